"""SparK: Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling (Tian et al., ICLR 2023,
arXiv:2301.03580). Official code: https://github.com/keyu-tian/SparK (pretrain/, read at a63e386).

Mask 60% of the image on a grid whose cell is the convnet's downsample ratio (32 px) and let the convnet see only the
visible cells: every conv, pool and norm keeps masked sites exactly zero, as a submanifold sparse convolution would
(emulated with masked dense ops, no CUDA, as the official encoder.py). Each stage output is "densified" (norm, a
learned mask token in the empty sites, a projection) and a light UNet decoder rebuilds the image from the coarsest map
upwards. The loss is the MSE on masked patches against per-patch normalised pixels. Only the convnet is kept: its
weights load into the ordinary dense network unchanged.

Differences from the official code (each deliberate):
 1. Mask noise comes from the data loader (per-sample generator, see common.py), not torch.rand, so resume is exact and
    N processes equal one; the masking itself (argsort, keep round(L * 0.4) cells) is the official one. An epoch drops
    its last partial batch (the official sampler tops it up from the start: ImageNet at 4096, 313 steps, not 312).
 2. No global `_cur_active`: `SparK.forward(imgs, mask)` takes the mask, and sparse layers read its visible grid only
    inside `with visible_sites(model, visible)`. ConvNeXt re-masks after each pointwise Linear instead of after the
    branch: the same values (GELU(0) = 0, gamma * 0 = 0). No timm: ResNet and ConvNeXt are written here with timm /
    official names and num_classes=0 as in SparK pretraining, so `*_1kpretrained_timm_style.pth` files load strictly
    (we write one at the end); spark-style files load once the unused buffers imn_m, imn_s, norm_black are dropped.
 3. Small images (32-64 px; not in the official code): `*_ds8` backbones have a stride-1 stem (ResNet: 3x3 conv, no
    max-pool; ConvNeXt: 1x1 patchify) for a downsample ratio of 8, a 4x4 mask grid at 32 px. Their decoder has
    log2(8) = 3 blocks and takes the 3 coarsest maps (the official code would densify the stride-1 map and never use
    it). CPU sizes: `resnet_mini_ds8` (Bottleneck [1,1,1,1], 16-128 planes), `convnext_atto_ds8` (ConvNeXt-V2 atto).
    The presets `shapes` (16 epochs, warmup 1, blr 0.04, 64-wide decoder) and CIFAR (512 per process, no accumulation;
    official: 4096 in all on any data) are ours; --data folder trains at 64 per process (said at the start).
 4. SyncBatchNorm (official `sbn`: the encoder's sparse BNs, the densify and decoder BNs in pretraining, every BN
    when fine-tuning) under torchrun on GPUs only: PyTorch has none on CPUs, where each process normalises its own
    batch, so CPU torchrun runs equal one process only approximately. Under accumulation (--accum_iter; in fine-tuning
    the one --ft_batch sets, e.g. 32 micro-batches for ResNet-50's 2048 at --batch_size 64 on one process), as in any
    BN network, the statistics are those of one micro-batch (batch_size x processes), not of the effective batch.
 5. bf16 autocast where supported (official: fp32); --amp none gives fp32. Evaluation adds kNN and a linear probe on
    globally average-pooled last-stage features (the official repo only fine-tunes).
 6. Fine-tuning is common.finetune with downstream_imagenet/arg.py's row of the model (FINETUNE_ROWS; the `_ds8` models
    take resnet50's or convnext_small's): ResNets LAMB without bias correction, adapting every tensor, and binary
    cross-entropy; ConvNeXts AdamW, soft-target cross-entropy and repeated augmentation (x3, timm's RepeatAugSampler);
    the row's lr, layer scale over the official layer groups (layer_id), weight decay, mixup (cutmix 1.0, smoothing 0.1
    for all; --mixup 0 turns both off, as util.py), drop path, and an EMA of the network (timm's ModelEmaV2, decay
    0.9999; the better of the network and its EMA is reported); downstream_imagenet's lr schedule (from 0.005x the peak
    to 0.001x at the last iteration); convnext_large at --input_size 384 takes the convnext_large_384 row (and
    pretrains with pretrain/README.md's 384 recipe: mask 0.75, blr 4e-4, --data imagenet's batch 2048). Left:
    RandAugment instead of TrivialAugmentWide (AutoAugment v0 at 384 px), val crop MAE's (0.875 up to 224 px, then 1.0;
    official 0.95 below 384 px, a plain resize to a square from 384), the best epoch not selected, and the EMA starts
    from the pretrained weights (see common.finetune); the repeated-augmentation epoch is not rounded down to a
    multiple of 256 images; the last batch is dropped.
 7. --weight_decay_end 0 means 0 (the official `wde or wd` reads 0 as "constant"). DDP broadcasts buffers, PyTorch's
    default (official, pretraining and fine-tuning: broadcast_buffers=False): under SyncBatchNorm (GPUs) the BN running
    statistics are equal on every rank either way; on CPUs the other ranks start each step from rank 0's. Under
    --accum_iter (ours), when the loader's length is not a multiple of it, the last step's lr is a hair above the floor.

Backbone contract: forward(images) returns a list of its stage maps, finest first, each a whole number of mask-grid
cells wide; attributes `downsample_ratio` (the coarsest map's stride: one mask cell) and `feature_channels` (the maps'
widths; SparK(backbone, ...) checks these two, and that the ratio divides input_size); made of nn.Conv2d / Max- or
AvgPool2d / BatchNorm2d / LayerNorm / Linear, which sparse_twin swaps for their masked twins (a GroupNorm, InstanceNorm,
adaptive pool or transposed conv raises when it runs; pools or means computed in forward by functions are not seen).

Expected result (`python spark.py`, built-in shapes, 32 px, resnet_mini_ds8, 16 epochs, 2-core AMD EPYC CPU, 7.4
minutes): kNN / linear-probe top-1 10.1 / 18.9 pretrained vs 11.4 / 12.8 at random init. The probe gains 6 points;
the kNN is within noise of random (12.2 before the crop read only its own pixels; at 8 epochs 10.7; another run,
rounding apart the same code, 9.9): pooled features of a briefly trained convnet.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import common
from common import (LayerNorm2d, Sparse, SparseBatchNorm2d, SparseSyncBatchNorm2d, drop_path, patchify, sparse_twin,
                    unpatchify, visible_at, visible_sites)  # drop_path: timm's DropPath, SparK pretrains with it


# ---- arguments ----------------------------------------------------------------------------------------------------
DEFAULTS = dict(model='resnet50', input_size=224, crop_scale=0.67, batch_size=64, epochs=1600, blr=2e-4,
                weight_decay=0.04, weight_decay_end=0.2, warmup_epochs=40, mask_ratio=0.6, decoder_width=768,
                num_workers=8, probe_epochs=90, shapes_size=10000)  # pretrain/utils/arg_util.py
PRESETS = {  # flags given on the command line win over these
    # LAMB's lr is a relative step (||update|| = lr ||w||): 2496 steps need a far larger one than the official 500k
    'shapes': dict(model='resnet_mini_ds8', input_size=32, batch_size=64, epochs=16, warmup_epochs=1, blr=0.04,
                   decoder_width=64, num_workers=0, probe_epochs=30),
    'cifar10': dict(model='resnet50_ds8', input_size=32, batch_size=512, epochs=800, decoder_width=512, num_workers=4),
    'cifar100': dict(model='resnet50_ds8', input_size=32, batch_size=512, epochs=800, decoder_width=512, num_workers=4),
    'imagenet': dict(model='resnet50', epochs=1600, target_batch=4096),  # README: 1600 ep, batch 4096
}
FINETUNE_ROWS = {  # downstream_imagenet/arg.py:13-24: bs, wp_ep, base_lr, lr_scale, wd, mixup, rep_aug, drop_path, ema
    # (its ep, 400 / 400 / 200 / 200 / 300 x4, is --finetune_epochs); ResNets LAMB + BCE, ConvNeXts AdamW + soft CE
    'convnext_small': (4096, 20, 2e-4, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
    'convnext_base': (4096, 20, 1e-4, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
    'convnext_large': (4096, 10, 1e-4, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
    'convnext_large_384': (1024, 20, 6e-5, 0.7, 0.01, 0.8, 3, 0.5, 0.99995),  # convnext_large at --input_size 384
    'resnet50': (2048, 5, 2e-3, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
    'resnet101': (2048, 5, 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    'resnet152': (2048, 5, 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    'resnet200': (2048, 5, 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999)}


def recipe(model, data, input_size):  # the model's row; the small-image models take resnet50's or convnext_small's
    large_384 = model == 'convnext_large' and input_size == 384  # arg.py:121-124's row; pretrain/README.md's 384
    row = FINETUNE_ROWS.get('convnext_large_384' if large_384 else model,  # pretraining: mask 0.75, bs 2048, 4e-4
                            FINETUNE_ROWS['convnext_small' if 'convnext' in model else 'resnet50'])
    keys = 'ft_batch ft_warmup_epochs ft_blr layer_decay ft_weight_decay mixup ft_repeated_aug ft_drop_path ft_ema'
    pretraining = dict(mask_ratio=0.75, blr=4e-4, target_batch=2048) if large_384 else {}
    values = {**dict(zip(keys.split(), row)), **pretraining}
    return values if data == 'imagenet' else {k: v for k, v in values.items() if k not in ('ft_batch', 'target_batch')}


def get_args_parser():
    parser = common.get_args_parser('SparK pretraining of a convnet, then kNN / linear-probe evaluation', MODELS,
                                    vit=False, min_lr='unset: 0.001 x the peak lr',
                                    clip_grad="LAMB clips to 5 inside its step in any case",
                                    warmup_epochs='here it starts at 0.005 x the peak lr, not 0 (lr_control.py)')
    parser.add_argument('--mask_ratio', type=float, help='fraction of mask-grid cells removed (official `mask`)')
    parser.add_argument('--weight_decay_end', type=common.AMOUNT, help='weight decay at the end of the cosine (`wde`; '
                        'its 0, a constant wd there, is 0 here: give --weight_decay\'s value instead)')
    parser.add_argument('--decoder_width', type=common.COUNT, help='width of the first decoder block, halved per block')
    parser.add_argument('--drop_path', type=common.BELOW_ONE, help="backbone's drop path (default: its own; `dp`, "
                        "but 0 is none here, where the official --dp 0 keeps the default)")
    parser.add_argument('--ft_repeated_aug', type=common.NATURAL,
                        help='fine-tuning: draws of each image per epoch (`rep_aug`)')
    parser.add_argument('--ft_ema', type=common.BELOW_ONE,
                        help='fine-tuning: EMA decay of the network (`ema`; 0: none)')
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = common.parse_args(parser, 'spark', DEFAULTS, PRESETS, argv, recipe, pretraining='drop_path weight_decay_end')
    if args.input_size % MODELS[args.model][3]:
        parser.error(f'--input_size {args.input_size} is not a multiple of the downsample ratio '
                     f'{MODELS[args.model][3]} of {args.model} (use a *_ds8 model for 32-64 px images)')
    L = (args.input_size // MODELS[args.model][3]) ** 2
    common.check_mask_count(parser, args.mask_ratio, round(L * (1 - args.mask_ratio)), L)
    if args.decoder_width < MODELS[args.model][3]:  # as SparK's constructor: halved once per 2x of the ratio
        parser.error(f'--decoder_width must be at least {MODELS[args.model][3]} for {args.model} (its decoder halves '
                     f'the width at each 2x upsampling), got {args.decoder_width}')
    if args.mixup == 0 and parser.parse_args(argv).cutmix is None:  # util.py: mixup_enabled = mixup > 0, so --mixup 0
        args.cutmix = 0.0  # turns cutmix off too (label smoothing stays); a --cutmix typed is kept
    if args.finetune_epochs and args.model not in FINETUNE_ROWS and args.rank == 0:  # the _ds8 and CPU sizes
        print(f"note: downstream_imagenet/arg.py has no {args.model} row: it fine-tunes with "
              f"{'convnext_small' if 'convnext' in args.model else 'resnet50'}'s (each value unless given)")
    return args


# ---- masking ------------------------------------------------------------------------------------------------------
def mask_noise(num_patches, rng):
    """Per-sample mask noise (L,), drawn in the data loader (difference 1): its `keep` smallest cells stay visible."""
    return rng.random(num_patches, dtype=np.float32)


def mask_from_noise(noise, keep):
    """(B, L) noise -> mask (B, L), 1 = masked: the `keep` cells of smallest noise stay visible (SparK.mask keeps the
    first len_keep = round(L * (1 - mask_ratio)) of an argsort of uniform noise)."""
    visible_ids = noise.argsort(dim=1)[:, :keep]
    return torch.ones_like(noise).scatter_(1, visible_ids, 0.0)


# ---- target -------------------------------------------------------------------------------------------------------
def pixel_target(imgs, patch_size):
    """(B, 3, H, W) normalised image -> (B, L, P), each patch standardised by its own mean and unbiased variance
    (SparK.forward step 4; the patch is the downsample ratio, 32 px)."""
    target = patchify(imgs, patch_size)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


# ---- model --------------------------------------------------------------------------------------------------------
MODELS = {  # name: (family, blocks per stage, widths, downsample ratio, pretraining drop path (models/__init__.py))
    'resnet50': ('resnet', [3, 4, 6, 3], 64, 32, 0.05), 'resnet101': ('resnet', [3, 4, 23, 3], 64, 32, 0.08),
    'resnet152': ('resnet', [3, 8, 36, 3], 64, 32, 0.10), 'resnet200': ('resnet', [3, 24, 36, 3], 64, 32, 0.15),
    'convnext_small': ('convnext', [3, 3, 27, 3], [96, 192, 384, 768], 32, 0.2),
    'convnext_base': ('convnext', [3, 3, 27, 3], [128, 256, 512, 1024], 32, 0.3),
    'convnext_large': ('convnext', [3, 3, 27, 3], [192, 384, 768, 1536], 32, 0.4),
    # 32-64 px images (difference 3): stride-1 stem, downsample ratio 8
    'resnet50_ds8': ('resnet', [3, 4, 6, 3], 64, 8, 0.05), 'resnet_mini_ds8': ('resnet', [1, 1, 1, 1], 16, 8, 0.0),
    'convnext_tiny_ds8': ('convnext', [3, 3, 9, 3], [96, 192, 384, 768], 8, 0.1),
    'convnext_atto_ds8': ('convnext', [2, 2, 6, 2], [40, 80, 160, 320], 8, 0.0),
}


class Bottleneck(nn.Module):
    """timm's ResNet Bottleneck: 1x1, 3x3 (stride here), 1x1 with 4x the planes, BN after each, ReLU."""
    def __init__(self, inplanes, planes, stride, drop_path):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None if stride == 1 and inplanes == planes * 4 else nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        self.drop_path = drop_path

    def forward(self, x):  # (B, C, H, W)
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())).relu()
        y = drop_path(self.bn3(self.conv3(y)), self.drop_path, self.training)
        return (y + (x if self.downsample is None else self.downsample(x))).relu()


class ResNet(nn.Module):
    """timm's ResNet with num_classes=0 (no fc), as SparK pretrains it; forward returns the 4 stage outputs. With
    classes (fine-tuning), the global average pool of the last stage -> `fc` -> logits."""
    def __init__(self, blocks, planes=64, downsample_ratio=32, drop_path_rate=0.0, num_classes=0):
        super().__init__()
        small = downsample_ratio == 8  # difference 3: 3x3 stride-1 stem, no max-pool
        self.conv1 = nn.Conv2d(3, planes, 3, 1, 1, bias=False) if small else nn.Conv2d(3, planes, 7, 2, 3, bias=False)
        self.bn1, self.maxpool = nn.BatchNorm2d(planes), nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        rates = [drop_path_rate * i / max(sum(blocks) - 1, 1) for i in range(sum(blocks))]  # timm's linear rule
        inplanes, self.feature_channels, self.downsample_ratio = planes, [], downsample_ratio
        for i, n in enumerate(blocks):
            width = planes * 2 ** i
            stage = [Bottleneck(inplanes if j == 0 else width * 4, width, 2 if i > 0 and j == 0 else 1, rates.pop(0))
                     for j in range(n)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*stage))
            inplanes = width * 4
            self.feature_channels.append(inplanes)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None
        for m in self.modules():  # timm's init, with zero_init_last_bn
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x):  # (B, 3, H, W) -> 4 maps at strides ratio/8 .. ratio
        x = self.maxpool(self.bn1(self.conv1(x)).relu())
        features = []
        for i in range(4):
            x = getattr(self, f'layer{i + 1}')(x)
            features.append(x)
        return self.fc(x.mean((2, 3))) if self.fc else features

    def features(self, imgs):
        """(B, 3, H, W) -> (B, C): global average pool of the last stage."""
        return self(imgs)[-1].mean(dim=(2, 3))


class ConvNeXtBlock(nn.Module):
    """Official ConvNeXt block: 7x7 depthwise conv, LayerNorm, Linear 4x, GELU, Linear, layer scale gamma (1e-6)."""
    def __init__(self, dim, drop_path):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x):  # (B, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C): the Linears are pointwise convs
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class ConvNeXt(nn.Module):
    """The official ConvNeXt (SparK's models/convnext.py) with num_classes=0: no norm / head. With classes
    (fine-tuning), the global average pool -> `norm` -> `head` -> logits."""
    def __init__(self, depths, dims, downsample_ratio=32, drop_path_rate=0.0, num_classes=0):
        super().__init__()
        stem, norm = 4 if downsample_ratio == 32 else 1, partial(LayerNorm2d, eps=1e-6)  # difference 3: 1x1 stem
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], stem, stem), norm(dims[0]))])
        self.downsample_layers.extend(nn.Sequential(norm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
                                      for i in range(3))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(dims[i], rates.pop(0)) for _ in range(depths[i])])
                                    for i in range(4))
        self.feature_channels, self.downsample_ratio = list(dims), downsample_ratio
        if num_classes:
            self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)  # timm's trunc_normal_: cut at +-2, effectively normal
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) -> 4 maps at strides ratio/8 .. ratio
        features = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            features.append(x)
        return self.head(self.norm(x.mean((2, 3)))) if hasattr(self, 'head') else features

    features = ResNet.features


def build_backbone(name, drop_path=None, num_classes=0):
    family, blocks, widths, ratio, default_drop_path = MODELS[name]
    network = ResNet if family == 'resnet' else ConvNeXt
    return network(blocks, widths, ratio, default_drop_path if drop_path is None else drop_path, num_classes)


def layer_id(name, network):
    """downstream_imagenet/models/__init__.py -> (layer, top) for the fine-tuning lr decay. ResNet-50: stem 0,
    layer1 1, layer2 in 2 groups (2-3), layer3 in 2 (4-5), layer4 6, fc 7; other depths group blocks likewise (sizes
    the official code does not list, e.g. resnet_mini_ds8, get groups of 2). ConvNeXt: 6 groups (12 with a deep
    stage 3): stem 0, stage i i+1, stage 3 in groups of 3 blocks, the last stage N, the head N + 1."""
    parts = name.split('.')
    if isinstance(network, ResNet):
        L2, L3 = len(network.layer2), len(network.layer3)
        size2, size3 = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4)}.get((L2, L3), (2, 2))
        n2, n3 = math.ceil(L2 / size2), math.ceil(L3 / size3)
        top = 2 + n2 + n3
        stage = int(parts[0][5:]) if parts[0].startswith('layer') else 0  # 0: the stem (or fc)
        if stage in (2, 3):
            layer = 2 + int(parts[1]) // size2 if stage == 2 else 2 + n2 + int(parts[1]) // size3
        else:
            layer = top + 1 if parts[0] == 'fc' else {0: 0, 1: 1, 4: top}[stage]
        return layer, top + 1
    top = 12 if len(network.stages[-2]) > 9 else 6
    stage = int(parts[1]) if parts[0] in ('downsample_layers', 'stages') else -1
    if parts[0] == 'downsample_layers':
        layer = [0, 2, 3, top][stage]
    elif parts[0] == 'stages':
        layer = [1, 2, 3 + int(parts[2]) // 3, top][stage]
    else:
        layer = top + 1
    return layer, top + 1


class UNetBlock(nn.Module):
    """2x upsampling by a transposed conv, then two 3x3 convs with BN (decoder.py)."""
    def __init__(self, cin, cout):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
                                  nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """log2(ratio) UNet blocks, widths halving from `width`, then a 1x1 conv to RGB at full resolution (decoder.py)."""
    def __init__(self, blocks, width=768):
        super().__init__()
        channels = [width // 2 ** i for i in range(blocks + 1)]
        self.dec = nn.ModuleList(UNetBlock(cin, cout) for cin, cout in zip(channels[:-1], channels[1:]))
        self.proj = nn.Conv2d(channels[-1], 3, kernel_size=1)
        for m in self.modules():  # decoder.py's initialize()
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, to_dec):  # densified maps, smallest first -> (B, 3, H, W)
        x = 0
        for i, block in enumerate(self.dec):
            x = block(x + to_dec[i] if i < len(to_dec) else x)  # a skip from the encoder while there is one
        return self.proj(x)


class SparK(nn.Module):
    """Sparse encoder, densify layers and light decoder, with the official state-dict names (spark.py)."""
    def __init__(self, backbone, input_size, mask_ratio=0.6, decoder_width=768):
        super().__init__()
        missing = [a for a in ('downsample_ratio', 'feature_channels') if not hasattr(backbone, a)]
        if missing or input_size % backbone.downsample_ratio:
            raise ValueError(f'SparK needs a backbone with `downsample_ratio` and `feature_channels` (missing: '
                             f'{missing or "none"}) whose ratio divides input_size {input_size} (see the docstring)')
        self.patch_size = backbone.downsample_ratio  # one mask cell = one loss patch
        self.grid_size = input_size // self.patch_size
        self.num_patches = self.grid_size ** 2
        self.keep = round(self.num_patches * (1 - mask_ratio))
        self.sparse_encoder = nn.ModuleDict({'sp_cnn': sparse_twin(backbone)})  # keys as the official SparseEncoder's
        blocks = round(math.log2(self.patch_size))
        if decoder_width >> blocks < 1:  # its blocks halve the width, one per 2x upsampling
            raise ValueError(f'decoder_width {decoder_width} cannot be halved {blocks} times: {2 ** blocks} at least')
        channels = backbone.feature_channels[::-1][:blocks]  # smallest map first, as many as decoder blocks
        norm = nn.BatchNorm2d if isinstance(backbone, ResNet) else partial(LayerNorm2d, eps=1e-6)  # densify 'bn' / 'ln'
        self.densify_norms = nn.ModuleList(sparse_twin(norm(c)) for c in channels)
        self.densify_projs = nn.ModuleList()  # 1x1 for the smallest map (identity if widths agree), then 3x3
        self.mask_tokens = nn.ParameterList()
        for i, c in enumerate(channels):
            width, kernel = decoder_width // 2 ** i, 1 if i == 0 else 3
            self.densify_projs.append(nn.Identity() if i == 0 and c == width else
                                      nn.Conv2d(c, width, kernel, padding=kernel // 2))
            token = nn.init.trunc_normal_(torch.zeros(1, c, 1, 1), std=0.02, a=-0.02, b=0.02)  # cut at +-1 std
            self.mask_tokens.append(nn.Parameter(token))
        self.dense_decoder = LightDecoder(blocks, decoder_width)

    def encode(self, imgs, visible):
        """Steps 1-2: zero the masked pixels (the mean colour after normalisation) and run the sparse convnet.
        -> its maps (B, C_i, H_i, W_i), smallest first, as many as the decoder takes."""
        masked = imgs * visible_at(visible, imgs.shape[2], imgs.shape[3])  # (B, 3, H, W)
        return self.sparse_encoder.sp_cnn(masked)[::-1][:len(self.mask_tokens)]

    def densify(self, features, visible):
        """Step 3 (SparK.forward): per scale, sparse norm, a mask token in every masked site, then a projection to the
        decoder's width at that scale."""
        to_dec = []
        for feature, norm, mask_token, proj in zip(features, self.densify_norms, self.mask_tokens, self.densify_projs):
            feature = torch.where(visible_at(visible, *feature.shape[2:]), norm(feature), mask_token)
            to_dec.append(proj(feature))
        return to_dec

    def forward_loss(self, imgs, rec, mask):
        """MSE per patch against the normalised target, averaged over masked patches only (spark.py step 4)."""
        loss = ((patchify(rec, self.patch_size) - pixel_target(imgs, self.patch_size)) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / (mask.sum() + 1e-8)

    def forward(self, imgs, mask):
        """imgs (B, 3, H, W) normalised, mask (B, L) 1 = masked -> loss, reconstruction (B, 3, H, W)."""
        visible = (mask == 0).view(-1, 1, self.grid_size, self.grid_size)  # (B, 1, h, w), the official `active`
        with visible_sites(self, visible):
            to_dec = self.densify(self.encode(imgs, visible), visible)
        rec = self.dense_decoder(to_dec)  # step 4: decode all scales to the full image
        return self.forward_loss(imgs, rec.to(imgs.dtype), mask), rec  # the loss in fp32 under autocast


def sync_batchnorm(model):
    """The official `sbn` under torchrun: BatchNorm statistics over all processes (difference 4)."""
    for m in model.modules():
        if type(m) in (nn.BatchNorm2d, SparseBatchNorm2d):
            m.__class__, m.process_group = SparseSyncBatchNorm2d if isinstance(m, Sparse) else nn.SyncBatchNorm, None
    return model


# ---- optimizer ----------------------------------------------------------------------------------------------------
class LAMB(torch.optim.Optimizer):
    """timm's LAMB as SparK uses it (pretrain/utils/lamb.py, bias correction on, always_adapt off): gradients clipped to
    a global norm of 5 inside the step (main.py), Adam moments with bias correction, weight decay added to the update,
    and for decayed tensors the update rescaled by the trust ratio ||w|| / ||update||. Fine-tuning (util.py) runs it
    without clipping or bias correction, and with the trust ratio on every tensor (always_adapt)."""
    def __init__(self, params, lr, betas, eps=1e-6, max_grad_norm=5.0, bias_correction=True, always_adapt=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, step=0))
        self.max_grad_norm, self.bias_correction, self.always_adapt = max_grad_norm, bias_correction, always_adapt

    @torch.no_grad()
    def step(self):  # a loop over tensors: a torch._foreach_* form ran 3.5x slower on a CPU (ResNet-50)
        grads = [p.grad for group in self.param_groups for p in group['params'] if p.grad is not None]
        global_norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        clip = 1 / torch.clamp(global_norm / self.max_grad_norm, min=1.0)
        for group in self.param_groups:
            group['step'] += 1  # one count per group, as timm
            (beta1, beta2), decay = group['betas'], group['weight_decay']
            correction1, correction2 = (1 - beta1 ** group['step'], 1 - beta2 ** group['step']) \
                if self.bias_correction else (1.0, 1.0)
            for p in (p for p in group['params'] if p.grad is not None):
                grad, state = p.grad * clip, self.state[p]
                if not state:
                    state['exp_avg'], state['exp_avg_sq'] = torch.zeros_like(p), torch.zeros_like(p)
                state['exp_avg'].mul_(beta1).add_(grad, alpha=1 - beta1)
                state['exp_avg_sq'].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = state['exp_avg_sq'].sqrt() / math.sqrt(correction2) + group['eps']
                update = state['exp_avg'] / correction1 / denominator
                if decay != 0 or self.always_adapt:
                    update.add_(p, alpha=decay)
                    w_norm, u_norm = p.norm(), update.norm()
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0))
                p.add_(update, alpha=-group['lr'])


def annealed_lr(epoch, args, end, low):
    """SparK's lr curve (pretrain/utils/lr_control.py, downstream_imagenet/lr_decay.py), per iteration: linear from
    0.005x the peak over warmup_epochs, then a cosine down to `low` at epoch `end`."""
    if epoch < args.warmup_epochs:
        return args.lr * (0.005 + 0.995 * epoch / args.warmup_epochs)
    progress = (epoch - args.warmup_epochs) / max(end - args.warmup_epochs, 1e-8)
    return low + (args.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_wd_annealing(optimizer, epoch, args, iters_per_epoch):
    """Pretraining: the lr curve down to --min_lr (default 0.001x the peak) at the last iteration; the weight decay
    follows a cosine UP, weight_decay to weight_decay_end."""
    last = args.epochs - 1 / iters_per_epoch  # the last iteration, in epochs: its lr is the floor, its wd the end
    lr = annealed_lr(epoch, args, last, 0.001 * args.lr if args.min_lr is None else args.min_lr)
    wd_start, wd_end = args.weight_decay, args.weight_decay_end
    wd = wd_end + (wd_start - wd_end) * 0.5 * (1 + math.cos(math.pi * epoch / max(last, 1e-8)))
    for group, decayed in zip(optimizer.param_groups, (False, True)):  # common.param_groups: [no decay, decay]
        group['lr'], group['weight_decay'] = lr, wd if decayed else 0.0
    return lr


def finetune_annealing(optimizer, epoch, args):
    """Fine-tuning (downstream_imagenet's lr_wd_annealing): the lr curve down to 0.001x the peak at the last
    iteration, times each group's layer-decay scale; the weight decay stays constant."""
    lr = annealed_lr(epoch, args, args.epochs - 1 / args.iters_per_epoch, 0.001 * args.lr)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    return lr


class RepeatedAugSampler(torch.utils.data.Sampler):
    """timm's RepeatAugSampler: each image `repeats` times per epoch, its copies dealt to different ranks, then each
    rank's share cut to n / world_size (timm also rounds n down to a multiple of 256), so an epoch keeps its length
    and sees about 1 / repeats of the images. Copy k of image i is index i + k * n (other draws of its randomness)."""
    def __init__(self, n, world_size, rank, repeats, seed=0):
        self.n, self.world_size, self.rank, self.repeats, self.seed, self.epoch = n, world_size, rank, repeats, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        copies = (order[:, None] + self.n * torch.arange(self.repeats)).flatten()  # i, i + n, i + 2n, then the next
        copies = torch.cat([copies, copies[:-len(copies) % self.world_size]])  # padded to a multiple of world_size
        return iter(copies[self.rank::self.world_size][:len(self)].tolist())


# ---- pictures -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def draw_reconstructions(model, images, args, path):
    """Rows of original | masked | reconstruction | reconstruction with the visible patches pasted back; the prediction
    is un-normalised with each original patch's mean and variance (as SparK's vis output)."""
    model.eval()
    images, count = common.normalize(images), len(images)  # (B, 3, H, W) uint8 -> normalised
    noise = torch.rand(count, model.num_patches, generator=torch.Generator().manual_seed(0)).to(args.device)
    mask = mask_from_noise(noise, model.keep)
    _, rec = model(images, mask)
    p, h = model.patch_size, model.grid_size
    target, pred = patchify(images, p), patchify(rec, p)
    pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    mask = mask[..., None]  # (B, L, 1)
    columns = [images, unpatchify(target * (1 - mask), p, h, h), unpatchify(pred, p, h, h),
               unpatchify(pred * mask + target * (1 - mask), p, h, h)]
    common.save_picture([common.denormalize(c) for c in columns], path)


def official_state(checkpoint):
    """Ours {'model'}, the official `*_spark_style.pth` {'module'} (the whole model; buffers imn_m, imn_s, norm_black
    unused) or `*_timm_style.pth` (the bare encoder state dict) -> our names, for --eval_only."""
    if 'model' in checkpoint or 'module' in checkpoint:
        return checkpoint.get('model', checkpoint.get('module'))
    return {f'sparse_encoder.sp_cnn.{k}': v for k, v in checkpoint.items()}


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    common.setup(args)
    model = SparK(build_backbone(args.model, args.drop_path), args.input_size, args.mask_ratio, args.decoder_width)
    sync = args.world_size > 1 and args.device.type == 'cuda'
    if args.world_size > 1 and not sync and common.is_main():
        print("note: PyTorch's SyncBatchNorm needs GPUs: here each process normalises its own batch (difference 4)")
    for part in (sync_batchnorm(model) if sync else model).to(args.device).sparse_encoder, model.densify_projs, \
            model.dense_decoder:
        part.to(memory_format=torch.channels_last)  # the sparse norms' layout: faster, grads match DDP's buckets
    crop = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0))
    train_set, eval_sets = common.build_datasets(args, crop, partial(mask_noise, model.num_patches))
    groups = common.param_groups(model, 0.0, [n for n, _ in model.named_parameters() if 'mask_token' in n])
    beta2 = 0.95 if MODELS[args.model][0] == 'resnet' else 0.999  # official `ada`
    optimizer, step = LAMB(groups, args.lr, betas=(0.9, beta2)), common.step_settings(args)
    ddp_model, loader = common.wrap_ddp(model, args), common.make_loader(train_set, args, not args.eval_only)
    start_epoch = common.resume(args, model, None if args.eval_only else optimizer, step['scaler'], official_state,
                                encoder=lambda key: key.startswith('sparse_encoder.'))
    schedule = partial(lr_wd_annealing, args=args, iters_per_epoch=len(loader) // args.accum_iter)

    def loss_fn(net, images, labels, noise):  # one step of the objective, inside autocast
        loss, _ = net(common.normalize(images), mask_from_noise(noise, model.keep))
        return loss, {}

    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        stats = common.train_one_epoch(ddp_model, loss_fn, loader, optimizer, epoch, schedule=schedule, **step)
        common.log_stats(args, {'epoch': epoch, **stats, 'weight_decay': optimizer.param_groups[1]['weight_decay']})
        common.save_checkpoint(args, epoch, model, optimizer, step['scaler'])

    encoder = build_backbone(args.model).to(args.device)  # the dense convnet, loaded strictly from the sparse twin
    encoder.load_state_dict(model.sparse_encoder.sp_cnn.state_dict())
    common.evaluate(args, encoder, partial(build_backbone, args.model), eval_sets)
    common.export_encoder(args, encoder.state_dict())
    if common.is_main():
        if not args.eval_only:  # (its name says pretrained; --export_encoder writes any run's encoder)
            common.atomic_save(encoder.state_dict(), f'{args.output_dir}/{args.model}_1kpretrained_timm_style.pth')
        images = common.picture_images(args, train_set, eval_sets)  # (8, 3, H, W) uint8
        draw_reconstructions(model, images, args, f'{args.output_dir}/reconstruction.png')
        print(f'wrote {args.output_dir}/reconstruction.png, ' + 'the encoder, ' * (not args.eval_only) + 'log.txt')
    resnet = MODELS[args.model][0] == 'resnet'  # ResNets: LAMB and binary cross-entropy; ConvNeXts: AdamW, soft CE
    def classifier(num_classes):  # timm's network with its head, SyncBatchNorm under torchrun on GPUs (util.py)
        network = build_backbone(args.model, args.ft_drop_path, num_classes)
        return sync_batchnorm(network) if sync else network
    repeated = lambda n, ft: RepeatedAugSampler(n, ft.world_size, ft.rank, args.ft_repeated_aug, ft.seed)
    common.finetune(args, classifier, encoder.state_dict(), eval_sets, lambda name: layer_id(name, encoder),
                    partial(LAMB, betas=(0.9, 0.999), max_grad_norm=1e7, bias_correction=False, always_adapt=True)
                    if resnet else None, bce=resnet, schedule=finetune_annealing, ema_decay=args.ft_ema,
                    sampler=repeated if args.ft_repeated_aug else None)


if __name__ == '__main__':
    main()
