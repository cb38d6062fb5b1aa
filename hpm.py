"""HPM: Hard Patches Mining for Masked Image Modeling (Wang et al., CVPR 2023, arXiv:2304.05919), and its
extension "Bootstrap Masked Visual Modeling via Hard Patches Mining" (arXiv:2312.13714).
Official code: https://github.com/Haochen-Wang409/HPM (read at c15ae90; models_mae_learn_loss.py, engine_pretrain.py).

MAE, plus a model that learns where it will fail and masks those patches (Sec. 3). A second decoder, the loss
predictor, reads the same latent tokens as the pixel decoder and predicts each masked patch's reconstruction loss. It
is trained with a relative objective (Sec. 3.2, Eq. 5): for every pair of masked patches of an image, it should rank
them as their true (detached) reconstruction errors rank them. An EMA copy of the model, the teacher, predicts the
losses of all patches on the unmasked image; the alpha_t * N_masked patches it finds hardest are masked, the rest of
the mask is random. alpha_t = 0.5 * (epoch + 1) / epochs (epoch counted from 0, as the official generate_mask)
grows linearly over training, so masking goes from easy to hard (Sec. 3.3).

Relative loss, with y = detached reconstruction errors and s = predicted losses of the masked patches i, j of each
image b, summed over the batch and divided by the batch's count of untied pairs (as the official code):
  L_rank = sum_{b,i,j: y_i != y_j} ( -[y_j > y_i] log(sigmoid(s_j - s_i) + 1e-6)
                                     -[y_j < y_i] log(1 - sigmoid(s_j - s_i) + 1e-6) ) / #{b, i, j: y_i != y_j}
  (pairs with equal errors, ties, are left out; as in the official code, a batch whose errors are all equal within
  each image would divide by zero, which continuous errors never give)
The total loss is the reconstruction loss + L_rank (weight 1).

Differences from the official code (each deliberate):
 1. As in mae.py, the random part of each mask comes from per-sample noise drawn by the data loader; the official code
    shuffles the non-hard patches with a per-sample Python/numpy loop. Same distribution, batched on the device.
 2. The encoder sees its visible tokens in random order and the decoder unshuffles them (MAE's code); the official
    HPM code keeps index order and puts mask tokens last. Attention is permutation-equivariant, so every output is
    the same up to rounding. The pair loss runs over all (L, L) pairs, weighted to the masked ones: the same sum.
 3. The teacher runs only the encoder and the loss predictor (the official EMA model also runs the unused pixel
    decoder), and is made after DDP has synchronised the student, so every rank's teacher starts equal.
 4. Teacher decay as engine_pretrain.py sets it, per epoch: 0.999 + epoch / 100 * (0.9999 - 0.999) for the first
    100 epochs, then 0.9999, whatever --epochs (`--ema_decay 0.999 0.9999 --ema_ramp_epochs 100`). The `shapes`
    preset sets a faster teacher, 0.84 -> 0.984 over 2.5 epochs (its whole run is 780 steps, where the official
    constants would leave the teacher near its random initialisation); it prints the values in its settings line.
    That preset also turns norm-pix on (the official scripts use plain pixels) and evaluates the mean of the patch
    tokens (the official kNN and probe read the cls token), as mae.py's does (its difference 7: blr 1.5e-3, 10x, and
    the small decoder, as here).
 5. bf16 autocast by default where supported (official: fp16); the loss predictor's P outputs are averaged in fp32,
    as bf16 ties up to a sixth of a 224-px image's predicted losses, which the hard-patch ranking breaks by index.
    The relative loss is in fp32 too (under the official fp16 autocast, 1 - sigmoid(s_j - s_i) is 0 above about 8).
    kNN and linear probe as in mae.py (not scripts/linprob.sh: SGD on augmented images, blr 1e-3, batch 2048, 100
    epochs, 10 warmup; main_linprob.py's LARS is commented out).
 6. Fine-tuning is common.finetune with scripts/finetune_base.sh's values (layer decay 0.8, blr 5e-4, batch 384;
    finetune_large.sh's batch 512 for ViT-L); --teacher evaluates, fine-tunes and exports the EMA teacher instead of
    the student (main_finetune.py --teacher). The teacher's EMA covers every float tensor of the state dict, as timm's
    ModelEma, updated after each optimizer step (not on accumulation-only iterations), as engine_pretrain.py. The
    eval crop is mae.py's (difference 7: no 224/256 margin at 64 px and below).
 7. Resume continues at the epoch after the last one saved; the official checkpoint stores epoch + 1 and
    misc.load_model adds 1 again, so an official resume skips an epoch.
 8. Only the paper's configuration is built (--learning_loss --relative, pixel targets, random + hard masks): the
    official code's MSE loss predictor (no --relative), --learn_feature_loss (CLIP / DINO targets), --vis_mask_ratio
    and --mask_regular / --mask_block are not implemented.

Expected result (`python hpm.py`, built-in shapes, 32 px, ViT-Ti/4, 5 epochs, 2-core AMD EPYC CPU; kNN / linear-probe
top-1): 16.8 / 27.1 pretrained vs 10.7 / 15.8 at random init, 4.8 minutes (README table; gradient clipping at 5).
"""
import argparse, copy, sys
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import Block, VisionTransformer, patchify, unpatchify

# ---- arguments --------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='vit_base_patch16', input_size=224, crop_scale=0.2, batch_size=64, epochs=400, blr=1.5e-4,
                min_lr=0.0, weight_decay=0.05, warmup_epochs=40, mask_ratio=0.75, norm_pix_loss=False,
                decoder_embed_dim=512, decoder_depth=8, num_workers=8, probe_epochs=90, shapes_size=10000,
                decoder_num_heads=16, alpha_final=0.5, ema_decay=(0.999, 0.9999), ema_ramp_epochs=100,  # engine_
                # pretrain.py; the official scripts do not pass --norm_pix_loss: plain pixels
                clip_grad=5.0,  # util/misc.py's loss scaler clips at 5 unless told otherwise (MAE's: no clipping)
                ft_blr=5e-4, layer_decay=0.8)  # scripts/finetune_base.sh and _large.sh (common.FINETUNE: the rest)
PRESETS = {  # flags given on the command line win over these
    'shapes': dict(model='vit_tiny_patch4', input_size=32, batch_size=64, epochs=5, warmup_epochs=1, blr=1.5e-3,
                   decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, num_workers=0, probe_epochs=30,
                   global_pool=True,
                   norm_pix_loss=True, ema_decay=(0.84, 0.984), ema_ramp_epochs=2.5),  # difference 4
    'cifar10': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'cifar100': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'imagenet': dict(model='vit_base_patch16', epochs=200, target_batch=2048),  # PRETRAIN.md: 8 GPUs x 32 x 8
}


def recipe(model, data, input_size):  # finetune_base.sh: 8 GPUs x 48, finetune_large.sh: 8 x 64 (same lr etc.)
    return {'ft_batch': 512 if 'large' in model else 384} if data == 'imagenet' else {}


def get_args_parser():
    parser = common.get_args_parser('HPM pretraining, then kNN / linear-probe evaluation')
    parser.add_argument('--mask_ratio', type=float, help='fraction of patches removed')
    parser.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction,
                        help='per-patch normalised pixel target')
    parser.add_argument('--decoder_embed_dim', type=common.COUNT, help='decoder width')
    parser.add_argument('--decoder_depth', type=common.NATURAL, help='decoder blocks, of each of the two decoders')
    parser.add_argument('--decoder_num_heads', type=common.COUNT, help='decoder attention heads')
    parser.add_argument('--alpha_final', type=common.FRACTION,
                        help='alpha_T: the fraction of masked patches chosen as the hardest at the end of training')
    parser.add_argument('--ema_decay', type=common.BELOW_ONE, nargs=2, metavar=('START', 'END'),
                        help='teacher EMA decay at epoch 0 and at the end of the ramp')
    parser.add_argument('--ema_ramp_epochs', type=common.AMOUNT, help='epochs of the linear ramp from START to END')
    parser.add_argument('--teacher', action='store_true', help='evaluate / fine-tune / export the EMA teacher')
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = common.parse_args(parser, 'hpm', DEFAULTS, PRESETS, argv, recipe, pretraining='ema_decay ema_ramp_epochs')
    L = (args.input_size // common.vit_config(args.model)['patch_size']) ** 2
    common.check_mask_count(parser, args.mask_ratio, int(L * (1 - args.mask_ratio)), L)
    if args.decoder_embed_dim % args.decoder_num_heads:  # else the model's constructor stops with a traceback
        parser.error(f'--decoder_embed_dim {args.decoder_embed_dim} does not split into --decoder_num_heads '
                     f'{args.decoder_num_heads} heads')
    if args.ema_ramp_epochs == 0:  # (--ema_decay's values: each in [0, 1), by its type)
        parser.error('--ema_ramp_epochs must be positive, got 0')
    if args.teacher and not (args.knn_k or args.probe_epochs or args.finetune_epochs or args.export_encoder or
                             args.eval_only and args.resume):  # (then it picks the weights loaded, the picture's too)
        parser.error('--teacher would do nothing here: it picks what the kNN, the probe, the fine-tune and '
                     '--export_encoder read, and the weights --eval_only --resume FILE loads; all are off')
    if args.teacher and args.eval_only and not args.resume:  # (the teacher would be a copy of the random init)
        parser.error('--teacher with --eval_only takes --resume FILE: the checkpoint whose EMA teacher to read')
    if args.finetune_epochs and common.VIT_NAME.fullmatch(args.model)[1] not in ('base', 'large') and args.rank == 0:
        print(f'note: HPM has fine-tuning scripts for ViT-B and ViT-L only (equal but for the batch): {args.model} '
              'fine-tunes with their values (ft_blr 5e-4, layer_decay 0.8, each unless given)')
    if args.data == 'imagenet' and args.epochs != 200 and args.rank == 0:  # the batch is PRETRAIN.md's 200 epochs'
        print(f"note: --epochs {args.epochs} at PRETRAIN.md's 200-epoch batch of {args.eff_batch_size}; the official "
              f"800-epoch script (pretrain_base.sh) trains at 256: 8 processes x --batch_size 32 x --accum_iter 1")
    return args


# ---- masking ----------------------------------------------------------------------------------------------------
def mask_noise(num_patches, rng):
    """Per-sample mask noise (L,), drawn in the data loader (difference 1): the argsort of it is the random mask."""
    return rng.random(num_patches, dtype=np.float32)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by argsort of uniform noise (Sec. 3, "random sampling").
    x: (B, L, D) -> kept tokens (B, K, D) with K = int(L * (1 - mask_ratio)), mask (B, L) with 1 = masked,
    ids_restore (B, L), the permutation that undoes the shuffle."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def hard_count(num_patches, mask_ratio, alpha):
    """Sec. 3.3: k = int(alpha * N_masked) of the masked patches are the hardest (a whole number, so that a compiled
    step does not recompile for each epoch's alpha_t; it marks k dynamic instead)."""
    return int((num_patches - int(num_patches * (1 - mask_ratio))) * alpha)


def hard_patches_order(predicted_loss, noise, k):
    """Mask the k patches with the highest predicted loss, and fill the rest of the mask at random. Returns a score
    (B, L) whose argsort is that order: random visible first, then random masked, then the k hardest;
    random_masking(x, mask_ratio, score) applies it. k = 0 gives MAE's random mask. Ranks, not topk(k), so that no
    shape depends on k (ties, which the official argsort breaks as it may, go to the lower index).
    Passing a fixed 0/1 mask as the score reproduces that mask (its zeros sort first)."""
    hardness = predicted_loss.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (B, L): 0 for the hardest
    return torch.where(hardness < k, 2.0, noise)  # noise is in [0, 1): the hardest sort last, into the masked part


# ---- target -----------------------------------------------------------------------------------------------------
def pixel_target(imgs, patch_size, norm_pix_loss):
    """(B, 3, H, W) -> (B, L, P) patch pixels; with norm_pix_loss each patch is standardised by its own mean and
    unbiased variance (Sec. 3, "reconstruction target"; Tab. 1d)."""
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


# ---- model ------------------------------------------------------------------------------------------------------
class HPM(VisionTransformer):
    """MAE (encoder keys inherited from the ViT, MAE's pixel decoder) plus the loss-predictor decoder, with the
    official state-dict names and constructor (models_mae_learn_loss.py; defaults ViT-L/16's)."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False, global_pool=False):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, global_pool=global_pool)
        p = patch_size
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(decoder_embed_dim, self.grid_size)[None],
                                              requires_grad=False)  # fixed sin-cos, like the encoder's
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, p * p * 3)  # decoder to patch pixels
        # the loss predictor: a decoder of the same shape, whose P outputs per patch are averaged to one loss
        self.decoder_blocks_losspred = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                                      for _ in range(decoder_depth)])
        self.decoder_norm_losspred = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred_losspred = nn.Linear(decoder_embed_dim, p * p * 3)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        """The official init: patch_embed like a Linear (Xavier on its (D, P) view), Xavier-uniform Linears with zero
        bias, LayerNorm 1/0, cls and mask tokens normal(0.02) (timm's trunc_normal with cut-off 2 is effectively
        normal). The sin-cos tables are set in the constructors and frozen."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """(B, 3, H, W) -> latent (B, 1 + K, D), mask (B, L), ids_restore (B, L): the encoder sees visible patches."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, L, D), position added before masking
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        return self.forward_tokens(x), mask, ids_restore  # cls prepended, blocks, final norm

    def forward_decoder(self, latent, ids_restore):
        """latent (B, 1 + K, D) -> predicted pixels (B, L, P) and predicted losses (B, L) for every patch."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # one per removed patch
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order, without cls
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        return self.reconstruct(x), self.predict_loss(x)

    def reconstruct(self, x):  # decoder input (B, 1 + L, Dd) -> pixels (B, L, P)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def predict_loss(self, x):  # decoder input (B, 1 + L, Dd) -> predicted loss (B, L), the mean of P outputs
        for block in self.decoder_blocks_losspred:
            x = block(x)
        out = self.decoder_pred_losspred(self.decoder_norm_losspred(x))[:, 1:]  # (B, L, P)
        return out.float().mean(dim=-1)  # in fp32: a bf16 mean would tie often in hard_patches_order's ranking

    @torch.no_grad()
    def teacher_losses(self, imgs):
        """The teacher's view (Sec. 3.3): predicted losses (B, L) on the full, unmasked image."""
        B, L = imgs.shape[0], self.num_patches
        latent, _, ids_restore = self.forward_encoder(imgs, 0.0, torch.arange(L, device=imgs.device).expand(B, -1))
        x = self.decoder_embed(latent)  # (B, 1 + L, Dd): every patch visible, so no mask tokens
        return self.predict_loss(x + self.decoder_pos_embed)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over masked patches only (Sec. 3): visible patches do not count."""
        target = pixel_target(imgs, self.patch_size, self.norm_pix_loss)  # (B, L, P)
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L), per patch
        return (loss * mask).sum() / mask.sum(), loss  # masked patches only; and the per-patch errors

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> (reconstruction loss, relative loss), predicted pixels (B, L, P), mask (B, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred, predicted_loss = self.forward_decoder(latent, ids_restore)
        loss, errors = self.forward_loss(imgs, pred.float(), mask)
        return (loss, relative_loss(predicted_loss.float(), errors.detach(), mask)), pred, mask


def relative_loss(predicted, errors, mask):
    """Eq. 5, the pairwise ranking loss over the masked patches of each image (formula in the module docstring).
    predicted, errors, mask: (B, L); errors are detached, so only the loss predictor learns from it."""
    pair = mask[:, :, None] * mask[:, None, :]  # (B, L, L): both i and j masked
    above = (errors[:, None, :] > errors[:, :, None]) * pair  # [i, j] = 1 where y_j > y_i
    below = (errors[:, None, :] < errors[:, :, None]) * pair
    logit = predicted[:, None, :] - predicted[:, :, None]  # [i, j] = s_j - s_i
    loss = -above * torch.log(torch.sigmoid(logit) + 1e-6) - below * torch.log(1 - torch.sigmoid(logit) + 1e-6)
    return loss.sum() / (above + below).sum()  # ties (y_i == y_j) count in neither


# ---- teacher ----------------------------------------------------------------------------------------------------
def teacher_decay(epoch, start=0.999, end=0.9999, ramp_epochs=100):
    """engine_pretrain.py: the EMA decay of this (integer) epoch, start + epoch / ramp_epochs * (end - start) during
    the ramp, then end; in epochs, whatever the run's length (difference 4 for the shapes preset's values)."""
    return start + min(epoch / ramp_epochs, 1.0) * (end - start)


def build_model(args):  # --model vit_base_patch16 -> HPM(patch_size=16, embed_dim=768, depth=12, num_heads=12, ...)
    return HPM(args.input_size, **common.vit_config(args.model), decoder_embed_dim=args.decoder_embed_dim,
               decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
               norm_pix_loss=args.norm_pix_loss, global_pool=args.global_pool)


@torch.no_grad()
def draw_reconstructions(model, teacher, images, args, path):
    """Rows of original | the teacher's predicted losses (hot = hard) | input under the hard-patches mask at
    alpha_T | reconstruction | reconstruction with the visible patches pasted back."""
    model.eval()
    images, count = common.normalize(images), len(images)  # (B, 3, H, W) uint8 -> normalised
    noise = torch.rand(count, model.num_patches, generator=torch.Generator().manual_seed(0)).to(args.device)
    predicted = teacher.teacher_losses(images)  # (B, L)
    k = hard_count(model.num_patches, args.mask_ratio, args.alpha_final)
    (_, _), pred, mask = model(images, args.mask_ratio, hard_patches_order(predicted, noise, k))
    target, p, h = patchify(images, model.patch_size), model.patch_size, model.grid_size
    if model.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    heat = predicted - predicted.min(1, keepdim=True).values
    heat = F.interpolate((heat / heat.max(1, keepdim=True).values).view(count, 1, h, h), scale_factor=p)
    hot = torch.cat([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)], dim=1)
    mask = mask[..., None]  # (B, L, 1)
    columns = [images, unpatchify(target * (1 - mask), p, h, h), unpatchify(pred, p, h, h),
               unpatchify(pred * mask + target * (1 - mask), p, h, h)]
    common.save_picture([common.denormalize(columns[0]), hot] + [common.denormalize(c) for c in columns[1:]], path)


def official_state(checkpoint, teacher=False):
    """Ours {'model', 'ema_state_dict'} or the official {'state_dict' (`module.` names), 'ema_state_dict', 'model' (the
    architecture's name)} -> the student's weights, or with --teacher the EMA teacher's (main_finetune.py --teacher)."""
    if teacher and 'ema_state_dict' not in checkpoint:
        sys.exit('error: --teacher: this file holds no EMA teacher (ema_state_dict); drop --teacher for its weights')
    if teacher:
        return checkpoint['ema_state_dict']
    return checkpoint.get('state_dict', checkpoint.get('model', checkpoint))  # or a bare one, as --export_encoder's


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    model = build_model(args).to(args.device)
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0))
    train_set, eval_sets = common.build_datasets(args, crop, partial(mask_noise, model.num_patches))
    optimizer, step = common.adamw(model, args, betas=(0.9, 0.95)), common.step_settings(args)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, not args.eval_only)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()  # after DDP's broadcast: equal on every rank
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, step['scaler'],
                                partial(official_state, teacher=args.teacher), ema_state_dict=teacher)
    if args.eval_only:  # the pictures' teacher: the evaluated weights
        teacher.load_state_dict(model.state_dict())

    def loss_fn(model, images, labels, noise, k):  # one step of the objective, inside autocast
        imgs = common.normalize(images)
        order = hard_patches_order(teacher.teacher_losses(imgs), noise, k)
        (loss, rank_loss), _, _ = model(imgs, args.mask_ratio, order)
        return loss + rank_loss, {'reconstruction': loss, 'relative': rank_loss}

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        alpha = args.alpha_final * (epoch + 1) / args.epochs  # easy to hard: alpha_t, updated per epoch (Sec. 3.3)
        decay = teacher_decay(epoch, *args.ema_decay, args.ema_ramp_epochs)
        k = hard_count(model.num_patches, args.mask_ratio, alpha)  # the patches mined per image this epoch
        stats = common.train_one_epoch(ddp_model, partial(loss_fn, k=k), loader, optimizer, epoch,
                                       schedule=partial(common.adjust_learning_rate, args=args),
                                       on_step=partial(common.update_ema, teacher, model, decay), **step)
        common.log_stats(args, {'epoch': epoch, 'alpha': alpha, 'teacher_decay': decay, **stats})
        common.save_checkpoint(args, epoch, model, optimizer, step['scaler'], ema_state_dict=teacher.state_dict())

    common.evaluate(args, teacher if args.teacher else model, partial(build_model, args), eval_sets)
    if common.is_main():
        images = common.picture_images(args, train_set, eval_sets)  # (8, 3, H, W) uint8
        draw_reconstructions(model, teacher, images, args, f'{args.output_dir}/reconstruction.png')
        print(f'wrote {args.output_dir}/reconstruction.png and log.txt')
    encoder = common.vit_encoder_state((teacher if args.teacher else model).state_dict())
    common.export_encoder(args, encoder)
    classifier = partial(common.ViTClassifier, img_size=args.input_size, **common.vit_config(args.model),
                         drop_path=args.ft_drop_path)
    common.finetune(args, classifier, encoder, eval_sets)


if __name__ == '__main__':
    main()
