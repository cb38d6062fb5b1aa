"""What every method file shares: the ViT, patchify, data, training plumbing, checkpoints, evaluation (kNN, linear
probe, fine-tuning, released checkpoints), sparse ops.

Shapes: B batch, C,H,W image, p patch size, h,w patch grid, L = h*w patches, K kept (visible) patches, D encoder
width, P = p*p*C values per patch. Masks are (B, L) with 1 = masked (removed) and 0 = visible, in every method file.

Randomness: every per-sample random choice (crop, flip, and what a method's mask is made from, through
`draw_mask(rng)`: MAE's noise, MaskFeat's block mask, MFM's filter type) is drawn in the data pipeline from
`numpy.random.default_rng([seed, epoch, index])`: the same samples, crops and masks whatever the number of processes,
workers or restarts. That makes `--resume` exact and N processes equal one.
"""
import argparse, copy, ctypes, glob, hashlib, json, math, os, pickle, re, shutil, sys, tarfile, time, warnings, zipfile
import urllib.request
from collections import Counter, OrderedDict
from contextlib import contextmanager, nullcontext, suppress
from functools import partial
from multiprocessing import Value

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from tqdm import tqdm

try:
    import fcntl, resource  # POSIX only: the folder's lock, the peak resident memory of CPU runs
except ImportError:  # Windows
    fcntl = resource = None
HELD = {}  # output folder -> the descriptor by which this process holds its lock (lock_folder)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- ViT, with the timm / official MAE module names, so released checkpoints load with strict=True -----------
VIT_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12), 'large': (1024, 24, 16),
             'huge': (1280, 32, 16)}  # name: (embed_dim D, depth, heads); MLP ratio 4 for all
VIT_NAME = re.compile(rf"vit_({'|'.join(VIT_SIZES)})_patch([1-9]\d*)")  # vit_<size>_patch<p>


def vit_config(name):
    """'vit_base_patch16' -> dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)."""
    if not (m := VIT_NAME.fullmatch(name)):
        raise ValueError(f"unknown --model '{name}': use vit_<size>_patch<p> with size in {sorted(VIT_SIZES)}, "
                         f"e.g. vit_base_patch16, or vit_tiny_patch4 for 32 px images")
    dim, depth, heads = VIT_SIZES[m[1]]
    return dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=int(m[2]))


def sincos_pos_embed(dim, grid_size):
    """MAE's fixed 2-D sin-cos table (1 + L, D), computed in float64 as the numpy original: the first D/2 dims encode
    the column x, the last D/2 the row y, each as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-4k/D), k < D/4."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid_size, dtype=torch.float64)] * 2, indexing='ij')  # row-major
    angles = [pos.reshape(-1, 1) * omega for pos in (cols, rows)]  # (L, D/4) each
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (L, D)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()  # the cls slot first, all zeros


def patchify(imgs, p):
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, inside a patch (row, column, channel) with channel fastest."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, h, w):
    """(B, L, p*p*C) -> (B, C, h*p, w*p), the inverse of patchify."""
    x = x.reshape(x.shape[0], h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(x.shape[0], -1, h * p, w * p)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v, (B, heads, N, d): SDPA's fused kernels, but on CPUs in bf16 the three ops (timm's and
    HF's unfused path), 2-6x faster than SDPA's math / flash kernels at every shape here (fwd + bwd, ms, 2-core EPYC,
    torch 2.13: ViT-B 16.9 vs 45.7 / 40.9, MAE decoder 16.1 vs 42.4 / 41.2, ViT-Ti/4 5.2 vs 11.7 / 29.4)."""
    if q.is_cpu and q.dtype == torch.bfloat16:
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch_size, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, L, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention width {dim} is not divisible by its {num_heads} heads')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # output laid out as [q | k | v], each split over heads
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def drop_path(x, prob, training):
    """Stochastic depth (timm's DropPath): drop a residual branch per sample, scale the kept ones by 1 / (1 - prob)."""
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - prob) if prob and training else None
    return x if keep is None else x * keep / (1 - prob)


class Block(nn.Module):
    """Pre-norm transformer block, as timm's (LayerNorm eps 1e-6, its Mlp's fc1 / fc2 keys; drop path to fine-tune)."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, hidden = nn.LayerNorm(dim, eps=1e-6), int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = drop_path

    def forward(self, x):  # (B, N, D)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT encoder; pos_embed is MAE's frozen sin-cos table, or learned (MaskFeat, MFM). Init is the method's.
    features() gives the cls token after the final norm (MAE's probe feature), or with global_pool the patch mean."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 learned_pos=False, drop_path=0.0, global_pool=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image side {img_size} is not divisible by the patch size {patch_size}')
        self.patch_size, self.grid_size, self.global_pool = patch_size, img_size // patch_size, global_pool
        self.num_patches, self.patch_embed = self.grid_size ** 2, PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = torch.zeros(1, 1 + self.num_patches, embed_dim) if learned_pos else \
            sincos_pos_embed(embed_dim, self.grid_size)[None]
        self.pos_embed = nn.Parameter(table, requires_grad=learned_pos)
        rates = torch.linspace(0, drop_path, depth).tolist()  # timm's rule: deeper blocks drop more
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward_tokens(self, x, final_norm=True):
        """(B, N, D) patch tokens already position-embedded -> (B, 1 + N, D) after cls, blocks and the final norm."""
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if final_norm else x

    def features(self, imgs):  # (B, 3, H, W) -> (B, D)
        x = self.forward_tokens(self.patch_embed(imgs) + self.pos_embed[:, 1:])
        return x[:, 1:].mean(1) if self.global_pool else x[:, 0]


class ViTClassifier(VisionTransformer):
    """MAE's fine-tuning ViT (models_vit.py, global_pool): learned positions, drop path, patch-token mean -> `fc_norm`
    -> `head`; no final `norm` (a pretrained one is reported unused, as in MAE). MaskFeat calls `fc_norm` `norm`."""
    def __init__(self, num_classes, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.1, pool_norm='fc_norm'):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, True, drop_path)
        del self.norm
        self.pool_norm, self.head = pool_norm, nn.Linear(embed_dim, num_classes)
        setattr(self, pool_norm, nn.LayerNorm(embed_dim, eps=1e-6))
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # main_finetune.py; the encoder comes from the checkpoint
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):  # (B, 3, H, W) -> logits (B, classes)
        x = self.forward_tokens(self.patch_embed(imgs) + self.pos_embed[:, 1:], final_norm=False)
        return self.head(getattr(self, self.pool_norm)(x[:, 1:].mean(1)))


def vit_layer_id(name, depth):
    """MAE's lr_decay.py -> (layer, top): patch_embed, cls_token, pos_embed 0; blocks.i i + 1; the head's top."""
    layer = 0 if name.startswith(('cls_token', 'pos_embed', 'patch_embed')) else \
        int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1
    return layer, depth + 1


ENCODER_KEYS = lambda key: key.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.'))  # timm's


def vit_encoder_state(state):  # any ViT method's state dict (ours or the official one) -> its encoder, timm names
    return {k: v for k, v in clean_state_dict(state).items() if ENCODER_KEYS(k)}


# ---- data: items are (uint8 image (3, H, W), label[, mask input]); normalisation happens on the device ------
def _polar(radii, angles, dx=0.0):  # polygon vertices (x, y) in unit coordinates
    return [(dx + r * np.cos(a), r * np.sin(a)) for r, a in zip(np.broadcast_to(radii, np.shape(angles)), angles)]


CIRCLE = np.linspace(0, 2 * np.pi, 32)
# Each shape: polygons filled with 1 (shape) or 0 (a hole), in unit coordinates, rotated, scaled and placed at random.
SHAPES = {
    'disk': [(_polar(1, CIRCLE), 1)], 'ring': [(_polar(1, CIRCLE), 1), (_polar(0.6, CIRCLE), 0)],
    'crescent': [(_polar(1, CIRCLE), 1), (_polar(0.85, CIRCLE, dx=0.45), 0)],
    'half-disk': [(_polar(1, np.linspace(0, np.pi, 17)), 1)], 'triangle': [(_polar(1, np.arange(3) * 2.094), 1)],
    'square': [(_polar(1, np.arange(4) * np.pi / 2), 1)], 'star': [(_polar([1, .4] * 5, np.arange(10) * .628), 1)],
    'cross': [([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                (-1, .3), (-1, -.3), (-.3, -.3)], 1)],
    'arrow': [([(-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)], 1)],
    'two-bars': [([(-1, -.7), (1, -.7), (1, -.25), (-1, -.25)], 1), ([(-1, .7), (1, .7), (1, .25), (-1, .25)], 1)]}


def make_shapes(n, size, seed):
    """The built-in dataset from seed: n images (n, size, size, 3) uint8, labels (n,). Only the shape is the class;
    colour, size, place, rotation, background and clutter are random; no pixel noise (norm-pix would make it noise)."""
    rng, names = np.random.default_rng(seed), list(SHAPES)
    images, labels = np.empty((n, size, size, 3), np.uint8), rng.integers(0, len(names), n)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i, label in enumerate(labels):
        big, angle = 2 * size, rng.uniform(0, 2 * np.pi)  # drawn at 2x, then box-downsampled to anti-alias
        radius = rng.uniform(0.22, 0.4) * big
        (cx, cy), (cos, sin) = rng.uniform(radius, big - radius, 2), (np.cos(angle), np.sin(angle))
        shape = Image.new('L', (big, big))
        for polygon, fill in SHAPES[names[label]]:
            ImageDraw.Draw(shape).polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
                                           for x, y in polygon], fill=255 * fill)
        c0, c1, fg = rng.uniform(0, 255, (3, 3))
        while np.abs(fg - (c0 + c1) / 2).sum() < 120:  # keep the shape visible against the background
            fg = rng.uniform(0, 255, 3)
        t = ramp[:, None] * np.cos(3 * angle) + ramp[None, :] * np.sin(3 * angle)  # background: a linear gradient
        image = Image.fromarray((c0 + (c1 - c0) * ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]).astype(np.uint8))
        for _ in range(rng.integers(1, 4)):  # thin lines in random colours: clutter, not class evidence
            ImageDraw.Draw(image).line(list(rng.uniform(0, size, 4)), fill=tuple(rng.integers(0, 256, 3).tolist()))
        image.paste(tuple(fg.astype(int).tolist()), mask=shape.resize((size, size), Image.BOX))  # anti-aliased edge
        images[i] = np.asarray(image)
    return images, labels


CIFAR = {  # name: (archive, md5, folder, train files, test files, label key, meta file, class-names key)
    'cifar10': ('cifar-10-python.tar.gz', 'c58f30108f718f92721af3b95e74349a', 'cifar-10-batches-py',
                [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], b'labels', 'batches.meta', b'label_names'),
    'cifar100': ('cifar-100-python.tar.gz', 'eb9058c3a382ffc7106e4002c42a8d85', 'cifar-100-python', ['train'], ['test'],
                 b'fine_labels', 'meta', b'fine_label_names')}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.gif')


def read_cifar(name, root):
    """CIFAR's python archive in root (downloaded, md5-checked if absent) -> {split: (images NHWC, labels)}, names."""
    archive, md5, folder, train_files, test_files, label_key, meta_file, names_key = CIFAR[name]
    url, path = f'https://www.cs.toronto.edu/~kriz/{archive}', os.path.join(root, archive)
    if not all(os.path.isfile(os.path.join(root, folder, f)) for f in (*train_files, *test_files, meta_file)):
        try:
            if not os.path.exists(path):
                os.makedirs(root, exist_ok=True)
                print(f'downloading {url} to {path}')
                with urllib.request.urlopen(url, timeout=60) as response, open(path + '.part', 'wb') as f:
                    f.write(response.read())
                os.replace(path + '.part', path)
        except OSError as e:
            sys.exit(f'error: could not download {url} ({e}). Without network, download {archive} elsewhere and '
                     f'put it at {path} (or its extracted folder {folder}/ in {root}).')
        if (digest := hashlib.md5(open(path, 'rb').read()).hexdigest()) != md5:
            sys.exit(f'error: {path} has md5 {digest}, expected {md5}: it is damaged or not the official archive. '
                     f'Delete it and run again to download it afresh.')
        with tarfile.open(path) as tar:  # extracted aside, then moved: a killed extraction leaves no partial file
            tar.extractall(aside := os.path.join(root, f'.extracting{os.getpid()}'), filter='data')
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for file in os.listdir(os.path.join(aside, folder)):
            os.replace(os.path.join(aside, folder, file), os.path.join(root, folder, file))
        shutil.rmtree(aside)
    unpickle = lambda file: pickle.load(open(os.path.join(root, folder, file), 'rb'), encoding='bytes')
    load = lambda parts: (np.ascontiguousarray(np.concatenate([p[b'data'] for p in parts]).reshape(-1, 3, 32, 32)
                                               .transpose(0, 2, 3, 1)), np.concatenate([p[label_key] for p in parts]))
    try:  # (the files of the archive, md5-checked when extracted here: pickles, as torchvision reads them)
        splits = {'train': load([*map(unpickle, train_files)]), 'val': load([*map(unpickle, test_files)])}  # (N, 3072)
        return splits, [n.decode() for n in unpickle(meta_file)[names_key]]
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError) as e:  # a damaged file
        sys.exit(f'error: {os.path.join(root, folder)} is damaged ({type(e).__name__}: {e}): delete that folder and '
                 f'run again to extract {archive} afresh')


def to_rgb(img):
    """Any Pillow image (L, CMYK, RGBA, P, 16-bit I;16, 32-bit I, float F) -> RGB: I;16 (16-bit PNG, TIFF) always / 257,
    I and F (their range unknown) / 257 only where the image exceeds 255."""
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        values = np.asarray(img, dtype=np.float32)
        deep = img.mode.startswith('I;16') or values.max() > 255  # (I;16 by its mode: a dataset on one scale)
        img = Image.fromarray(np.clip(values / (257.0 if deep else 1.0), 0, 255).astype(np.uint8))
    return img.convert('RGB')


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, H, W, 3) or paths, labels (-1: none) -> (transform(image, rng), label[, draw_mask(rng)]), rng
    from (seed, epoch, i); i + k * N is image i with other draws. A file that will not decode is skipped and counted."""
    def __init__(self, items, labels, classes, seed=0):
        self.items, self.labels, self.classes, self.seed, self.epoch = items, np.asarray(labels), classes, seed, 0
        self.transform, self.draw_mask, self.num_skipped = None, None, Value('i', 0)  # shared with loader workers

    __len__ = lambda self: len(self.items)

    def set_epoch(self, epoch):  # the per-sample draws of this epoch (loader workers are not persistent: they see it)
        self.epoch = epoch

    def load(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            if not isinstance(self.items[j], str):
                return Image.fromarray(np.asarray(self.items[j])), self.labels[j]
            try:
                with Image.open(str(self.items[j])) as img:  # str, not numpy's: its repr is in PIL's messages
                    return to_rgb(img), self.labels[j]
            except Exception as e:  # noqa: BLE001 (whatever the decoder raises, the file is unusable)
                with self.num_skipped.get_lock():
                    self.num_skipped.value += 1
                warnings.warn(f'skipping {self.items[j]}: cannot decode it ({e}); the next image takes its place')
        raise RuntimeError('no image in this dataset can be decoded')

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])  # this sample's randomness, see the module doc
        img, label = self.load(i % len(self))
        return (self.transform(img, rng), label) + ((self.draw_mask(rng),) if self.draw_mask else ())

    def with_transform(self, transform, draw_mask=None):  # a view on the same images, labels and skip counter
        twin = copy.copy(self)
        twin.transform, twin.draw_mask = transform, draw_mask
        return twin


def scan_folder(root, classes=None):
    """-> (paths, labels by class sub-folder, classes); classes=[] reads every image below root as unlabeled (-1).
    Hidden class folders (.ipynb_checkpoints) and hidden files (macOS's ._x.jpg) are left out."""
    if classes is None:
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.'))
        if classes and (loose := [f.name for f in os.scandir(root) if f.is_file() and not f.name.startswith('.') and
                                  f.name.lower().endswith(IMAGE_EXTENSIONS)]):
            warnings.warn(f'{len(loose)} image(s) lie in {root} itself, outside its class folders: left out (as '
                          f'ImageFolder), e.g. {loose[0]}')
    paths, labels = [], []
    for label, folder in enumerate(os.path.join(root, name) for name in classes or ['']):
        found = sorted(os.path.join(sub, f) for sub, _, files in os.walk(folder, followlinks=True)  # as ImageFolder
                       for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
        if not found and classes:  # (val/ may lack a class)
            warnings.warn(f"class folder {folder} {'holds no images' if os.path.isdir(folder) else 'is missing'}; "
                          f"its label is kept")
        paths, labels = paths + found, labels + [label if classes else -1] * len(found)
    return np.array(paths), labels, classes


def available_memory():  # bytes the OS can still give (Linux's MemAvailable; elsewhere unknown: infinite)
    with suppress(OSError), open('/proc/meminfo') as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:')), math.inf)
    return math.inf


def cache_images(dataset, size, num_workers):
    """Decode every image once into a uint8 array (N, size, size, 3), shorter side resized to `size`, centre crop."""
    array = np.empty((len(dataset), size, size, 3), np.uint8)  # copied into, so no worker's tensor is kept alive
    square = dataset.with_transform(EvalTransform(size, crop_pct=1.0))
    loader = torch.utils.data.DataLoader(square, batch_size=256, num_workers=num_workers)  # in order
    for i, (images, _) in enumerate(tqdm(loader, desc=f'caching {len(dataset)} images', disable=not is_main())):
        array[i * 256:(i + 1) * 256] = images.permute(0, 2, 3, 1).numpy()
    return array


def build_datasets(args, train_transform, draw_mask=None):
    """-> pretraining set (train_transform, draw_mask), and (train, val) with the eval transform, or None."""
    if args.data == 'shapes':
        n_val, classes = max(args.shapes_size // 5, 10), list(SHAPES)
        images, labels = make_shapes(args.shapes_size + n_val, args.input_size, args.seed)
        splits = {'train': (images[n_val:], labels[n_val:]), 'val': (images[:n_val], labels[:n_val])}
    elif args.data in CIFAR and not os.path.isdir(os.path.join(args.data_path, 'train')):
        splits, classes = read_cifar(args.data, args.data_path)
    else:  # <data_path>/train/<class>/... with val/ (or test/); else an unlabeled folder of images
        if args.data in CIFAR and is_main():  # (CIFAR's recipe still applies)
            print(f'{args.data_path} holds train/: read as an image folder, not the {args.data} archive')
        root, val = os.path.join(args.data_path, 'train'), os.path.join(args.data_path, 'val')
        val = val if os.path.isdir(val) else os.path.join(args.data_path, 'test')
        if os.path.isdir(val) and not os.path.isdir(root):  # as one unlabeled folder, val/ would be pretrained on
            sys.exit(f'error: {args.data_path} has {os.path.basename(val)}/ but no train/: name its training folder '
                     f'train/')
        *train, classes = scan_folder(root) if os.path.isdir(root) else scan_folder(args.data_path, classes=[])
        labeled = classes and os.path.isdir(val) and any(os.path.isdir(os.path.join(val, c)) for c in classes)
        splits = {'train': train, 'val': scan_folder(val, classes)[:2] if labeled else None}
        if labeled and (unknown := sorted({d.name for d in os.scandir(val) if d.is_dir()} - set(classes))):
            warnings.warn(f'{val} has folders that {root} lacks, their images not evaluated: {", ".join(unknown)}')
        if not len(train[0]):
            sys.exit(f'error: no images ({", ".join(IMAGE_EXTENSIONS)}) found under {args.data_path}')
        if classes and os.path.isdir(val) and not (labeled and len(splits['val'][0])):  # evaluation would crash
            sys.exit(f"error: {val} holds no images in folders named as the classes of {root}: sort it into "
                     f"{val}/<class>/ (ImageNet's val comes flat), or move it away to pretrain only")
    subsets = {split: ImageDataset(*data, classes, seed=args.seed) for split, data in splits.items() if data}
    cache = args.cache and isinstance(splits['train'][0][0], str)
    copies, images = int(os.environ.get('LOCAL_WORLD_SIZE', 1)), sum(map(len, subsets.values()))  # one per process
    if cache and (need := copies * images * args.input_size ** 2 * 3) > (free := available_memory()):  # no OOM kill
        sys.exit(f'error: --cache needs {need / 1e9:.1f} GB ({copies} process(es) x {images} images at '
                 f'{args.input_size} px), {free / 1e9:.1f} GB is available: leave --cache off')  # hours into decoding
    for subset in subsets.values() if cache else ():
        subset.items = cache_images(subset, args.input_size, args.num_workers)
        if subset.num_skipped.value and is_main():  # (an epoch's skipped_images in the log counts only that epoch's)
            print(f'note: {subset.num_skipped.value} undecodable image(s) replaced by the next in the cache, all run')
    evaluation = EvalTransform(args.input_size)
    n = len(subsets['train'])  # one class or one image: a top-1 of 100% by construction, a probe BN cannot train
    few = len(subsets) > 1 and min(n, len(classes)) < 2
    eval_sets = [subsets[s].with_transform(evaluation) for s in subsets] if len(subsets) > 1 and not few else None
    if not eval_sets and is_main():
        why = f'the training split has {n} image(s) of {len(classes)} class(es)' if few else \
            'no labeled val/ (or test/) split' if classes or not os.path.isdir(os.path.join(args.data_path, 'train')) \
            else f"{args.data_path}/train has no class folders (unlabeled)"
        print(f'{why}: pretraining only, evaluation and fine-tuning skipped')
    accum = getattr(args, 'ft_accum_iter', 1)  # fine-tuning's step, checked at the start
    if eval_sets and getattr(args, 'finetune_epochs', 0) and math.ceil(n / args.world_size) < args.batch_size * accum:
        sys.exit(f'error: the training split has {n} images, fewer than one fine-tuning step needs (--ft_batch '
                 f'{args.batch_size * accum * args.world_size}: --batch_size {args.batch_size} x {accum} x '
                 f'{args.world_size} process(es)): lower --ft_batch')
    return subsets['train'].with_transform(train_transform, draw_mask), eval_sets


def to_uint8_tensor(img):  # PIL RGB -> (3, H, W) uint8; the float conversion happens on the device
    return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1)


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic), drawn as torchvision does, then a horizontal flip."""
    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def __call__(self, img, rng):
        return to_uint8_tensor(self.crop_flip(img, rng))

    def crop_flip(self, img, rng):
        W, H = img.size
        for _ in range(10):
            area, aspect = W * H * rng.uniform(*self.scale), math.exp(rng.uniform(*map(math.log, self.ratio)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
                break
        else:  # 10 misses (a 3:2 image at scale (0.67, 1): 18%): torchvision's central crop at the nearest ratio
            w, h = min(W, round(H * self.ratio[1])), min(H, round(W / self.ratio[0]))  # the whole side, one clamped
            left, top = (W - w) // 2, (H - h) // 2
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)  # as torchvision
        # (resize(box=...) would read the pixels just outside the box too, so its border pixels differ by up to 16/255)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if self.flip and rng.random() < 0.5 else img


class EvalTransform:
    """torchvision's Resize(size / crop_pct, bicubic) + CenterCrop(size); crop_pct MAE's, 224/256 to 224 px, 1.0 above
    (util/datasets.py), but 1.0 at 64 px and below (CIFAR; ours)."""
    def __init__(self, size, crop_pct=None):
        self.size, self.crop_pct = size, crop_pct or (0.875 if 64 < size <= 224 else 1.0)

    def __call__(self, img, rng=None):
        (w, h), short = img.size, int(self.size / self.crop_pct)
        w, h = (short, int(h * short / w)) if w <= h else (int(w * short / h), short)  # torchvision: long side floored,
        left, top = int(round((w - self.size) / 2)), int(round((h - self.size) / 2))  # offsets half-even
        return to_uint8_tensor(img.resize((w, h), Image.BICUBIC).crop((left, top, left + self.size, top + self.size)))


def on_device(values, device, made={}):  # a constant tensor made once per device: a host copy would wait for the GPU
    if torch.compiler.is_compiling():  # a constant of the graph (reading the dict, a guard, recompiled the step once)
        return torch.tensor(values, device=device)
    if (values, device) not in made:  # (a dict, not functools.cache, which torch.compile warns about)
        made[values, device] = torch.tensor(values, device=device)
    return made[values, device]


def normalize(images):
    """(B, 3, H, W) uint8, or floats in [0, 1], on the device -> ImageNet mean/std normalised floats."""
    mean, std = (on_device(v, images.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((images.float() / 255 if images.dtype == torch.uint8 else images) - mean) / std


def denormalize(images):  # the inverse of normalize, to [0, 1] floats for pictures
    mean, std = (on_device(v, images.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images.float() * std + mean).clamp(0, 1)


def make_loader(dataset, args, train, sampler=None):
    """Shuffled by (seed, epoch) only, for any world size; training drops the last batch, needs one step's images."""
    sampler = sampler or torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, train, args.seed)
    if train and len(sampler) < args.batch_size * args.accum_iter:
        sys.exit(f'error: the training split has {len(dataset)} images, fewer than one optimizer step needs '
                 f'(--batch_size {args.batch_size} x --accum_iter {args.accum_iter} x {args.world_size} process(es)): '
                 'lower ' + "--accum_iter (a recipe's target batch sets it unless given), or " * (args.accum_iter > 1)
                 + '--batch_size')
    if train and (left := len(sampler) // args.batch_size % args.accum_iter) and is_main():
        print(f'note: the last {left} batch(es) of each epoch fill no optimizer step of {args.accum_iter} accumulated '
              'batches: skipped (the official loop computes them, then discards their gradients)')
    return torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=args.device.type == 'cuda', drop_last=train)


# ---- arguments: MAE's flag names; a flag given > the model's row > the dataset preset > the method default -------
class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, convnets=(), vit=True, **kwargs):  # --model: a ViT name if vit, or one of convnets
        super().__init__(allow_abbrev=False, **kwargs)  # `--epoch 1` is refused, never taken for --epochs
        self.builds = lambda model: model in convnets or vit and VIT_NAME.fullmatch(model)  # parse_args checks it
        self.models = ' or '.join(['a ViT: vit_<tiny|small|base|large|huge>_patch<p>'] * vit +
                                  ['one of ' + ', '.join(convnets)] * (len(convnets) > 0))

    def error(self, message):  # one line, no usage block, no traceback; under torchrun once per node (a check can
        # fail on one node only: its --data_path, its GPUs)
        sys.exit(f'{self.prog}: error: {message} (see --help)' if os.environ.get('LOCAL_RANK', '0') == '0' else 1)


def number(kind, low, high=math.inf, below=False):  # an argparse type: a finite kind (int, float) in [low, high]
    def parse(text):                                  # (below: [low, high)), else one line saying so
        finite = not isinstance(value := kind(text), float) or math.isfinite(value)  # (an int of any size is)
        if not (finite and low <= value <= high) or below and value == high:
            bounds = f'at least {low}' if high == math.inf else f"in [{low}, {high}{')' if below else ']'}"
            raise argparse.ArgumentTypeError(f"must be {bounds if finite else 'finite'}, got {text}")
        return value
    parse.__name__ = kind.__name__  # a word that is no number: argparse's "invalid float value: 'fast'"
    return parse


COUNT, NATURAL, AMOUNT, FRACTION = number(int, 1), number(int, 0), number(float, 0), number(float, 0, 1)
BELOW_ONE = number(float, 0, 1, below=True)  # drop path (1 would drop every block, scale by 1 / 0), an EMA decay
FLAGS = [  # (flag, argparse options, help); a default of None is filled from the dataset preset or the method default
    ('--input_size', dict(type=COUNT), 'image side in pixels'),
    ('--crop_scale', dict(type=FRACTION), 'smallest area fraction of the pretraining RandomResizedCrop'),
    ('--batch_size', dict(type=COUNT), 'images per process and step (effective batch: x accum_iter x world size)'),
    ('--epochs', dict(type=NATURAL), 'pretraining epochs'),
    ('--accum_iter', dict(type=COUNT), 'micro-batches per optimizer step (a preset with a target batch sets it)'),
    ('--blr', dict(type=AMOUNT), 'base learning rate: lr = blr * effective_batch / 256'),
    ('--lr', dict(type=AMOUNT), 'absolute learning rate, instead of --blr'),
    ('--min_lr', dict(type=AMOUNT), 'lower bound of the cosine schedule'),
    ('--weight_decay', dict(type=AMOUNT), 'weight decay'),
    ('--warmup_epochs', dict(type=AMOUNT), 'epochs of linear warmup (from 0; MaskFeat, MFM: from their start lr)'),
    ('--clip_grad', dict(type=AMOUNT), 'clip the global gradient norm of pretraining to this '
     "(fine-tuning: unclipped, as MAE's); 0, or unset without a default: no clipping"),
    ('--data', dict(default='shapes', choices=['shapes', 'cifar10', 'cifar100', 'imagenet', 'folder']),
     'shapes: built in; cifar: its archive (downloaded), or an image folder; imagenet/folder: '
     '<data_path>/train/<class>/*, val/ or test/'),
    ('--data_path', dict(), 'dataset root (unset: ./data)'),
    ('--shapes_size', dict(type=COUNT), 'training images generated for --data shapes'),
    ('--cache', dict(action='store_true'),
     'decode images once into memory (resized, centre-cropped), a copy per process: small datasets'),
    ('--num_workers', dict(type=NATURAL), "data loader processes per training process (unset: the preset's, at most "
     'its share of the cores)'),
    ('--output_dir', dict(), 'one run per folder (default: output/<method>_<data>, or <...>_eval with --eval_only)'),
    ('--resume', dict(default=''), "a checkpoint to continue from, or 'auto' for output_dir/checkpoint-last.pth"),
    ('--save_freq', dict(type=COUNT, default=20), 'keep a numbered checkpoint every this many epochs'),
    ('--eval_only', dict(action='store_true'), 'evaluate the --resume checkpoint, no training'),
    ('--knn_k', dict(type=NATURAL, default=20), 'neighbours of the kNN evaluation (0: no kNN)'),
    ('--probe_epochs', dict(type=NATURAL), 'linear-probe epochs (0: no probe)'),
    ('--finetune_epochs', dict(type=NATURAL, default=0), 'then fine-tune end to end this many epochs, report top-1'),
    ('--ft_blr', dict(type=AMOUNT), 'fine-tuning base lr (lr = ft_blr * effective batch / 256)'),
    ('--ft_batch', dict(type=COUNT), "fine-tuning effective batch, reached by accumulation (default: pretraining's)"),
    ('--ft_warmup_epochs', dict(type=AMOUNT), 'fine-tuning warmup epochs'),
    ('--ft_weight_decay', dict(type=AMOUNT), 'fine-tuning weight decay'),
    ('--ft_drop_path', dict(type=BELOW_ONE), 'fine-tuning stochastic depth'),
    ('--layer_decay', dict(type=FRACTION), 'layer-wise lr decay: layer i of n gets lr * layer_decay^(n - i)'),
    ('--mixup', dict(type=AMOUNT), 'fine-tuning mixup alpha (0: off)'),
    ('--cutmix', dict(type=AMOUNT), 'fine-tuning cutmix alpha (0: off)'),
    ('--smoothing', dict(type=FRACTION), 'fine-tuning label smoothing'),
    ('--reprob', dict(type=FRACTION), 'fine-tuning random-erasing probability'),
    ('--export_encoder', dict(action='store_true'), 'write the encoder in timm names to output_dir/encoder_timm.pth'),
    ('--compile', dict(action='store_true'), 'the training step under torch.compile (minutes of compilation first)'),
    ('--seed', dict(type=NATURAL, default=0), 'seeds the model init and every per-sample random choice'),
    ('--device', dict(default='cuda' if torch.cuda.is_available() else 'cpu'), 'cpu, cuda, or cuda:N (torchrun: cuda)'),
    ('--amp', dict(default='auto', choices=['auto', 'bf16', 'fp16', 'none']), 'bf16, else fp16 on GPUs, else none')]


# MAE's main_finetune.py defaults but mixup / cutmix, FINETUNE.md's (its argparse's: 0); the recipes override them
FINETUNE = dict(ft_blr=1e-3, ft_warmup_epochs=5, ft_weight_decay=0.05, ft_drop_path=0.1, layer_decay=0.75, mixup=0.8,
                cutmix=1.0, smoothing=0.1, reprob=0.25)


def get_args_parser(description, convnets=(), vit=True, **rules):
    """The flags every method shares; --model: a ViT name if `vit` (which adds --global_pool), or one of convnets;
    rules: the method's words for a flag's help, e.g. min_lr='unset: 0.001 x the peak lr'."""
    parser = ArgumentParser(convnets, vit, description=description)
    parser.add_argument('--model', help=parser.models)
    pool = ('--global_pool', dict(action=argparse.BooleanOptionalAction), 'ViT features for kNN / probe: the mean '
            'patch token, not the cls token')
    for flag, options, help in FLAGS + [pool] * vit:
        parser.add_argument(flag, **options, help=f'{help}; {rules[flag[2:]]}' if flag[2:] in rules else help)
    return parser


def show_values(parser, defaults, presets, recipe, argv):
    """Append to each flag's help the default and each preset's value where it differs: '(default 512; shapes: 128)';
    the rows of a --model and --input_size typed in argv (those of each preset's own otherwise)."""
    show = lambda v: ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else f'{v:g}' if isinstance(v, float) else \
        {True: 'on', False: 'off'}.get(v, v) if isinstance(v, bool) else v
    rows = {d: {**FINETUNE, **defaults, **p} for d, p in [('default', {}), *presets.items()]}
    typed = dict(re.findall(r'--(model|input_size)[= ](\S+)', ' '.join(argv)))
    rows = {d: {**row, **recipe(typed.get('model', row['model']), d, int(typed['input_size']) if typed.get(
        'input_size', '').isdigit() else row['input_size'])} for d, row in rows.items()}
    for action in [a for a in parser._actions if a.dest != 'help']:
        values = {d: row.get(action.dest, action.default) for d, row in rows.items()}
        parts = [f'{d}: {show(v)}' for d, v in values.items() if v is not None and (d == 'default' or
                                                                                    v != values['default'])]
        action.help += f" ({'; '.join(parts).replace('default:', 'default')})".replace('%', '%%') if parts else ''


def parse_args(parser, method, defaults, presets, argv=None, recipe=lambda model, data, input_size: {}, pretraining=''):
    """Parse; fill each unset flag from recipe(model, data, input_size) (values that depend on the model: a row),
    presets[data], then `defaults`; validate before any work starts; derive the run's settings -> args. pretraining:
    the method's flags that act on pretraining only (said to do nothing with --eval_only)."""
    argv = sys.argv[1:] if argv is None else argv
    show_values(parser, defaults, presets, recipe, argv)
    args = parser.parse_args(argv)
    if args.lr is not None and args.blr is not None:  # else --blr would be ignored without a word
        parser.error('--lr and --blr both given: --lr sets the lr, --blr scales it with the batch; give one')
    idle = [(f'--{k}', 'it sets fine-tuning, which runs with --finetune_epochs N') for k, v in vars(args).items()
            if v is not None and (k in FINETUNE or k.startswith('ft_')) and not args.finetune_epochs]
    idle += [('--shapes_size', 'it sizes --data shapes')] * (args.shapes_size is not None and args.data != 'shapes')
    idle += [('--cache', 'shapes are made in memory')] * (args.cache and args.data == 'shapes')
    archive = args.data in CIFAR and not os.path.isdir(os.path.join(args.data_path or './data', 'train'))
    idle += [('--cache', f"{args.data}'s archive is read into memory whole")] * (args.cache and archive)
    idle += [('--data_path', '--data shapes is built in: add --data folder (or imagenet, cifar10) to read it')] * (
        args.data_path is not None and args.data == 'shapes')
    pool = getattr(args, 'global_pool', None)  # (a ViT method's flag)
    idle += [(f"--{'no-' * (pool is False)}global_pool", 'it picks the kNN / probe feature, and --knn_k 0 '
              '--probe_epochs 0 turn both off (the fine-tuning ViT always pools)')] * (
        pool is not None and args.knn_k == 0 and args.probe_epochs == 0)
    idle += [('--compile', 'it compiles training steps; add --finetune_epochs N to compile the fine-tune')] * (
        args.compile and args.eval_only and not args.finetune_epochs)
    pretraining += ' epochs blr lr min_lr weight_decay warmup_epochs clip_grad crop_scale save_freq' + ' accum_iter' * (
        not args.finetune_epochs or args.ft_batch is not None)  # (else it sets the fine-tuning batch)
    skipped = [f'--{k}' for k in pretraining.split() if args.eval_only and getattr(args, k) != parser.get_default(k)]
    if idle:  # a flag that changes nothing is refused, not ignored without a word
        parser.error(f'{idle[0][0]} would do nothing here: {idle[0][1]}')
    args.data_path = './data' if args.data_path is None else args.data_path
    filled, workers = {**FINETUNE, **defaults, **presets.get(args.data, {})}, args.num_workers
    for key, value in {**filled, **recipe(args.model or filled['model'], args.data,
                                          args.input_size or filled['input_size'])}.items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.method, args.num_workers = method, min(args.num_workers, cpu_share()) if workers is None else workers
    args.output_dir = args.output_dir or os.path.join('output', f'{method}_{args.data}' + '_eval' * args.eval_only)
    patch, ratio = int(m[2]) if (m := VIT_NAME.fullmatch(args.model)) else 1, getattr(args, 'mask_ratio', 0.5)
    args.world_size, args.rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))  # torchrun's
    for ok, message in [
            (parser.builds(args.model), f"unknown --model '{args.model}': use {parser.models}"),
            (0 < ratio < 1, f'--mask_ratio must be in (0, 1), got {ratio}'),
            (args.input_size % patch == 0,
             f'--input_size {args.input_size} is not divisible by the patch size {patch}'),
            (args.epochs >= 1 or args.eval_only, f'--epochs must be at least 1, got {args.epochs}'),
            (args.data not in ('imagenet', 'folder') or os.path.isdir(args.data_path),
             f'--data_path {args.data_path} is not a folder: point it at a folder with train/<class>/ images'),
            (args.resume in ('', 'auto') or os.path.isfile(args.resume), f'--resume {args.resume}: ' + (
                f'a folder: pass a checkpoint in it, or --resume auto --output_dir {args.resume}' if os.path.isdir(
                    args.resume) else "no such file (use 'auto' to continue the run in --output_dir)")),
            (not (args.eval_only and args.resume == 'auto'), '--eval_only takes --resume FILE (none: random weights)'),
            (re.fullmatch(r'cpu|cuda(:\d+)?', args.device), f'--device {args.device}: use cpu, or cuda (cuda:N for one '
             'GPU of several); other backends (mps, xpu) are not supported'),
            (not (':' in args.device and args.world_size > 1), f'--device {args.device} under '
             'torchrun: each process takes the GPU of its LOCAL_RANK; pass --device cuda (CUDA_VISIBLE_DEVICES picks)'),
            (not args.device.startswith('cuda') or torch.cuda.is_available(), 'no CUDA GPU: use --device cpu')]:
        if not ok:
            parser.error(message)
    # Derived settings, computed here only (printed at start, kept in args.json): the processes (above), device,
    # precision, accumulation towards a preset's target batch, effective batch, lr.
    cuda, local = args.device.startswith('cuda'), f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    args.device = torch.device(local if cuda and args.world_size > 1 else args.device)
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if args.amp == 'auto':
        args.amp = ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if cuda else 'bf16' if cpu_bf16 else 'none'
    per_step, target = args.batch_size * args.world_size, getattr(args, 'target_batch', None)  # a preset's (MAE: 4096)
    typed, args.accum_iter = args.accum_iter, args.accum_iter or accumulation(target, per_step, "the recipe's batch")
    args.eff_batch_size = per_step * args.accum_iter
    official = {**presets.get('imagenet', {}), **recipe(args.model, 'imagenet', args.input_size)}.get('target_batch')
    off = args.data == 'folder' or args.data == 'imagenet' and typed  # (else accumulation() said any shortfall)
    if off and official not in (None, args.eff_batch_size) and not args.eval_only and args.rank == 0:
        print(f"note: --data {args.data} trains at an effective batch of {args.eff_batch_size}, not the ImageNet "
              f"recipe's {official}: --accum_iter {max(1, official // per_step)} reaches it (the lr follows the batch)")
    args.ft_accum_iter = accumulation(args.ft_batch or args.eff_batch_size, per_step, '--ft_batch') \
        if args.finetune_epochs else 1  # unset --ft_batch: pretraining's effective batch
    for warmup, epochs in (('warmup_epochs', 'epochs'), ('ft_warmup_epochs', 'finetune_epochs')):
        if 0 < getattr(args, epochs) <= getattr(args, warmup) and args.rank == 0:  # as the official code, but said
            print(f'note: --{warmup} {getattr(args, warmup):g} >= --{epochs} {getattr(args, epochs)}: the lr rises '
                  f'through the whole run and never reaches its peak')
    args.lr = args.blr * args.eff_batch_size / 256 if args.lr is None else args.lr  # --lr 0 too is taken as given
    if skipped and args.rank == 0:  # said, not refused: a run's own command plus --eval_only --resume is common use
        print(f"note: --eval_only skips pretraining, so {', '.join(skipped)} change(s) nothing")
    return args


def accumulation(batch, per_step, name):  # micro-batches per optimizer step towards an effective batch (None: 1)
    accum = max(1, batch // per_step) if batch else 1
    if batch and accum * per_step != batch and int(os.environ.get('RANK', 0)) == 0:  # before or after dist's init
        print(f'note: {name} {batch} is not a multiple of --batch_size x processes = {per_step}: the effective batch '
              f'is {accum * per_step}, and the lr is scaled to it')
    return accum


def check_mask_count(parser, ratio, kept, cells):  # one masked and one visible cell at least, on this square grid
    if not 1 <= kept <= cells - 1:
        low, side = float(f'{1.5 / cells:.2g}'), math.isqrt(cells)  # 1.5 cells: safe under int() and round() alike
        parser.error(f'--mask_ratio {ratio} keeps {kept} of the {cells} cells of the {side}x{side} mask grid visible: '
                     'it must mask one and keep one (' + (f'on this grid use a value in [{low:g}, {1 - low:g}])' if
                     cells > 1 else 'a larger --input_size, or a model that patches or downsamples less, gives more '
                                    'cells)'))


def cpu_share():  # the cores this process may use, shared with torchrun's other processes on this machine
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def setup(args):
    """The process group (NCCL on GPUs, gloo on CPUs), CPU threads, the seed, and the output folder: refused if it
    holds another run, rid of the temporary files of killed saves, checked writable; all before any work."""
    if args.world_size > 1:
        torch.cuda.set_device(args.device) if args.device.type == 'cuda' else None
        dist.init_process_group('nccl' if args.device.type == 'cuda' else 'gloo')
    if args.device.type == 'cpu':  # freed memory kept for the next step; the cores this process may use
        keep_freed_memory()
        if 'OMP_NUM_THREADS' not in os.environ:
            torch.set_num_threads(min(torch.get_num_threads(), cpu_share()))
    torch.manual_seed(args.seed + args.rank)  # the model init is broadcast from rank 0 by DDP anyway
    last, epochs = os.path.join(args.output_dir, 'checkpoint-last.pth'), [int(m[1]) for f in glob.glob(os.path.join(
        glob.escape(args.output_dir), 'checkpoint-*.pth')) if (m := re.search(r'checkpoint-(\d+)\.pth$', f))]
    newest = last if os.path.isfile(last) else os.path.join(args.output_dir, f'checkpoint-{max(epochs)}.pth') \
        if epochs else None  # (checkpoint-last.pth deleted: the run's newest numbered one)
    try:  # nothing of this run is written yet (resume writes args.json once a checkpoint is accepted): a probe
        if is_main():
            os.makedirs(args.output_dir, exist_ok=True)
            lock_folder(args.output_dir)  # first: a living run there is said, and its files are left alone
            if newest and (args.eval_only or os.path.abspath(checkpoint_path(args)) != os.path.abspath(newest)):
                sys.exit(f'error: {args.output_dir} holds a training run ({os.path.basename(newest)}): ' + (
                    'give --eval_only its own --output_dir' if args.eval_only else 'continue it with --resume ' + (
                        'auto' if newest == last else newest) + ', or give another --output_dir ' + (
                        f'to continue from {args.resume} there' if args.resume not in ('', 'auto') else
                        'to start afresh (or delete that folder)')))
            for leftover in glob.glob(os.path.join(glob.escape(args.output_dir), '**', '*.pth.tmp*'), recursive=True):
                os.remove(leftover)  # a save killed half-way: its target file was never replaced
            open(probe := os.path.join(args.output_dir, f'.write_test{os.getpid()}'), 'w').close()
            os.remove(probe)
    except OSError as e:
        sys.exit(f'error: cannot write to --output_dir {args.output_dir} ({e.strerror}): choose one you can write to')
    if is_main():
        print(f'{args.method}: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
        print(f'effective batch {args.eff_batch_size}, lr {args.lr:.3g}, {args.world_size} process(es) on '
              f'{args.device.type}, {torch.get_num_threads()} CPU threads, autocast {args.amp}')
        if (getattr(args, 'min_lr', None) or 0) > args.lr:  # the official schedules do the same, without a word
            print(f'note: --min_lr {args.min_lr:g} is above the peak lr {args.lr:.3g}: after warmup the lr rises to it')
        if args.finetune_epochs and (args.mixup or args.cutmix) and args.batch_size % 2:  # (timm: "should be even")
            print(f'note: --batch_size {args.batch_size} is odd: fine-tuning mixes its middle image with itself')
        if args.amp == 'fp16' and args.device.type == 'cpu':  # measured: throughput.py, 2-core EPYC, torch 2.13
            print('note: --amp fp16 has no fast CPU kernels: MAE\'s small preset ran 23x slower than with none, 55x '
                  'than bf16')


def keep_freed_memory():
    """glibc gives large freed blocks back, so each CPU step faults its activations in again (MAE ViT-B: 13% slower):
    blocks <= 32 MiB come from the heap, 2 GiB of it kept. Linux / glibc only."""
    if sys.platform.startswith('linux') and hasattr(libc := ctypes.CDLL(None), 'mallopt'):
        libc.mallopt(-3, 32 << 20), libc.mallopt(-1, 2 ** 31 - 1)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (process-wide)


def lock_folder(folder):  # POSIX: one living run per folder (the lock on the folder itself goes with its process)
    if fcntl and (folder := os.path.abspath(folder)) not in HELD:
        try:
            fcntl.flock(HELD.setdefault(folder, os.open(folder, os.O_RDONLY)), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f'error: another run is writing into {folder} now: let it finish, or give another --output_dir')
        except OSError as e:  # a file system without locks (some network ones): unguarded, as on Windows, but said
            print(f'note: {folder} cannot be locked ({e.strerror}): a second run started into it is not refused')


def plain(args):  # the arguments as a dict of plain values, for JSON and weights-only checkpoints
    return {k: str(v) if isinstance(v, torch.device) else list(v) if isinstance(v, tuple) else v
            for k, v in vars(args).items()}


def wrap_ddp(model, args):
    cuda = args.device.type == 'cuda'
    return nn.parallel.DistributedDataParallel(model, [args.device] if cuda else None) if args.world_size > 1 else model


def mean_over_processes(loss, count):
    """A loss averaged over this process's `count` items (masked patches, removed frequencies), counts differing between
    processes -> the loss whose gradient, as DDP averages it, is that of the mean over all processes' items."""
    world, count = dist.get_world_size() if dist.is_initialized() else 1, count.detach().float()
    return loss if world == 1 else loss * count * world / sum_over_processes(count.clone())  # (in place: a copy)


# ---- optimisation: AdamW with MAE's weight-decay groups, warmup + half-cosine per iteration, the epoch loop --
def param_groups(model, weight_decay, no_decay_names=(), layer_id=None, layer_decay=1.0):
    """timm 0.3.2's add_weight_decay (MAE): no decay on 1-D tensors and biases (the 3-D cls / mask tokens ARE decayed),
    frozen ones left out; fine-tuning's layer decay (lr_decay.py): layer_id(name) -> (i, n) scales the lr by
    layer_decay^(n - i). Ordered by layer, no decay first: pretraining gets [no decay, decay]."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or name.endswith('.bias') or name in no_decay_names
            layer, top = layer_id(name) if layer_id else (0, 0)
            group = groups.setdefault((layer, not skip), {'params': [], 'weight_decay': 0.0 if skip else weight_decay,
                                                          'lr_scale': layer_decay ** (top - layer)})
            group['params'].append(param)
    return [groups[key] for key in sorted(groups)]


def adamw(model, args, betas, no_decay_names=()):
    """torch's AdamW over MAE's groups; the fused kernel on CPUs too (equal steps within 1e-6, measured faster)."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay, no_decay_names), lr=args.lr, betas=betas,
                             fused=True)


def adjust_learning_rate(optimizer, epoch, args):
    """Linear warmup from 0 over warmup_epochs, then half-cosine to min_lr; epoch is fractional (per iteration)."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr


def optimizer_step(model, optimizer, scaler, clip_grad=None, on_step=None):
    """Clip the unscaled gradient norm, step, update the scaler (a disabled GradScaler unless fp16), zero, on_step()."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    on_step() if on_step else None


def train_one_epoch(model, loss_fn, loader, optimizer, epoch, device, accum_iter=1, amp=None, scaler=None,
                    clip_grad=None, schedule=None, on_step=None, output_dir=None, compile=False):
    """One pass over any DataLoader of (images, labels[, mask input]) (set_epoch on its sampler and dataset if they have
    it): loss_fn(model, images, labels, mask_input or None) -> (loss, logs) under autocast(amp dtype or None), compiled
    with `compile`; schedule(optimizer, epoch) before each optimizer step, on_step() after. Losses are read every 20
    steps; a non-finite one stops the run. A trailing partial accumulation is dropped. -> the epoch's means, speed."""
    model.train()
    loss_fn, scaler = torch.compile(loss_fn) if compile else loss_fn, scaler or torch.amp.GradScaler(enabled=False)
    for owner in (loader.sampler, loader.dataset):
        getattr(owner, 'set_epoch', lambda epoch: None)(epoch)
    if skipped := getattr(loader.dataset, 'num_skipped', None):
        skipped.value = 0  # this epoch's undecodable files (shared with the loader's workers)
    steps, world = len(loader) // accum_iter * accum_iter, dist.get_world_size() if dist.is_initialized() else 1
    sums, first_bad, seen, start = {}, torch.tensor(-1, device=device), 0, time.time()
    bar = tqdm(total=steps, desc=f'epoch {epoch}', disable=not is_main(), mininterval=1, dynamic_ncols=True)
    with interrupt_said(f'in epoch {epoch}', output_dir, bar):  # Ctrl-C: one line saying what is kept
        for step, (images, labels, *mask_input) in zip(range(steps), loader):
            if step % accum_iter == 0 and schedule:
                schedule(optimizer, epoch + step / len(loader))  # engine_pretrain.py: data_iter_step / len(loader)
            images, labels, *mask_input = [t.to(device, non_blocking=True) for t in (images, labels, *mask_input)]
            seen, update = seen + len(images) * world, (step + 1) % accum_iter == 0
            with model.no_sync() if hasattr(model, 'no_sync') and not update else nullcontext():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss, logs = loss_fn(model, images, labels, *mask_input or [None])
                scaler.scale(loss / accum_iter).backward()
            if update:
                optimizer_step(model, optimizer, scaler, clip_grad, on_step)
            for key, value in {'loss': loss, **logs}.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            if (step + 1) % 20 == 0 or step + 1 == steps:
                if first_bad.item() >= 0:
                    bar.close()
                    sys.exit(f'error: non-finite loss at epoch {epoch}, step {first_bad.item()}: stopping; '
                             f'{kept(output_dir)} (try a lower lr: --blr, or --ft_blr when fine-tuning; --amp none; '
                             '--clip_grad when pretraining)')
                lr = optimizer.param_groups[-1]['lr']
                bar.set_postfix(loss=f"{sums['loss'].item() / (step + 1):.4f}",
                                img_s=f'{seen / (time.time() - start):.0f}', lr=f'{lr:.2e}')
                bar.update(step + 1 - bar.n)
    bar.close()
    stats = torch.stack(list(sums.values())) / (max(steps, 1) * world)
    if world > 1:
        dist.all_reduce(stats)
    elapsed, cuda = time.time() - start, device.type == 'cuda'  # on CPUs: the process's peak resident memory
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_resident_memory()
    if skipped:  # summed over the processes, each reading its own share
        dist.all_reduce(count := torch.tensor(skipped.value, device=device)) if world > 1 else None
    return {**{f'train_{k}': v for k, v in zip(sums, stats.tolist())}, 'lr': optimizer.param_groups[-1]['lr'],
            'images_per_s': seen / elapsed, 'epoch_time_s': elapsed, 'peak_mem_mb': peak and peak / 2 ** 20,
            **({'skipped_images': int(count) if world > 1 else skipped.value} if skipped else {})}


def kept(output_dir):  # what a stopped run leaves
    last = os.path.join(output_dir or '', 'checkpoint-last.pth')
    return f'{last} (the last finished epoch) is intact' if output_dir and os.path.isfile(last) else \
        f'no checkpoint in {output_dir or "this run"} yet'


@contextmanager
def interrupt_said(where, output_dir, bar=None):  # Ctrl-C: one line saying what is kept, not a traceback
    try:
        yield
    except KeyboardInterrupt:
        bar.close() if bar is not None else None
        left, again = kept(output_dir), os.path.basename(output_dir or '') == 'finetune'  # (finetune: the same command)
        sys.exit(f'interrupted {where}: {left}' + (': the same command continues it (--resume auto if it pretrains)'
                 if again else ': continue with --resume auto') * ('intact' in left)
                 if os.environ.get('LOCAL_RANK', '0') == '0' else 1)  # once per node (the others: the status alone)


def peak_resident_memory():  # bytes, the most this process has held: Linux counts KiB, macOS bytes; Windows: None
    return resource and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)


def step_settings(args):  # train_one_epoch's settings from a run's arguments
    return dict(device=args.device, accum_iter=args.accum_iter, amp=AMP[args.amp], clip_grad=args.clip_grad,
                scaler=torch.amp.GradScaler(args.device.type, enabled=args.amp == 'fp16'),
                output_dir=args.output_dir, compile=args.compile)


AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}


def log_stats(args, stats):  # one JSON line per call in output_dir/log.txt
    if is_main():
        with open(os.path.join(args.output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


# ---- checkpoints: atomic writes, weights-only loads, exact resume (model, optimizer, scaler, epoch, RNG, log) ---
def atomic_save(state, path):
    """Write to a temporary file, fsync, rename: a crash mid-save never leaves a broken file at `path`. A failed write
    (a full disk) removes its temporary file and stops the run with one line; `path` is left as it was."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sys.platform != 'win32':  # make the rename itself durable (Windows cannot open a folder: skipped there)
            directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            os.fsync(directory)
            os.close(directory)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 30
        sys.exit(f'error: could not write {path} ({getattr(e, "strerror", None) or str(e).splitlines()[0]}; '
                 f'{free:.2f} GiB free there): the file is unchanged; make room, then run again with --resume auto')


def save_checkpoint(args, epoch, model, optimizer, scaler=None, **extra):
    """checkpoint-<epoch>.pth every save_freq epochs and at the end, then checkpoint-last.pth each epoch, with log.txt's
    lines so far, the arguments, every rank's RNG state and `extra` (a teacher's weights)."""
    rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if args.device.type == 'cuda' else []}
    rngs = [rng] * args.world_size
    if args.world_size > 1:
        dist.all_gather_object(rngs, rng)
    if not is_main():
        return
    log = os.path.join(args.output_dir, 'log.txt')
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch, 'args': plain(args),
             'scaler': scaler.state_dict() if scaler else {}, 'rng': rngs, **extra,
             'log': open(log).read().splitlines() if os.path.isfile(log) else []}
    if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
        atomic_save(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
    atomic_save(state, os.path.join(args.output_dir, 'checkpoint-last.pth'))


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain containers only, nothing in the file is executed. A file
    that is not a checkpoint, is cut short or pickles Python objects stops the run with one line that says so."""
    try:  # argparse.Namespace is allowed: MAE's and our older checkpoints keep their arguments as one (made a dict)
        if zipfile.is_zipfile(path):  # torch.load checks no CRC: flipped bytes in a tensor would load as other weights
            with zipfile.ZipFile(path) as archive:  # (saved with torch's compute_crc32 off: every CRC 0, none to check)
                if any(entry.CRC for entry in archive.infolist()) and (bad := archive.testzip()):
                    raise ValueError(f'{bad} fails its checksum')
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get('args'), argparse.Namespace):
            checkpoint['args'] = vars(checkpoint['args'])
        return checkpoint
    except Exception as e:  # noqa: BLE001 (each way torch.load fails is told apart below, in one line)
        zipped = open(path, 'rb').read(4) == b'PK\x03\x04'  # torch.save's format is a zip archive
        pickled = found[1] if (found := re.search(r'GLOBAL (\S+)', str(e))) else ''  # what torch refused to import
        sys.exit(f'error: cannot load {path}: ' + (
            f'it holds pickled Python objects ({pickled}), not only tensors, and loading it could run code; if you '
            f'trust it, keep its weights only (README, "Fine-tuning and released checkpoints")' if pickled else
            "it is truncated or damaged: copy or download it again (a run's own checkpoint-last.pth: delete it, then "
            'continue from its newest checkpoint-<epoch>.pth if any, else start again)' if zipped else
            'it is not a PyTorch checkpoint (or one cut short)'))


def checkpoint_path(args):  # --resume: a file, 'auto' for the run in output_dir, or '' for none
    return os.path.join(args.output_dir, 'checkpoint-last.pth') if args.resume == 'auto' else args.resume


def clean_state_dict(state_dict):  # strip the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes
    return {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in state_dict.items()}


NOT_IN_A_RESULT = {'resume', 'eval_only', 'output_dir', 'num_workers', 'device', 'save_freq', 'knn_k', 'probe_epochs',
                   'compile', 'rank', 'export_encoder', 'global_pool', 'resumed'}  # how a run goes or is evaluated,
# not what it trains (global_pool: the kNN / probe feature; the fine-tuning ViT always pools; resumed: a record)
SPLIT = {'batch_size', 'world_size', 'accum_iter', 'ft_accum_iter'}  # how an effective batch is split (pretraining:
# N processes equal one)
RESUME_FREE = NOT_IN_A_RESULT | SPLIT | {'epochs', 'finetune_epochs', 'ft_batch', 'amp', *FINETUNE}  # a resume may
# change them unwarned (SPLIT: how the effective batch is split; a change of its size or of the lr is warned)


def resume(args, model, optimizer=None, scaler=None, convert=None, encoder=ENCODER_KEYS, **extra_modules):
    """Load --resume into model, extra modules, optimizer, scaler, RNG, log.txt -> the epoch to start at (a fresh start
    empties log.txt, an earlier one kept); changed settings are printed and recorded, another network refused. With
    no optimizer (--eval_only) the weights convert(checkpoint) (default its 'model') load leniently, but every tensor
    with encoder(key) must load."""
    path = checkpoint_path(args)
    checkpoint = load_checkpoint(path) if path and os.path.isfile(path) else None
    if checkpoint is not None and not (isinstance(checkpoint, dict) and checkpoint):  # a tensor, a list, {}
        sys.exit(f'error: {path} holds {"nothing" if checkpoint == {} else type(checkpoint).__name__}, not weights: '
                 f'pass a checkpoint or a state dict')
    if checkpoint and not convert and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):  # a bare state
        checkpoint = {'model': checkpoint}  # dict, as --export_encoder writes (for --eval_only: it continues no run)
    if checkpoint is None or optimizer is None:
        state = (convert(checkpoint) if convert else checkpoint.get('model', {})) if checkpoint else {}
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
        if checkpoint and not state:  # e.g. {'state_dict', 'epoch'} of another framework
            sys.exit(f"error: {path} holds no weights {args.method}.py reads (its entries: "
                     f"{', '.join(map(str, checkpoint))}): pass a checkpoint of this project or of the official code, "
                     f"or a bare state dict")
        if any(re.search(r'(^|\.)(head|fc)\.weight$', k) for k in state):  # its encoder may load whole: refused
            sys.exit(f'error: {path} is a fine-tuned classifier (it has a head), not pretrained weights: pass the '
                     f'checkpoint it was fine-tuned from')
        by = made.get('method') if isinstance(made := checkpoint and checkpoint.get('args'), dict) else None  # named
        source = f'{path} (made by {by}.py)' if by not in (None, getattr(args, 'method', None)) else path  # if another
        missing = checkpoint and load_pretrained(model, state, source, encoder)[0]  # (the decoder, often)
        if is_main():  # (a file that does not fit has stopped the run: the folder is as it was)
            start_run(args)  # a new run: its arguments, an empty log
            if checkpoint is None and optimizer is None:
                print('note: --eval_only without --resume: the "trained" weights are the random init')
            elif checkpoint is None and args.resume == 'auto':  # a typo in --output_dir shows here
                print(f'note: --resume auto: no checkpoint-last.pth in {args.output_dir}, so the run starts afresh')
            if missing:
                print(f"note: the tensors missing from {path} keep their random init, in this run's pictures too")
        return 0
    if not {'model', 'optimizer'} <= checkpoint.keys() or not isinstance(checkpoint['model'], dict):  # HPM's: a name
        sys.exit(f'error: {path} holds no model and optimizer state, so it cannot continue a run: evaluate it with '
                 f'--eval_only --resume {path}, or fine-tune from it (README, "Fine-tuning and released checkpoints")')
    saved, now, modules = dict(checkpoint.get('args', {})), plain(args), {'model': model, **extra_modules}
    saved['model'] = re.sub(r'^mae_(vit_)', r'\1', saved.get('model', args.model))  # official: 'mae_vit_base_patch16'
    moved = {k: v for k, v in saved.items() if k not in NOT_IN_A_RESULT and now.get(k, v) != v}  # v: the saved value
    changed = [f"{'effective batch' if k == 'eff_batch_size' else '--' + k} {now[k]} (was {v})"
               for k, v in moved.items() if k not in RESUME_FREE]
    if (made := f"{saved.get('method', args.method)}.py --model {saved['model']}") != (
            run := f'{args.method}.py --model {args.model}'):  # another method's run, or another network
        sys.exit(f'error: {path} was made by {made}, this run is {run}: resume it with {made}, or start afresh with '
                 f'another --output_dir')
    if problem := next(filter(None, (mismatches(m.state_dict(), clean_state_dict(checkpoint[k]))
                                     for k, m in modules.items())), ''):
        sys.exit(f"error: {path} does not fit this run's network ({problem}; settings that differ: "
                 f"{', '.join(changed) or 'none'}): resume with its settings, or start afresh in another --output_dir")
    if is_main() and changed:
        print(f"warning: resuming {path} with settings that differ from its own: {', '.join(changed)}")
    if checkpoint['epoch'] + 1 > args.epochs:  # else it would be evaluated and logged as an --epochs run
        sys.exit(f"error: {path} has trained {checkpoint['epoch'] + 1} epochs, more than --epochs {args.epochs}: "
                 f"resume with --epochs {saved.get('epochs', checkpoint['epoch'] + 1)} or evaluate it with --eval_only")
    if is_main() and saved.get('epochs') != args.epochs:
        print(f"note: the run now lasts {args.epochs} epochs (was {saved.get('epochs')}): each schedule (the lr's, the "
              f"method's) follows the new length from epoch {checkpoint['epoch'] + 1} on")
    args.resumed = saved.get('resumed', []) + [f"from epoch {checkpoint['epoch'] + 1}: " + ', '.join(
        f'{k} {v} -> {now[k]}' for k, v in moved.items())] * bool(moved)  # args.json: what each epoch ran under
    for key, module in modules.items():
        module.load_state_dict(clean_state_dict(checkpoint[key]))
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler') and scaler:  # {}: saved by a run that was not fp16 (a resume may change --amp)
        scaler.load_state_dict(checkpoint['scaler'])
    if len(checkpoint.get('rng', ())) == args.world_size:  # same world size: each rank continues its own random stream
        torch.set_rng_state(checkpoint['rng'][args.rank]['torch'])
        if args.device.type == 'cuda':
            torch.cuda.set_rng_state_all(checkpoint['rng'][args.rank]['cuda'])
    elif is_main():  # the per-sample draws are (seed, epoch, index)'s, whatever the world size
        print(f"note: {path} holds the random state of {len(checkpoint.get('rng', ()))} process(es), this run has "
              f"{args.world_size}: data, crops and masks continue exactly, torch's draws (drop path) from --seed")
    if is_main():  # the log as it was at that checkpoint (none saved: kept); lines written after it go, but for
        log, file = checkpoint.get('log'), os.path.join(args.output_dir, 'log.txt')  # evaluations of its weights
        written = open(file).read().splitlines() if log is not None and os.path.isfile(file) else []
        if log is not None and written[:len(log)] == log:  # (a finished run's, evaluated again)
            log = log + [line for line in written[len(log):] if '"evaluation": true' in line and line.endswith('}')]
        start_run(args, log)
        print(f"resumed from {path}: epoch {checkpoint['epoch']} done, on at epoch {checkpoint['epoch'] + 1}")
    return checkpoint['epoch'] + 1


def start_run(args, log_lines=()):  # args.json, and log.txt with the lines of the run so far (None: kept)
    log, named = os.path.join(args.output_dir, 'log.txt'), os.path.join(args.output_dir, 'args.json')
    if log_lines == () and os.path.isfile(log) and os.path.getsize(log):  # results of a run with no checkpoint
        n = next(i for i in range(1, sys.maxsize) if not os.path.exists(f'{args.output_dir}/log-{i}.txt'))
        for old, new in [(log, f'log-{n}.txt')] + [(named, f'args-{n}.json')] * os.path.isfile(named):
            os.replace(old, os.path.join(args.output_dir, new))
        print(f'note: {args.output_dir} held the log of an earlier run (no checkpoint): kept as log-{n}.txt, '
              f'its arguments as args-{n}.json')
    with open(named, 'w') as f:
        json.dump(plain(args), f, indent=1)
    if log_lines is not None:
        with open(log, 'w') as f:
            f.writelines(line + '\n' for line in log_lines)


def mismatches(own, theirs, bad=None):  # '' or 'blocks.0.attn.qkv.weight: (1152, 384) in the file, (576, 192) here'
    bad = bad or [k for k in own if k in theirs and own[k].shape != theirs[k].shape] + sorted(own.keys() ^ theirs)
    shape = lambda state, k: tuple(state[k].shape) if k in state else 'none'
    return bad and (f'{bad[0]}: {shape(theirs, bad[0])} in the file, {shape(own, bad[0])} here' +
                    (f'; {len(bad) - 1} more' if len(bad) > 1 else ''))


def resize_pos_embed(table, num_patches):
    """(1, 1 + L0, D) -> (1, 1 + L, D): the grid resized bicubically, cls slot kept (MAE's interpolate_pos_embed)."""
    old, new, dim = math.isqrt(table.shape[1] - 1), math.isqrt(num_patches), table.shape[2]
    grid = F.interpolate(table[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2).float(), size=(new, new),
                         mode='bicubic', align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(table.dtype)], dim=1)


def load_pretrained(model, state, source, required=None):
    """Load non-strictly (prefixes stripped, pos_embed resized, tensors of other shapes left out), print and return the
    keys missing and unused; stop, saying what the file holds, if a key with required(key) does not load."""
    own, state = model.state_dict(), clean_state_dict(state)
    resized = ''  # said, as MAE's interpolate_pos_embed says it
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        n = own['pos_embed'].shape[1] - 1
        resized = f"; pos_embed resized from the file's {state['pos_embed'].shape[1] - 1} patches to {n}"
        state['pos_embed'] = resize_pos_embed(state['pos_embed'], n)
    unused = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=False)
    count = lambda keys: ', '.join(f'{k} ({n})' for k, n in Counter(k.split('.')[0] for k in keys).items())
    if required and (lacking := [k for k in own if required(k) and (k in missing or k in unused)]):
        sys.exit(f'error: {source} does not fit this network: {len(lacking)} of its {sum(map(required, own))} encoder '
                 f'tensors do not load ({mismatches(own, state, lacking)}); the file holds {len(state)} tensors: '
                 f'{count(state) or "none"}: pass the --model (and sizes) it was made with, to the method file that '
                 f'made it')
    if is_main():  # keys counted by their first name: 'decoder_blocks (96)'
        print(f'loaded {source}: missing {count(missing) or "none"}; unused {count(unexpected + unused) or "none"}'
              + resized)
    return sorted(missing), sorted(unexpected + unused)


# ---- evaluation on frozen features: kNN (DINO protocol) and a linear probe (MAE protocol) -------------------
@torch.no_grad()
def extract_features(function, dataset, args, desc='features'):
    """function(images) (B, D) -> (N, D) floats, (N,) labels of a split, sharded over ranks and gathered to all."""
    features, labels = [], []
    bar = tqdm(make_loader(dataset, args, train=False), desc=desc, disable=not is_main(), mininterval=1,
               dynamic_ncols=True, leave=False)
    with interrupt_said('in the evaluation', getattr(args, 'output_dir', None), bar):
        for images, label, *_ in bar:
            with torch.autocast(args.device.type, dtype=AMP[args.amp], enabled=args.amp != 'none'):
                features.append(function(normalize(images.to(args.device, non_blocking=True))).float())
            labels.append(label.to(args.device))
    def gather(local):  # the sampler dealt index i to rank i % world_size: interleave the shards back
        shards = [torch.empty_like(local) for _ in range(args.world_size)]
        dist.all_gather(shards, local)
        return torch.stack(shards, 1).flatten(0, 1)[:len(dataset)]
    features, labels = torch.cat(features), torch.cat(labels)
    return (gather(features), gather(labels)) if args.world_size > 1 else (features, labels)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07):
    """Weighted kNN (DINO): cosine similarity of L2-normalised features, the k nearest vote with exp(sim / T)."""
    train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    correct, chunk = 0, 256  # (256, N_train) similarities: 1.3 GB at ImageNet's 1.28M (DINO: 500 at a time)
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start:start + chunk] @ train_features.T  # (b, N_train)
        top_sim, top_idx = similarity.topk(min(k, len(train_features)), dim=1)
        votes = torch.zeros(len(top_sim), num_classes, device=top_sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(test_features)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, num_classes, epochs, seed=0):
    """MAE's head, BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc-normal 0.01), on features extracted once without
    augmentation. SGD (momentum 0.9, lr 0.1 per 256, cosine) replaces LARS at batch 16384."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_features.shape[1], num_classes)).to(train_features.device)
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    batch = min(256, len(train_features))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1 * batch / 256, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * (len(train_features) // batch), 1))
    for _ in tqdm(range(epochs), desc='linear probe', disable=not is_main(), leave=False, dynamic_ncols=True):
        order = torch.randperm(len(train_features), generator=generator).to(train_features.device)
        for idx in order[:len(order) // batch * batch].view(-1, batch):
            optimizer.zero_grad()
            F.cross_entropy(head(train_features[idx]), train_labels[idx]).backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return 100.0 * (head.eval()(test_features).argmax(1) == test_labels).float().mean().item()


def evaluate(args, trained, build_random, eval_sets):
    """kNN and linear-probe top-1 of `trained` and of build_random() (.features(images) each), printed and logged."""
    torch.manual_seed(args.seed)  # the random-init baseline is the same network whatever happened before
    encoders = {'trained': trained, 'random_init': build_random().to(args.device)}
    results, num_classes = {}, len(eval_sets[0].classes) if eval_sets else 0
    with interrupt_said('in the evaluation', args.output_dir):  # (the kNN and the probe's fit too)
        for name, encoder in encoders.items() if eval_sets and (args.knn_k or args.probe_epochs) else ():
            (train_f, train_y), (val_f, val_y) = [extract_features(encoder.eval().features, s, args, f'{name} {split}')
                                                  for s, split in zip(eval_sets, ('train', 'val'))]
            if args.knn_k and is_main():
                results[f'{name}_knn_top1'] = knn_accuracy(train_f, train_y, val_f, val_y, num_classes, args.knn_k)
            if args.probe_epochs and is_main():
                results[f'{name}_probe_top1'] = linear_probe_accuracy(train_f, train_y, val_f, val_y, num_classes,
                                                                      args.probe_epochs, args.seed)
    k = min(args.knn_k, len(eval_sets[0]) if eval_sets else 0)  # as knn_accuracy: no more than the training images
    for metric, title in (('knn', f'kNN (k={k})'), ('probe', 'linear probe')):
        if found := [f'{n} {results[key]:.2f}%' for n in encoders if (key := f'{n}_{metric}_top1') in results]:
            print(f'{title:>14} top-1: ' + ', '.join(found))  # only rank 0 has results
    done = {'checkpoint': args.resume or None} if args.eval_only else {'epoch': args.epochs - 1}  # what was evaluated
    line, log = {**done, 'evaluation': True, **results}, os.path.join(args.output_dir, 'log.txt')
    if not (os.path.isfile(log) and json.dumps(line) in open(log).read().splitlines()[-1:]):  # a finished run, resumed
        log_stats(args, line)  # (its fine-tune killed), gives the same line: written once, as by an unbroken run
    return results


# ---- fine-tuning end to end (MAE's main_finetune.py recipe), the evaluation the papers report ---------------------
def _affine(img, coefficients):  # shear / translate: bicubic, uncovered pixels filled with the ImageNet mean
    return img.transform(img.size, Image.AFFINE, coefficients, resample=Image.BICUBIC, fillcolor=(124, 116, 104))


def _lookup(img, table):  # the same 256-entry table on each of the 3 channels
    return img.point([table(v) for v in range(256)] * 3)


# timm's rand-m9-mstd0.5-inc1 ops (auto_augment.py, 'increasing' set): name -> (random sign?, op(img, m, sign)), the
# magnitude m on timm's 0-10 scale. Posterize at m = 10 keeps 0 bits (black), which Pillow 13 refuses: own table.
RAND_OPS = {
    'AutoContrast': (False, lambda img, m, s: ImageOps.autocontrast(img)),
    'Equalize': (False, lambda img, m, s: ImageOps.equalize(img)),
    'Invert': (False, lambda img, m, s: ImageOps.invert(img)),
    'Rotate': (True, lambda img, m, s: img.rotate(s * m / 10 * 30, Image.BICUBIC, fillcolor=(124, 116, 104))),
    'PosterizeIncreasing': (False, lambda img, m, s: _lookup(img, lambda v: v & ~(2 ** (4 + int(m / 10 * 4)) - 1))),
    'SolarizeIncreasing': (False, lambda img, m, s: ImageOps.solarize(img, 256 - int(m / 10 * 256))),
    'SolarizeAdd': (False, lambda img, m, s: _lookup(img, lambda v: min(255, v + int(m / 10 * 110)) if v < 128 else v)),
    **{name: (True, lambda img, m, s, kind=kind: kind(img).enhance(max(0.1, 1 + s * m / 10 * 0.9)))
       for name, kind in [('ColorIncreasing', ImageEnhance.Color), ('ContrastIncreasing', ImageEnhance.Contrast),
                          ('BrightnessIncreasing', ImageEnhance.Brightness),
                          ('SharpnessIncreasing', ImageEnhance.Sharpness)]},
    'ShearX': (True, lambda img, m, s: _affine(img, (1, s * m / 10 * 0.3, 0, 0, 1, 0))),
    'ShearY': (True, lambda img, m, s: _affine(img, (1, 0, 0, s * m / 10 * 0.3, 1, 0))),
    'TranslateXRel': (True, lambda img, m, s: _affine(img, (1, 0, s * m / 10 * 0.45 * img.size[0], 0, 1, 0))),
    'TranslateYRel': (True, lambda img, m, s: _affine(img, (1, 0, 0, 0, 1, s * m / 10 * 0.45 * img.size[1])))}


def rand_augment(img, rng, magnitude=9, std=0.5, num_ops=2, prob=0.5):
    """timm's rand-m9-mstd0.5-inc1: 2 ops with replacement, each with probability 0.5 at magnitude N(9, 0.5) clipped to
    [0, 10], signed ops negated half the time; pixel for pixel timm's for equal draws (measured)."""
    for k in rng.integers(len(RAND_OPS), size=num_ops):
        if rng.random() <= prob:
            m = min(max(float(rng.normal(magnitude, std)), 0.0), 10.0)
            signed, op = list(RAND_OPS.values())[k]
            img = op(img, m, (-1 if rng.random() > 0.5 else 1) if signed else 1)
    return img


class FinetuneTransform(TrainTransform):
    """timm's create_transform for fine-tuning: RandomResizedCrop (0.08-1, bicubic), flip, RandAugment, then random
    erasing with probability reprob ('pixel' mode, N(0, 1) noise in normalised space, here drawn in uint8)."""
    def __init__(self, size, reprob):
        super().__init__(size, scale=(0.08, 1.0))
        self.reprob = reprob

    def __call__(self, img, rng):
        x = to_uint8_tensor(rand_augment(self.crop_flip(img, rng), rng))  # (3, H, W)
        if rng.random() >= self.reprob:
            return x
        mean, std = (np.array(v)[:, None, None] * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
        for _ in range(10):  # a box of 2-33% of the area, aspect 0.3-3.3
            area = rng.uniform(0.02, 1 / 3) * self.size ** 2
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < self.size and w < self.size:
                top, left = rng.integers(0, self.size - h + 1), rng.integers(0, self.size - w + 1)
                noise = np.clip(mean + std * rng.standard_normal((3, h, w)), 0, 255).round().astype(np.uint8)
                x[:, top:top + h, left:left + w] = torch.from_numpy(noise)
                break
        return x


def mix(images, labels, num_classes, mixup, cutmix, smoothing, rng):
    """timm's Mixup (mode 'batch', switch prob 0.5, correct_lam): the batch mixed with itself reversed, by mixup or
    cutmix (a box of the partner's pixels, lam the area left) -> images, smoothed targets (B, classes) mixed alike."""
    target = torch.full((len(labels), num_classes), smoothing / num_classes, device=labels.device)
    target.scatter_(1, labels.long()[:, None], 1 - smoothing + smoothing / num_classes)
    if mixup <= 0 and cutmix <= 0:
        return images, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(*[cutmix if use_cutmix else mixup] * 2))
    if use_cutmix:  # rand_bbox of timm 0.3.2 (MAE) and SparK: sides sqrt(1 - lam) of the image's, centre uniform,
        H, W = images.shape[-2:]  # clipped (timm >= 0.9 makes odd sides one pixel longer)
        (cut_h, cut_w), cy, cx = (int(n * math.sqrt(1 - lam)) for n in (H, W)), rng.integers(H), rng.integers(W)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + images.flip(0) * (1 - lam)
    return images, target * lam + target.flip(0) * (1 - lam)


@torch.no_grad()
def update_ema(ema, model, decay):  # ema = decay * ema + (1 - decay) * model, buffers too (timm's ModelEma, V2)
    pairs = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values()) if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in pairs], [m for _, m in pairs], 1 - decay)


def finetune(args, build_classifier, state, eval_sets, layer_id=None, optimizer=None, bce=False,
             schedule=adjust_learning_rate, no_decay_names=('pos_embed', 'cls_token'), ema_decay=0.0, sampler=None):
    """Fine-tune build_classifier(num_classes) from the encoder weights `state` -> val top-1 (%), logged each epoch in
    output_dir/finetune/, ending in finetuned.pth. main_finetune.py's protocol: AdamW (0.9, 0.999), layer decay
    (layer_id(name) -> (i, n), default the ViT's), no decay on no_decay_names and 1-D tensors, schedule(optimizer,
    epoch, ft) per iteration, drop path, FinetuneTransform, mixup / cutmix, smoothing, soft-target CE, --ft_batch by
    accumulation; SparK adds optimizer (LAMB), bce, an EMA (the better reported) and sampler(n, ft) (repeated aug.).
    Differences: a. SparK's TrivialAugmentWide is RandAugment, its val crop MAE's (not 0.95; see spark.py), its EMA
    starts from the pretrained weights (not the random init); b. erasing noise in uint8; c. the last epoch's top-1,
    not the best. The same weights and settings again continue an interrupted fine-tune or report a finished one;
    others start afresh, the earlier folder moved to finetune-<n>."""
    if not args.finetune_epochs or not eval_sets:
        return None
    (train, val), per_step, accum = eval_sets, args.batch_size * args.world_size, args.ft_accum_iter
    ft = argparse.Namespace(**{**vars(args), 'epochs': args.finetune_epochs, 'warmup_epochs': args.ft_warmup_epochs,
                               'min_lr': 1e-6, 'clip_grad': None, 'output_dir': f'{args.output_dir}/finetune',
                               'save_freq': sys.maxsize, 'accum_iter': accum, 'eff_batch_size': per_step * accum})
    ft.lr = args.ft_blr * per_step * accum / 256
    name = {'start': float(sum(v.double().sum() for v in state.values() if v.is_floating_point())),  # the weights,
            **{k: v for k, v in plain(args).items() if k not in NOT_IN_A_RESULT}}  # the data and every setting
    done, last = f'{ft.output_dir}/finetuned.pth', f'{ft.output_dir}/checkpoint-last.pth'
    names = {f: load_checkpoint(f).get('name') for f in (done, last) if os.path.isfile(f)}  # what each fine-tuned
    same, split = finetune_identity(name), lambda n: '{} x {} x {} process(es)'.format(
        *(n.get(k) for k in ('batch_size', 'ft_accum_iter', 'world_size')))
    if finetune_identity(names.get(done)) == same and (finished := load_checkpoint(done)):
        other = f", its batch split as {split(finished['name'])}" * (split(finished['name']) != split(name))
        print(f"fine-tuned already ({done}{other}): val top-1 {finished['top1']:.2f}%") if is_main() else None
        return finished['top1']
    classifier = build_classifier(len(train.classes)).to(args.device)
    load_pretrained(classifier, state, 'the pretrained encoder into the classifier',
                    lambda k: k.split('.')[0] not in ('head', 'fc', 'fc_norm', 'norm'))
    extra = {'ema': copy.deepcopy(classifier).requires_grad_(False)} if ema_decay else {}  # saved with the network
    nets = {'finetune_top1': classifier, **{'finetune_ema_top1': ema for ema in extra.values()}}
    layer_id = layer_id or partial(vit_layer_id, depth=len(getattr(classifier, 'blocks', ())))
    groups = param_groups(classifier, args.ft_weight_decay, no_decay_names, layer_id, args.layer_decay)
    optimizer = (optimizer or partial(torch.optim.AdamW, fused=True))(groups, lr=ft.lr)
    settings, model = step_settings(ft), wrap_ddp(classifier, args)
    loader = make_loader(train.with_transform(FinetuneTransform(args.input_size, args.reprob)), ft, True,
                         sampler and sampler(len(train), ft))
    ft.iters_per_epoch = len(loader) // ft.accum_iter  # read by the schedules that end on the last step (SparK, MFM)

    def loss_fn(model, images, labels, _):
        images, target = mix(normalize(images), labels, len(train.classes), args.mixup, args.cutmix, args.smoothing,
                             rng)
        logits = model(images).float()
        return (F.binary_cross_entropy_with_logits(logits, target) if bce else
                torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()), {}

    def top1(net):
        logits, labels = extract_features(net.eval(), val, ft, 'fine-tuned val')  # (ft: Ctrl-C names its folder)
        return 100.0 * (logits.argmax(1) == labels).float().mean().item()
    ft.resume = 'auto' if finetune_identity(names.get(last)) == same else ''  # continued
    if not ft.resume and is_main() and glob.glob(f'{glob.escape(ft.output_dir)}/*.pth'):  # other weights or settings
        kept = next(f'{ft.output_dir}-{i}' for i in range(1, sys.maxsize) if not os.path.exists(f'{ft.output_dir}-{i}'))
        os.replace(ft.output_dir, kept)
        other = next((i for n in names.values() if (i := finetune_identity(n))), {})
        differ = [{'start': 'the pretrained weights', 'ft_batch_made': 'fine-tuning batch'}.get(k, k) for k in same
                  if other.get(k, same[k]) != same[k]]
        print(f"note: {ft.output_dir} held a fine-tune of other {', '.join(differ) or 'weights or settings'}: moved to "
              f'{kept}')
    os.makedirs(ft.output_dir, exist_ok=True)
    top1s, start = {}, resume(ft, classifier, optimizer, settings['scaler'], **extra)
    for epoch in range(start, args.finetune_epochs):
        rng = np.random.default_rng([args.seed, args.rank, epoch])  # this epoch's mixup / cutmix draws
        stats = train_one_epoch(model, loss_fn, loader, optimizer, epoch, schedule=partial(schedule, args=ft),
                                on_step=partial(update_ema, extra['ema'], classifier, ema_decay) if extra else None,
                                **settings)
        top1s = {key: top1(net) for key, net in nets.items()}
        log_stats(ft, {'finetune_epoch': epoch, **stats, **top1s})
        if is_main():
            print(f'fine-tuning epoch {epoch}: loss {stats["train_loss"]:.4f}, val top-1 ' +
                  ', '.join(f'{v:.2f}% ({k})' for k, v in top1s.items()))
        save_checkpoint(ft, epoch, classifier, optimizer, settings['scaler'], name=name,
                        **{k: m.state_dict() for k, m in extra.items()})
    best = max((top1s or {key: top1(net) for key, net in nets.items()}).values())  # (killed before finetuned.pth)
    if is_main():
        atomic_save({'model': classifier.state_dict(), **{k: m.state_dict() for k, m in extra.items()}, 'name': name,
                     'args': plain(args), 'top1': best}, done)
        for leftover in glob.glob(f'{glob.escape(ft.output_dir)}/checkpoint-*.pth'):  # last and numbered
            os.remove(leftover)
    return best


def finetune_identity(name):  # what a fine-tune's result is of: not how its batch is split (which changes only each
    # micro-batch's own mixup draws and BatchNorm statistics), nor pretraining's lr and batch, which `start` stands for
    if isinstance(name, dict):  # (names saved before the split was left out compare alike)
        batch = name.get('batch_size', 0) * name.get('world_size', 1) * name.get('ft_accum_iter', 1)
        return {**{k: v for k, v in name.items() if k not in SPLIT | {'lr', 'eff_batch_size'}}, 'ft_batch_made': batch}


def export_encoder(args, state):  # --export_encoder: the encoder alone, timm names, as the papers release it
    if args.export_encoder and is_main():
        atomic_save(state, os.path.join(args.output_dir, 'encoder_timm.pth'))
        print(f'encoder written to {os.path.join(args.output_dir, "encoder_timm.pth")}')


def picture_images(args, train_set, eval_sets, count=8):
    """(count, 3, H, W) uint8 on the device: val (else uncropped training) images spread over the split's classes."""
    dataset = eval_sets[1] if eval_sets else train_set.with_transform(EvalTransform(args.input_size))
    indices = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    return torch.stack([dataset[i][0] for i in indices]).to(args.device)


def save_picture(columns, path, min_side=96):
    """Write a PNG grid: one row per sample, one column per (N, 3, H, W) tensor of [0, 1] values."""
    rows = torch.cat([torch.cat(list(col.detach().float().clamp(0, 1).cpu()), dim=1) for col in columns], dim=2)
    grid = (rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (N*H, cols*W, 3)
    scale = max(1, math.ceil(min_side / columns[0].shape[-1]))
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


# ---- sparse ops: SparK's masked convnet without CUDA ----------------------------------------------------
# SparK's sparse convolution without CUDA (official pretrain/encoder.py): masked sites stay exactly zero through every
# op, so visible sites never see them. The rule for the input: zero its masked pixels first (SparK.encode does). Then
# convs, pools, Linears and LayerNorms (per site) run densely and re-mask their output; BatchNorms take their
# statistics from visible sites only, by masked sums (no boolean indexing: no host sync, compilable). `visible`
# (B, 1, h, w) bool is True where the image is visible (the official `active`; the opposite of a (B, L) mask), one
# cell per site of the coarsest map; each layer repeats it to its own resolution, reading it only inside
# `with visible_sites(model, visible):`. Inputs that are not 4-D maps (a classifier head's) pass through densely.
def visible_at(visible, h, w):  # (B, 1, h0, w0) -> (B, 1, h, w): each cell covers (h / h0) x (w / w0) sites
    h0, w0 = visible.shape[2:]
    if h % h0 or w % w0:
        raise ValueError(f'a {h}x{w} feature map does not split into the {h0}x{w0} cells of the mask grid: the grid '
                         f'must be the coarsest map (image side / the network\'s downsample ratio)')
    return visible.repeat_interleave(h // h0, 2).repeat_interleave(w // w0, 3)


class Sparse:  # inputs are (B, C, H, W), or (B, H, W, C) where channels_first is False
    visible, channels_first = None, True

    def sites(self, x):  # x's visible sites, shaped to broadcast over it
        if self.visible is None:
            raise RuntimeError(f'{type(self).__name__} ran outside `with common.visible_sites(model, visible):`, so '
                               f'it has no mask (see the sparse ops in common.py)')
        sites = visible_at(self.visible, *(x.shape[2:] if self.channels_first else x.shape[1:3]))
        return sites if self.channels_first else sites.permute(0, 2, 3, 1)


class Remasked(Sparse):  # the dense op, then zero the masked sites of its output (its masked inputs are zero already)
    def forward(self, x):  # in place: none of these ops keeps its output for the backward (7% faster SparK step, CPU)
        y = super().forward(x)
        return y.mul_(self.sites(y)) if y.ndim == 4 else y


class VisibleStatistics(Sparse):
    """BatchNorm over visible sites only (the official BN of active sites' vectors), statistics from masked sums (over
    all processes if synced), no host sync. bf16 maps are summed in bf16 (an fp32 copy cost more than the convs),
    centred on a rough mean, accumulated in fp32 (channel_sum); fp16 ones in fp32 (their squares would overflow)."""
    def forward(self, x):  # (B, C, H, W)
        m = self.sites(x) if x.ndim == 4 else None  # (B, 1, H, W) bool
        if m is None or not self.training:  # evaluation: the running statistics, constants for autograd
            return super().forward(x) if m is None else F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps) * m
        total = sum_over_processes if isinstance(self, nn.SyncBatchNorm) and dist.is_initialized() else lambda t: t
        with torch.no_grad():
            xs = x if x.dtype == torch.bfloat16 else x.float()
            n = total(m.sum(dtype=torch.float32).reshape(1))
            rough = (total(channel_sum(xs * m)) / n).to(xs.dtype)
            centred = xs - rough[:, None, None]  # (B, C, H, W)
            visible_centred = centred * m
            shift = total(channel_sum(visible_centred)) / n  # the mean of centred
            mean, var = rough.float() + shift, total(channel_sum(visible_centred * centred)) / n - shift ** 2
            self.running_mean.lerp_(mean, self.momentum)  # the running variance is the unbiased one, as BN's
            self.running_var.lerp_(var * n / (n - 1).clamp(min=1), self.momentum)
            self.num_batches_tracked += 1
        return VisibleNorm.apply(x, m, centred, shift, mean, var, self.weight, self.bias, self.eps, n, total)


class VisibleNorm(torch.autograd.Function):
    """BN's affine normalisation with the n visible sites' statistics, 0 at masked sites; BN's backward over them."""
    @staticmethod
    def forward(ctx, x, m, centred, shift, mean, var, weight, bias, eps, n, total):
        ctx.save_for_backward(m, centred, shift, torch.rsqrt(var + eps), weight)
        ctx.n, ctx.total = n, total
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps).mul_(m)

    @staticmethod
    def backward(ctx, grad):  # x_hat = (centred - shift) * rstd; dx = scale * (g - mean(g) - x_hat * mean(g * x_hat))
        m, centred, shift, rstd, weight = ctx.saved_tensors  # at visible sites, the means over all processes
        g, scale = (grad * m).to(centred.dtype), weight * rstd
        dbias = channel_sum(g)
        dweight = (channel_sum(g * centred) - shift * dbias) * rstd  # sum of g * x_hat
        mean_g, mean_gx = (ctx.total(torch.stack([dbias, dweight])) / ctx.n).unbind()
        c1, c0 = -scale * rstd * mean_gx, scale * (rstd * mean_gx * shift - mean_g)
        dx = torch.addcmul(c0.to(g.dtype)[:, None, None], centred, c1.to(g.dtype)[:, None, None]).mul_(m)
        dx = torch.addcmul(dx, g, scale.to(g.dtype)[:, None, None])
        return dx.to(grad.dtype), None, None, None, None, None, dweight, dbias, None, None, None


def channel_sum(t):  # (B, C, H, W) -> (C,) in fp32: per image in t's dtype (fp32 accumulation inside), then in fp32
    return t.sum((2, 3)).float().sum(0)


def sum_over_processes(t):  # in place (t is a fresh sum), over all processes: SyncBatchNorm's statistics, gradients
    dist.all_reduce(t)
    return t


class LayerNorm2d(nn.LayerNorm):  # ConvNeXt's LayerNorm(data_format='channels_first'), over C of (B, C, H, W)
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SparseConv2d(Remasked, nn.Conv2d): pass
class SparseMaxPool2d(Remasked, nn.MaxPool2d): pass
class SparseAvgPool2d(Remasked, nn.AvgPool2d): pass  # (masked zeros in the mean, as the official SparseAvgPooling)
class SparseLinear(Remasked, nn.Linear): channels_first = False  # pointwise convs on (B, H, W, C), as in ConvNeXt
class SparseBatchNorm2d(VisibleStatistics, nn.BatchNorm2d): pass
class SparseSyncBatchNorm2d(VisibleStatistics, nn.SyncBatchNorm): pass
class SparseLayerNorm2d(Remasked, LayerNorm2d): pass
class SparseLayerNorm(Remasked, nn.LayerNorm): channels_first = False
TWINS = [(nn.Conv2d, SparseConv2d), (nn.MaxPool2d, SparseMaxPool2d), (nn.Linear, SparseLinear),
         (nn.BatchNorm2d, SparseBatchNorm2d), (nn.SyncBatchNorm, SparseSyncBatchNorm2d),
         (LayerNorm2d, SparseLayerNorm2d), (nn.LayerNorm, SparseLayerNorm), (nn.AvgPool2d, SparseAvgPool2d)]
MIXERS = (nn.GroupNorm, nn.InstanceNorm2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
          nn.ConvTranspose2d)  # no twin: they would carry masked sites into visible ones


class NoTwin(Sparse):  # a MIXERS layer in a sparse network: refused when it runs (a head's unused pool may stay)
    def forward(self, x):
        raise ValueError(f'{type(self).__bases__[1].__name__} has no sparse twin (it would carry masked sites into '
                         'visible ones): build the encoder of Conv2d, Max/AvgPool2d, BatchNorm2d, LayerNorm, Linear')


globals().update({f'Sparse{k.__name__}': type(f'Sparse{k.__name__}', (NoTwin, k), {}) for k in MIXERS})  # named:
TWINS += [(k, globals()[f'Sparse{k.__name__}']) for k in MIXERS]  # a network holding one pickles; first match wins


def sparse_twin(dense):
    """A copy of `dense` with its layers swapped for their TWINS. Twins add behaviour but no state, so re-classing the
    copied layers keeps every weight, buffer and state-dict name: weights load both ways with strict=True."""
    twin = copy.deepcopy(dense)
    for m in twin.modules():
        twins = [sparse for kind, sparse in TWINS if isinstance(m, kind) and not isinstance(m, Sparse)]
        m.__class__ = twins[0] if twins else type(m)
    return twin


@contextmanager
def visible_sites(model, visible):  # inside this block, and only there, the sparse layers of `model` see `visible`
    layers = [m for m in model.modules() if isinstance(m, Sparse)]
    for m in layers:
        m.visible = visible
    try:
        yield
    finally:
        for m in layers:
            m.visible = None
