"""MaskFeat: Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al., CVPR 2022,
arXiv:2112.09133).
Official code: https://github.com/facebookresearch/SlowFast (read at 287ec00): projects/maskfeat, the image path of
slowfast/models/masked.py (MaskMViT with MVIT.PATCH_2D, i.e. a plain ViT), operators.py (HOGLayerC), head_helper.py
(MSSeparateHead), datasets/transform.py (MaskingGenerator), configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml.

Mask about 40% of the patches in BEiT-style rectangular blocks, replace their embeddings by a learned mask token, run
the ViT over all tokens (cls token and learned position embeddings included), and regress, from the last block
through a LayerNorm + Linear head, the Histograms of Oriented Gradients of the masked patches (Sec. 3). The HOG is
computed on the fly from the normalised image, per colour channel: Sobel gradients, 9 unsigned orientation bins with
hard assignment, sums of gradient magnitude over 8x8-pixel cells, L2 normalisation of each cell's histogram; a 16-px
patch owns 2x2 cells x 3 channels x 9 bins = 108 values. The loss is the mean squared error over masked tokens only.
The paper's point: the target, not the architecture, is the lever (among the targets it compares, HOG is the best
of the cheap ones and beats pixels).

Differences from the official code (each deliberate):
 1. Block masks are drawn by the data loader from each sample's numpy generator (see common.py), not from Python's
    `random`; the algorithm is SlowFast's MaskingGenerator: round(L * 0.4) patches, block areas drawn between
    num_mask // 5 and the budget left, aspect log-uniform in [0.3, 1/0.3], 10 tries per block, and it stops early
    when a block adds nothing, so about 30% of the 224-px masks get fewer than 78 (mean 77.6). Filling a block is a
    numpy slice instead of a Python double loop.
 2. HOG target as SlowFast's HOGLayerC, which has no Gaussian window (masked.py builds it with gaussian_window=0).
    The OpenMMLab port (mmpretrain / mmselfsup HOGGenerator) multiplies every gradient magnitude by a 16x16 Gaussian
    (std 8, tiled over the image) before binning, and predicts from the encoder's final LayerNorm through a Linear
    "neck" with no LayerNorm of its own; here the encoder has no final norm and the head has one, as in SlowFast.
 3. Small images keep the official structure at half scale: `--data shapes` uses 8-px patches with 4-px HOG cells,
    CIFAR 4-px patches with 2-px cells, so a patch always holds 2x2 cells and 108 values. `--hog_cell_size` follows
    the model's patch (half of it); another value is refused at start-up. The presets' lrs are ours: `shapes` blr
    1.5e-3 with 1 warmup epoch, CIFAR blr 1e-3 with 40 (official 2e-4 and 30).
 4. Schedule: lr = blr * effective batch / 256 with blr 2e-4 (SOLVER.BASE_LR 2e-4 at the config's TRAIN.BATCH_SIZE
    256 per shard, scaled by the number of shards; `--data imagenet` is the paper's 8 shards, 2048).
    WARMUP_START_LR = COSINE_END_LR = 1e-6 are scaled alike (defaults.py scales all three by NUM_SHARDS): --min_lr
    sets both (the config keeps them equal), by default 1e-6 * effective batch / 256, 8e-6 at the preset's 2048.
 5. bf16 autocast by default where supported, fine-tuning too (SlowFast pretrains and fine-tunes in fp32:
    TRAIN.MIXED_PRECISION False; --amp none).
    The HOG target and the loss are always computed in fp32.
 6. `--data imagenet` runs 1600 epochs, the length of the released checkpoints behind the README's 84.0; the PT config
    file says MAX_EPOCH 300 (pass --epochs 300 for it; the batch stays difference 4's 2048).
 7. Evaluation (SlowFast has no linear probe or kNN for MaskFeat): the encoder features are the mean of the last
    block's patch tokens after the prediction head's LayerNorm, the only norm pretraining trains on those tokens
    (SlowFast deletes the encoder's final norm; its fine-tuning mean-pools and adds a fresh `norm`). --no-global_pool
    takes the cls token through the same LayerNorm instead. kNN and probe as in common.py. An exported encoder
    (--export_encoder, timm names, as SlowFast releases it) lacks that LayerNorm: --eval_only of it reads the tokens
    through a fresh one (the start-up note counts pred_head among the missing), so its kNN and probe
    differ from the full checkpoint's; evaluate the checkpoint. It loads into timm with final_norm=False (no `norm`).
 8. Only the image path: one prediction depth (the last block, MASK.PRETRAIN_DEPTH [11] for ViT-B), no MViT pooling,
    no video, no pixel target.
 9. Fine-tuning is common.finetune with in1k_VIT_B_MaskFeat_FT's values (ViT-L: _L_FT's; other sizes, said at the
    start: ViT-B's): BASE_LR 2e-3 at batch 512 (1e-3 per 256; ViT-L 1e-3 at 256), layer decay 0.65 (0.75), warmup 20
    (5) epochs from WARMUP_START_LR 1e-8 to a half-cosine ending at 1e-6 (both scaled as the lr, and by each layer's
    decay, as SlowFast's set_lr), weight decay on pos_embed and cls_token too (ZERO_DECAY_POS_CLS False); mean pooling,
    `norm`, then `head` (SlowFast's `head.projection`, renamed on load), whose init is trunc-normal(2e-5) and bias 0
    here, trunc-normal(0.02) x 0.001 and bias 2e-5 there (the fresh `norm`'s bias: 0 here, 0.02 there). mmpretrain
    files load renamed (official_state); their 108 HOG outputs come in SlowFast's order (HOGGenerator._reshape unfolds
    as masked.py). The eval crop is MAE's, 0.875 up to 224 px and none at 64 px and below or above 224 (SlowFast:
    IN_VAL_CROP_RATIO 0.875 at every size).
10. With several processes the loss is divided by the masked count of the whole batch over all processes, not by
    each GPU's own (a block mask masks num_mask patches or fewer: at 14 x 14 and 40%, 29% of them fewer than 78), so
    N processes equal one; SlowFast's per-GPU mean weighs each patch of a GPU with fewer masked patches a little more.
    One process: the same loss either way. Under --accum_iter each micro-batch is divided by its own count (as each
    GPU's mean in SlowFast), so at an equal effective batch, runs with different process counts differ slightly.

State-dict keys equal SlowFast's for the ViT-B image model (patch_embed.proj, cls_token, pos_embed (1, 197, D),
blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, mask_token (1, 1, D), pred_head.transforms.0.0 (the
LayerNorm), pred_head.projections.0 (Linear D -> 108), and no `norm`): a released `*_PT_epoch_01600.pyth` loads its
`model_state` with strict=True once its two HOG buffers `hogs.0.weight_x/_y` (the fixed Sobel kernels) are dropped.
Its fine-tuned models add `norm` (after mean pooling) and `head.projection`.

Expected result (`python maskfeat.py`, built-in shapes, 32 px, ViT-Ti/8, batch 32, 10 epochs, 2-core AMD EPYC CPU, 4.3
minutes): kNN / linear-probe top-1 13.4 / 18.2 pretrained vs 12.2 / 15.7 at random init; with --seed 1 and 2 (other
draws of the data and the init; the code of 2026-11-28) 12.0 / 17.0 vs 11.2 / 14.9 and 12.3 / 16.6 vs 11.4 / 16.6. Small
gains, for a slow start: the loss reaches 0.080 in the first epoch and ends at 0.0798, close to predicting the dataset's
mean HOG for every masked patch (hog.png shows it), although the target is informative (common.knn_accuracy on the
flattened hog_target of the val and train images themselves: 66%). Most cells of a `shapes` image are background, whose
colour ramp the per-cell L2 normalisation turns into a full-strength histogram pointing the same way in every background
cell; on uncropped training images with block masks, the masked loss of the dataset's mean HOG is 0.084, of each image's
visible cells' mean histogram 0.064, but the ViT must first learn to compute orientations from pixels on the visible
tokens, which get no loss, only gradients through attention. Batch 32 for 10 epochs (3,120 steps) was the best setting
tried within 10 minutes: batch 128 for 8 epochs (624 steps, 3 minutes) gives 11.4 / 16.7, 11.7 / 15.3 and 12.2 / 15.9
(seeds 0, 1, 2) against the same random inits (mean gains +0.2 / +0.2, against +1.0 / +1.55 at batch 32), batch 16 for 6
epochs (3,750 steps, 6.4 minutes) 10.9 / 15.9 (seed 0). A sin-cos start for the position embedding, a 4-block ViT, 4-px
patches, fp32, no clipping and lr from /5 to x4 stayed on the plateau in runs of 300 to 1200 steps. Longer runs leave
it, late: 24 epochs at batch 128 (1,872 steps, 12 minutes) near step 1,200, ending at 0.071 and 12.4 / 17.7. Use this
run to check the program; MaskFeat's gains come with long schedules on natural images (on CIFAR-10 it beats random init
by 4 points, see the README).
"""
import math, re
from functools import partial, reduce

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import VisionTransformer

HOG_BINS = 9  # masked.py: self.nbins = 9, unsigned orientations of 20 degrees

# ---- arguments --------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='vit_base_patch16', input_size=224, crop_scale=0.5, batch_size=32, epochs=300, blr=2e-4,
                weight_decay=0.05, warmup_epochs=30, clip_grad=0.02, mask_ratio=0.4,
                global_pool=True, num_workers=8, probe_epochs=90, shapes_size=10000)
PRESETS = {  # flags given on the command line win over these
    'shapes': dict(model='vit_tiny_patch8', input_size=32, batch_size=32, epochs=10,
                   warmup_epochs=1, blr=1.5e-3, num_workers=0, probe_epochs=30),  # batch 32: see the docstring
    'cifar10': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800,
                    warmup_epochs=40, blr=1e-3, num_workers=4),
    'cifar100': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800,
                     warmup_epochs=40, blr=1e-3, num_workers=4),
    'imagenet': dict(model='vit_base_patch16', epochs=1600, target_batch=2048),  # in1k_VIT_B_MaskFeat_PT x 8 shards
}
FINETUNE_ROWS = {  # in1k_VIT_{B,L}_MaskFeat_FT (common.FINETUNE: the rest); config_batch: the batch its lrs are for
    'base': dict(ft_blr=1e-3, layer_decay=0.65, ft_warmup_epochs=20, ft_config_batch=512),
    'large': dict(ft_blr=1e-3, layer_decay=0.75, ft_warmup_epochs=5, ft_config_batch=256)}


def recipe(model, data, input_size):  # HOG cells of half the patch (difference 3); the encoder size's fine-tuning row
    row = {**FINETUNE_ROWS['large' if 'large' in model else 'base'], 'hog_cell_size': int(patch[1]) // 2} if (
        patch := re.search(r'_patch(\d+)$', model)) else FINETUNE_ROWS['base']  # (another --model is refused later)
    return {**row, 'ft_batch': row['ft_config_batch']} if data == 'imagenet' else row


def get_args_parser():
    parser = common.get_args_parser('MaskFeat pretraining, then kNN / linear-probe evaluation',
                                    min_lr='also the warmup start; unset: 1e-6 x effective batch / 256 (difference 4)')
    parser.add_argument('--mask_ratio', type=float, help='fraction of patches to mask in blocks (AUG.MASK_RATIO)')
    parser.add_argument('--hog_cell_size', type=common.COUNT, help='HOG cell side in pixels, half the patch size')
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = common.parse_args(parser, 'maskfeat', DEFAULTS, PRESETS, argv, recipe)
    patch = common.vit_config(args.model)['patch_size']
    if patch != 2 * args.hog_cell_size:  # 2x2 cells per patch: the 108-value layout of the official head
        parser.error(f'--hog_cell_size {args.hog_cell_size} must be half the patch size {patch} of {args.model} '
                     f'(use --hog_cell_size {patch // 2})' if patch % 2 == 0 else f'{args.model} has patches of '
                     f'{patch} px: MaskFeat needs an even patch size, 2x2 HOG cells per patch (e.g. _patch{patch + 1})')
    L = (args.input_size // patch) ** 2
    common.check_mask_count(parser, args.mask_ratio, L - round(L * args.mask_ratio), L)
    args.min_lr = 1e-6 * args.eff_batch_size / 256 if args.min_lr is None else args.min_lr  # difference 4
    if args.finetune_epochs and common.VIT_NAME.fullmatch(args.model)[1] not in FINETUNE_ROWS and args.rank == 0:
        print(f"note: SlowFast fine-tunes MaskFeat ViT-B and ViT-L only: {args.model} fine-tunes with ViT-B's row "
              '(ft_blr 1e-3, layer_decay 0.65, ft_warmup_epochs 20, each unless given)')
    return args


# ---- masking ----------------------------------------------------------------------------------------------------
def add_block(mask, rng, min_patches, max_patches, log_aspect):
    """One rectangle of the BEiT block masking (transform.py MaskingGenerator._mask): up to 10 tries to place a block
    of random area and aspect that masks between 1 and max_patches new patches. mask (h, w) is edited in place;
    returns the number of patches it newly masked (0: every try failed)."""
    height, width = mask.shape
    for _ in range(10):
        area = min_patches + (max_patches - min_patches) * rng.random()  # random.uniform(min, max), as in BEiT
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < height and w < width:  # strict: a block never spans the whole grid (official condition)
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            block = mask[top:top + h, left:left + w]  # a view: filling it edits mask
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:  # overlap allowed, but no more new patches than the budget left
                block[...] = 1
                return new
    return 0


def block_masking(grid, num_mask, rng, min_aspect=0.3):
    """Block-wise masking (BEiT Alg. 1; SlowFast imagenet.py: num_mask = round(L * ratio), min block num_mask // 5,
    no maximum beyond the budget left). Adds blocks until num_mask patches are masked or a block adds nothing, so the
    count is num_mask or fewer (at 14 x 14 and 40%: 78 for 71% of the masks, 77.6 on average). Drawn in the data
    loader (difference 1). -> (L,) float32, 1 = masked, row-major over the grid like the patch tokens."""
    mask = np.zeros((grid, grid), np.float32)
    log_aspect, count = (math.log(min_aspect), math.log(1 / min_aspect)), 0
    while count < num_mask:
        added = add_block(mask, rng, num_mask // 5, num_mask - count, log_aspect)
        if added == 0:
            break
        count += added
    return mask.reshape(-1)


# ---- target -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def hog(imgs, cell_size=8, nbins=HOG_BINS):
    """Histograms of Oriented Gradients as SlowFast's HOGLayerC (Sec. 3, "HOG"), on the normalised image.
    (B, 3, H, W) -> (B, 3, nbins, H / cell, W / cell), every (channel, cell) histogram of unit L2 norm (or zero)."""
    with torch.autocast(imgs.device.type, enabled=False):  # the target is fp32 even inside a bf16 step
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode='reflect')  # edge pixels see their mirror: no gradient across
        # Sobel kernel for gx, [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (cross-correlation); gy uses its transpose
        sobel = torch.outer(common.on_device((1.0, 2.0, 1.0), x.device), common.on_device((1.0, 0.0, -1.0), x.device))
        gx = F.conv2d(x, sobel.repeat(3, 1, 1, 1), groups=3)  # (B, 3, H, W), each colour channel alone
        gy = F.conv2d(x, sobel.T.repeat(3, 1, 1, 1), groups=3)
        magnitude = torch.linalg.vector_norm(torch.stack([gx, gy], dim=-1), dim=-1)  # (B, 3, H, W)
        # atan2(gx, gy), in this argument order, scaled to [-nbins, nbins]; floor and wrap modulo nbins: unsigned bins
        # of 180/nbins degrees, hard assignment (no interpolation between bins or cells), exactly as the official code
        bins = torch.floor(torch.atan2(gx, gy) / math.pi * nbins).long() % nbins
        B, C, H, W = magnitude.shape
        votes = magnitude.new_zeros(B, C, nbins, H, W).scatter_(2, bins[:, :, None], magnitude[:, :, None])
        k = cell_size
        cells = votes.reshape(B, C, nbins, H // k, k, W // k, k).transpose(4, 5)  # (B, 3, nbins, H/k, W/k, k, k)
        histograms = cells.sum(dim=(-1, -2))  # magnitude summed per (bin, cell)
        return F.normalize(histograms, p=2, dim=2, eps=1e-12)  # per-cell L2 norm ("local contrast normalisation")


def hog_per_patch(histograms, cells_per_patch):
    """(B, 3, nbins, H/k, W/k) -> (B, L, 3 * nbins * c * c) with c = cells_per_patch, in SlowFast's order
    (masked.py _get_hog_label_2d): value index ((channel * nbins + bin) * c + cell_row) * c + cell_col."""
    B, C, N, Hc, Wc = histograms.shape
    c = cells_per_patch
    x = histograms.reshape(B, C * N, Hc // c, c, Wc // c, c).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, 3*nbins, c, c)
    return x.reshape(B, (Hc // c) * (Wc // c), C * N * c * c)


def patch_to_cells(x, cells_per_patch, grid, nbins=HOG_BINS):
    """The inverse of hog_per_patch: (B, L, 3 * nbins * c * c) -> (B, 3, nbins, grid * c, grid * c)."""
    c = cells_per_patch
    x = x.reshape(x.shape[0], grid, grid, 3, nbins, c, c).permute(0, 3, 4, 1, 5, 2, 6)  # (B, 3, nbins, h, c, w, c)
    return x.reshape(x.shape[0], 3, nbins, grid * c, grid * c)


def hog_target(imgs, patch_size, cell_size):
    """(B, 3, H, W) normalised -> (B, L, Q) HOG features per patch, Q = 3 * 9 * (p / cell)^2 = 108 for 16-px patches."""
    return hog_per_patch(hog(imgs, cell_size), patch_size // cell_size)


# ---- model ------------------------------------------------------------------------------------------------------
class PredictionHead(nn.Module):
    """SlowFast's MSSeparateHead with one depth and decoder depth 0: LayerNorm then Linear to the HOG dimension.
    The nesting (transforms[0] a Sequential holding the norm, projections[0] the Linear) reproduces its keys."""
    def __init__(self, dim, out_dim):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim, eps=1e-6))])
        self.projections = nn.ModuleList([nn.Linear(dim, out_dim)])

    def forward(self, x):  # (B, N, D) -> (B, N, Q)
        return self.projections[0](self.transforms[0](x))


class MaskFeat(VisionTransformer):
    """The ViT encoder (inherited, official keys) with a learned mask token and the HOG prediction head."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 hog_cell_size=8, global_pool=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, True, global_pool=global_pool)
        if patch_size != 2 * hog_cell_size:
            raise ValueError(f'hog_cell_size {hog_cell_size} must be half the patch size {patch_size}')
        self.norm = nn.Identity()  # masked.py: `del self.norm` at pretraining; the head brings its own LayerNorm
        dim, self.hog_cell_size = embed_dim, hog_cell_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pred_head = PredictionHead(dim, 3 * HOG_BINS * (self.patch_size // hog_cell_size) ** 2)
        self.initialize_weights()

    def initialize_weights(self):
        """SlowFast's init, quirks included. Encoder (MViT._init_weights): Linear and patch-embed Conv weights
        trunc-normal(0.02) (cut at +-2, so effectively normal), Linear biases and LayerNorm biases 0.02 (not 0),
        LayerNorm weights 1, the conv bias left at PyTorch's default; pos_embed, cls_token, mask_token
        trunc-normal(0.02). Head (MSSeparateHead._init_weights): trunc-normal(0.02) weight, zero biases."""
        for p in (self.pos_embed, self.cls_token, self.mask_token, self.patch_embed.proj.weight):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.02)
        nn.init.trunc_normal_(self.pred_head.projections[0].weight, std=0.02)
        nn.init.zeros_(self.pred_head.projections[0].bias)
        nn.init.ones_(self.pred_head.transforms[0][0].weight)
        nn.init.zeros_(self.pred_head.transforms[0][0].bias)

    def forward_encoder(self, imgs, mask):
        """(B, 3, H, W), mask (B, L) -> the last block's output (B, 1 + L, D). The encoder sees every token; a masked
        patch's embedding is replaced by the mask token before the position embedding is added (Sec. 3)."""
        x = self.patch_embed(imgs)  # (B, L, D)
        mask = mask.to(x.dtype)[..., None]  # (B, L, 1)
        x = x * (1 - mask) + self.mask_token * mask  # masked.py: x * (1 - m) + mask_token * m
        return self.forward_tokens(x + self.pos_embed[:, 1:])  # cls prepended, all blocks, no final norm (Identity)

    def forward_head(self, latent):
        """latent (B, 1 + L, D) -> predicted HOG (B, L, Q) for every patch; the loss keeps the masked ones."""
        return self.pred_head(latent)[:, 1:]  # cls dropped, as MSSeparateHead does

    # ---- loss ---------------------------------------------------------------------------------------------------
    def forward_loss(self, pred, target, mask):
        """MSE over masked tokens only (Sec. 3; the "multi_mse" loss with one term of weight 1): the squared error
        averaged over the Q values of each masked token, then over the masked tokens of the whole batch."""
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L), per token
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask):
        """imgs (B, 3, H, W) normalised, mask (B, L) with 1 = masked -> loss, pred (B, L, Q), target (B, L, Q)."""
        pred = self.forward_head(self.forward_encoder(imgs, mask))
        target = hog_target(imgs, self.patch_size, self.hog_cell_size)  # on the uncorrupted input, no gradient
        return self.forward_loss(pred.float(), target, mask.float()), pred, target

    def features(self, imgs):
        """(B, 3, H, W) -> (B, D): the last block's tokens through the head's LayerNorm, then the mean of the patch
        tokens, or the cls token when global_pool is off (difference 7)."""
        x = self.pred_head.transforms[0](self.forward_tokens(self.patch_embed(imgs) + self.pos_embed[:, 1:]))
        return x[:, 1:].mean(1) if self.global_pool else x[:, 0]


def build_model(args):  # --model vit_base_patch16 -> MaskFeat(patch_size=16, embed_dim=768, depth=12, ...)
    return MaskFeat(args.input_size, **common.vit_config(args.model), hog_cell_size=args.hog_cell_size,
                    global_pool=args.global_pool)


def warmup_cosine(optimizer, epoch, args, start, end):
    """SlowFast's lr_policy with COSINE_AFTER_WARMUP, per iteration: linear from `start` (WARMUP_START_LR) to lr over
    the warmup, then a half-cosine to `end` (COSINE_END_LR); set_lr scales the whole value by each layer's decay."""
    if epoch < args.warmup_epochs:
        lr = start + (args.lr - start) * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
        lr = end + (args.lr - end) * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr


def finetune_schedule(optimizer, epoch, args):  # the FT config's 1e-8 and 1e-6 at its batch, scaled as its lr
    shards = args.batch_size * args.accum_iter * args.world_size / args.ft_config_batch
    return warmup_cosine(optimizer, epoch, args, 1e-8 * shards, 1e-6 * shards)


# ---- pictures ---------------------------------------------------------------------------------------------------
def hog_glyphs(histograms, glyph=16):
    """(B, 3, nbins, h, w) histograms -> (B, 3, h * glyph, w * glyph) picture in [0, 1]: in every cell one line per
    bin, drawn along the edge (perpendicular to the bin's gradient direction), as bright as the bin's value averaged
    over R, G, B. Bin b holds atan2(gx, gy) in [b, b+1) * pi / nbins: the gradient (d/dx, d/dy) lies along
    -(sin t, cos t) in image coordinates (y down; the Sobel kernel gives minus the derivative, the bins are unsigned),
    so a vertical edge falls in bin 4 and a horizontal one in bin 0."""
    nbins = histograms.shape[2]
    centre = torch.arange(glyph, dtype=torch.float32) - (glyph - 1) / 2
    y, x = torch.meshgrid(centre, centre, indexing='ij')  # (g, g) pixel offsets from the cell centre
    theta = ((torch.arange(nbins) + 0.5) * math.pi / nbins)[:, None, None]  # bin centres
    across, along = x * theta.sin() + y * theta.cos(), x * theta.cos() - y * theta.sin()  # (nbins, g, g)
    stencil = (1 - across.abs()).clamp(min=0) * (along.abs() <= glyph / 2 - 1)  # anti-aliased 1-px lines
    values = histograms.float().mean(1).clamp(0, 1).cpu()  # (B, nbins, h, w)
    B, _, h, w = values.shape
    image = torch.einsum('bnij,nuv->biujv', values, stencil).reshape(B, 1, h * glyph, w * glyph)
    return image.clamp(0, 1).expand(-1, 3, -1, -1)


@torch.no_grad()
def draw_hog(model, images, args, path, glyph=16):
    """Rows of original | HOG of the original | predicted HOG at the masked patches, the visible patches showing the
    input pixels at half brightness. A cell is `glyph` pixels wide, the images are enlarged to match."""
    model.eval()
    images, count = common.normalize(images), len(images)  # (B, 3, H, W) uint8 -> normalised
    num_mask = round(model.num_patches * args.mask_ratio)
    mask = torch.from_numpy(np.stack([block_masking(model.grid_size, num_mask, np.random.default_rng(i))
                                      for i in range(count)])).to(args.device)  # (B, L)
    _, pred, target = model(images, mask)
    cells, grid = model.patch_size // model.hog_cell_size, model.grid_size
    side = grid * cells * glyph  # picture side
    original = F.interpolate(common.denormalize(images), size=(side, side), mode='nearest').cpu()
    truth = hog_glyphs(patch_to_cells(target, cells, grid), glyph)
    predicted = hog_glyphs(patch_to_cells(pred.float() * mask[..., None], cells, grid), glyph)
    pixel_mask = F.interpolate(mask.reshape(-1, 1, grid, grid).float(), size=(side, side)).cpu()  # (B, 1, side, side)
    predicted = predicted * pixel_mask + 0.5 * original * (1 - pixel_mask)
    common.save_picture([original, truth, predicted], path)


MMPRETRAIN_NAMES = [(r'^backbone\.', ''), (r'^patch_embed\.projection', 'patch_embed.proj'), (r'^layers\.', 'blocks.'),
                    (r'\.ln([12])\.', r'.norm\1.'), (r'ffn\.layers\.0\.0', 'mlp.fc1'), (r'ffn\.layers\.1', 'mlp.fc2'),
                    (r'^ln1\.', 'pred_head.transforms.0.0.'), (r'^neck\.fc\.', 'pred_head.projections.0.')]


def official_state(checkpoint):
    """Ours {'model'}, SlowFast's .pyth {'model_state'} (its HOG buffers `hogs.*` dropped; a fine-tuned model's
    `head.projection` is our `head`) or mmpretrain's {'state_dict'} (`backbone.layers.i.ln1`...) -> our names."""
    if 'model_state' in checkpoint:
        return {k.replace('head.projection.', 'head.'): v for k, v in checkpoint['model_state'].items()
                if not k.startswith('hogs.')}
    if 'state_dict' in checkpoint:
        return {reduce(lambda k, rule: re.sub(*rule, k), MMPRETRAIN_NAMES, k): v
                for k, v in checkpoint['state_dict'].items()}
    return checkpoint.get('model', checkpoint)  # ours, or a bare state dict (as --export_encoder writes)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    model = build_model(args).to(args.device)
    num_mask = round(model.num_patches * args.mask_ratio)  # imagenet.py: round(14 * 14 * 0.4) = 78
    # in1k_VIT_B_MaskFeat_PT: crop scale (0.5, 1), ratio (0.75, 1.3333), flip, and no colour augmentation
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0), ratio=(0.75, 1.3333))
    train_set, eval_sets = common.build_datasets(args, crop, partial(block_masking, model.grid_size, num_mask))
    # SOLVER.BETAS default (0.9, 0.999); no decay on 1-D params and biases, but cls/pos/mask tokens decay
    optimizer = common.adamw(model, args, betas=(0.9, 0.999))  # (ZERO_WD_1D_PARAM True, ZERO_DECAY_POS_CLS False)
    step = common.step_settings(args)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, not args.eval_only)
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, step['scaler'], official_state)

    def loss_fn(model, images, labels, mask):  # one step of the objective, inside autocast
        loss, _, _ = model(common.normalize(images), mask.float())
        return common.mean_over_processes(loss, mask.sum()), {}  # difference 10: the whole batch's masked count

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        stats = common.train_one_epoch(ddp_model, loss_fn, loader, optimizer, epoch,
                                       schedule=partial(warmup_cosine, args=args, start=args.min_lr, end=args.min_lr),
                                       **step)
        common.log_stats(args, {'epoch': epoch, **stats})
        common.save_checkpoint(args, epoch, model, optimizer, step['scaler'])

    common.evaluate(args, model, partial(build_model, args), eval_sets)
    if common.is_main():
        draw_hog(model, common.picture_images(args, train_set, eval_sets), args, f'{args.output_dir}/hog.png')
        print(f'wrote {args.output_dir}/hog.png and log.txt')
    encoder = common.vit_encoder_state(model.state_dict())  # no `norm`: SlowFast deletes it at pretraining
    common.export_encoder(args, encoder)
    classifier = partial(common.ViTClassifier, img_size=args.input_size, **common.vit_config(args.model),
                         drop_path=args.ft_drop_path, pool_norm='norm')  # SlowFast: mean of the patch tokens, `norm`
    common.finetune(args, classifier, encoder, eval_sets, schedule=finetune_schedule, no_decay_names=())


if __name__ == '__main__':
    main()
