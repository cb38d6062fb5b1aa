"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022, arXiv:2111.06377).
Official code: https://github.com/facebookresearch/mae (read at efb2a80).

Mask 75% of the image patches at random, encode only the visible 25% with a ViT, and let a light transformer decoder
rebuild the pixels of the masked patches from the latent tokens plus a shared mask token (Sec. 3). The loss is the
mean squared error on masked patches only, against per-patch normalised pixels (norm-pix, Tab. 1d). Because the
encoder never sees mask tokens, pretraining costs about a quarter of a full ViT pass.

Differences from the official code (each deliberate):
 1. The mask noise of each sample is drawn by the data loader from the sample's own generator (see common.py), not by
    torch.rand on the GPU; the masking itself (argsort of the noise, keep the first K) is the official one. This is
    what makes resume exact and N processes equal one. `MAE.forward(imgs, mask_ratio, noise=None)` still draws it
    like the official code when no noise is given.
 2. Defaults follow PRETRAIN.md where it and main_pretrain.py's argparse differ: norm-pix on and blr 1.5e-4;
    --data imagenet also takes its ViT-L, 800 epochs and effective batch 4096 (through --accum_iter). --data folder
    keeps the argparse's 400 epochs and batch 64 per process, with ViT-B (argparse: ViT-L); the presets: difference
    7. The decoder's width, depth and heads are flags (official 512 / 8 / 16), so small presets can shrink it.
 3. bf16 autocast by default where supported (the official code uses fp16 + GradScaler); --amp fp16 or none.
 4. The linear probe trains SGD (cosine, no warmup) on features extracted once without augmentation
    (common.linear_probe_accuracy) rather than LARS at batch 16384 on augmented images with 10 warmup epochs
    (main_linprobe.py), and a kNN evaluation (DINO protocol) is added.
 5. Fine-tuning (--finetune_epochs N; with --eval_only --resume FILE for a released encoder) is common.finetune:
    main_finetune.py with FINETUNE.md's row of the encoder's size (ViT-B, L, H; smaller ViTs take ViT-B's) but the
    epochs, which are yours (FINETUNE.md: 100 for ViT-B, 50 for ViT-L / H); its differences are listed there.
 6. --mask_type red|blue|green|purple: ColorMAE's data-independent masks (Hinojosa, Liu, Ghanem, ECCV 2024,
    arXiv:2407.13036; official code carlosh93/ColorMAE, models/utils/masking_generator.py), MAE otherwise unchanged.
    The mask keeps visible the patches where a window of filtered noise is highest (as the official descending sort).
    Differences from ColorMAE: (a) the patterns are generated at start-up (noise_bank, seed 0: 32 periodic 64 x 64
    fields in patch units; sigma 1 and 2 patches, our choice) where the official code downloads .npz files whose
    filter widths it does not state; (b) each sample draws its own pattern, window and flips from its generator in
    the data loader (difference 1), where the official code draws one window and one pair of flips per batch and
    gives sample i pattern i; (c) its per-window division by the maximum is left out: it does not change the order.
 7. The 32-px presets are ours (the official code has no small-image recipe): `shapes` trains a ViT-Ti/4 for 7 epochs
    (warmup 1) at blr 1.5e-3 (10x) with a 128-wide decoder of 2 blocks and 4 heads, and its kNN and probe read the
    mean patch token after the pretrained final norm (--global_pool; the official probe reads the cls token, or with
    --global_pool a fresh LayerNorm of the raw mean); CIFAR's are ViT-S/4, batch 256, 800 epochs. At 64 px and below
    the eval transform has no 224/256 margin: the short side goes to the size, then a centre crop (official: 32 -> 36).

Expected result (`python mae.py`, built-in shapes, 32 px, ViT-Ti/4, 2-core AMD EPYC CPU): see the README table
(kNN and linear probe of the pretrained vs the randomly initialised encoder): 15.9 / 28.8 vs 11.2 / 14.7, 3.7 minutes.
"""
import argparse, math
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import common
from common import Block, VisionTransformer, patchify, unpatchify

# ---- arguments --------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='vit_base_patch16', input_size=224, crop_scale=0.2, batch_size=64, epochs=400, blr=1.5e-4,
                min_lr=0.0, weight_decay=0.05, warmup_epochs=40, mask_ratio=0.75, norm_pix_loss=True,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, num_workers=8, probe_epochs=90,
                shapes_size=10000)
PRESETS = {  # flags given on the command line win over these
    'shapes': dict(model='vit_tiny_patch4', input_size=32, batch_size=64, epochs=7, warmup_epochs=1, blr=1.5e-3,
                   decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, num_workers=0, probe_epochs=30,
                   global_pool=True),
    'cifar10': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'cifar100': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'imagenet': dict(model='vit_large_patch16', epochs=800, target_batch=4096, ft_batch=1024),  # PRETRAIN.md
}
FINETUNE_ROWS = {  # FINETUNE.md, per encoder size (common.FINETUNE: the rest, main_finetune.py's defaults)
    'base': dict(ft_blr=5e-4, layer_decay=0.65, ft_drop_path=0.1), 'large': dict(ft_blr=1e-3, layer_decay=0.75,
    ft_drop_path=0.2), 'huge': dict(ft_blr=1e-3, layer_decay=0.75, ft_drop_path=0.3)}


def recipe(model, data, input_size):  # the fine-tuning row of the encoder's size (a ViT-Ti or ViT-S takes ViT-B's)
    return FINETUNE_ROWS.get(model.split('_')[1] if model.count('_') == 2 else '', FINETUNE_ROWS['base'])


def get_args_parser():
    parser = common.get_args_parser('MAE pretraining, then kNN / linear-probe evaluation')
    parser.add_argument('--mask_ratio', type=float, help='fraction of patches removed')
    parser.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction,
                        help='per-patch normalised pixel target')
    parser.add_argument('--decoder_embed_dim', type=common.COUNT, help='decoder width')
    parser.add_argument('--decoder_depth', type=common.NATURAL, help='decoder blocks')
    parser.add_argument('--decoder_num_heads', type=common.COUNT, help='decoder attention heads')
    parser.add_argument('--mask_type', choices=['random', *COLORS], default='random',
                        help="random: MAE's uniform noise; red / blue / green / purple: ColorMAE's filtered noise "
                             "(low-, high-, band-pass, band-stop; difference 6)")
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = common.parse_args(parser, 'mae', DEFAULTS, PRESETS, argv, recipe)
    L = (args.input_size // common.vit_config(args.model)['patch_size']) ** 2
    common.check_mask_count(parser, args.mask_ratio, int(L * (1 - args.mask_ratio)), L)
    if args.mask_type != 'random' and L > 64 ** 2:  # noise_bank's patterns are 64 x 64 patches
        parser.error(f'--mask_type {args.mask_type} has patterns of 64x64 patches, this grid is {math.isqrt(L)}x'
                     f'{math.isqrt(L)}: use a smaller --input_size or a larger patch')
    if args.decoder_embed_dim % args.decoder_num_heads:  # else the model's constructor stops with a traceback
        parser.error(f'--decoder_embed_dim {args.decoder_embed_dim} does not split into --decoder_num_heads '
                     f'{args.decoder_num_heads} heads')
    if args.finetune_epochs and args.model.split('_')[1] not in FINETUNE_ROWS and args.rank == 0:  # said, not silent
        print(f"note: FINETUNE.md has rows for ViT-B, L and H only: {args.model} fine-tunes with ViT-B's (ft_blr 5e-4, "
              'layer_decay 0.65, ft_drop_path 0.1, each unless given)')
    return args


# ---- masking ----------------------------------------------------------------------------------------------------
def mask_noise(num_patches, rng):
    """Per-sample mask noise (L,), drawn in the data loader (difference 1): the argsort of it is the mask."""
    return rng.random(num_patches, dtype=np.float32)


COLORS = ('red', 'blue', 'green', 'purple')


def noise_bank(color, count=32, size=64, seed=0):
    """ColorMAE's noise patterns (Sec. 3.2), (count, size, size) in units of patches: white noise W filtered by
    Gaussians G_s (s in patches), periodic (filtered in the Fourier domain): red G_2 W (low-pass, blobs), blue
    W - G_1 W (high-pass, scattered), green G_1 W - G_2 W (band-pass), purple W - (G_1 W - G_2 W) (band-stop)."""
    white = np.random.default_rng(seed).standard_normal((count, size, size))
    freq = np.fft.fftfreq(size)
    spectrum, radius2 = np.fft.fft2(white), freq[:, None] ** 2 + freq[None, :] ** 2
    blur = lambda s: np.fft.ifft2(spectrum * np.exp(-2 * np.pi ** 2 * s ** 2 * radius2)).real  # G_s * W
    made = {'red': blur(2), 'blue': white - blur(1), 'green': blur(1) - blur(2), 'purple': white - blur(1) + blur(2)}
    return made[color].astype(np.float32)


def color_noise(bank, grid, rng):
    """A sample's ColorMAE mask noise (L,): a grid x grid window of one of the bank's patterns, flipped left-right
    and up-down with probability 0.5 each (masking_generator.py: RandomCrop, the two flips), negated, so that
    random_masking keeps the highest values visible (the official descending sort)."""
    top, left = rng.integers(0, bank.shape[1] - grid + 1, 2)
    window = bank[rng.integers(len(bank)), top:top + grid, left:left + grid]
    window = window[:, ::-1] if rng.random() < 0.5 else window
    window = window[::-1] if rng.random() < 0.5 else window
    return -np.ascontiguousarray(window).reshape(-1)


def mask_drawer(mask_type, grid):  # the data loader's per-sample draw for --mask_type
    if mask_type == 'random':
        return partial(mask_noise, grid ** 2)
    return partial(color_noise, noise_bank(mask_type), grid)


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
class MAE(VisionTransformer):
    """The ViT encoder (inherited, so its keys are the encoder's) plus MAE's decoder, official state-dict names and
    constructor (models_mae.MaskedAutoencoderViT; its defaults are ViT-L/16's)."""
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
        """latent (B, 1 + K, D) -> predicted pixels (B, L, P) for every patch."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # one per removed patch
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order, without cls
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, P), cls dropped

    # ---- loss ---------------------------------------------------------------------------------------------------
    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over masked patches only (Sec. 3): visible patches do not count."""
        target = pixel_target(imgs, self.patch_size, self.norm_pix_loss)  # (B, L, P)
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L), per patch
        return (loss * mask).sum() / mask.sum()  # masked patches only

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred.float(), mask), pred, mask


def build_model(args):  # --model vit_base_patch16 -> MAE(patch_size=16, embed_dim=768, depth=12, num_heads=12, ...)
    return MAE(args.input_size, **common.vit_config(args.model), decoder_embed_dim=args.decoder_embed_dim,
               decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
               norm_pix_loss=args.norm_pix_loss, global_pool=args.global_pool)


@torch.no_grad()
def draw_reconstructions(model, images, args, path, draw_mask):
    """Rows of original | masked | reconstruction | reconstruction with the visible patches pasted back; masks from
    draw_mask (the run's --mask_type). With norm-pix the prediction is un-normalised with each original patch's own
    mean and variance."""
    model.eval()
    images, count = common.normalize(images), len(images)  # (B, 3, H, W) uint8 -> normalised
    noise = torch.from_numpy(np.stack([draw_mask(np.random.default_rng([args.seed, i])) for i in range(count)]))
    noise = noise.to(args.device)
    _, pred, mask = model(images, args.mask_ratio, noise)
    target, p, h = patchify(images, model.patch_size), model.patch_size, model.grid_size
    if model.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    mask = mask[..., None]  # (B, L, 1)
    columns = [images, unpatchify(target * (1 - mask), p, h, h), unpatchify(pred, p, h, h),
               unpatchify(pred * mask + target * (1 - mask), p, h, h)]
    common.save_picture([common.denormalize(c) for c in columns], path)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    model = build_model(args).to(args.device)
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0))
    draw_mask = mask_drawer(args.mask_type, model.grid_size)
    train_set, eval_sets = common.build_datasets(args, crop, draw_mask)
    optimizer, step = common.adamw(model, args, betas=(0.9, 0.95)), common.step_settings(args)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, not args.eval_only)
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, step['scaler'])

    def loss_fn(model, images, labels, noise):  # one step of the objective, inside autocast
        loss, _, _ = model(common.normalize(images), args.mask_ratio, noise)
        return loss, {}

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        stats = common.train_one_epoch(ddp_model, loss_fn, loader, optimizer, epoch,
                                       schedule=partial(common.adjust_learning_rate, args=args), **step)
        common.log_stats(args, {'epoch': epoch, **stats})
        common.save_checkpoint(args, epoch, model, optimizer, step['scaler'])

    common.evaluate(args, model, partial(build_model, args), eval_sets)
    if common.is_main():
        images = common.picture_images(args, train_set, eval_sets)  # (8, 3, H, W) uint8
        draw_reconstructions(model, images, args, f'{args.output_dir}/reconstruction.png', draw_mask)
        print(f'wrote {args.output_dir}/reconstruction.png and log.txt')
    encoder = common.vit_encoder_state(model.state_dict())  # timm names, as the released mae_pretrain_*.pth
    common.export_encoder(args, encoder)
    classifier = partial(common.ViTClassifier, img_size=args.input_size, **common.vit_config(args.model),
                         drop_path=args.ft_drop_path)
    common.finetune(args, classifier, encoder, eval_sets)


if __name__ == '__main__':
    main()
