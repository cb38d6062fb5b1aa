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
 2. Defaults are the paper's recipe (PRETRAIN.md: norm-pix on, blr 1.5e-4, effective batch 4096 through --accum_iter,
    800 epochs for --data imagenet), not main_pretrain.py's argparse defaults. The decoder has 32-wide heads
    (16 at width 512 as in the paper) and its width/depth are flags, so small presets can shrink it.
 3. bf16 autocast by default where supported (the official code uses fp16 + GradScaler); --amp fp16 or none.
 4. The linear probe trains SGD on features extracted once without augmentation (common.linear_probe_accuracy)
    rather than LARS at batch 16384 on augmented images, and a kNN evaluation (DINO protocol) is added.
 5. Fine-tuning (--finetune_epochs N; with --eval_only --resume FILE for a released encoder) is common.finetune:
    main_finetune.py with FINETUNE.md's ViT-B values (ViT-L's under --data imagenet); its differences are listed there.

Expected result (`python mae.py`, built-in shapes, 32 px, ViT-Ti/4, 2-core CPU): see the README table
(kNN and linear probe of the pretrained vs the randomly initialised encoder): 15.4 / 28.5 vs 11.3 / 14.8, 4.5 minutes.
"""
import argparse
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import common
from common import Block, VisionTransformer, patchify, unpatchify

# ---- arguments --------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='vit_base_patch16', input_size=224, crop_scale=0.2, batch_size=64, epochs=400, blr=1.5e-4,
                min_lr=0.0, weight_decay=0.05, warmup_epochs=40, mask_ratio=0.75, norm_pix_loss=True,
                decoder_embed_dim=512, decoder_depth=8, num_workers=8, probe_epochs=90, shapes_size=10000,
                ft_blr=5e-4, layer_decay=0.65)  # fine-tuning, FINETUNE.md for ViT-B (common.FINETUNE: the rest)
PRESETS = {  # flags given on the command line win over these
    'shapes': dict(model='vit_tiny_patch4', input_size=32, batch_size=64, epochs=7, warmup_epochs=1, blr=1.5e-3,
                   decoder_embed_dim=128, decoder_depth=2, num_workers=0, probe_epochs=30, global_pool=True),
    'cifar10': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'cifar100': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=800, num_workers=4),
    'imagenet': dict(model='vit_large_patch16', epochs=800, target_batch=4096,  # PRETRAIN.md; FINETUNE.md for ViT-L
                     ft_blr=1e-3, layer_decay=0.75, ft_drop_path=0.2, ft_batch=1024),
}


def get_args_parser():
    parser = common.get_args_parser('MAE pretraining, then kNN / linear-probe evaluation')
    parser.add_argument('--mask_ratio', type=float, help='fraction of patches removed (0.75)')
    parser.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction,
                        help='per-patch normalised pixel target (on)')
    parser.add_argument('--decoder_embed_dim', type=int, help='decoder width (512)')
    parser.add_argument('--decoder_depth', type=int, help='decoder blocks (8)')
    return parser



# ---- masking ----------------------------------------------------------------------------------------------------
def uniform_noise(num_patches, rng):
    """Per-sample mask noise, drawn in the data loader (difference 1)."""
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
    """The ViT encoder (inherited, so its keys are the encoder's) plus MAE's decoder, official state-dict names."""
    def __init__(self, model='vit_large_patch16', img_size=224, decoder_embed_dim=512, decoder_depth=8,
                 norm_pix_loss=False):
        config = common.vit_config(model)
        super().__init__(img_size, **config)
        p, dim = config['patch_size'], config['embed_dim']
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed(decoder_embed_dim, self.grid_size)[None],
                                              requires_grad=False)  # fixed sin-cos, like the encoder's
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_embed_dim // 32)
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


def build_model(args):
    return MAE(args.model, args.input_size, args.decoder_embed_dim, args.decoder_depth, args.norm_pix_loss)


@torch.no_grad()
def draw_reconstructions(model, images, args, path):
    """Rows of original | masked | reconstruction | reconstruction with the visible patches pasted back.
    With norm-pix the prediction is un-normalised with each original patch's own mean and variance."""
    model.eval()
    images, count = common.normalize(images), len(images)  # (B, 3, H, W) uint8 -> normalised
    noise = torch.rand(count, model.num_patches, generator=torch.Generator().manual_seed(0)).to(args.device)
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
    args = common.parse_args(get_args_parser(), 'mae', DEFAULTS, PRESETS, argv)
    common.setup(args)
    model = build_model(args).to(args.device)
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0))
    train_set, eval_sets = common.build_datasets(args, crop, partial(uniform_noise, model.num_patches))
    optimizer = common.adamw(model, args, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp == 'fp16')
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, scaler)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, train=True)

    def loss_fn(model, images, noise):  # one step of the objective, inside autocast
        loss, _, _ = model(common.normalize(images), args.mask_ratio, noise)
        return loss, {}

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        stats = common.train_one_epoch(ddp_model, loss_fn, loader, optimizer, scaler, epoch, args)
        common.save_checkpoint(args, epoch, model, optimizer, scaler)
        common.log_stats(args, {'epoch': epoch, **stats})

    common.evaluate(args, model, partial(build_model, args), eval_sets)
    if common.is_main():
        images = common.picture_images(args, train_set, eval_sets)  # (8, 3, H, W) uint8
        draw_reconstructions(model, images, args, f'{args.output_dir}/reconstruction.png')
        print(f'wrote {args.output_dir}/reconstruction.png and log.txt')
    encoder = common.vit_encoder_state(model.state_dict())  # timm names, as the released mae_pretrain_*.pth
    common.export_encoder(args, encoder)
    classifier = partial(common.ViTClassifier, args.model, args.input_size, drop_path=args.ft_drop_path)
    common.finetune(args, classifier, encoder, eval_sets)


if __name__ == '__main__':
    main()
