"""Invariants of the shared pieces: patchify, position table, transforms, datasets, optimisation, checkpoints."""
import copy, hashlib, io, json, math, os, pickle, shutil, subprocess, sys, tarfile
import urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import common
from conftest import ROOT, run_script


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 24, 16)
    patches = common.patchify(imgs, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(common.unpatchify(patches, 8, 3, 2), imgs)
    # MAE's layout: patches row-major over the grid; inside one, (row, column, channel) with channel fastest
    b, l, row, col, channel = 1, 3, 5, 2, 1  # patch 3 is grid cell (1, 1)
    assert patches[b, l, (row * 8 + col) * 3 + channel] == imgs[b, channel, 8 + row, 8 + col]


def test_sincos_pos_embed_matches_closed_formula():
    dim, grid = 16, 3
    table = common.sincos_pos_embed(dim, grid)
    assert table.shape == (1 + grid * grid, dim) and torch.all(table[0] == 0)
    for index in range(grid * grid):
        y, x = divmod(index, grid)
        for k in range(dim // 4):
            omega = 1 / 10000 ** (k / (dim / 4))
            expected = [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega), math.cos(y * omega)]
            got = table[1 + index, [k, dim // 4 + k, dim // 2 + k, 3 * dim // 4 + k]]
            assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_vit_config_and_attention_shapes():
    assert common.vit_config('vit_base_patch16') == dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
    with pytest.raises(ValueError, match='vit_<size>_patch<p>'):
        common.vit_config('vit_enormous_patch16')
    vit = common.VisionTransformer(32, 4, 64, 2, 4)
    assert vit.features(torch.randn(3, 3, 32, 32)).shape == (3, 64)
    assert not vit.pos_embed.requires_grad


def test_vit_at_a_size_no_preset_uses():
    torch.manual_seed(0)
    vit = common.VisionTransformer(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, mlp_ratio=2)
    assert vit.num_patches == 16 and vit.pos_embed.shape == (1, 17, 40) and len(vit.blocks) == 2
    assert vit.blocks[0].attn.num_heads == 5 and vit.blocks[0].mlp.fc1.out_features == 80
    imgs = torch.randn(2, 3, 24, 24)
    features = vit.features(imgs)
    assert features.shape == (2, 40) and torch.isfinite(features).all()
    (features @ torch.randn(40)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    pooled = common.VisionTransformer(24, 6, 40, 2, 5, 2, global_pool=True)
    assert pooled.features(imgs).shape == (2, 40)
    classifier = common.ViTClassifier(7, img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, mlp_ratio=2)
    assert classifier(imgs).shape == (2, 7)
    with pytest.raises(ValueError, match='not divisible by its 6 heads'):
        common.VisionTransformer(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=6)
    with pytest.raises(ValueError, match='image side 24 is not divisible by the patch size 7'):
        common.VisionTransformer(img_size=24, patch_size=7, embed_dim=40, depth=2, num_heads=5)


def test_train_transform_is_a_function_of_the_generator():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    transform = common.TrainTransform(16, scale=(0.2, 1.0))
    a = transform(img, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, transform(img, np.random.default_rng([0, 1, 2])))
    others = [transform(img, np.random.default_rng([0, 1, i])) for i in range(3, 8)]
    assert not all(torch.equal(a, o) for o in others)
    assert common.EvalTransform(16)(img).shape == (3, 16, 16)


@pytest.mark.parametrize('size, shape, window', [(224, (256, 320), (16, 48)), (32, (40, 32), (4, 0)),
                                                 (384, (384, 480), (0, 48))])
def test_eval_transform_is_the_resize_then_centre_crop_of_mae(size, shape, window):
    """MAE's eval transform: shorter side to size / 0.875 (256 for 224), centre crop; above 224 px (crop_pct 1.0, as
    util/datasets.py) and at 64 px and below (CIFAR, ours) no resize. Chosen shapes make the resize an identity, so the
    output is the image's centre window, pixel for pixel."""
    pixels = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    out = common.EvalTransform(size)(Image.fromarray(pixels))
    top, left = window
    assert torch.equal(out, torch.from_numpy(pixels[top:top + size, left:left + size]).permute(2, 0, 1))


@pytest.mark.parametrize('size, image, resized, corner', [
    (224, (301, 257), (299, 256), (38, 16)),  # long side int(299.8) = 299, not round's 300; left round(37.5) = 38
    (224, (299, 257), (297, 256), (36, 16)),  # left int(round(36.5)) = 36: half-even, not half-up's 37
    (160, (200, 190), (191, 182), (16, 11)),  # short side int(160 / 0.875) = int(182.9) = 182; left round(15.5) = 16
    (240, (300, 260), (276, 240), (18, 0))])  # above 224 px crop_pct 1.0 (util/datasets.py): short side 240
def test_eval_resize_floors_and_rounds_as_torchvision(size, image, resized, corner):
    """Resize(int(size / crop_pct)) then CenterCrop(size), with torchvision's integer rules (sizes floored, offsets
    int(round(x / 2)), half-even), written out with PIL."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*image[::-1], 3), dtype=np.uint8))
    left, top = corner
    expected = img.resize(resized, Image.BICUBIC).crop((left, top, left + size, top + size))
    assert torch.equal(common.EvalTransform(size)(img), torch.from_numpy(np.array(expected)).permute(2, 0, 1))


@pytest.mark.parametrize('width, height, box', [(300, 100, (83, 0, 216, 100)), (100, 300, (0, 83, 100, 216))])
def test_a_crop_that_misses_ten_times_is_torchvisions_central_crop_at_the_nearest_ratio(width, height, box):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    transform = common.TrainTransform(16, scale=(0.99, 1.0), flip=False)  # 3:1 never fits a ratio in [3/4, 4/3]
    expected = common.to_uint8_tensor(img.crop(box).resize((16, 16), Image.BICUBIC))  # 133 x 100: 4/3
    assert torch.equal(transform(img, np.random.default_rng(1)), expected)


def test_the_crop_is_resized_from_its_own_pixels_only():
    """torchvision's resized_crop crops, then resizes: no pixel outside the box reaches the output. The box is the
    white right half of a half-black image; a resize with box= on the whole image greys the left column."""
    class Fixed:  # the draws: the smallest scale and ratio, the right-most and top-most position, no flip
        uniform, integers, random = (lambda self, low, high: low), (lambda self, low, high: high - 1), lambda self: 1.0
    img = Image.fromarray(np.concatenate([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)], 1))
    out = common.TrainTransform(16, scale=(0.5, 0.5), ratio=(1.0, 1.0))(img, Fixed())  # the 32 x 32 right half
    assert torch.equal(out, torch.full((3, 16, 16), 255, dtype=torch.uint8)), out[0, :, 0]


def test_train_transform_flips_horizontally_half_the_time():
    """MAE's RandomHorizontalFlip (p 0.5) after the crop: with the crop made the whole image, each draw gives the image
    or its left-right mirror, the mirror about half the time (200 draws: 100 expected, sd 7); flip=False never."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    flipping = common.TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = common.TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    unflipped = common.to_uint8_tensor(img)
    flips = 0
    for i in range(200):
        out = flipping(img, np.random.default_rng([0, 0, i]))
        assert torch.equal(plain(img, np.random.default_rng([0, 0, i])), unflipped)
        assert torch.equal(out, unflipped) or torch.equal(out, unflipped.flip(-1)), i
        flips += torch.equal(out, unflipped.flip(-1))
    assert 70 <= flips <= 130, flips


# ---- RandAugment: timm's rand-m9-mstd0.5-inc1 (auto_augment.py), written from timm's level functions -------------
TIMM_INCREASING = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
                   'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                   'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']  # its 'inc1' list
TIMM_FILL = tuple(min(255, round(255 * x)) for x in (0.485, 0.456, 0.406))  # create_transform's img_mean


def timm_op(name, img, m, sign):
    """timm's AugmentOp(name, m) once its draws are made (sign: _randomly_negate's), resample bicubic as MAE passes."""
    affine = dict(resample=Image.BICUBIC, fillcolor=TIMM_FILL)
    level = m / 10  # _LEVEL_DENOM
    if name == 'Rotate':  # _rotate_level_to_arg: [-30, 30] degrees
        return img.rotate(sign * level * 30, **affine)
    if name == 'PosterizeIncreasing':  # 4 - int(level * 4) bits kept; 0 bits is black (the mask ~255)
        bits = 4 - int(level * 4)
        return ImageOps.posterize(img, bits) if bits else Image.new(img.mode, img.size)
    if name == 'SolarizeIncreasing':  # 256 - min(256, int(level * 256)): pixels >= it inverted
        return ImageOps.solarize(img, 256 - min(256, int(level * 256)))
    if name == 'SolarizeAdd':  # min(128, int(level * 110)) added below 128, saturating at 255
        add = min(128, int(level * 110))
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name.endswith('Increasing'):  # _enhance_increasing_level_to_arg: max(0.1, 1 +- level * 0.9)
        kind = getattr(ImageEnhance, name[:-len('Increasing')])
        return kind(img).enhance(max(0.1, 1.0 + sign * level * 0.9))
    shear, pixels = sign * level * 0.3, sign * level * 0.45 * np.array(img.size)  # translate_pct 0.45 of the side
    coefficients = {'ShearX': (1, shear, 0, 0, 1, 0), 'ShearY': (1, 0, 0, shear, 1, 0),
                    'TranslateXRel': (1, 0, pixels[0], 0, 1, 0), 'TranslateYRel': (1, 0, 0, 0, 1, pixels[1])}
    if name in coefficients:
        return img.transform(img.size, Image.AFFINE, coefficients[name], **affine)
    return {'AutoContrast': ImageOps.autocontrast, 'Equalize': ImageOps.equalize, 'Invert': ImageOps.invert}[name](img)


def ra_images():  # 20 x 14 (not square: translate's side) of values 30-199 (autocontrast and equalize change it), and
    # 16 x 16 with each value 0-255 once per channel (a threshold moved by one changes pixels)
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(30, 200, (14, 20, 3), dtype=np.uint8)),
            Image.fromarray(np.stack([rng.permutation(256).reshape(16, 16).astype(np.uint8) for _ in range(3)], -1))]


def test_rand_augment_has_timms_increasing_ops_in_its_order_and_the_signed_ones():
    """The 15 ops of timm's _RAND_INCREASING_TRANSFORMS in its order (an op index draws the same op as timm's); signed
    (_randomly_negate): rotate, the 4 enhances, shears and translates, never posterize / solarize / the plain ops."""
    assert list(common.RAND_OPS) == TIMM_INCREASING
    signed = {name for name, (sign, _) in common.RAND_OPS.items() if sign}
    assert signed == {'Rotate', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                      'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}


@pytest.mark.parametrize('name', TIMM_INCREASING)
def test_each_rand_augment_op_is_timms_pixel_for_pixel(name):
    """Each op at magnitudes 0-10 and both signs equals the PIL operation timm applies at that magnitude; at m 9 each
    changes the image (none is an identity)."""
    signed, op = common.RAND_OPS[name]
    for img in ra_images():
        for m in (0.0, 2.5, 4.99, 9.0, 9.73, 10.0):
            for sign in (1, -1) if signed else (1,):
                expected = timm_op(name, img, m, sign)
                assert np.array_equal(np.asarray(op(img, m, sign)), np.asarray(expected)), (img.size, m, sign)
    limited = ra_images()[0]
    assert not np.array_equal(np.asarray(op(limited, 9.0, 1)), np.asarray(limited))


def test_rand_augment_ops_at_m9_take_timms_numbers():
    """timm's level functions at m 9, written out: solarize threshold 256 - 230 = 26, posterize keeps 1 bit,
    solarize-add adds 99, rotate 27 degrees, enhance 1.81 / 0.19, shear 0.27, translate 0.405 of the side."""
    ops = {name: op for name, (_, op) in common.RAND_OPS.items()}
    affine = dict(resample=Image.BICUBIC, fillcolor=(124, 116, 104))
    for img in ra_images():
        same = lambda name, sign, expected: np.array_equal(np.asarray(ops[name](img, 9.0, sign)), np.asarray(expected))
        width, height = img.size
        assert same('SolarizeIncreasing', 1, ImageOps.solarize(img, 26))
        assert same('PosterizeIncreasing', 1, ImageOps.posterize(img, 1))
        assert same('SolarizeAdd', 1, img.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3))
        assert same('Rotate', 1, img.rotate(27, **affine)) and same('Rotate', -1, img.rotate(-27, **affine))
        assert same('ContrastIncreasing', 1, ImageEnhance.Contrast(img).enhance(1.81))
        assert same('ColorIncreasing', -1, ImageEnhance.Color(img).enhance(0.19))
        assert same('ShearY', -1, img.transform(img.size, Image.AFFINE, (1, 0, 0, -0.27, 1, 0), **affine))
        assert same('TranslateXRel', 1, img.transform(img.size, Image.AFFINE, (1, 0, 0.405 * width, 0, 1, 0), **affine))
        assert same('TranslateYRel', -1, img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.405 * height),
                                                       **affine))


class ScriptedDraws:  # a generator whose draws are given in advance; records what each draw was asked for
    def __init__(self, ops, uniforms, normals):
        self.ops, self.uniforms, self.normals, self.asked = np.array(ops), list(uniforms), list(normals), []

    def integers(self, high, size):
        self.asked.append(('integers', high, size))
        return self.ops

    def random(self):
        return self.uniforms.pop(0)

    def normal(self, loc, scale):
        self.asked.append(('normal', loc, scale))
        return self.normals.pop(0)


def test_rand_augment_draws_two_ops_each_at_p_half_with_magnitude_n9_05_clipped_and_a_fair_sign():
    """timm's RandAugment: 2 op indices (with replacement) among the 15; each op applied when its draw is <= 0.5
    (AugmentOp skips above prob), at m ~ N(9, 0.5) clipped to [0, 10], a signed op negated when its draw is > 0.5."""
    img, index = ra_images()[1], {name: i for i, name in enumerate(TIMM_INCREASING)}
    draws = ScriptedDraws([index['Rotate'], index['SolarizeIncreasing']], [0.5, 0.51, 0.2], [12.0, 9.7])  # sign -
    expected = timm_op('SolarizeIncreasing', timm_op('Rotate', img, 10.0, -1), 9.7, 1)  # 12 clipped to 10: 30 deg
    assert np.array_equal(np.asarray(common.rand_augment(img, draws)), np.asarray(expected))
    assert draws.asked == [('integers', 15, 2), ('normal', 9, 0.5), ('normal', 9, 0.5)] and not draws.uniforms
    draws = ScriptedDraws([index['ShearX'], index['PosterizeIncreasing']], [0.3, 0.5, 0.9], [8.0])  # sign +, then skip
    expected = timm_op('ShearX', img, 8.0, 1)
    assert np.array_equal(np.asarray(common.rand_augment(img, draws)), np.asarray(expected)) and not draws.uniforms
    draws = ScriptedDraws([index['PosterizeIncreasing']] * 2, [0.0, 0.0], [-3.0, 9.0])  # clipped at 0: 4 bits kept
    expected = ImageOps.posterize(ImageOps.posterize(img, 4), 1)
    assert np.array_equal(np.asarray(common.rand_augment(img, draws)), np.asarray(expected))


def test_normalize_roundtrip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(common.denormalize(common.normalize(x)), x.float() / 255, atol=1e-6)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported() or not (shutil.which('g++') or shutil.which('c++')),
                    reason='torch.compile is unavailable here (no dynamo support or no C++ compiler for inductor)')
def test_normalize_compiles_once():  # its constants made once per device: read from a dict, a guard that recompiled
    torch._dynamo.reset()  # every compiled step at its second call (minutes at ViT-B on a CPU)
    torch._dynamo.utils.counters.clear()
    step = torch.compile(lambda x: common.normalize(x) * 2)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    for _ in range(3):
        assert torch.equal(step(x), common.normalize(x) * 2)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


def write_archive(path, folder, members):  # a .tar.gz holding folder/name: pickle(obj) for each (name, obj)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name, obj in members:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f'{folder}/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(buffer.getvalue())
    return path


def fabricate_cifar(root):
    """A CIFAR-10 archive in the official format, with 10 + 5 images instead of 50000 + 10000."""
    rng = np.random.default_rng(0)
    members = [(f'data_batch_{i}', {b'data': rng.integers(0, 255, (2, 3072), dtype=np.uint8), b'labels': [i, i + 1]})
               for i in range(1, 6)]
    members += [('test_batch', {b'data': rng.integers(0, 255, (5, 3072), dtype=np.uint8), b'labels': [0, 1, 2, 3, 4]}),
                ('batches.meta', {b'label_names': [f'class{i}'.encode() for i in range(10)]})]
    return write_archive(os.path.join(root, 'cifar-10-python.tar.gz'), 'cifar-10-batches-py', members)


def test_cifar_archive_read_md5_and_offline(tmp_path, monkeypatch):
    path = fabricate_cifar(tmp_path / 'ok')
    digest = hashlib.md5(open(path, 'rb').read()).hexdigest()
    # the real md5 rejects the fabricated archive, with a message saying what to do
    with pytest.raises(SystemExit, match='md5.*Delete it'):
        common.read_cifar('cifar10', str(tmp_path / 'ok'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    with monkeypatch.context() as patch:
        patch.setattr(urllib.request, 'urlopen', offline)
        with pytest.raises(SystemExit, match=r'put it at .*cifar-10-python.tar.gz'):
            common.read_cifar('cifar10', str(tmp_path / 'empty'))
    monkeypatch.setitem(common.CIFAR, 'cifar10', (common.CIFAR['cifar10'][0], digest) + common.CIFAR['cifar10'][2:])
    splits, classes = common.read_cifar('cifar10', str(tmp_path / 'ok'))
    assert splits['train'][0].shape == (10, 32, 32, 3) and splits['val'][0].shape == (5, 32, 32, 3)
    assert list(splits['train'][1]) == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert list(splits['val'][1]) == [0, 1, 2, 3, 4] and classes[3] == 'class3'
    # pixels are channel-major rows in the archive: check one value went to the right place
    raw = pickle.load(open(tmp_path / 'ok' / 'cifar-10-batches-py' / 'test_batch', 'rb'))
    assert splits['val'][0][2, 4, 5, 1] == raw[b'data'][2, 1024 + 4 * 32 + 5]
    # an extraction stopped half-way (a folder with some files) is done again, not read as it is (a traceback)
    os.remove(tmp_path / 'ok' / 'cifar-10-batches-py' / 'data_batch_3')
    assert common.read_cifar('cifar10', str(tmp_path / 'ok'))[0]['train'][0].shape == (10, 32, 32, 3)
    assert sorted(os.listdir(tmp_path / 'ok')) == ['cifar-10-batches-py', 'cifar-10-python.tar.gz']  # none aside
    # an extracted folder whose files are damaged (all present: not extracted again): one line, not a traceback
    (tmp_path / 'ok' / 'cifar-10-batches-py' / 'data_batch_2').write_bytes(b'not a pickle')
    with pytest.raises(SystemExit, match=r'cifar-10-batches-py is damaged \(UnpicklingError: .*delete that folder'):
        common.read_cifar('cifar10', str(tmp_path / 'ok'))
    pickle.dump({b'labels': [0]}, open(tmp_path / 'ok' / 'cifar-10-batches-py' / 'data_batch_2', 'wb'))  # no data
    with pytest.raises(SystemExit, match=r"is damaged \(KeyError: b'data'\)"):
        common.read_cifar('cifar10', str(tmp_path / 'ok'))


def test_cifar100_reads_the_fine_labels_and_their_names(tmp_path, monkeypatch):
    """torchvision's CIFAR100: labels from b'fine_labels' (100 classes), names from meta's b'fine_label_names'; the
    archive also holds the 20 coarse ones, which must not be taken."""
    rng = np.random.default_rng(0)
    path = write_archive(str(tmp_path / 'cifar-100-python.tar.gz'), 'cifar-100-python', [
        ('train', {b'data': rng.integers(0, 255, (4, 3072), dtype=np.uint8), b'fine_labels': [10, 20, 30, 99],
                   b'coarse_labels': [1, 2, 3, 19]}),
        ('test', {b'data': rng.integers(0, 255, (2, 3072), dtype=np.uint8), b'fine_labels': [42, 7],
                  b'coarse_labels': [5, 6]}),
        ('meta', {b'fine_label_names': [f'fine{i}'.encode() for i in range(100)],
                  b'coarse_label_names': [f'coarse{i}'.encode() for i in range(20)]})])
    digest = hashlib.md5(open(path, 'rb').read()).hexdigest()
    monkeypatch.setitem(common.CIFAR, 'cifar100', (common.CIFAR['cifar100'][0], digest) + common.CIFAR['cifar100'][2:])
    splits, classes = common.read_cifar('cifar100', str(tmp_path))
    assert list(splits['train'][1]) == [10, 20, 30, 99] and list(splits['val'][1]) == [42, 7]
    assert len(classes) == 100 and classes[42] == 'fine42'


def test_each_epoch_draws_new_crops_and_masks_and_the_same_epoch_the_same(tmp_path):
    """A sample's randomness comes from (seed, epoch, index): set_epoch gives every image new crops and masks, as
    DistributedSampler.set_epoch gives a new order; the same epoch gives them again (exact resume)."""
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    dataset = common.ImageDataset(images, [0, 1, 0, 1], ['a', 'b']).with_transform(
        common.TrainTransform(16), lambda rng: rng.random(5))
    draws = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        draws.append([dataset[i] for i in range(4)])
    for i in range(4):
        assert torch.equal(draws[0][i][0], draws[2][i][0]) and np.array_equal(draws[0][i][2], draws[2][i][2])
        assert not torch.equal(draws[0][i][0], draws[1][i][0]) and not np.array_equal(draws[0][i][2], draws[1][i][2])


def folder_args(path, **overrides):
    defaults = dict(data='folder', data_path=str(path), input_size=16, seed=0, cache=False,
                    output_dir=str(path), num_workers=0, world_size=1)
    return SimpleNamespace(**{**defaults, **overrides})


def write_images(folder, names_and_images):
    os.makedirs(folder, exist_ok=True)
    for name, image in names_and_images:
        image.save(os.path.join(folder, name))


def test_image_folder_modes_corrupt_and_empty_class(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    sixteen = Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16))  # values up to 47,900
    write_images(tmp_path / 'train' / 'cat', [('rgb.jpg', Image.fromarray(rgb)),
                                              ('gray.png', Image.fromarray(rgb[..., 0])),
                                              ('cmyk.jpg', Image.fromarray(rgb).convert('CMYK')),
                                              ('rgba.png', Image.fromarray(rgb).convert('RGBA'))])
    write_images(tmp_path / 'train' / 'dog', [('palette.png', Image.fromarray(rgb).convert('P')),
                                              ('deep.png', sixteen)])
    (tmp_path / 'train' / 'dog' / 'broken.jpg').write_bytes(b'not an image at all')
    os.makedirs(tmp_path / 'train' / 'emu')  # an empty class folder keeps its label
    write_images(tmp_path / 'val' / 'dog', [('v.png', Image.fromarray(rgb))])
    write_images(tmp_path / 'val' / 'yak', [('v.png', Image.fromarray(rgb))])  # a class train/ lacks: said (was not)
    with pytest.warns(UserWarning) as said:
        train_set, (train_eval, val) = common.build_datasets(folder_args(tmp_path), common.TrainTransform(16))
    assert any('emu holds no images' in str(w.message) for w in said)
    assert any(f"{tmp_path / 'val' / 'cat'} is missing" in str(w.message) for w in said)  # was: "holds no images"
    assert any('lacks, their images not evaluated: yak' in str(w.message) for w in said)
    assert train_set.classes == ['cat', 'dog', 'emu'] and list(val.labels) == [1]
    assert len(train_set) == 7
    with pytest.warns(UserWarning, match='broken.jpg'):
        samples = [train_eval[i] for i in range(len(train_eval))]
    assert all(len(sample) == 2 for sample in samples)  # (image, label): no mask input without draw_mask
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.uint8 for image, _ in samples)
    assert train_eval.num_skipped.value == 1
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda model, images, labels, _: (model(images.float().mean((2, 3))).logsumexp(1).mean(), {})
    loader = torch.utils.data.DataLoader(train_set, batch_size=7)
    with pytest.warns(UserWarning, match='broken.jpg'):
        counts = [common.train_one_epoch(model, loss_fn, loader, optimizer, epoch, torch.device('cpu'))
                  ['skipped_images'] for epoch in range(2)]
    assert counts == [1, 1]  # each epoch's own (was a running total, 1 then 2, which a resumed run did not repeat)
    deep = Image.open(tmp_path / 'train' / 'dog' / 'deep.png')
    assert 20 < np.asarray(common.to_rgb(deep)).mean() < 200  # 16-bit scaled to 8 bits, not clipped to white


def test_16_bit_images_are_scaled_by_their_mode_so_a_dataset_keeps_one_scale():
    dim, bright = (Image.fromarray(np.full((4, 4), v, np.uint16)) for v in (200, 60000))  # PNG's 16-bit: I;16
    assert dim.mode == bright.mode == 'I;16'  # (was: 200 kept as 200 here, as its maximum is under 256)
    assert np.asarray(common.to_rgb(dim)).max() == 0 and np.asarray(common.to_rgb(bright)).max() == 233  # / 257
    assert np.asarray(common.to_rgb(Image.fromarray(np.full((4, 4), 200, np.int32)))).max() == 200  # I: as it is


def test_images_beside_the_class_folders_are_said_to_be_left_out(tmp_path):
    write_images(tmp_path / 'train' / 'cat', [('0.png', Image.new('RGB', (20, 20)))])
    write_images(tmp_path / 'train', [(f'loose{i}.png', Image.new('RGB', (20, 20))) for i in range(3)])
    (tmp_path / 'train' / '._loose0.png').write_bytes(b'macOS metadata')  # hidden: not counted
    (tmp_path / 'train' / 'a.jpg').mkdir()  # a folder named as an image: a class, not a loose image
    with pytest.warns(UserWarning, match=r'3 image\(s\) lie in .*train itself, outside its class folders: left out'):
        paths, labels, classes = common.scan_folder(str(tmp_path / 'train'))
    assert len(paths) == 1 and classes == ['a.jpg', 'cat']


def test_a_flat_train_folder_beside_a_labeled_val_says_train_is_unlabeled(tmp_path, capsys):
    write_images(tmp_path / 'train', [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(3)])
    write_images(tmp_path / 'val' / 'cat', [('0.png', Image.new('RGB', (20, 20)))])
    assert common.build_datasets(folder_args(tmp_path), common.TrainTransform(16))[1] is None
    assert f'{tmp_path}/train has no class folders (unlabeled): pretraining only' in capsys.readouterr().out


def test_eval_only_names_the_method_of_a_checkpoint_that_does_not_fit_and_what_keeps_its_random_init(tmp_path,
                                                                                                     capsys):
    import mae
    (path := tmp_path / 'other.pth').write_bytes(b'')  # (parse_args checks that the file exists)
    args = mae.parse_args(['--eval_only', '--resume', str(path), '--output_dir',
                           str(tmp_path / 'eval')])
    os.makedirs(args.output_dir)
    model = mae.build_model(args)
    encoder = {k: v for k, v in model.state_dict().items() if common.ENCODER_KEYS(k)}
    torch.save({'model': {k: v[..., :1] if k.endswith('qkv.weight') else v for k, v in encoder.items()},
                'args': {'method': 'spark'}}, path)  # was: only "pass the --model it was made with"
    (tmp_path / 'eval' / 'log.txt').write_text('{"evaluation": true}\n')  # an earlier evaluation's folder
    with pytest.raises(SystemExit, match=r'other\.pth \(made by spark\.py\) does not fit this network'):
        common.resume(args, model)
    assert os.listdir(tmp_path / 'eval') == ['log.txt']  # left as it was (was: moved to log-1.txt, args.json written)
    assert 'log-1' not in capsys.readouterr().out
    os.remove(tmp_path / 'eval' / 'log.txt')
    torch.save({'model': encoder, 'args': {'method': 'hpm'}}, path)  # the encoder alone: the decoder stays random
    assert common.resume(args, model) == 0
    out = capsys.readouterr().out
    assert 'loaded ' + str(path) + ' (made by hpm.py): missing mask_token (1), decoder' in out
    assert f"note: the tensors missing from {path} keep their random init, in this run's pictures too" in out
    torch.save({'model': model.state_dict(), 'args': {'method': 'mae'}}, path)  # whole: nothing to say
    common.resume(args, model)
    assert 'random init' not in (out := capsys.readouterr().out) and 'made by' not in out


def test_an_argument_error_under_torchrun_is_said_once_per_node(monkeypatch):
    parser = common.ArgumentParser()
    monkeypatch.setenv('LOCAL_RANK', '1')  # was: the same line from each process
    with pytest.raises(SystemExit) as other:
        parser.error('--epochs must be at least 1')
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(SystemExit, match='error: --epochs must be at least 1'):
        parser.error('--epochs must be at least 1')
    assert other.value.code == 1  # the status of the one-line exit, without the line


def test_unlabeled_folder_skips_evaluation(tmp_path, capsys):
    write_images(tmp_path / 'a' / 'b', [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(3)])
    train_set, eval_sets = common.build_datasets(folder_args(tmp_path), common.TrainTransform(16))
    assert len(train_set) == 3 and eval_sets is None and set(train_set.labels) == {-1}
    assert 'evaluation and fine-tuning skipped' in capsys.readouterr().out


def test_one_class_or_one_image_skips_evaluation(tmp_path, capsys):  # was: 100% top-1, or the probe's BN crashed
    images = lambda n: [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(n)]
    write_images(tmp_path / 'one' / 'train' / 'cat', images(3))
    write_images(tmp_path / 'one' / 'val' / 'cat', images(2))
    assert common.build_datasets(folder_args(tmp_path / 'one'), common.TrainTransform(16))[1] is None
    assert 'has 3 image(s) of 1 class(es): pretraining only, evaluation and fine-tuning skipped' in \
        capsys.readouterr().out
    args = SimpleNamespace(data='shapes', shapes_size=1, input_size=16, seed=0, cache=False, world_size=1)
    assert common.build_datasets(args, common.TrainTransform(16))[1] is None
    assert 'has 1 image(s) of 10 class(es)' in capsys.readouterr().out


def test_linked_folders_are_read_hidden_names_skipped_and_a_val_without_train_is_refused(tmp_path):
    images = lambda n: [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(n)]
    write_images(tmp_path / 'elsewhere', images(3))
    for name in ('cat', 'dog'):
        write_images(tmp_path / 'data' / 'train' / name, images(1))
        write_images(tmp_path / 'data' / 'val' / name, images(1))
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'data' / 'train' / 'dog' / 'linked')  # was: left out, unsaid
    write_images(tmp_path / 'data' / 'train' / '.ipynb_checkpoints', images(1))  # hidden: was a class of its own
    (tmp_path / 'data' / 'train' / 'cat' / '._0.png').write_bytes(b'macOS metadata')  # was: a warning per read
    paths, labels, classes = common.scan_folder(str(tmp_path / 'data' / 'train'))
    assert len(paths) == 5 and labels == [0, 1, 1, 1, 1] and classes == ['cat', 'dog']
    os.rename(tmp_path / 'data' / 'train', tmp_path / 'data' / 'training')  # was: all pretrained on, val/ included
    with pytest.raises(SystemExit, match=r'has val/ but no train/: name its training folder train/'):
        common.build_datasets(folder_args(tmp_path / 'data'), common.TrainTransform(16))


def test_a_flat_val_folder_is_refused_before_training(tmp_path):
    write_images(tmp_path / 'train' / 'cat', [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(2)])
    write_images(tmp_path / 'val', [('v.JPEG', Image.new('RGB', (20, 20)))])  # ImageNet's val as it is distributed
    with pytest.raises(SystemExit, match='val holds no images in folders named as the classes of'):  # was: a
        common.build_datasets(folder_args(tmp_path, data='imagenet'), common.TrainTransform(16))  # traceback at eval


def test_cifar_as_an_image_folder_is_read_as_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, 'read_cifar', lambda *_: pytest.fail('would download the archive into data_path'))
    for split in ('train', 'test'):
        for name in ('cat', 'dog'):
            write_images(tmp_path / split / name,
                         [(f'{i}.png', Image.new('RGB', (32, 32), (i, 0, 0))) for i in range(2)])
    train_set, (_, val) = common.build_datasets(folder_args(tmp_path, data='cifar10'), common.TrainTransform(16))
    assert len(train_set) == 4 and len(val) == 4 and 'read as an image folder' in capsys.readouterr().out


def test_cache_equals_decoding(tmp_path):
    rng = np.random.default_rng(0)
    noise = lambda: Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    write_images(tmp_path / 'train' / 'x', [(f'{i}.png', noise()) for i in range(4)])
    plain, _ = common.build_datasets(folder_args(tmp_path), common.EvalTransform(16, crop_pct=1.0))
    cached, _ = common.build_datasets(folder_args(tmp_path, cache=True), common.EvalTransform(16, crop_pct=1.0))
    assert isinstance(cached.items, np.ndarray) and cached.items.shape == (4, 16, 16, 3)
    for i in range(4):
        assert torch.equal(cached[i][0], plain[i][0])


def test_cache_says_the_undecodable_images_it_replaced(tmp_path, capsys):  # each epoch's log then counts 0 (was all)
    write_images(tmp_path / 'train' / 'x', [(f'{i}.png', Image.new('RGB', (20, 20), (i, 0, 0))) for i in range(3)])
    (tmp_path / 'train' / 'x' / 'broken.png').write_bytes(b'not an image')
    with pytest.warns(UserWarning, match='broken.png'):
        cached, _ = common.build_datasets(folder_args(tmp_path, cache=True), common.EvalTransform(16, crop_pct=1.0))
    assert 'note: 1 undecodable image(s) replaced by the next in the cache, all run' in capsys.readouterr().out
    common.build_datasets(folder_args(tmp_path, cache=False), common.EvalTransform(16, crop_pct=1.0))
    assert 'undecodable' not in capsys.readouterr().out  # (each epoch warns and counts it)


def test_cache_that_does_not_fit_in_memory_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / 'train' / 'x', [(f'{i}.png', Image.new('RGB', (20, 20))) for i in range(4)])
    monkeypatch.setattr(common, 'available_memory', lambda: 4 * 16 * 16 * 3 * 2 - 1)  # one process fits, two do not
    monkeypatch.setattr(common, 'cache_images', lambda *args: pytest.fail('decoding started'))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match=r'--cache needs 0.0 GB \(2 process\(es\) x 4 images at 16 px\), 0.0 GB is'):
        common.build_datasets(folder_args(tmp_path, cache=True), common.EvalTransform(16))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    monkeypatch.setattr(common, 'cache_images', lambda subset, *args: np.zeros((len(subset), 16, 16, 3), np.uint8))
    assert common.build_datasets(folder_args(tmp_path, cache=True), common.EvalTransform(16))[0].items.shape[0] == 4
    assert common.available_memory() > 0  # this machine's (Linux: MemAvailable; elsewhere inf)


def test_param_groups_follow_mae():
    model = common.VisionTransformer(16, 4, 32, 1, 2)
    no_decay, decay = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay['params']} == {n for n, p in model.named_parameters()
                                                            if p.ndim == 1}
    assert 'cls_token' in {names[id(p)] for p in decay['params']}  # 3-D: decayed, as in MAE
    assert 'pos_embed' not in {names[id(p)] for p in no_decay['params'] + decay['params']}  # frozen


def test_learning_rate_schedule():
    args = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0)
    assert common.adjust_learning_rate(optimizer, 0, args) == 0
    assert common.adjust_learning_rate(optimizer, 1, args) == pytest.approx(0.5)
    assert common.adjust_learning_rate(optimizer, 2, args) == pytest.approx(1.0)
    assert common.adjust_learning_rate(optimizer, 6, args) == pytest.approx(0.55)
    for epoch in (3.5, 4, 9.25):  # off the midpoint a straight line would pass too: MAE's lr_sched.py half-cosine
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / 8))
        assert common.adjust_learning_rate(optimizer, epoch, args) == pytest.approx(cosine)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(cosine)
    assert common.adjust_learning_rate(optimizer, 10, args) == pytest.approx(0.1)


def test_attention_equals_the_softmax_formula_on_every_path():
    """common.attention's paths (SDPA; the three ops for bf16 on CPUs) against softmax(q k^T / sqrt(d)) v in float64:
    the scale and the softmax axis, at bf16's precision where the inputs are bf16 (the scale 1 / d^(1/4): 0.16 off)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    assert torch.allclose(common.attention(q.float(), k.float(), v.float()).double(), expected, atol=1e-5)
    found = common.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert found.dtype == torch.bfloat16 and torch.allclose(found.double(), expected, atol=3e-2)


def own_dataset(n=32, extra=False):
    """A user's own data: uint8 images whose class is the brighter half (top or bottom), no project dataset."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 100, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    images[labels == 0, :, :4] += 150
    images[labels == 1, :, 4:] += 150
    tensors = (images, labels) + ((torch.randn(n, 5, generator=generator),) if extra else ())
    return torch.utils.data.TensorDataset(*tensors)


@pytest.mark.parametrize('extra', [False, True], ids=['pairs', 'triples'])
def test_train_one_epoch_with_a_plain_dataloader(extra):
    torch.manual_seed(0)
    dataset = own_dataset(extra=extra)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    optimizer = common.adamw(model, SimpleNamespace(weight_decay=0.0, lr=3e-2), betas=(0.9, 0.999))
    seen, fractions = [], []

    def loss_fn(model, images, labels, mask_input):
        seen.append(mask_input)
        logits = model(common.normalize(images))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss, {'acc': (logits.argmax(1) == labels).float().mean()}

    def schedule(optimizer, epoch):
        fractions.append(epoch)
        for group in optimizer.param_groups:
            group['lr'] = 3e-2
    losses = []
    for epoch in range(4):
        stats = common.train_one_epoch(model, loss_fn, loader, optimizer, epoch, torch.device('cpu'),
                                       schedule=schedule)
        assert {'train_loss', 'train_acc', 'lr', 'images_per_s', 'epoch_time_s', 'peak_mem_mb'} <= stats.keys()
        assert 'skipped_images' not in stats  # a TensorDataset counts no skipped files
        assert all(math.isfinite(v) for v in stats.values())
        losses.append(stats['train_loss'])
    assert losses[-1] < 0.5 * losses[0] and stats['train_acc'] == 1.0
    assert fractions[:4] == [0, 0.25, 0.5, 0.75] and len(fractions) == 16  # lr set before each step, per iteration
    assert len(seen) == 16
    if extra:  # the third item reaches loss_fn as the mask input, batched
        assert all(m.shape == (8, 5) and m.dtype == torch.float32 for m in seen)
        assert torch.equal(torch.sort(torch.cat(seen[:4]).sum(1)).values, torch.sort(dataset.tensors[2].sum(1)).values)
    else:
        assert all(m is None for m in seen)


def test_accumulation_sets_the_lr_once_per_optimizer_step():
    """engine_pretrain.py / engine_finetune.py: with accum_iter 2 the lr is set only on the first micro-batch of each
    accumulation (data_iter_step % accum_iter == 0), at epoch + data_iter_step / len(loader); one step per 2 batches."""
    loader = torch.utils.data.DataLoader(own_dataset(), batch_size=4)  # 8 batches: 4 optimizer steps
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    fractions, steps = [], []
    loss_fn = lambda model, images, labels, _: (torch.nn.functional.cross_entropy(
        model(common.normalize(images)), labels), {})
    common.train_one_epoch(model, loss_fn, loader, optimizer, 3, torch.device('cpu'), accum_iter=2,
                           schedule=lambda optimizer, epoch: fractions.append(epoch), on_step=lambda: steps.append(1))
    assert fractions == [3.0, 3.25, 3.5, 3.75] and len(steps) == 4
    fractions.clear()  # 11 batches of 3: the 11th fills no step, is skipped, but still counts in len(loader)
    common.train_one_epoch(model, loss_fn, torch.utils.data.DataLoader(own_dataset(), batch_size=3), optimizer, 3,
                           torch.device('cpu'), accum_iter=2, schedule=lambda optimizer, epoch: fractions.append(epoch))
    assert fractions == pytest.approx([3 + i / 11 for i in (0, 2, 4, 6, 8)])


def test_clipping_scales_the_gradient_to_the_global_norm_given():
    """util/misc.py's NativeScalerWithGradNormCount: clip_grad_norm_(parameters, clip_grad) over all parameters at
    once, so a gradient of norm 5 clipped at 1 is divided by 5 (and one below the limit is left as it is)."""
    for clip, scale in ((1.0, 1 / 5), (10.0, 1.0)):
        model = torch.nn.Linear(1, 2)
        start = [p.detach().clone() for p in model.parameters()]
        model.weight.grad, model.bias.grad = torch.tensor([[3.0], [0.0]]), torch.tensor([0.0, 4.0])  # norm 5 in all
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        common.optimizer_step(model, optimizer, torch.amp.GradScaler('cpu', enabled=False), clip)
        assert torch.allclose(model.weight.detach(), start[0] - scale * torch.tensor([[3.0], [0.0]]), atol=1e-5)
        assert torch.allclose(model.bias.detach(), start[1] - scale * torch.tensor([0.0, 4.0]), atol=1e-5)
        assert model.weight.grad is None and model.bias.grad is None  # zeroed for the next accumulation


def test_fused_adamw_equals_the_for_loop_one():
    torch.manual_seed(0)
    model = common.VisionTransformer(16, 4, 32, 1, 2)
    twin, start = copy.deepcopy(model), [p.detach().clone() for p in model.parameters()]
    args = SimpleNamespace(weight_decay=0.05, lr=1e-3)
    fused = common.adamw(model, args, betas=(0.9, 0.95))
    assert all(group['fused'] for group in fused.param_groups)
    loop = torch.optim.AdamW(common.param_groups(twin, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                             foreach=False, fused=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=generator)
                b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=0, atol=1e-6), name
    # the steps were taken (5 x lr 1e-3 moves each weight ~5e-3), so 1e-6 is a real bound, not a no-op
    assert min((a - s).abs().max().item() for a, s, in zip(model.parameters(), start) if a.requires_grad) > 1e-3


FAULTS_PER_ROUND = """
import resource, torch, common
def faults_of_a_step():  # a step's worth of activations (8 x 16 MiB) made and freed, after one round to warm up
    for _ in range(2):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones(4 * 2 ** 20) for _ in range(8)]
        del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults_of_a_step()
common.keep_freed_memory()
print(before, faults_of_a_step())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the setting is glibc-only')
def test_freed_memory_is_reused_without_page_faults():
    """glibc returns a freed 128 MiB to the OS, so the next step faults every page in again (32768 of 4 KiB); with
    common.keep_freed_memory (which common.setup calls on CPUs) the same round reuses it. Some of its eight blocks may
    land on fresh pages, after whatever small allocation Python made in between: mostly none, at times one, once on a
    loaded machine three; without the setting all eight, every time, at this second round."""
    result = subprocess.run([sys.executable, '-c', FAULTS_PER_ROUND], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    before, after = map(int, result.stdout.split())
    assert before > 20000 and after <= before // 2, (before, after)


def test_help_shows_the_default_and_each_preset_value(capsys, monkeypatch):
    import mae
    monkeypatch.setenv('COLUMNS', '60')  # a narrow terminal: argparse wraps the values over lines
    with pytest.raises(SystemExit) as exit:
        mae.parse_args(['--help'])
    assert exit.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())  # argparse wraps the help to the terminal width
    entry = lambda flag: text.split(f'{flag} {flag[2:].upper()} ')[1].split(' --')[0]
    assert 'default 512' in entry('--decoder_embed_dim') and 'shapes: 128' in entry('--decoder_embed_dim')
    assert 'default 16' in entry('--decoder_num_heads') and 'shapes: 4' in entry('--decoder_num_heads')
    assert 'cifar10:' not in entry('--decoder_embed_dim')  # presets that keep the default are not listed
    options = text.split('options:')[1]  # on / off flags too
    assert 'default on' in options.split('--no-norm_pix_loss ')[1].split(' --')[0]
    assert 'default off' in options.split('--compile ')[1].split(' --')[0]


@pytest.mark.parametrize('method, flag, words', [('spark', '--min_lr', 'unset: 0.001 x the peak lr'),
                                                 ('spark', '--clip_grad', 'LAMB clips to 5'),
                                                 ('mfm', '--clip_grad', 'without a default: no clipping (default 3)'),
                                                 ('maskfeat', '--min_lr', 'unset: 1e-6 x effective batch / 256')])
def test_help_states_the_rule_of_a_value_made_at_run_time(method, flag, words, capsys):
    with pytest.raises(SystemExit):
        __import__(method).parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert words in text.split(f'{flag} {flag[2:].upper()} ')[1].split(' --')[0]


def test_help_shows_the_recipe_of_the_model_and_size_typed(capsys):
    """SparK's fine-tuning row is per model: --help with --model convnext_base shows its row (arg.py: lr 1e-4, batch
    4096), not ResNet-50's (2e-3, 2048); with --model convnext_large --input_size 384, the 384 row and pretraining."""
    def entry(flag, *typed):
        with pytest.raises(SystemExit):
            __import__('spark').parse_args(['--data', 'imagenet', '--data_path', '.', *typed, '--help'])
        return ' '.join(capsys.readouterr().out.split()).split(f'{flag} {flag[2:].upper()} ')[1].split(' --')[0]
    assert 'default 0.0001' in entry('--ft_blr', '--model', 'convnext_base')
    assert 'imagenet: 4096' in entry('--ft_batch', '--model=convnext_base')
    assert 'default 6e-05' in entry('--ft_blr', '--model', 'convnext_large', '--input_size', '384')
    assert 'default 0.75' in entry('--mask_ratio', '--model', 'convnext_large', '--input_size', '384')
    assert 'default 0.002' in entry('--ft_blr')  # the default model's, ResNet-50


def test_knn_and_probe_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=generator) * 5
    labels = torch.arange(200) % 4
    features = centers[labels] + torch.randn(200, 8, generator=generator)
    assert common.knn_accuracy(features[:150], labels[:150], features[150:], labels[150:], 4) == 100.0
    assert common.linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:], 4, 20) > 95


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    """DINO's eval_knn.py: each of the k nearest votes exp(cos / 0.07). One neighbour of class 0 at cosine 0.9 beats two
    of class 1 at 0.841 only through that weighting (at T 0.1, by a count or by a sum of cosines, class 1 wins)."""
    angle = lambda cos: torch.tensor([cos, math.sqrt(1 - cos ** 2)])
    train = torch.stack([angle(0.9), angle(0.841), angle(0.841) * torch.tensor([1, -1]), angle(0.5), angle(0.5)])
    train_labels, query = torch.tensor([0, 1, 1, 1, 1]), torch.tensor([[2.0, 0.0]])  # (norms do not matter)
    assert common.knn_accuracy(train * 3, train_labels, query, torch.tensor([0]), 2, k=3) == 100.0
    assert common.knn_accuracy(train, train_labels, query, torch.tensor([1]), 2, k=3, temperature=0.1) == 100.0


def test_knn_over_several_chunks_of_queries_counts_each_query_once_against_its_own_label():
    generator = torch.Generator().manual_seed(0)
    train, train_labels = torch.randn(50, 4, generator=generator), torch.randint(0, 3, (50,), generator=generator)
    queries, labels = torch.randn(600, 4, generator=generator), torch.randint(0, 3, (600,), generator=generator)
    alone = [common.knn_accuracy(train, train_labels, q[None], y[None], 3, k=5) for q, y in zip(queries, labels)]
    assert common.knn_accuracy(train, train_labels, queries, labels, 3, k=5) == pytest.approx(sum(alone) / 600)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    """timm's DropPath: per sample, the branch is 0 or scaled by 1 / (1 - p); in evaluation, or at p 0, unchanged."""
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 2) + 2
    out = common.drop_path(x, 0.25, training=True)
    kept = (out != 0).flatten(1).any(1)
    assert torch.equal((out == 0).flatten(1).all(1), ~kept)  # whole samples dropped, never parts
    assert torch.allclose(out[kept], x[kept] / 0.75) and abs(kept.float().mean().item() - 0.75) < 0.03
    assert common.drop_path(x, 0.25, training=False) is x and common.drop_path(x, 0.0, training=True) is x


def test_linear_probe_trains_only_a_linear_layer_behind_a_batchnorm_without_affine(monkeypatch):
    """main_linprobe.py's head: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, classes); the optimizer gets
    the head's parameters, which are then the Linear's weight and bias only (the BN has none to learn). The top-1 (%)
    is that head's in eval mode: the BN's running statistics after its one step (of all 40 images, momentum 0.1)."""
    given, sgd = [], torch.optim.SGD

    def spy(params, **kwargs):  # the real SGD, over the parameters given, recorded
        given.extend(params)
        return sgd(given, **kwargs)
    monkeypatch.setattr(torch.optim, 'SGD', spy)
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, 6, generator=generator), torch.arange(40) % 3
    accuracy = common.linear_probe_accuracy(features, labels, features, labels, 3, 1)
    assert sorted(tuple(p.shape) for p in given) == [(3,), (3, 6)]
    (weight,), (bias,) = ([p.detach() for p in given if p.dim() == d] for d in (2, 1))
    mean, var = 0.1 * features.mean(0), 0.9 + 0.1 * features.var(0)  # from 0 and 1, the unbiased batch variance
    logits = (features - mean) / torch.sqrt(var + 1e-6) @ weight.T + bias
    assert accuracy == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize('n, epochs, batch, steps', [(40, 3, 40, 3), (700, 3, 256, 6)])
def test_linear_probe_optimizer_init_and_schedule_are_maes(monkeypatch, n, epochs, batch, steps):
    """main_linprobe.py's settings, SGD for LARS: lr 0.1 * batch / 256 (batch min(256, n)), momentum 0.9, no decay; BN
    eps 1e-6 without affine, the Linear trunc-normal (std 0.01), bias 0; a cosine to 0 over epochs * (n // batch)."""
    made, cosine = {}, torch.optim.lr_scheduler.CosineAnnealingLR

    class Norm(torch.nn.BatchNorm1d):  # the probe's BN, kept
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made['norm'] = self
    monkeypatch.setattr(torch.nn, 'BatchNorm1d', Norm)

    def spy(optimizer, *args, **kwargs):  # the real schedule, its optimizer and the head's weights before any step kept
        made.update(optimizer=optimizer, schedule=cosine(optimizer, *args, **kwargs),
                    start=[p.detach().clone() for group in optimizer.param_groups for p in group['params']])
        return made['schedule']
    monkeypatch.setattr(torch.optim.lr_scheduler, 'CosineAnnealingLR', spy)
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(n, 6, generator=generator), torch.arange(n) % 3
    common.linear_probe_accuracy(features, labels, features, labels, 3, epochs, seed=7)
    optimizer, schedule, (weight, bias) = made['optimizer'], made['schedule'], made['start']
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults['lr'] == pytest.approx(0.1 * batch / 256)
    assert (optimizer.defaults['momentum'], optimizer.defaults['weight_decay'], optimizer.defaults['nesterov']) == \
        (0.9, 0, False)
    expected = torch.nn.init.trunc_normal_(torch.empty(3, 6), std=0.01, generator=torch.Generator().manual_seed(7))
    assert torch.equal(weight, expected) and torch.equal(bias, torch.zeros(3))
    norm = made['norm']
    assert (norm.num_features, norm.eps, norm.affine, norm.momentum) == (6, 1e-6, False, 0.1)
    assert (schedule.T_max, schedule.eta_min, schedule.last_epoch) == (steps, 0, steps)  # stepped once per step
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0, abs=1e-12)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / 'executed'
    torch.save({'model': {}, 'evil': Payload(str(marker))}, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match='cannot load'):
        common.load_checkpoint(str(tmp_path / 'bad.pth'))
    assert not marker.exists()


@pytest.mark.parametrize('payload', [
    pytest.param(lambda path: Payload(path), id='os.system'),
    pytest.param(lambda path: SimpleNamespace(path=path), id='SimpleNamespace')])
def test_checkpoint_with_pickled_objects_says_so(tmp_path, payload):
    marker = tmp_path / 'executed'
    torch.save({'model': {}, 'extra': payload(str(marker))}, tmp_path / 'pickled.pth')
    with pytest.raises(SystemExit) as exit:
        common.load_checkpoint(str(tmp_path / 'pickled.pth'))
    assert not marker.exists()
    message = str(exit.value)
    assert len(message.splitlines()) == 1 and 'pickled Python objects' in message, message


def test_load_checkpoint_tells_truncated_from_foreign_files(tmp_path):
    torch.save({'model': {'w': torch.zeros(1000)}, 'epoch': 3}, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.pth').write_bytes(b'not a checkpoint at all')
    assert common.load_checkpoint(str(tmp_path / 'good.pth'))['epoch'] == 3
    with pytest.raises(SystemExit, match='truncated or damaged'):
        common.load_checkpoint(str(tmp_path / 'cut.pth'))
    with pytest.raises(SystemExit, match='not a PyTorch checkpoint'):
        common.load_checkpoint(str(tmp_path / 'text.pth'))
    at = data.index(bytes(256))  # inside w's 4,000 zero bytes
    (tmp_path / 'flipped.pth').write_bytes(data[:at] + b'\x01' * 16 + data[at + 16:])  # bytes of a tensor changed
    with pytest.raises(SystemExit, match=r'flipped\.pth: it is truncated or damaged: .*delete it, then continue from '
                       r'its newest checkpoint-<epoch>\.pth if any, else start again\)$'):  # (was: loaded as other
        # weights, without a word)
        common.load_checkpoint(str(tmp_path / 'flipped.pth'))
    with pytest.MonkeyPatch.context() as patch:  # torch's option to save without CRCs (each 0): nothing to check
        patch.setattr(torch.utils.serialization.config.save, 'compute_crc32', False)
        torch.save({'epoch': 4}, tmp_path / 'no_crc.pth')
    assert common.load_checkpoint(str(tmp_path / 'no_crc.pth'))['epoch'] == 4  # (was: refused as damaged)


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint-last.pth')
    common.atomic_save({'epoch': 1}, path)

    def crash(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_save({'epoch': 2}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 1}


def test_peak_memory_is_in_bytes_on_linux_and_macos_and_unknown_on_windows(monkeypatch):
    """getrusage's ru_maxrss counts KiB on Linux and bytes on macOS (the log said 1024x a Mac's peak); Windows has no
    `resource` module: common still imports, and the peak is None."""
    monkeypatch.setattr(common.resource, 'getrusage', lambda who: SimpleNamespace(ru_maxrss=3000))
    for platform, expected in [('linux', 3000 * 1024), ('darwin', 3000)]:
        monkeypatch.setattr(sys, 'platform', platform)
        assert common.peak_resident_memory() == expected
    monkeypatch.setattr(common, 'resource', None)
    assert common.peak_resident_memory() is None
    windows = "import sys; sys.modules['resource'] = None; import common; print(common.resource)"  # ImportError
    assert subprocess.run([sys.executable, '-c', windows], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == 'None'


def test_atomic_save_where_a_folder_cannot_be_opened_as_on_windows(tmp_path, monkeypatch):
    """Windows cannot os.open a folder (PermissionError), which the rename's fsync needs on POSIX: there it is skipped,
    not reported as a failed write after the file was written."""
    def no_folders(path, *args):
        if os.path.isdir(path):
            raise PermissionError(13, 'Permission denied', path)
        return real_open(path, *args)
    real_open, path = os.open, str(tmp_path / 'checkpoint-last.pth')
    monkeypatch.setattr(os, 'open', no_folders)
    with pytest.raises(SystemExit, match='could not write'):  # what Windows got before
        common.atomic_save({'epoch': 1}, path)
    monkeypatch.setattr(sys, 'platform', 'win32')
    common.atomic_save({'epoch': 2}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 2} and os.listdir(tmp_path) == ['checkpoint-last.pth']


def test_clean_state_dict_strips_wrappers():
    assert list(common.clean_state_dict({'module._orig_mod.blocks.0.w': 1, 'norm.b': 2})) == ['blocks.0.w', 'norm.b']


BAD_FLAGS = [
    (['--mask_ratio', '1.5'], '--mask_ratio must be in'),
    (['--input_size', '30'], 'not divisible by the patch size'),
    (['--model', 'vit_giant_patch4'], "unknown --model 'vit_giant_patch4'"),
    (['--data', 'folder', '--data_path', '/nonexistent'], 'is not a folder'),
    (['--resume', '/nonexistent.pth'], 'no such file'),
    (['--batch_size', '0'], 'must be at least 1'),
    (['--blr', 'fast'], 'invalid float value'),
    (['--lr', '1e-3', '--blr', '1e-2'], '--lr and --blr both given'),  # was: --blr ignored without a word
    (['--epoch', '1'], 'unrecognized arguments: --epoch 1'),  # no abbreviations: never taken for --epochs
    (['--seed', '-5'], 'argument --seed: must be at least 0, got -5'),  # was numpy's traceback in the loader
    (['--ft_drop_path', '1'], 'argument --ft_drop_path: must be in [0, 1), got 1'),  # was a NaN loss
]


@pytest.mark.parametrize('method, model', [('mae', 'resnet50'), ('hpm', 'convnext_base'), ('maskfeat', 'resnet50'),
                                           ('mfm', 'convnext_base'), ('spark', 'vit_base_patch16'),
                                           ('mae', 'vit_base_patch0')])
def test_a_model_the_method_cannot_build_is_refused_in_one_line(method, model):
    with pytest.raises(SystemExit, match=f"unknown --model '{model}': use "):  # was a traceback
        __import__(method).parse_args(['--model', model])


def test_a_mask_grid_of_one_cell_asks_for_a_larger_grid():
    import spark
    with pytest.raises(SystemExit, match='1x1 mask grid.*a larger --input_size'):  # 32 px / downsample 32
        spark.parse_args(['--model', 'resnet50'])


def test_bad_flags_exit_with_one_line():
    with ThreadPoolExecutor(2) as pool:  # two at a time: each run is mostly torch's import
        results = list(pool.map(lambda flags: run_script('mae.py', flags, timeout=60, check=False),
                                [flags for flags, _ in BAD_FLAGS]))
    for (flags, message), result in zip(BAD_FLAGS, results):
        assert result.returncode != 0, flags
        assert message in result.stderr and 'Traceback' not in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (flags, result.stderr)


@pytest.mark.parametrize('method, flags, message, needed', [
    ('mae', ['--mixup', '0'], '--mixup would do nothing here: it sets fine-tuning, which runs with --finetune_epochs',
     ['--finetune_epochs', '1']),
    ('spark', ['--ft_ema', '0.999'], '--ft_ema would do nothing here', ['--finetune_epochs', '1']),
    ('mae', ['--eval_only', '--compile'], '--compile would do nothing here', ['--finetune_epochs', '1']),
    ('mae', ['--shapes_size', '10', '--data', 'cifar10'], '--shapes_size would do nothing here', ['--data', 'shapes']),
    ('mae', ['--data_path', '.'], '--data_path would do nothing here', ['--data', 'folder']),  # a forgotten --data
    ('hpm', ['--no-global_pool', '--knn_k', '0', '--probe_epochs', '0'], '--no-global_pool would do nothing here: it '
     'picks the kNN / probe feature', ['--probe_epochs', '1']),
    ('mae', ['--cache', '--data', 'shapes'], '--cache would do nothing here: shapes are made in memory',
     ['--data', 'folder', '--data_path', '.']),
    *[('hpm', ['--teacher', '--knn_k', '0', '--probe_epochs', '0'], '--teacher would do nothing here: it picks what '
       'the kNN, the probe, the fine-tune and --export_encoder read', needed)
      for needed in (['--export_encoder'], ['--finetune_epochs', '1'], ['--eval_only', '--resume', __file__],
                     ['--knn_k', '5'], ['--probe_epochs', '1'])],
    ('hpm', ['--teacher', '--knn_k', '0', '--probe_epochs', '0', '--eval_only'], '--teacher would do nothing here',
     ['--resume', __file__]),  # (--eval_only alone: random weights, the teacher a copy of them)
    *[('hpm', ['--teacher', '--eval_only', *reads], '--teacher with --eval_only takes --resume FILE',
       ['--resume', __file__]) for reads in ([], ['--finetune_epochs', '1'], ['--export_encoder'])]])  # (was taken)
def test_a_flag_that_would_do_nothing_is_refused(method, flags, message, needed):  # each was ignored without a word
    with pytest.raises(SystemExit, match=message):
        __import__(method).parse_args(flags)
    __import__(method).parse_args(flags + needed)  # with what it acts on (later flags win), it is taken


def test_eval_only_says_the_flags_of_the_pretraining_it_skips(capsys):  # each was ignored without a word
    import hpm, spark
    for flag, value in (('--blr', '1e-3'), ('--clip_grad', '1'), ('--epochs', '5'), ('--ema_ramp_epochs', '3')):
        hpm.parse_args(['--eval_only', flag, value, '--warmup_epochs', '1'])
        note = capsys.readouterr().out.strip()
        assert note.startswith('note: --eval_only skips pretraining, so') and note.endswith('change(s) nothing')
        assert {flag, '--warmup_epochs'} <= set(note.replace(',', '').split()) and len(note.splitlines()) == 1, note
        hpm.parse_args([flag, value])
        assert 'skips pretraining' not in capsys.readouterr().out
    spark.parse_args(['--eval_only', '--weight_decay_end', '0.1'])
    assert 'so --weight_decay_end change(s) nothing' in capsys.readouterr().out
    __import__('mfm').parse_args(['--eval_only', '--sample_ratio', '0.3'])
    assert 'so --sample_ratio change(s) nothing' in capsys.readouterr().out
    for save_freq in (['--save_freq', '5'], ['--save_freq=5']):  # (a flag with a default: seen as typed)
        hpm.parse_args(['--eval_only', *save_freq])
        assert 'so --save_freq change(s) nothing' in capsys.readouterr().out
    hpm.parse_args(['--save_freq', '5'])
    assert 'skips pretraining' not in capsys.readouterr().out
    hpm.parse_args(['--eval_only', '--accum_iter', '2'])
    assert 'so --accum_iter change(s) nothing' in capsys.readouterr().out
    assert hpm.parse_args(['--eval_only', '--accum_iter', '2', '--finetune_epochs', '1']).ft_accum_iter == 2  # its
    assert 'skips pretraining' not in capsys.readouterr().out  # batch, unless --ft_batch sets that
    hpm.parse_args(['--eval_only', '--accum_iter', '2', '--finetune_epochs', '1', '--ft_batch', '128'])
    assert 'so --accum_iter change(s) nothing' in capsys.readouterr().out


def test_resume_auto_with_nothing_to_resume_says_it_starts_afresh(tmp_path, capsys):
    import mae
    args = mae.parse_args(['--resume', 'auto', '--output_dir', str(tmp_path / 'typo')])
    common.setup(args)
    model = mae.build_model(args)
    assert common.resume(args, model, common.adamw(model, args, betas=(0.9, 0.95))) == 0
    assert f'no checkpoint-last.pth in {tmp_path / "typo"}, so the run starts afresh' in capsys.readouterr().out


def test_lr_zero_is_taken_and_a_min_lr_above_the_peak_or_fp16_on_a_cpu_is_said(tmp_path, capsys):
    import mae
    assert mae.parse_args(['--lr', '0']).lr == 0  # was: 0 read as unset, the lr made from --blr instead
    common.setup(mae.parse_args(['--min_lr', '1', '--output_dir', str(tmp_path / 'a')]))  # shapes: blr 1.5e-3, batch 64
    assert 'note: --min_lr 1 is above the peak lr 0.000375: after warmup the lr rises to it' in capsys.readouterr().out
    common.setup(mae.parse_args(['--min_lr', '1e-6', '--output_dir', str(tmp_path / 'b')]))
    assert 'note' not in capsys.readouterr().out
    common.setup(mae.parse_args(['--amp', 'fp16', '--device', 'cpu', '--output_dir', str(tmp_path / 'c')]))
    assert 'note: --amp fp16 has no fast CPU kernels' in capsys.readouterr().out  # a GPU command's flag, 23x slower


def test_an_odd_batch_that_mixup_pairs_with_itself_reversed_is_said(tmp_path, capsys):
    """timm's Mixup refuses an odd batch; common.mix pairs image i with image B - 1 - i, so the middle one with itself:
    said when fine-tuning mixes, silent when it does not mix or the batch is even."""
    import mae
    ft = ['--finetune_epochs', '1']
    for i, (flags, said) in enumerate([(['--batch_size', '7', *ft], True), (['--batch_size', '8', *ft], False),
                                       (['--batch_size', '7', '--mixup', '0', *ft], True),  # cutmix alone mixes
                                       (['--batch_size', '7', '--mixup', '0', '--cutmix', '0', *ft], False),
                                       (['--batch_size', '7'], False)]):  # no fine-tune
        common.setup(mae.parse_args(flags + ['--output_dir', str(tmp_path / str(i))]))
        out = capsys.readouterr().out
        assert ('note: --batch_size 7 is odd: fine-tuning mixes its middle image with itself' in out) == said, flags
    images, labels = torch.arange(3.0).view(3, 1, 1, 1), torch.tensor([0, 1, 2])
    mixed, target = common.mix(images, labels, 3, 0.8, 0.0, 0.0, np.random.default_rng(0))
    assert mixed[1].item() == 1.0 and target[1].tolist() == [0.0, 1.0, 0.0]  # the middle image: itself, its label


def test_a_warmup_as_long_as_the_run_is_said(capsys):
    import mae
    mae.parse_args(['--epochs', '20', '--warmup_epochs', '40', '--finetune_epochs', '3'])  # the official code runs
    out = capsys.readouterr().out  # them so too, without a word: the lr never leaves its warmup
    assert 'note: --warmup_epochs 40 >= --epochs 20: the lr rises through the whole run' in out
    assert 'note: --ft_warmup_epochs 5 >= --finetune_epochs 3' in out
    mae.parse_args(['--epochs', '20', '--warmup_epochs', '5'])
    assert 'note' not in capsys.readouterr().out


@pytest.mark.parametrize('flag, value, words', [
    ('--reprob', '25', 'argument --reprob: must be in [0, 1], got 25'),  # a percentage: every image was erased
    ('--smoothing', '1.5', 'argument --smoothing: must be in [0, 1]'),
    ('--crop_scale', '1.5', 'argument --crop_scale: must be in [0, 1]'),
    ('--finetune_epochs', '-1', 'argument --finetune_epochs: must be at least 0'),  # reported the untrained head
    ('--knn_k', '-5', 'argument --knn_k: must be at least 0'),
    ('--weight_decay', '-0.05', 'argument --weight_decay: must be at least 0'),
    ('--warmup_epochs', 'inf', 'argument --warmup_epochs: must be finite, got inf'),  # the lr was 0 all run
    ('--blr', 'inf', 'argument --blr: must be finite, got inf'),  # was a "non-finite loss" at step 1
    ('--weight_decay', 'inf', 'argument --weight_decay: must be finite, got inf'),  # (that line said: a lower lr)
    ('--blr', 'nan', 'argument --blr: must be finite, got nan'),
    ('--data_path', '/datasets/imagenet', '--data_path would do nothing here: --data shapes is built in: add --data '
     'folder'),  # a forgotten --data: the run trained on shapes
    ('--device', 'mps', '--device mps: use cpu, or cuda (cuda:N for one GPU of several); other backends (mps, xpu) are '
     'not supported'),  # each a traceback at the model's .to(device), or later
    ('--device', 'cpu:0', '--device cpu:0: use cpu, or cuda')])
def test_a_value_out_of_its_range_is_refused_in_one_line(flag, value, words):
    import mae
    with pytest.raises(SystemExit) as stop:  # parser.error: sys.exit of one line
        mae.parse_args([flag, value])
    assert f'error: {words}' in str(stop.value) and '\n' not in str(stop.value), stop.value


def test_one_gpu_named_under_torchrun_is_refused_in_one_line(monkeypatch):  # it ran on cuda:LOCAL_RANK, silently
    import mae
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit) as stop:
        mae.parse_args(['--device', 'cuda:1'])
    assert 'error: --device cuda:1 under torchrun: each process takes the GPU of its LOCAL_RANK' in str(stop.value)
    assert '\n' not in str(stop.value)


@pytest.mark.parametrize('method, flags, words', [  # each was a traceback after start-up (or ran on, silently)
    ('mae', ['--decoder_num_heads', '5'], '--decoder_embed_dim 128 does not split into --decoder_num_heads 5 heads'),
    ('mae', ['--mask_type', 'green', '--input_size', '272'],
     '--mask_type green has patterns of 64x64 patches, this grid is 68x68'),
    ('hpm', ['--decoder_embed_dim', '0'], 'argument --decoder_embed_dim: must be at least 1, got 0'),
    ('hpm', ['--alpha_final', '1.5'], 'argument --alpha_final: must be in [0, 1], got 1.5'),
    ('spark', ['--decoder_width', '7'], '--decoder_width must be at least 8 for resnet_mini_ds8'),
    ('spark', ['--drop_path', '-1'], 'argument --drop_path: must be in [0, 1), got -1'),
    ('spark', ['--ft_ema', '1.5'], 'argument --ft_ema: must be in [0, 1), got 1.5'),
    ('spark', ['--ft_ema', '1'], 'argument --ft_ema: must be in [0, 1), got 1'),  # the EMA never moved, yet reported
    ('hpm', ['--ema_decay', '0.5', 'nan'], 'argument --ema_decay: must be finite, got nan'),  # NaN teacher, silently
    ('hpm', ['--ema_decay', '0.5', '1'], 'argument --ema_decay: must be in [0, 1), got 1'),
    ('hpm', ['--ema_ramp_epochs', '0'], '--ema_ramp_epochs must be positive, got 0'),
    ('hpm', ['--ema_ramp_epochs', 'inf'], 'argument --ema_ramp_epochs: must be finite, got inf'),
    ('maskfeat', ['--model', 'vit_tiny_patch5', '--input_size', '30'], 'vit_tiny_patch5 has patches of 5 px: MaskFeat '
     'needs an even patch size'),  # was: "must be half the patch size 5 (use --hog_cell_size 2)"
    ('mae', ['--data', 'cifar10', '--cache'], "--cache would do nothing here: cifar10's archive is read into memory"),
])
def test_a_method_size_or_value_that_cannot_work_is_refused_in_one_line(method, flags, words):
    with pytest.raises(SystemExit) as stop:
        __import__(method).parse_args(flags)
    assert f'error: {words}' in str(stop.value) and '\n' not in str(stop.value), stop.value


def test_spark_refuses_a_decoder_too_narrow_to_halve():
    import spark
    with pytest.raises(ValueError, match='decoder_width 4 cannot be halved 3 times: 8 at least'):
        spark.SparK(spark.build_backbone('resnet_mini_ds8'), 32, 0.6, decoder_width=4)


def test_knn_says_the_k_it_uses(tmp_path, capsys, monkeypatch):  # it said k=20 while voting with all 5 images
    class Split(list):
        classes = ['a', 'b']

    class Encoder(torch.nn.Identity):
        def features(self, images):
            return images
    features = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    monkeypatch.setattr(common, 'extract_features', lambda *_, **__: features)
    args = SimpleNamespace(output_dir=str(tmp_path), epochs=1, seed=0, device=torch.device('cpu'), knn_k=20,
                           probe_epochs=0, eval_only=False, resume='')
    results = common.evaluate(args, Encoder(), Encoder, (Split(range(5)), Split(range(5))))
    assert 'kNN (k=5) top-1' in capsys.readouterr().out and 'trained_knn_top1' in results


def test_an_evaluation_logs_what_it_evaluated(tmp_path):
    settings = dict(output_dir=str(tmp_path), epochs=7, seed=0, device=torch.device('cpu'), knn_k=0, probe_epochs=0)
    common.evaluate(SimpleNamespace(**settings, eval_only=False, resume=''), None, torch.nn.Identity, None)
    common.evaluate(SimpleNamespace(**settings, eval_only=True, resume='run/checkpoint-last.pth'), None,
                    torch.nn.Identity, None)
    with open(tmp_path / 'log.txt') as f:
        trained, evaluated = [json.loads(line) for line in f]
    assert trained == {'epoch': 6, 'evaluation': True}  # the last epoch of this run
    assert evaluated == {'checkpoint': 'run/checkpoint-last.pth', 'evaluation': True}  # was 'epoch': 6, whatever


def test_batches_left_over_by_accumulation_are_said(capsys):  # each epoch skips them, as the official loop discards
    args = SimpleNamespace(world_size=1, rank=0, seed=0, batch_size=2, accum_iter=2, num_workers=0,
                           device=torch.device('cpu'))
    assert len(common.make_loader(list(range(10)), args, train=True)) == 5
    said = capsys.readouterr().out
    assert 'the last 1 batch(es) of each epoch fill no optimizer step of 2 accumulated batches' in said
    common.make_loader(list(range(8)), args, train=True)
    common.make_loader(list(range(10)), args, train=False)  # evaluation accumulates nothing
    assert capsys.readouterr().out == ''


def test_a_presets_loader_workers_are_at_most_the_cores_a_given_number_is_kept(monkeypatch):  # was: 8 workers on 2
    import mae  # cores, and torch's warning about it on the first `--data folder` run
    monkeypatch.setattr(common, 'cpu_share', lambda: 3)
    assert mae.parse_args(['--data', 'folder', '--data_path', '.']).num_workers == 3  # the preset's 8
    assert mae.parse_args(['--data', 'folder', '--data_path', '.', '--num_workers', '6']).num_workers == 6
    assert mae.parse_args([]).num_workers == 0  # shapes: in memory, no workers


def test_an_evaluation_loader_keeps_every_image():
    """main_finetune.py / main_linprobe.py's val loader: drop_last=False, in order, so a top-1 counts each val image
    once; the training loader drops the last partial batch (drop_last=True)."""
    args = SimpleNamespace(world_size=1, rank=0, seed=0, batch_size=4, accum_iter=1, num_workers=0,
                           device=torch.device('cpu'), amp='none')
    assert [len(b) for b in common.make_loader(list(range(10)), args, train=False)] == [4, 4, 2]
    assert torch.equal(torch.cat(list(common.make_loader(list(range(10)), args, train=False))), torch.arange(10))
    assert len(common.make_loader(list(range(10)), args, train=True)) == 2
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10))
    features, labels = common.extract_features(lambda x: x.mean((2, 3)), dataset, args)
    assert features.shape == (10, 3) and torch.equal(labels, torch.arange(10))


def test_ctrl_c_in_the_evaluation_says_in_one_line_what_is_kept(tmp_path):
    args = SimpleNamespace(world_size=1, rank=0, seed=0, batch_size=4, accum_iter=1, num_workers=0,
                           device=torch.device('cpu'), amp='none', output_dir=str(tmp_path))
    (tmp_path / 'checkpoint-last.pth').write_bytes(b'')
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10))

    def pressed(images):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit, match=r'^interrupted in the evaluation: .*checkpoint-last.pth \(the last finished '
                                         r'epoch\) is intact: continue with --resume auto$'):
        common.extract_features(pressed, dataset, args)
    dataset.classes = list(range(10))  # the probe's fit, after the features are extracted: the same line

    def fit_pressed(*args):
        raise KeyboardInterrupt
    encoder = SimpleNamespace(eval=lambda: SimpleNamespace(features=lambda x: x.float().flatten(1)))
    args.knn_k, args.probe_epochs = 0, 1
    with pytest.MonkeyPatch.context() as patch, pytest.raises((SystemExit, KeyboardInterrupt)) as stop:
        patch.setattr(common, 'linear_probe_accuracy', fit_pressed)  # (KeyboardInterrupt caught: it would end pytest)
        common.evaluate(args, encoder, lambda: SimpleNamespace(to=lambda device: encoder), [dataset, dataset])
    assert stop.type is SystemExit and str(stop.value).startswith('interrupted in the evaluation: ') and \
        str(stop.value).endswith('continue with --resume auto')


def test_ctrl_c_in_a_fine_tune_says_the_same_command_continues_it_and_is_said_once_under_torchrun(tmp_path,
                                                                                                 monkeypatch):
    (tmp_path / 'finetune').mkdir()  # (after --eval_only, --resume auto is refused: the advice was that)
    (tmp_path / 'finetune' / 'checkpoint-last.pth').write_bytes(b'')
    for output_dir, advice in ((tmp_path / 'finetune', 'the same command continues it (--resume auto if it '
                                'pretrains)'), (tmp_path / 'finetune-1', None), (tmp_path, None)):
        with pytest.raises(SystemExit) as stop, common.interrupt_said('in epoch 0', str(output_dir)):
            raise KeyboardInterrupt
        assert str(stop.value).endswith(advice) if advice else 'the same command' not in str(stop.value)
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(SystemExit) as other, common.interrupt_said('in epoch 0', str(tmp_path / 'finetune')):
        raise KeyboardInterrupt
    assert other.value.code == 1  # the status alone: each node's local rank 0 says it (was: every process)


@pytest.mark.parametrize('method,flags', [('mae', ['--mask_type', 'green']), ('hpm', []), ('maskfeat', []),
                                          ('mfm', []), ('spark', [])])
def test_every_dataset_a_loader_gets_pickles_as_spawned_workers_need(method, flags, tmp_path, monkeypatch):
    """macOS and Windows start loader workers by spawn, which pickles the dataset with its transform and mask draw (a
    lambda or closure there fails only on those systems): each method's pretraining set, and the fine-tuning and eval
    views, survive pickling with the same items. (The skip counter, a multiprocessing Value, pickles only while a
    process is spawned; five methods spawned with a worker each, by hand, 2026-12-07: see README, "Not done yet".)"""
    import importlib
    from test_recipes import Stop
    module, seen = importlib.import_module(method), {}

    def first_epoch(model, loss_fn, loader, *args, **kwargs):
        seen['dataset'] = loader.dataset
        raise Stop
    monkeypatch.setattr(common, 'train_one_epoch', first_epoch)
    with pytest.raises(Stop):
        module.main(['--shapes_size', '20', '--batch_size', '4', '--output_dir', str(tmp_path), *flags])
    pretraining = seen['dataset']
    for dataset in (pretraining, pretraining.with_transform(common.FinetuneTransform(32, reprob=1.0)),
                    pretraining.with_transform(common.EvalTransform(32))):
        dataset.num_skipped = None  # (the counter: see above)
        twin = pickle.loads(pickle.dumps(dataset))
        for mine, its in zip(dataset[3], twin[3]):
            assert np.array_equal(np.asarray(mine), np.asarray(its))


def test_a_split_smaller_than_one_step_names_only_what_can_be_lowered():
    dataset = torch.utils.data.TensorDataset(torch.zeros(6, 3, 2, 2, dtype=torch.uint8), torch.arange(6))
    args = SimpleNamespace(world_size=1, rank=0, seed=0, num_workers=0, batch_size=8, accum_iter=1)
    with pytest.raises(SystemExit, match=r'process\(es\)\): lower --batch_size$'):  # (was: "lower --accum_iter" at 1)
        common.make_loader(dataset, args, train=True)
    args.batch_size, args.accum_iter = 4, 2
    with pytest.raises(SystemExit, match=r'lower --accum_iter \(a recipe.s target batch sets it unless given\), or '
                                         r'--batch_size$'):
        common.make_loader(dataset, args, train=True)
