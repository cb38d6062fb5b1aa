"""MFM: Masked Frequency Modeling for Self-Supervised Visual Pre-Training (Xie et al., ICLR 2023, arXiv:2206.07706).
Official code: https://github.com/Jiahao000/MFM (read at c9194b1).

Remove part of each image's Fourier spectrum and predict what was removed. A circle of radius r on the centred
spectrum is kept (low-pass, with probability 0.5 for ViTs, 0.3 for ResNets) or removed (high-pass); the image is
rebuilt by the inverse FFT, clamped and normalised, and the encoder sees all of it (no mask token, no dropped
tokens). A 1x1 conv + PixelShuffle turns its last feature map into a full image, and the loss is the distance between
the orthonormal FFTs of that prediction and of the normalised original, averaged over the removed frequencies only.
Masks here are `removed` (B, H, W) on the centred spectrum, 1 = removed (to predict); the official one is 1 = kept.

Differences from the paper and the official code (each deliberate):
 1. The low/high-pass choice is drawn by the data loader from each sample's own generator (`low_pass_choice`), not
    by torch.bernoulli, so that resume is exact and N processes equal one; the mask is rebuilt from it on the device.
 2. The radius scales with the input, r = 16 * input_size / 224 (MASK_RADIUS1 = 16 at 224): the circle keeps the same
    share of the spectrum (1.6% at 224 and 96 px; 2.1% at 32 px, on its coarser grid). MASK_RADIUS2 (999: no effect
    below 1400 px) is left out.
 3. ViT: common's ViT with the BEiT attention of the official code (`attn.qkv` without bias, `attn.q_bias`,
    `attn.v_bias`, no k bias), so our state dict is the official one key for key (`encoder.*`, `decoder.*`) and
    `model.load_state_dict(checkpoint['model'])` loads released pretraining files (they also pickle a yacs config:
    load trusted files only). `timm_layout` converts an encoder for common.VisionTransformer (qkv.bias = [q|0|v]).
 4. ResNets are written out with timm's names and init. Below 65 px the stem is a 3x3 stride-1 conv without max-pool
    (output stride 8, not 32; the PixelShuffle factor follows). `--model resnet_tiny` (one Bottleneck per stage, base
    width 16, 0.5M parameters, ~15x faster than ResNet-50 at 32 px) is for CPUs; `--model resnet50` is the official.
 5. --blr is per 256 images as in every file here: 1.5e-4 is the official BASE_LR 3e-4 per 512. The schedule is the
    official timm cosine: warmup from lr/1200, then a cosine over the whole run (warmup included) to lr/120; the
    fine-tuning one alike, from and to lr/8000 (WARMUP_LR = MIN_LR = 2.5e-7 at BASE_LR 2e-3), these two shared by
    every layer (not scaled by the layer decay); timm is stepped after each optimizer step, at the index of its last
    micro-batch, so each step takes the lr of the micro-batch before its own first one (step 0: the warmup lr).
    With accumulation the summed gradient is clipped once per step (as MAE's); main_mfm.py's ACCUMULATION_STEPS branch
    clips the running sum after each micro-batch, a path no official config takes (the 2048 batch is 16 GPUs x 128).
 6. bf16 autocast by default where supported (the official code uses apex O1); the FFTs and the loss run in fp32.
 7. Evaluation (kNN, linear probe; see common.py) on the mean of the patch tokens (--global_pool on: MFM fine-tunes
    so, and the cls output gets no gradient in pretraining), or a ResNet's global average pool.
 8. With several processes the loss is divided by the removed-frequency count of the whole batch over all processes,
    not by each GPU's own count (which depends on its mix of low- and high-pass images), so N processes equal one.
 9. `--sincos_pos_init` (on in the 32-px presets) starts the ViT's learned position embedding from MAE's sin-cos table
    instead of trunc-normal(0.02, cut at +-0.02). Measured with `python mfm.py` (2026-12-02): final loss 0.259 vs 0.277,
    kNN / probe 11.1 / 15.4 (random init 10.2 / 11.6) vs 10.8 / 13.5 (random init 11.8 / 13.0) with the official init,
    which leaves a small ViT almost no position signal in a short run. ImageNet presets keep the official init.
    The `shapes` preset's blr is ours too: 1.5e-3 (10x), 6e-3 for the ResNet, with 1 warmup epoch.
10. Fine-tuning is common.finetune (layer decay 0.8, lr 1e-3 per 256, the official 8e-3 at 2048; ViT-S's config too).
    The ViT is common's ViTClassifier, loaded through timm_layout: its k bias starts at 0 and then trains (BEiT keeps
    it at 0). ResNets get timm's `fc` on the pooled last stage and the same recipe without layer decay or drop path:
    the official ResNet-50 recipe is timm's training script, outside the repository. The eval crop is MAE's, 0.875 up
    to 224 px and none at 64 px and below or above 224 (official data_finetune.py: int(256 / 224 x size) above 32 px;
    at 32 px and below no resize or crop, and training random-crops with 4-px padding instead of RandomResizedCrop).

Expected result (built-in shapes, 32 px, 8 epochs, 2-core AMD EPYC CPU; kNN / linear-probe top-1, pretrained vs
random init): `python mfm.py` (ViT-Ti/4) 10.9 / 14.2 vs 10.2 / 11.6 in 8.4 minutes; `python mfm.py --model
resnet_tiny --output_dir output/mfm_resnet_tiny` (blr 6e-3 on shapes) 11.5 / 17.6 vs 11.4 / 12.8 in 2.0 minutes: the
probe gains, the kNN gain is within noise (with the ViT's blr 1.5e-3 the ResNet's kNN was 11.0, below random, also
after 16 epochs).
"""
import argparse, math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import VisionTransformer

# ---- arguments --------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='vit_base_patch16', input_size=224, crop_scale=0.2, batch_size=128, epochs=300, blr=1.5e-4,
                weight_decay=0.05, warmup_epochs=20, clip_grad=3.0, global_pool=True, sincos_pos_init=False,
                sample_ratio=0.5,
                num_workers=8, probe_epochs=90, shapes_size=10000,
                ft_blr=1e-3, layer_decay=0.8)  # vit_base fine-tuning config: 8e-3 at batch 2048 (common.FINETUNE: rest)
PRESETS = {  # flags given on the command line win over these
    'shapes': dict(model='vit_tiny_patch4', input_size=32, batch_size=128, epochs=8, warmup_epochs=1, blr=1.5e-3,
                   sincos_pos_init=True, num_workers=0, probe_epochs=30),
    'cifar10': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=300, sincos_pos_init=True,
                    num_workers=4),
    'cifar100': dict(model='vit_small_patch4', input_size=32, batch_size=256, epochs=300, sincos_pos_init=True,
                     num_workers=4),
    'imagenet': dict(model='vit_base_patch16', epochs=300, target_batch=2048,  # configs/*/mfm_pretrain__*.yaml
                     ft_batch=2048),  # docs/FINETUNE.md: 16 GPUs x 128
}
RESNETS = {'resnet50': ((3, 4, 6, 3), 64), 'resnet_tiny': ((1, 1, 1, 1), 16)}  # name: (blocks per stage, width)


def recipe(model, data, input_size):  # ResNets: SAMPLE_RATIO 0.3 (mfm_pretrain__resnet50); on shapes 4x the lr
    return {'sample_ratio': 0.3, **({'blr': 6e-3} if data == 'shapes' else {})} if model in RESNETS else {}


def get_args_parser():
    parser = common.get_args_parser('MFM pretraining, then kNN / linear-probe evaluation', convnets=RESNETS,
                                    min_lr='unset: lr x 2.5e-6 / 3e-4, MIN_LR at BASE_LR')
    parser.add_argument('--mask_radius', type=float,
                        help='radius of the frequency circle (DATA.MASK_RADIUS1; default 16 * input_size / 224)')
    parser.add_argument('--sample_ratio', type=common.FRACTION, help='probability of a low-pass mask (SAMPLE_RATIO)')
    parser.add_argument('--sincos_pos_init', action=argparse.BooleanOptionalAction,
                        help="start the ViT's learned position embedding from the sin-cos table (difference 9)")
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = common.parse_args(parser, 'mfm', DEFAULTS, PRESETS, argv, recipe, pretraining='sample_ratio')
    given = parser.parse_args(argv)  # the flags as typed, without what presets and defaults fill in
    resnet = args.model in RESNETS
    vit_only = [f"--{'no-' * (v is False)}{k}" for k in 'global_pool sincos_pos_init layer_decay ft_drop_path'.split()
                if resnet and (v := getattr(given, k)) is not None] + ['']  # what a ResNet would ignore
    args.mask_radius = 16 * args.input_size / 224 if args.mask_radius is None else args.mask_radius
    stride = (8 if args.input_size <= 64 else 32) if resnet else common.vit_config(args.model)['patch_size']
    for ok, message in [(args.input_size % stride == 0, f'--input_size {args.input_size} is not divisible by the '
                                                         f'output stride {stride} of {args.model}'),
                        (not vit_only[0], f'{vit_only[0]} is for ViTs: a ResNet has no position embedding or blocks, '
                                       'and its feature is always its global average pool'),
                        (0 < args.mask_radius < args.input_size / 2,
                         f'--mask_radius must be in (0, input_size / 2), got {args.mask_radius}')]:
        if not ok:
            parser.error(message)
    if args.finetune_epochs and resnet and args.rank == 0:  # difference 10, said at the start
        print("note: MFM's ResNet-50 fine-tuning is timm's training script, outside its repository: this one is the "
              'ViT recipe without layer decay or drop path (difference 10)')
    elif args.finetune_epochs and common.VIT_NAME.fullmatch(args.model)[1] not in ('small', 'base') and args.rank == 0:
        print(f"note: MFM's fine-tuning configs are ViT-S's and ViT-B's (equal but for their epochs): {args.model} "
              'fine-tunes with their values (ft_blr 1e-3, layer_decay 0.8, each unless given)')
    return args


# ---- masking ----------------------------------------------------------------------------------------------------
def low_pass_choice(sample_ratio, rng):
    """Per-sample filter type, drawn in the data loader (difference 1): [1.] = low-pass with probability
    sample_ratio (official FreqMaskGenerator: bernoulli(SAMPLE_RATIO) == 1), [0.] = high-pass."""
    return np.array([rng.random() < sample_ratio], dtype=np.float32)


def frequency_mask(size, radius, low_pass):
    """The circular mask on the centred (fftshift-ed) spectrum (data/data_mfm.py FreqMaskGenerator).
    low_pass (B,) with 1 = low-pass -> removed (B, size, size), 1 = frequency removed. The circle holds the
    frequencies at squared distance < radius^2 from (size // 2, size // 2), as in the official mask."""
    offset = torch.arange(size, device=low_pass.device) - size // 2
    inside = ((offset[:, None] ** 2 + offset[None, :] ** 2) < radius ** 2).float()  # (H, W), the low frequencies
    low_pass = low_pass.float().view(-1, 1, 1)
    return low_pass * (1 - inside) + (1 - low_pass) * inside  # low-pass removes the outside, high-pass the inside


def frequency_corrupt(imgs, removed):
    """models/mfm.py frequency_transform, in the official order: FFT of the UNnormalised [0, 1] image,
    centre it, zero the removed frequencies (same mask for the 3 channels), undo the shift, inverse FFT, keep the
    real part, clamp to [0, 1], THEN normalise. imgs (B, 3, H, W), removed (B, H, W) -> (B, 3, H, W) normalised."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(imgs.float()), dim=(-2, -1))  # (B, 3, H, W) complex, centred
    spectrum = spectrum * (1 - removed)[:, None]  # the official mask is 1 = kept
    corrupted = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return common.normalize(corrupted.clamp(0, 1))


# ---- target -----------------------------------------------------------------------------------------------------
def ortho_spectrum(x):
    """(B, C, H, W) -> centred orthonormal 2-D FFT per channel, in fp32 (frequency_loss.py tensor2freq, patch_factor
    1). The target is the normalised original image, compared in this domain."""
    return torch.fft.fftshift(torch.fft.fft2(x.float(), norm='ortho'), dim=(-2, -1))


# ---- model ------------------------------------------------------------------------------------------------------
class Attention(common.Attention):
    """BEiT attention as MFM's ViT has it (models/vision_transformer.py, QKV_BIAS True): qkv without bias, learned
    q_bias and v_bias, the k bias fixed at zero (a constant bias on k shifts every logit of a query equally)."""
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3D,), k part not trained
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class ViTEncoder(VisionTransformer):
    """MFM's ViT (VisionTransformerForMFM): learned absolute positions, cls token, final norm, every token of the
    corrupted image; returns the patch tokens as a feature map (B, D, h, w) for the 1x1-conv head."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 sincos_pos_init=False, global_pool=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, True, global_pool=global_pool)
        for block in self.blocks:
            block.attn = Attention(embed_dim, num_heads)
        self.num_features, self.stride = embed_dim, patch_size
        self.initialize_weights()
        if sincos_pos_init:  # difference 9: still learned, but starting with a positional signal
            self.pos_embed.data.copy_(common.sincos_pos_embed(self.num_features, self.grid_size)[None])

    def initialize_weights(self):
        """BEiT init as MFM runs it: trunc-normal std 0.02 cut at +-1 std (MFM's `_trunc_normal_` override, a=-std,
        b=std) for pos_embed, cls_token, Linear and Conv weights; zero biases (q_bias, v_bias too); LayerNorm 1/0;
        then fix_init_weight: attn.proj and mlp.fc2 weights of block i (1-based) divided by sqrt(2 i)."""
        trunc = partial(nn.init.trunc_normal_, std=0.02, a=-0.02, b=0.02)
        trunc(self.pos_embed)
        trunc(self.cls_token)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * i))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def forward(self, imgs):
        """(B, 3, H, W) -> (B, D, h, w): all tokens, final norm, cls dropped (DECODER.DEPTH 0)."""
        x = self.forward_tokens(self.patch_embed(imgs) + self.pos_embed[:, 1:])[:, 1:]  # (B, L, D)
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid_size, self.grid_size)


def timm_layout(encoder_state):
    """An MFM ViT encoder state dict (BEiT layout, `encoder.` prefix optional) -> the timm/MAE layout that
    common.VisionTransformer loads: attn.qkv.bias = [q_bias | 0 | v_bias]."""
    state = {k.removeprefix('encoder.'): v for k, v in encoder_state.items() if not k.startswith('decoder.')}
    for key in [k for k in state if k.endswith('attn.q_bias')]:
        q, v = state.pop(key), state.pop(key.replace('q_bias', 'v_bias'))
        state[key.replace('q_bias', 'qkv.bias')] = torch.cat([q, torch.zeros_like(q), v])
    return state


def mfm_layout(checkpoint):
    """--eval_only's weights: ours or the official {'model'}, else a bare encoder in timm's layout (--export_encoder
    writes it) -> MFM's: `encoder.` prefixed, attn.qkv.bias split into q_bias and v_bias. A k bias is dropped: it adds
    the same amount to all of a query's scores, which softmax ignores (zero in timm_layout's output anyway)."""
    state = checkpoint.get('model', checkpoint)
    if any(k.startswith('encoder.') for k in state):
        return state
    state = dict(state)
    for key in [k for k in state if k.endswith('attn.qkv.bias')]:
        q, _, v = state.pop(key).chunk(3)
        state[key.replace('qkv.bias', 'q_bias')], state[key.replace('qkv.bias', 'v_bias')] = q, v
    return {'encoder.' + k: v for k, v in state.items()}


class Bottleneck(nn.Module):
    """timm's ResNet Bottleneck (the stride on the 3x3 conv), with timm's module names."""
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.act1, self.act2, self.act3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:  # projection shortcut, keys downsample.0 (conv) / .1 (BN)
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """timm's ResNet (ResNetForMFM: forward_features, no classifier); blocks per stage and base width as timm's
    (ResNet-50: (3, 4, 6, 3), 64). Below 65 px, the small-image stem (difference 4): 3x3 stride-1 conv, no max-pool,
    output stride 8 instead of 32."""
    def __init__(self, blocks=(3, 4, 6, 3), width=64, img_size=224):
        super().__init__()
        small = img_size <= 64
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if small else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, depth in enumerate(blocks):
            stage = []
            for j in range(depth):
                stage.append(Bottleneck(inplanes, width * 2 ** i, stride=2 if i > 0 and j == 0 else 1))
                inplanes = width * 2 ** i * 4
            self.add_module(f'layer{i + 1}', nn.Sequential(*stage))
        self.num_features, self.stride = inplanes, 8 if small else 32
        for m in self.modules():  # timm's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # zero_init_last_bn: each block starts as the identity

    def forward(self, imgs):  # (B, 3, H, W) -> (B, C, H / stride, W / stride)
        x = self.maxpool(self.act1(self.bn1(self.conv1(imgs))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, imgs):  # (B, 3, H, W) -> (B, C): global average pool of the last stage, for evaluation
        return ResNet.forward(self, imgs).mean((2, 3))  # not self.forward: the classifier's returns logits


class ResNetClassifier(ResNet):
    """timm's ResNet with its classifier `fc` on the pooled last stage, for fine-tuning (difference 10)."""
    def __init__(self, num_classes, blocks=(3, 4, 6, 3), width=64, img_size=224):
        super().__init__(blocks, width, img_size)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, imgs):  # (B, 3, H, W) -> logits (B, classes)
        return self.fc(self.features(imgs))


class MFM(nn.Module):
    """The official MFM module: `encoder` (a ViTEncoder or ResNet: anything giving a (B, num_features, H / stride,
    W / stride) map) and `decoder` = 1x1 conv to stride^2 * 3 channels + PixelShuffle(stride), a full-resolution
    image (the SimMIM-style linear head, DECODER.DEPTH 0)."""
    def __init__(self, encoder):
        super().__init__()
        self.encoder, stride = encoder, encoder.stride
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, stride ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(stride))  # PyTorch's default init, as the official head

    # ---- loss ---------------------------------------------------------------------------------------------------
    @staticmethod
    def frequency_loss(pred, target, removed):
        """models/frequency_loss.py with the official settings (loss_gamma 1, no spectrum weight matrix,
        RECOVER_TARGET_TYPE 'masked'): per frequency, the distance |F(pred) - F(target)| (1e-12 inside the sqrt),
        summed over the removed frequencies only and divided by their count and the channel count.
        pred, target (B, 3, H, W) normalised images, removed (B, H, W) -> scalar."""
        diff = ortho_spectrum(pred) - ortho_spectrum(target)  # (B, 3, H, W) complex
        distance = torch.sqrt(diff.real ** 2 + diff.imag ** 2 + 1e-12)
        return (distance * removed[:, None]).sum() / removed.sum() / pred.shape[1]  # kept frequencies do not count

    def forward(self, imgs, removed):
        """imgs (B, 3, H, W) in [0, 1], removed (B, H, W) 1 = removed -> loss, prediction (B, 3, H, W) normalised,
        corrupted input (B, 3, H, W) normalised."""
        corrupted = frequency_corrupt(imgs, removed)
        pred = self.decoder(self.encoder(corrupted))  # (B, 3, H, W)
        return self.frequency_loss(pred, common.normalize(imgs.float()), removed), pred, corrupted


def build_model(args):  # --model vit_base_patch16 -> ViTEncoder(patch_size=16, ...); resnet50 -> ResNet((3, 4, 6, 3))
    if args.model in RESNETS:
        return MFM(ResNet(*RESNETS[args.model], args.input_size))
    return MFM(ViTEncoder(args.input_size, **common.vit_config(args.model), sincos_pos_init=args.sincos_pos_init,
                          global_pool=args.global_pool))


def official_schedule(optimizer, epoch, args, warmup_lr, min_lr):
    """timm's CosineLRScheduler as MFM configures it (lr_scheduler.py, warmup_prefix off), epoch fractional: each
    layer group warms up linearly from warmup_lr to its peak (lr x its layer-decay scale), then follows a cosine over
    the WHOLE run (t / T, warmup included) down to min_lr; warmup_lr and min_lr are the same for every group."""
    for group in optimizer.param_groups:
        peak = args.lr * group.get('lr_scale', 1.0)
        if epoch < args.warmup_epochs:
            group['lr'] = warmup_lr + (peak - warmup_lr) * epoch / args.warmup_epochs
        else:
            group['lr'] = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * epoch / args.epochs))
    return optimizer.param_groups[-1]['lr']


def pretrain_schedule(optimizer, epoch, args, batches_per_epoch):
    """WARMUP_LR 2.5e-7 and MIN_LR 2.5e-6 at BASE_LR 3e-4 (unless --min_lr). timm's scheduler is stepped after each
    optimizer step at the index of its last micro-batch (main_mfm.py: step_update(epoch * num_steps + idx)), so a step
    that starts at micro-batch i runs at the lr of i - 1 (and step 0 at WARMUP_LR): so here."""
    min_lr = args.lr * 2.5e-6 / 3e-4 if args.min_lr is None else args.min_lr
    return official_schedule(optimizer, max(epoch - 1 / batches_per_epoch, 0), args, args.lr * 2.5e-7 / 3e-4, min_lr)


def finetune_schedule(optimizer, epoch, args):  # finetune__vit_base: WARMUP_LR = MIN_LR = 2.5e-7 at BASE_LR 2e-3,
    at = max(epoch - 1 / (args.iters_per_epoch * args.accum_iter), 0)  # a micro-batch late, as pretrain_schedule
    return official_schedule(optimizer, at, args, args.lr * 2.5e-7 / 2e-3, args.lr * 2.5e-7 / 2e-3)


# ---- pictures ---------------------------------------------------------------------------------------------------
def log_amplitude(imgs):
    """(B, 3, H, W) -> (B, H, W): log(1 + |F|) of the centred, unnormalised spectrum, averaged over the channels."""
    return torch.fft.fftshift(torch.fft.fft2(imgs.float()), dim=(-2, -1)).abs().mean(1).log1p()


@torch.no_grad()
def draw_spectra(model, originals, args, path):
    """Rows (low-pass, high-pass alternating) of original | corrupted input | prediction | log-amplitude spectrum of
    each, on the original's scale, the mask circle outlined in red."""
    model.eval()
    imgs, count = originals.float() / 255, len(originals)  # (B, 3, H, W) uint8 -> [0, 1]
    removed = frequency_mask(args.input_size, args.mask_radius, (torch.arange(count) % 2 == 0).to(args.device))
    _, pred, corrupted = model(imgs, removed)
    images = [imgs, common.denormalize(corrupted), common.denormalize(pred)]
    zoom = max(1, math.ceil(96 / args.input_size))  # upsample here so that the outline can be one pixel thin
    up = lambda x: F.interpolate(x, scale_factor=zoom, mode='nearest')
    circle = up(frequency_mask(args.input_size, args.mask_radius, torch.zeros(1, device=args.device))[None])
    outline = circle * (F.max_pool2d(1 - circle, 3, 1, 1) > 0)  # (1, 1, H', W'), the circle's inner border
    spectra = [log_amplitude(x)[:, None] for x in images]  # (B, 1, H, W)
    red = torch.tensor([1.0, 0.0, 0.0], device=args.device).view(1, 3, 1, 1)
    columns = [up(x) for x in images] + [torch.where(outline > 0, red, up(s / spectra[0].amax((2, 3), keepdim=True))
                                                     .expand(-1, 3, -1, -1)) for s in spectra]
    common.save_picture(columns, path)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    model = build_model(args).to(args.device)
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0))
    train_set, eval_sets = common.build_datasets(args, crop, partial(low_pass_choice, args.sample_ratio))
    optimizer = common.adamw(model, args, betas=(0.9, 0.95),  # the ViT's no_weight_decay(), besides 1-D and biases
                             no_decay_names=('encoder.pos_embed', 'encoder.cls_token'))
    step = common.step_settings(args)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, not args.eval_only)
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, step['scaler'],
                                mfm_layout, encoder=lambda key: key.startswith('encoder.'))

    def loss_fn(model, images, labels, low_pass):  # one step of the objective, inside autocast
        removed = frequency_mask(args.input_size, args.mask_radius, low_pass[:, 0])  # (B, H, W)
        loss, _, _ = model(images.float() / 255, removed)  # corruption on the device, before normalisation
        return common.mean_over_processes(loss, removed.sum()), {}  # difference 8: the whole batch's count

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        stats = common.train_one_epoch(ddp_model, loss_fn, loader, optimizer, epoch,
                                       schedule=partial(pretrain_schedule, args=args,
                                                        batches_per_epoch=len(loader)), **step)
        common.log_stats(args, {'epoch': epoch, **stats})
        common.save_checkpoint(args, epoch, model, optimizer, step['scaler'])

    common.evaluate(args, model.encoder, lambda: build_model(args).encoder, eval_sets)
    if common.is_main():
        draw_spectra(model, common.picture_images(args, train_set, eval_sets), args, f'{args.output_dir}/spectra.png')
        print(f'wrote {args.output_dir}/spectra.png and log.txt')
    encoder = timm_layout(model.state_dict())  # as the official fine-tuning loads it: `encoder.` stripped
    common.export_encoder(args, encoder)
    classifier = partial(ResNetClassifier, blocks=RESNETS[args.model][0], width=RESNETS[args.model][1],
                         img_size=args.input_size) if args.model in RESNETS else \
        partial(common.ViTClassifier, img_size=args.input_size, **common.vit_config(args.model),
                drop_path=args.ft_drop_path)
    common.finetune(args, classifier, encoder, eval_sets, schedule=finetune_schedule)


if __name__ == '__main__':
    main()
