"""Fine-tuning: official checkpoint layouts load with only the expected missing / unused keys, position tables are
resized, the encoder export round-trips, layer-decay groups, mixup / cutmix, the fine-tuning transform, runs of
mae.py that fine-tune as a user would start them, and what fine-tuning hands on (mix's settings, the loss, SparK's
optimizer and layer groups)."""
import copy, inspect, json, math, os, re, shutil, signal, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import hpm
import mae
import maskfeat
import mfm
import spark
from conftest import ROOT, TINY, Stop, load_weights, read_log, run_script, without_timing

LOAD_PRETRAINED = common.load_pretrained  # the original, whatever a test patches
BLOCK = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
         'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']


def timm_encoder_keys(depth):
    """timm's VisionTransformer keys without `head` (and without the `fc_norm` of global pooling): the layout of the
    released encoder-only files (MAE's mae_pretrain_vit_*.pth)."""
    return ({'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
            | {f'blocks.{i}.{k}' for i in range(depth) for k in BLOCK})


def seeded(seed, build, *args, **kwargs):
    torch.manual_seed(seed)
    return build(*args, **kwargs)


TINY_VIT = common.vit_config('vit_tiny_patch4')  # embed_dim 192, depth 12, 3 heads, 4-px patches


def tiny_mae(cls=mae.MAE, img_size=16):  # MAE / HPM with a 32-wide, 1-block decoder
    return cls(img_size, **TINY_VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1)


def vit_classifier(num_classes, model='vit_tiny_patch4', img_size=16, **kwargs):  # as the method files build it
    return common.ViTClassifier(num_classes, img_size=img_size, **common.vit_config(model), **kwargs)


def resume_eval_only(model, checkpoint, tmp_path, monkeypatch, convert=None, args=None, encoder=common.ENCODER_KEYS):
    """Write `checkpoint`, load it as --eval_only --resume does (common.resume without an optimizer; `encoder`: the
    keys that must load, as the method's main passes them) -> the (missing, unused) lists of that load."""
    path = str(tmp_path / 'official.pth')
    torch.save(checkpoint, path)
    reports = []
    monkeypatch.setattr(common, 'load_pretrained', lambda *a: reports.append(LOAD_PRETRAINED(*a)) or reports[-1])
    args = args(path) if args else SimpleNamespace(resume=path, output_dir=str(tmp_path), world_size=1, rank=0,
                                                   device=torch.device('cpu'))
    assert common.resume(args, model, None, None, convert, encoder) == 0
    (missing, unused), = reports
    return missing, unused


def assert_loaded(model, expected):
    own = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


# ---- official layouts ------------------------------------------------------------------------------------------------
def test_mae_encoder_only_and_full_checkpoints_load(tmp_path, monkeypatch):
    """MAE's encoder-only file misses only the decoder and mask token in MAE, only head/fc_norm in the classifier."""
    source = seeded(1, tiny_mae).state_dict()
    encoder = {k: v for k, v in source.items() if not k.startswith(('decoder_', 'mask_token'))}
    assert set(encoder) == timm_encoder_keys(12)  # the released mae_pretrain_vit_*.pth layout
    parse = lambda path: mae.parse_args(['--eval_only', '--resume', path, '--output_dir', str(tmp_path)])
    model = seeded(2, tiny_mae)
    missing, unused = resume_eval_only(model, {'model': encoder}, tmp_path, monkeypatch, args=parse)
    assert unused == [] and 'mask_token' in missing and 'decoder_pos_embed' in missing
    assert set(missing) == {k for k in model.state_dict() if k.startswith('decoder_') or k == 'mask_token'}
    assert_loaded(model, encoder)

    classifier = seeded(2, vit_classifier, 10)
    missing, unused = common.load_pretrained(classifier, encoder, 'encoder')
    assert missing == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert unused == ['norm.bias', 'norm.weight']
    assert_loaded(classifier, {k: v for k, v in encoder.items() if not k.startswith('norm.')})

    model = seeded(3, tiny_mae)  # the full model (mae_visualize_*.pth): nothing left out
    assert resume_eval_only(model, {'model': source}, tmp_path, monkeypatch, args=parse) == ([], [])
    assert_loaded(model, source)


def test_eval_only_load_stops_when_encoder_tensors_do_not_load(tmp_path, monkeypatch):
    """--eval_only --resume of a file made for another network: one line naming the first tensor that does not fit,
    not a run on a half-random encoder; only the encoder's keys count (a missing decoder was fine above)."""
    small = {k: v for k, v in mae.MAE(16, **common.vit_config('vit_small_patch4'), decoder_embed_dim=32,
                                      decoder_depth=1).state_dict().items() if common.ENCODER_KEYS(k)}
    lacking = {k: v for k, v in seeded(1, tiny_mae).state_dict().items() if not k.startswith('blocks.11.')}
    for state, expected in ((small, r'150 of its 150 encoder tensors .*cls_token: \(1, 1, 384\) in the file, '
                                    r'\(1, 1, 192\) here'),
                            (lacking, r'12 of its 150 encoder tensors .*blocks\.11\.\S+: none in the file')):
        with pytest.raises(SystemExit) as stop:
            resume_eval_only(seeded(2, tiny_mae), {'model': state}, tmp_path, monkeypatch)
        message = str(stop.value.code)
        assert message.startswith('error: ') and 'does not fit this network' in message and '\n' not in message
        assert re.search(expected, message), message
        assert message.endswith('pass the --model (and sizes) it was made with, to the method file that made it')
    classifier = common.ViTClassifier(5, 16, **common.vit_config('vit_tiny_patch4')).state_dict()  # finetuned.pth's
    with pytest.raises(SystemExit, match=r'is a fine-tuned classifier \(it has a head\), not pretrained weights'):
        resume_eval_only(seeded(2, tiny_mae), {'model': classifier}, tmp_path, monkeypatch)  # was: "pass the --model"
    maskfeat_classifier = common.ViTClassifier(5, 16, **common.vit_config('vit_tiny_patch4'), pool_norm='norm')
    mfm_classifier = mfm.ResNetClassifier(5, *mfm.RESNETS['resnet_tiny'], img_size=32)  # timm's `fc`, `encoder.`-ed
    for model, classifier, convert in ((maskfeat.build_model(maskfeat.parse_args(['--model', 'vit_tiny_patch4',
                                                                                  '--input_size', '16'])),
                                        maskfeat_classifier, maskfeat.official_state),
                                       (mfm.MFM(mfm.ResNet(*mfm.RESNETS['resnet_tiny'], img_size=32)), mfm_classifier,
                                        mfm.mfm_layout)):  # their encoders load whole: were evaluated as 'trained'
        with pytest.raises(SystemExit, match='is a fine-tuned classifier'):
            resume_eval_only(model, {'model': classifier.state_dict()}, tmp_path, monkeypatch, convert)


@pytest.mark.parametrize('teacher', [False, True])
def test_hpm_official_checkpoint_gives_the_student_or_the_teacher(tmp_path, monkeypatch, teacher):
    """HPM's {'state_dict' (module.), 'ema_state_dict', 'model': arch name} loads whole, the chosen network's."""
    student = seeded(1, tiny_mae, hpm.HPM).state_dict()
    ema = seeded(3, tiny_mae, hpm.HPM).state_dict()
    assert not torch.equal(student['blocks.0.attn.qkv.weight'], ema['blocks.0.attn.qkv.weight'])
    checkpoint = {'state_dict': {f'module.{k}': v for k, v in student.items()}, 'ema_state_dict': ema,
                  'model': 'mae_vit_base_patch16', 'epoch': 199}
    model = seeded(2, tiny_mae, hpm.HPM)
    convert = partial(hpm.official_state, teacher=teacher)
    assert resume_eval_only(model, checkpoint, tmp_path, monkeypatch, convert) == ([], [])
    assert_loaded(model, ema if teacher else student)


def mmpretrain_name(key):
    """Our MaskFeat name -> mmpretrain's (the inverse of maskfeat.MMPRETRAIN_NAMES, written out from its key names)."""
    if key.startswith('pred_head.projections.0.'):
        return 'neck.fc.' + key.removeprefix('pred_head.projections.0.')
    key = re.sub(r'^pred_head\.transforms\.0\.0\.', 'ln1.', key)  # the backbone's final norm
    key = re.sub(r'^patch_embed\.proj\.', 'patch_embed.projection.', key)
    key = re.sub(r'^blocks\.(\d+)\.norm([12])\.', r'layers.\1.ln\2.', key)
    key = re.sub(r'^blocks\.', 'layers.', key).replace('.mlp.fc1.', '.ffn.layers.0.0.').replace('.mlp.fc2.',
                                                                                              '.ffn.layers.1.')
    return 'backbone.' + key


def test_maskfeat_slowfast_and_mmpretrain_checkpoints_load(tmp_path, monkeypatch):
    """SlowFast's {'model_state'} (HOG buffers dropped, head.projection) and mmpretrain's renamed {'state_dict'}
    load into MaskFeat / the classifier with nothing missing."""
    source = seeded(1, maskfeat.MaskFeat, 16, **TINY_VIT, hog_cell_size=2).state_dict()
    sobel = torch.tensor([[1., 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    hog = {'weight_x': sobel, 'weight_y': sobel.transpose(2, 3), 'gkern': torch.rand(16, 16)}
    slowfast = {'model_state': {**source, **{f'hogs.0.{k}': v for k, v in hog.items()}}, 'epoch': 300}
    model = seeded(2, maskfeat.MaskFeat, 16, **TINY_VIT, hog_cell_size=2)
    assert resume_eval_only(model, slowfast, tmp_path, monkeypatch, maskfeat.official_state) == ([], [])
    assert_loaded(model, source)

    # a SlowFast fine-tuned model: the pooled norm is `norm`, the classifier `head.projection`
    tuned = seeded(1, vit_classifier, 10, pool_norm='norm').state_dict()
    assert {'norm.weight', 'head.weight'} <= set(tuned) and not any(k.startswith('fc_norm') for k in tuned)
    checkpoint = {'model_state': {k.replace('head.', 'head.projection.'): v for k, v in tuned.items()}}
    classifier = seeded(2, vit_classifier, 10, pool_norm='norm')
    assert common.load_pretrained(classifier, maskfeat.official_state(checkpoint), 'slowfast') == ([], [])
    assert_loaded(classifier, tuned)

    mm = {mmpretrain_name(k): v for k, v in source.items()}
    assert {'backbone.patch_embed.projection.weight', 'backbone.layers.0.ln1.weight', 'backbone.layers.0.attn.qkv.bias',
            'backbone.layers.0.attn.proj.weight', 'backbone.layers.0.ffn.layers.0.0.weight',
            'backbone.layers.0.ffn.layers.1.bias', 'backbone.ln1.weight', 'neck.fc.weight', 'backbone.cls_token',
            'backbone.pos_embed', 'backbone.mask_token'} <= set(mm)
    # mmpretrain's HOGGenerator keeps its kernels as buffers: they may be reported unused, nothing else
    mm.update({f'target_generator.{k}': v for k, v in
               (('weight_x', hog['weight_x']), ('weight_y', hog['weight_y']), ('gaussian_kernel', hog['gkern']))})
    model = seeded(3, maskfeat.MaskFeat, 16, **TINY_VIT, hog_cell_size=2)
    missing, unused = resume_eval_only(model, {'state_dict': mm, 'meta': {'epoch': 300}}, tmp_path, monkeypatch,
                                       maskfeat.official_state)
    assert missing == [] and all(k.startswith('target_generator.') for k in unused)
    assert_loaded(model, source)


SPARK_ENCODER = lambda key: key.startswith('sparse_encoder.')  # the keys spark.main requires to load


def test_spark_timm_style_and_spark_style_checkpoints_load(tmp_path, monkeypatch):
    """SparK's bare timm-style encoder fills the sparse encoder only; the spark-style file loads whole."""
    encoder = seeded(1, spark.build_backbone, 'resnet_mini_ds8').state_dict()
    model = spark.SparK(seeded(2, spark.build_backbone, 'resnet_mini_ds8'), 32, 0.6, 16)
    missing, unused = resume_eval_only(model, encoder, tmp_path, monkeypatch, spark.official_state,
                                       encoder=SPARK_ENCODER)
    assert unused == []
    assert set(missing) == {k for k in model.state_dict() if not k.startswith('sparse_encoder.sp_cnn.')
                            and not k.endswith('num_batches_tracked')}  # PyTorch's BatchNorm fills those in itself
    assert_loaded(model.sparse_encoder.sp_cnn, encoder)

    whole = spark.SparK(seeded(3, spark.build_backbone, 'resnet_mini_ds8'), 32, 0.6, 16).state_dict()
    deprecated = {'imn_m': torch.rand(1, 3, 1, 1), 'imn_s': torch.rand(1, 3, 1, 1),
                  'norm_black': torch.zeros(1, 3, 32, 32)}
    checkpoint = {'module': {**whole, **deprecated}, 'epoch': 1599, 'arg': {'model': 'resnet_mini_ds8'}}
    model = spark.SparK(seeded(4, spark.build_backbone, 'resnet_mini_ds8'), 32, 0.6, 16)
    assert resume_eval_only(model, checkpoint, tmp_path, monkeypatch, spark.official_state,
                            encoder=SPARK_ENCODER) == ([], ['imn_m', 'imn_s', 'norm_black'])
    assert_loaded(model, whole)

    classifier = seeded(5, spark.build_backbone, 'resnet_mini_ds8', num_classes=10)  # fine-tuning: only `fc` new
    assert common.load_pretrained(classifier, encoder, 'timm style') == (['fc.bias', 'fc.weight'], [])


def test_mfm_official_checkpoint_and_its_timm_layout_load(tmp_path, monkeypatch):
    """MFM's {'model': encoder.*, decoder.*} (BEiT q/v biases) loads whole; its timm layout fills the classifier."""
    official = seeded(1, lambda: mfm.MFM(mfm.ViTEncoder(16, **TINY_VIT))).state_dict()
    with torch.no_grad():
        for key in [k for k in official if k.endswith(('q_bias', 'v_bias'))]:
            official[key] = torch.randn_like(official[key])
    model = seeded(2, lambda: mfm.MFM(mfm.ViTEncoder(16, **TINY_VIT)))
    assert resume_eval_only(model, {'model': official, 'epoch': 299}, tmp_path, monkeypatch,
                            encoder=lambda key: key.startswith('encoder.')) == ([], [])  # as mfm.main
    assert_loaded(model, official)

    classifier = seeded(2, vit_classifier, 10)
    missing, unused = common.load_pretrained(classifier, mfm.timm_layout(official), 'timm layout')
    assert missing == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert unused == ['norm.bias', 'norm.weight']
    q, v = official['encoder.blocks.3.attn.q_bias'], official['encoder.blocks.3.attn.v_bias']
    assert torch.equal(classifier.blocks[3].attn.qkv.bias, torch.cat([q, torch.zeros_like(q), v]))
    assert torch.equal(classifier.blocks[3].mlp.fc2.weight, official['encoder.blocks.3.mlp.fc2.weight'])


# ---- position tables -------------------------------------------------------------------------------------------------
def test_pos_embed_of_a_smaller_grid_is_resized(capsys):
    """A 4x4-grid table loaded at 8x8: resized, cls slot kept, constants constant, rows and columns not swapped."""
    state = seeded(1, vit_classifier, 10).state_dict()
    table = torch.full((1, 17, 192), 0.5)
    table[0, 0] = torch.randn(192)  # the cls slot
    cols, rows = torch.arange(16) % 4, torch.arange(16) // 4
    table[0, 1:, 0], table[0, 1:, 1] = cols.float(), rows.float()  # dim 0 encodes the column, dim 1 the row
    model = seeded(2, vit_classifier, 10, img_size=32)
    missing, unused = common.load_pretrained(model, {**state, 'pos_embed': table}, '16 px')
    assert 'pos_embed' not in missing + unused and model.pos_embed.shape == (1, 65, 192)
    assert "pos_embed resized from the file's 16 patches to 64" in capsys.readouterr().out  # was not said
    assert torch.equal(model.pos_embed[0, 0], table[0, 0])
    grid = model.pos_embed.detach()[0, 1:].reshape(8, 8, 192)  # (row, column, D)
    assert torch.allclose(grid[..., 2:], torch.tensor(0.5), atol=1e-6)
    assert torch.allclose(grid[..., 0], grid[:1, :, 0].expand(8, -1), atol=1e-6)  # columns: the same on every row
    assert torch.allclose(grid[..., 1], grid[:, :1, 1].expand(-1, 8), atol=1e-6)  # rows: the same on every column
    assert (grid[0, 1:, 0] - grid[0, :-1, 0]).min() >= -1e-6 and grid[0, -1, 0] - grid[0, 0, 0] > 2.5


def bicubic_weights(old, new, a=-0.75):
    """(new, old) weights of a 1-D bicubic resize as F.interpolate(mode='bicubic', align_corners=False) makes it:
    source x = (i + 0.5) * old / new - 0.5, Keys' cubic kernel with a = -0.75 on the 4 nearest taps, taps past the
    border clamped to it."""
    def kernel(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else a * (((d - 5) * d + 8) * d - 4)
    weights = np.zeros((new, old))
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        for tap in range(math.floor(x) - 1, math.floor(x) + 3):
            weights[i, min(max(tap, 0), old - 1)] += kernel(abs(x - tap))
    return weights


@pytest.mark.parametrize('old, new', [(3, 5), (4, 2)])
def test_pos_embed_is_resized_bicubically_on_the_patch_grid(old, new):
    """util/pos_embed.py's interpolate_pos_embed: the cls slot kept as it is, the patch tokens as an (old, old) grid
    of D channels resized bicubically (align_corners=False) to (new, new), row-major, up or down."""
    table = torch.randn(1, 1 + old * old, 4, generator=torch.Generator().manual_seed(0))
    resized = common.resize_pos_embed(table, new * new)
    assert resized.shape == (1, 1 + new * new, 4) and torch.equal(resized[0, 0], table[0, 0])
    weights, grid = bicubic_weights(old, new), table[0, 1:].double().numpy().reshape(old, old, 4)  # (row, col, D)
    expected = np.einsum('ir,rcd,jc->ijd', weights, grid, weights).reshape(new * new, 4)  # rows, then columns
    assert np.allclose(resized[0, 1:].numpy(), expected, atol=1e-5)


# ---- export ----------------------------------------------------------------------------------------------------------
def test_exported_encoder_round_trips_into_the_classifier_with_timm_keys():
    """vit_encoder_state of a (DDP-named) MAE fills the classifier's encoder exactly; its keys are timm's minus head."""
    model = seeded(1, tiny_mae)
    encoder = common.vit_encoder_state({f'module._orig_mod.{k}': v for k, v in model.state_dict().items()})
    assert set(encoder) == timm_encoder_keys(12)
    classifier = seeded(2, vit_classifier, 10)
    common.load_pretrained(classifier, encoder, 'export')
    own, original = classifier.state_dict(), model.state_dict()
    tested = [k for k in own if not k.startswith(('head.', 'fc_norm.'))]
    assert len(tested) == len(timm_encoder_keys(12)) - 2  # all but `norm`, which fine-tuning drops
    assert all(torch.equal(own[k], original[k]) for k in tested)

    base = common.vit_encoder_state(mae.MAE(224, **common.vit_config('vit_base_patch16'), decoder_embed_dim=32,
                                            decoder_depth=1).state_dict())
    assert set(base) == timm_encoder_keys(12)
    shapes = {'pos_embed': (1, 197, 768), 'patch_embed.proj.weight': (768, 3, 16, 16), 'blocks.11.mlp.fc1.weight':
              (3072, 768), 'norm.weight': (768,)}
    assert all(tuple(base[k].shape) == v for k, v in shapes.items())


def test_classifier_is_built_as_models_vit():
    """models_vit.py + main_finetune.py: every LayerNorm eps 1e-6 (timm's partial(nn.LayerNorm, eps=1e-6); PyTorch's
    default is 1e-5), the head trunc-normal with std 2e-5 and a zero bias, drop path rising linearly to its rate."""
    torch.manual_seed(0)
    classifier = vit_classifier(10, drop_path=0.2)
    norms = [m for m in classifier.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)  # two per block and fc_norm
    assert 1e-5 < classifier.head.weight.std().item() < 3e-5 and not classifier.head.bias.any()
    assert [b.drop_path for b in classifier.blocks] == pytest.approx([0.2 * i / 11 for i in range(12)])


# ---- layer decay -----------------------------------------------------------------------------------------------------
def lr_scales(model, groups):
    """-> {parameter name: (lr_scale, weight_decay)}, asserting every trainable parameter is in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = [(names[id(p)], (g['lr_scale'], g['weight_decay'])) for g in groups for p in g['params']]
    assert sorted(n for n, _ in found) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return dict(found)


def test_vit_base_layer_decay_follows_mae():
    """ViT-B/16 at 0.65: embeddings 0.65^13, blocks.i 0.65^(12-i), head and fc_norm 1; no decay on pos/cls/1-D."""
    model = vit_classifier(1000, 'vit_base_patch16', 224)
    groups = common.param_groups(model, 0.05, ('pos_embed', 'cls_token'), partial(common.vit_layer_id, depth=12),
                                 0.65)
    scales = lr_scales(model, groups)
    expected = {'patch_embed.proj.weight': 0.65 ** 13, 'cls_token': 0.65 ** 13, 'pos_embed': 0.65 ** 13,
                'blocks.0.attn.qkv.weight': 0.65 ** 12, 'blocks.0.norm1.weight': 0.65 ** 12,
                'blocks.5.mlp.fc1.bias': 0.65 ** 7, 'blocks.11.mlp.fc2.weight': 0.65, 'head.weight': 1.0,
                'head.bias': 1.0, 'fc_norm.weight': 1.0}
    for name, scale in expected.items():
        assert scales[name][0] == pytest.approx(scale), name
    for name, (_, decay) in scales.items():
        param = model.get_parameter(name)
        no_decay = param.ndim <= 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')
        assert decay == (0.0 if no_decay else 0.05), name
    assert scales['blocks.3.attn.proj.weight'][1] == 0.05 and scales['pos_embed'][1] == 0.0


def test_spark_resnet50_layer_decay_follows_the_official_grouping():
    """ResNet-50 at 0.7 (downstream_imagenet): stem 0.7^7, layer1 ^6, layer2 in pairs ^5 ^4, layer3 in threes ^3
    ^2, layer4 ^1, fc 1; no decay on BN and biases."""
    model = spark.build_backbone('resnet50', num_classes=1000)
    groups = common.param_groups(model, 0.05, (), partial(spark.layer_id, network=model), 0.7)
    scales = lr_scales(model, groups)
    exponent = lambda name: (7 if not name.startswith(('layer', 'fc')) else 6 if name.startswith('layer1') else
                             5 - int(name.split('.')[1]) // 2 if name.startswith('layer2') else
                             3 - int(name.split('.')[1]) // 3 if name.startswith('layer3') else
                             1 if name.startswith('layer4') else 0)
    assert {exponent(n) for n in scales} == set(range(8))
    for name, (scale, decay) in scales.items():
        assert scale == pytest.approx(0.7 ** exponent(name)), name
        assert decay == (0.0 if model.get_parameter(name).ndim <= 1 else 0.05), name
    assert scales['layer2.1.conv2.weight'][0] == pytest.approx(0.7 ** 5)
    assert scales['layer2.2.conv1.weight'][0] == pytest.approx(0.7 ** 4)
    assert scales['layer3.2.bn3.weight'][0] == pytest.approx(0.7 ** 3)
    assert scales['layer3.3.conv1.weight'][0] == pytest.approx(0.7 ** 2)


def test_spark_convnext_small_layer_decay_follows_the_official_grouping():
    """ConvNeXt-S at 0.7 (models/__init__.py; 27 stage-3 blocks: N = 12): stem 0.7^13, stage 0 ^12, stage 1 ^11,
    stage 2 in threes ^10 .. ^2 (its downsampling ^10), stage 3 ^1, norm and head 1."""
    model = spark.build_backbone('convnext_small', num_classes=1000)
    groups = common.param_groups(model, 0.01, (), partial(spark.layer_id, network=model), 0.7)
    scales = lr_scales(model, groups)

    def exponent(name):  # 13 - the official layer id
        kind, stage, block = (name.split('.') + ['', ''])[:3]
        if kind == 'downsample_layers':
            return {'0': 13, '1': 11, '2': 10, '3': 1}[stage]
        return {'0': 12, '1': 11, '2': 10 - int(block) // 3, '3': 1}[stage] if kind == 'stages' else 0
    assert {exponent(n) for n in scales} == set(range(14))
    for name, (scale, _) in scales.items():
        assert scale == pytest.approx(0.7 ** exponent(name)), name
    assert scales['stages.2.2.dwconv.weight'][0] == pytest.approx(0.7 ** 10)
    assert scales['stages.2.3.dwconv.weight'][0] == pytest.approx(0.7 ** 9)
    assert scales['stages.2.26.gamma'][0] == pytest.approx(0.7 ** 2) and scales['head.bias'][0] == 1.0


# ---- mixup / cutmix --------------------------------------------------------------------------------------------------
def batch(seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, size, size, generator=generator), torch.tensor([0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize('mixup, cutmix', [(0.0, 0.0), (0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_soft_targets_sum_to_one(mixup, cutmix):
    """Targets are (B, K) probabilities; with neither mixup nor cutmix, the images are untouched and the target is
    the smoothed one-hot."""
    images, labels = batch()
    rng = np.random.default_rng(0)
    for _ in range(5):
        mixed, target = common.mix(images.clone(), labels, 10, mixup, cutmix, 0.1, rng)
        assert mixed.shape == images.shape and target.shape == (6, 10)
        assert torch.allclose(target.sum(1), torch.ones(6), atol=1e-5) and (target >= 0).all()
        if mixup == cutmix == 0:
            assert torch.equal(mixed, images)
            expected = torch.full((6, 10), 0.01)
            expected[torch.arange(6), labels] = 1 - 0.1 + 0.01
            assert torch.allclose(target, expected, atol=1e-7)


def test_cutmix_pastes_one_rectangle_of_the_flipped_batch():
    """Cutmix only: each image is itself outside one box shared by the batch and the flipped batch inside it; the
    flipped label weighs the box's share of the area."""
    images, labels = batch()
    flipped, rng, boxes = images.flip(0), np.random.default_rng(0), 0
    for _ in range(10):
        mixed, target = common.mix(images.clone(), labels, 10, 0.0, 1.0, 0.0, rng)
        inside = (mixed != images).any(1)  # (B, H, W): random floats differ everywhere the box covers
        box = torch.zeros(16, 16, dtype=torch.bool)
        if inside.any():
            rows, cols = inside.any(0).any(1).nonzero()[:, 0], inside.any(0).any(0).nonzero()[:, 0]
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(mixed, torch.where(box, flipped, images))  # a filled rectangle, the same for all
        lam = 1 - box.float().mean()
        expected = lam * torch.eye(10)[labels] + (1 - lam) * torch.eye(10)[labels.flip(0)]
        assert torch.allclose(target, expected, atol=1e-5)
        boxes += 0 < box.sum() < 16 * 16
    assert boxes >= 5  # Beta(1, 1): most draws cut a proper box


def test_mixup_blends_with_the_flipped_batch():
    """Mixup only: lam * images + (1 - lam) * flipped images, and the same lam mixes the labels."""
    images, labels = batch()
    rng, blended = np.random.default_rng(0), 0
    for _ in range(5):
        mixed, target = common.mix(images.clone(), labels, 10, 1.0, 0.0, 0.0, rng)
        lam = target[0, labels[0]]
        assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-5)
        assert torch.allclose(target, lam * torch.eye(10)[labels] + (1 - lam) * torch.eye(10)[labels.flip(0)],
                              atol=1e-6)
        blended += lam < 0.999
    assert blended >= 3


def test_mixup_and_cutmix_together_switch_between_them_half_the_time():
    """timm's Mixup with both on (MAE: mixup 0.8, cutmix 1.0, switch_prob 0.5): each batch is either cut (every pixel
    its own image's or its partner's) or blended (no pixel either), cutmix about half of the 40 batches."""
    images, labels = batch()
    flipped, rng, cuts = images.flip(0), np.random.default_rng(0), 0
    for _ in range(40):
        mixed, _ = common.mix(images.clone(), labels, 10, 0.8, 1.0, 0.1, rng)
        cut = bool(((mixed == images) | (mixed == flipped)).all())
        assert cut or not ((mixed == images) | (mixed == flipped)).any()  # blended: every pixel a mixture
        cuts += cut
    assert 10 <= cuts <= 30, cuts


def timm_mix(images, labels, num_classes, mixup, cutmix, smoothing, rng):
    """timm's Mixup in mode 'batch' (mix prob 1, switch prob 0.5, correct_lam; MAE's timm 0.3.2 and SparK's
    BatchMixup), written out with its draws taken from `rng` in its order, but its first (rand() < mix_prob 1, always
    true), which common.mix does not draw -> images, target, (lam drawn, box)."""
    off = smoothing / num_classes  # mixup_target: one_hot(on 1 - smoothing + off, off smoothing / K), mixed alike
    smoothed = torch.full((len(labels), num_classes), off)
    smoothed[torch.arange(len(labels)), labels] = 1 - smoothing + off
    if mixup <= 0 and cutmix <= 0:
        return images, smoothed, (1.0, None)
    use_cutmix = bool(rng.random() < 0.5) if mixup > 0 and cutmix > 0 else cutmix > 0  # switch_prob 0.5
    lam = drawn = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    box, mixed = None, images * lam + images.flip(0) * (1 - lam)  # mixup's blend, unless cut
    if use_cutmix:  # rand_bbox: sides int(side * sqrt(1 - lam)), centre randint(H) then randint(W), clipped
        H, W = images.shape[-2:]
        cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        box = (np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H), np.clip(cx - cut_w // 2, 0, W),
               np.clip(cx + cut_w // 2, 0, W))
        (y0, y1, x0, x1), mixed = box, images.clone()
        mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # correct_lam: the area the box leaves
    return mixed, smoothed * lam + smoothed.flip(0) * (1 - lam), (drawn, box)


@pytest.mark.parametrize('mixup, cutmix', [(0.0, 0.0), (0.5, 0.0), (0.0, 1.0), (0.0, 0.4), (0.3, 3.0)])
def test_mix_equals_timms_mixup_given_the_same_draws(mixup, cutmix):
    """mix is timm's Mixup draw for draw (16 x 10 images, smoothing 0.3, 7 classes): the switch at 0.5 with each
    mode's own alpha, rand_bbox's box (timm 0.3.2: odd sides lose a pixel), lam corrected to the area it leaves."""
    images, labels = torch.randn(6, 3, 16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    rng, modes, corrected = np.random.default_rng(0), set(), 0
    for _ in range(30):
        replay = copy.deepcopy(rng)
        mixed, target = common.mix(images.clone(), labels, 7, mixup, cutmix, 0.3, rng)
        expected, expected_target, (drawn, box) = timm_mix(images, labels, 7, mixup, cutmix, 0.3, replay)
        assert torch.allclose(mixed, expected, atol=1e-6) and torch.allclose(target, expected_target, atol=1e-6)
        assert rng.random() == replay.random()  # the stream stays in step
        modes.add('none' if mixup == cutmix == 0 else 'blend' if box is None else 'cut')
        lam = (target[0, 0].item() - 0.3 / 7) / 0.7  # label 0's weight: lam (1 - 0.3) + 0.3 / 7
        corrected += box is not None and abs(lam - drawn) > 0.02
    assert modes == ({'none'} if mixup == cutmix == 0 else {'blend', 'cut'} if mixup and cutmix else
                     {'cut' if cutmix else 'blend'})
    assert corrected >= 3 if cutmix else corrected == 0  # clipped boxes: lam is not the drawn one


# ---- the fine-tuning transform ---------------------------------------------------------------------------------
def test_finetune_transform_is_deterministic_and_erases_one_box():
    """uint8 (3, size, size), a function of the generator; reprob=1 changes pixels inside one box only."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    keep, erase = common.FinetuneTransform(16, 0.0), common.FinetuneTransform(16, 1.0)
    a = keep(img, np.random.default_rng([0, 0, 7]))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, keep(img, np.random.default_rng([0, 0, 7])))
    assert not all(torch.equal(a, keep(img, np.random.default_rng([0, 0, i]))) for i in range(5))
    for seed in range(5):
        plain, erased = keep(img, np.random.default_rng([0, 1, seed])), erase(img, np.random.default_rng([0, 1, seed]))
        assert torch.equal(erased, erase(img, np.random.default_rng([0, 1, seed])))
        changed = (plain != erased).any(0)
        assert changed.sum() >= 3  # at least 2% of 256 pixels replaced by noise
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert box.float().mean() <= 1 / 3 + 0.07 and torch.equal(erased[:, ~box], plain[:, ~box])


# ---- fine-tuning runs ---------------------------------------------------------------------------------------
def test_ema_moves_a_one_minus_decay_share_towards_the_model():
    """timm's ModelEma (SparK's fine-tuning EMA): ema = decay * ema + (1 - decay) * model for every float tensor of
    the state, BN's running statistics too; the model itself is left as it is."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.fill_(0.0)
                m.fill_(1.0)
    for expected in (0.1, 0.19):  # 0.9 * 0 + 0.1 * 1, then 0.9 * 0.1 + 0.1 * 1
        common.update_ema(ema, model, 0.9)
        floats = [v for v in ema.state_dict().values() if v.is_floating_point()]  # weight, bias, BN's 4
        assert len(floats) == 6 and all(torch.allclose(v, torch.tensor(expected)) for v in floats)
    assert all(torch.equal(v, torch.ones_like(v)) for v in model.state_dict().values() if v.is_floating_point())


def test_finetune_anneals_the_lr_to_min_lr_1e_6(tmp_path):
    """main_finetune.py's schedule: (no warmup here) half-cosine from ft_blr * batch / 256 down to min_lr 1e-6, not
    pretraining's 0, set per iteration: the logged lr is the last of the epoch's 8 steps', at epoch 7/8 of 1."""
    args = mae.parse_args(TINY + ['--finetune_epochs', '1', '--ft_warmup_epochs', '0', '--ft_batch', '8', '--amp',
                                  'none', '--num_workers', '0', '--output_dir', str(tmp_path)])
    _, eval_sets = common.build_datasets(args, common.TrainTransform(16))  # 64 training images: 8 steps of 8
    torch.manual_seed(0)
    encoder = common.VisionTransformer(16, 4, 32, 1, 2, learned_pos=True).state_dict()  # a small ViT: fast
    build = lambda classes: common.ViTClassifier(classes, img_size=16, patch_size=4, embed_dim=32, depth=1,
                                                 num_heads=2)
    assert common.finetune(args, build, encoder, eval_sets) is not None
    (line,) = read_log(f'{tmp_path}/finetune')
    peak = args.ft_blr * 8 / 256
    assert line['lr'] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-9)


def colour_folder(root, seed=0):
    """A folder dataset of 16 px noise images whose class is a +40 tint of one channel (red, green, blue): 32
    training and 10 val images a class, learnable in a few fine-tuning epochs, unlike 16 px shapes."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', 32), ('val', 10)):
        for c, name in enumerate(['red', 'green', 'blue']):
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = rng.integers(0, 216, (16, 16, 3))
                pixels[..., c] += 40
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')


def test_tiny_finetune_learns(tmp_path):
    """Four epochs from a random encoder: the training loss falls and val top-1 ends far above chance (1/3). The
    epochs are logged in <output_dir>/finetune/log.txt (not in the pretraining log.txt), and finetune/finetuned.pth
    loads weights-only as the classifier, with the last epoch's top-1."""
    colour_folder(tmp_path / 'data')
    out = str(tmp_path / 'run')
    run_script('mae.py', ['--data', 'folder', '--data_path', str(tmp_path / 'data'), '--input_size', '16', '--model',
                          'vit_tiny_patch4', '--batch_size', '8', '--num_workers', '0', '--decoder_embed_dim', '32',
                          '--decoder_depth', '1', '--probe_epochs', '0', '--knn_k', '0', '--eval_only',
                          '--finetune_epochs', '4', '--ft_warmup_epochs', '0', '--ft_blr', '5e-3', '--mixup', '0',
                          '--cutmix', '0', '--reprob', '0', '--output_dir', out])
    log = read_log(f'{out}/finetune')
    assert [line['finetune_epoch'] for line in log] == [0, 1, 2, 3]
    assert not any('finetune_epoch' in line or 'finetune_top1' in line for line in read_log(out))
    first, last = log[0], log[-1]
    assert last['train_loss'] < first['train_loss'] - 0.02  # seen: falls 0.05-0.09 over seeds 0-9
    assert last['finetune_top1'] >= 80.0  # seen: 96.7-100 (epoch 0: 66.7-100)
    assert not os.path.exists(f'{out}/finetuned.pth') and not os.path.exists(f'{out}/finetune/checkpoint-last.pth')
    saved = torch.load(f'{out}/finetune/finetuned.pth', map_location='cpu', weights_only=True)
    assert saved['top1'] == last['finetune_top1'] and 'ema' not in saved
    state = saved['model']
    assert set(state) == set(vit_classifier(3).state_dict())
    assert state['head.weight'].shape == (3, 192)


def test_eval_only_has_its_own_output_dir_and_refuses_a_training_run(tmp_path):
    """--eval_only writes to output/<method>_<data>_eval by default, never into the training run's folder; given a
    folder holding checkpoint-last.pth it stops before any work, and --resume auto is refused."""
    assert mae.parse_args(['--eval_only']).output_dir == os.path.join('output', 'mae_shapes_eval')
    assert mae.parse_args([]).output_dir == os.path.join('output', 'mae_shapes')
    assert hpm.parse_args(['--eval_only', '--data', 'cifar10']).output_dir == os.path.join('output', 'hpm_cifar10_eval')
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'epoch': 3}, run / 'checkpoint-last.pth')
    with pytest.raises(SystemExit) as stop:
        common.setup(mae.parse_args(['--eval_only', '--output_dir', str(run)]))
    message = str(stop.value.code)
    assert message.startswith('error: ') and 'checkpoint-last.pth' in message and '--output_dir' in message
    assert sorted(os.listdir(run)) == ['checkpoint-last.pth']  # nothing written there (no args.json, no log)
    with pytest.raises(SystemExit) as stop:
        mae.parse_args(['--eval_only', '--resume', 'auto', '--output_dir', str(run)])
    message = str(stop.value.code)
    assert 'error' in message and '--eval_only' in message and '--resume FILE' in message and '\n' not in message


def test_eval_only_finetune_and_export_end_to_end(tmp_path):
    """mae.py --eval_only --resume <encoder-only file> reports the missing decoder, fine-tunes, and exports the
    encoder as loaded, in timm names."""
    encoder = {k: v for k, v in seeded(1, tiny_mae).state_dict().items()
               if not k.startswith(('decoder_', 'mask_token'))}
    torch.save({'model': encoder}, tmp_path / 'mae_pretrain_vit_tiny.pth')
    out = str(tmp_path / 'run')
    result = run_script('mae.py', TINY + ['--decoder_embed_dim', '32', '--decoder_depth', '1', '--eval_only',
                                          '--resume', str(tmp_path / 'mae_pretrain_vit_tiny.pth'), '--finetune_epochs',
                                          '1', '--export_encoder', '--accum_iter', '2', '--output_dir', out])
    report = re.search(r'loaded \S*mae_pretrain_vit_tiny\.pth: missing (.*); unused (.*)', result.stdout)
    assert report and 'decoder_blocks' in report[1] and 'mask_token' in report[1] and report[2] == 'none'
    assert re.search(r'fine-tuning epoch 0: loss [\d.]+, val top-1 [\d.]+%', result.stdout)
    assert [line['finetune_epoch'] for line in read_log(f'{out}/finetune')] == [0]
    assert 'finetune_top1' in read_log(f'{out}/finetune')[-1]
    assert not any('finetune_top1' in line for line in read_log(out))  # the pretraining log: evaluation only
    with open(f'{out}/finetune/args.json') as f:  # no --ft_batch: pretraining's effective batch, 8 x 2 (was 8,
        ft = json.load(f)                           # recorded as 16)
    assert (ft['accum_iter'], ft['eff_batch_size'], ft['lr']) == (2, 16, pytest.approx(ft['ft_blr'] * 16 / 256))
    exported = torch.load(f'{out}/encoder_timm.pth', map_location='cpu', weights_only=True)
    assert set(exported) == timm_encoder_keys(12)
    assert all(torch.equal(exported[k], v) for k, v in encoder.items())
    again = run_script('mae.py', TINY + ['--decoder_embed_dim', '32', '--decoder_depth', '1', '--eval_only', '--resume',
                                         f'{out}/encoder_timm.pth', '--probe_epochs', '0', '--output_dir', f'{out}2'])
    report = re.search(r'loaded \S*encoder_timm\.pth: missing (.*); unused (.*)', again.stdout)  # a bare state
    assert report and 'decoder_blocks' in report[1] and report[2] == 'none'  # dict: was a KeyError traceback
    assert 'keep their random init, in this run\'s pictures too' in again.stdout  # its reconstruction.png
    assert 'trained_knn_top1' in read_log(f'{out}2')[-1]


def test_finetune_killed_after_an_epoch_continues_to_the_same_weights(tmp_path):
    """SIGKILL after the first fine-tuning epoch's checkpoint, then the same command again: it continues from that
    epoch and ends with the uninterrupted run's weights (mixup, cutmix, erasing and drop path on: every random stream
    is restored) and log, and removes finetune/checkpoint-last.pth. The same start with another setting starts
    afresh, the interrupted one moved aside to finetune-1; a finished fine-tune run again with the same start and
    settings is reported, not redone."""
    colour_folder(tmp_path / 'data')
    flags = ['--data', 'folder', '--data_path', str(tmp_path / 'data'), '--input_size', '16', '--model',
             'vit_tiny_patch4', '--batch_size', '8', '--num_workers', '0', '--decoder_embed_dim', '32',
             '--decoder_depth', '1', '--probe_epochs', '0', '--knn_k', '0', '--eval_only', '--finetune_epochs', '2']
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside the killed one: one core each
        done = pool.submit(run_script, 'mae.py', flags + ['--output_dir', straight])
        process = subprocess.Popen([sys.executable, 'mae.py', *flags, '--output_dir', killed], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, 'OMP_NUM_THREADS': '1'})
        deadline = time.time() + 120
        while not os.path.exists(f'{killed}/finetune/checkpoint-last.pth') and process.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        last = f'{killed}/finetune/checkpoint-last.pth'
        assert not os.path.exists(f'{killed}/finetune/finetuned.pth')  # killed during the second epoch
        assert torch.load(last, weights_only=True)['epoch'] == 0
        shutil.copytree(f'{killed}/finetune', f'{tmp_path}/kept')
        done.result()
    assert [line['finetune_epoch'] for line in read_log(f'{straight}/finetune')] == [0, 1]
    other = run_script('mae.py', flags + ['--ft_blr', '2e-3', '--output_dir', killed])  # another setting: afresh
    assert 'resumed from' not in other.stdout and not os.path.exists(last)
    assert f'held a fine-tune of other ft_blr: moved to {killed}/finetune-1' in other.stdout  # kept, and why
    assert 'note: --eval_only without --resume: the "trained" weights are the random init' in other.stdout
    assert torch.load(f'{killed}/finetune-1/checkpoint-last.pth', weights_only=True)['epoch'] == 0
    assert [line['finetune_epoch'] for line in read_log(f'{killed}/finetune')] == [0, 1]
    # the interrupted fine-tune back, beside the other setting's finished finetuned.pth: it is continued
    shutil.copytree(f'{tmp_path}/kept', f'{killed}/finetune', dirs_exist_ok=True)
    result = run_script('mae.py', flags + ['--output_dir', killed])
    assert 'resumed from' in result.stdout and 'fine-tuned already' not in result.stdout and not os.path.exists(last)
    assert without_timing(read_log(f'{killed}/finetune')) == without_timing(read_log(f'{straight}/finetune'))
    a, b = load_weights(f'{straight}/finetune/finetuned.pth'), load_weights(f'{killed}/finetune/finetuned.pth')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # finished with the same start and settings: reported again, not redone
    written = os.stat(f'{killed}/finetune/finetuned.pth').st_mtime_ns
    again = run_script('mae.py', flags + ['--output_dir', killed])
    top1 = torch.load(f'{straight}/finetune/finetuned.pth', weights_only=True)['top1']
    assert 'fine-tuned already' in again.stdout and f'{top1:.2f}%' in again.stdout
    assert 'fine-tuning epoch' not in again.stdout and 'resumed from' not in again.stdout
    assert os.stat(f'{killed}/finetune/finetuned.pth').st_mtime_ns == written
    split = run_script('mae.py', flags + ['--batch_size', '4', '--accum_iter', '2', '--output_dir', killed])
    assert 'fine-tuned already (' in split.stdout and 'its batch split as 8 x 1 x 1 process(es))' in split.stdout  # was
    assert os.stat(f'{killed}/finetune/finetuned.pth').st_mtime_ns == written  # redone, the finished one moved aside
    smaller = run_script('mae.py', flags + ['--batch_size', '4', '--output_dir', killed])  # batch 4: another fine-tune
    assert 'held a fine-tune of other fine-tuning batch: moved to' in smaller.stdout
    assert [line['finetune_epoch'] for line in read_log(f'{killed}/finetune')] == [0, 1]


def test_finetune_killed_before_its_result_is_written_reports_its_last_epoch(tmp_path, monkeypatch, capsys):
    """A kill after the last epoch's checkpoint but before finetune/finetuned.pth: the same command again trains
    nothing more, evaluates the network of that checkpoint and writes its top-1 (a number, not None)."""
    colour_folder(tmp_path / 'data')
    out = str(tmp_path / 'run')
    argv = ['--data', 'folder', '--data_path', str(tmp_path / 'data'), '--input_size', '16', '--model',
            'vit_tiny_patch4', '--batch_size', '8', '--num_workers', '0', '--decoder_embed_dim', '32',
            '--decoder_depth', '1', '--probe_epochs', '0', '--knn_k', '0', '--eval_only', '--finetune_epochs', '1',
            '--output_dir', out]
    save = common.atomic_save

    def killed_at_the_result(state, path):
        if path.endswith('finetuned.pth'):
            raise SystemExit('killed')
        save(state, path)
    monkeypatch.setattr(common, 'atomic_save', killed_at_the_result)
    with pytest.raises(SystemExit, match='killed'):
        mae.main(argv)
    assert os.path.exists(f'{out}/finetune/checkpoint-last.pth')
    monkeypatch.setattr(common, 'atomic_save', save)
    capsys.readouterr()
    mae.main(argv)
    assert 'fine-tuning epoch' not in capsys.readouterr().out  # nothing trained again
    saved = torch.load(f'{out}/finetune/finetuned.pth', map_location='cpu', weights_only=True)
    assert saved['top1'] == read_log(f'{out}/finetune')[-1]['finetune_top1']
    assert not os.path.exists(f'{out}/finetune/checkpoint-last.pth')


# ---- what fine-tuning hands on: mix's settings, the loss, SparK's optimizer and layer groups ------------------------
def first_step(args, monkeypatch, build=None, **finetune_kwargs):
    """common.finetune (the given args, a 1-block 32-wide ViT unless `build`) up to its first loss -> {'mix': the
    arguments it gave mix, 'rng_state': its generator's then, 'images' / 'target': what mix returned, 'loss',
    'logits': the network's on those images}."""
    seen, real_mix = {}, common.mix

    def mix(*arguments):
        seen['mix'], seen['rng_state'] = arguments, copy.deepcopy(arguments[-1].bit_generator.state)
        seen['images'], seen['target'] = real_mix(*arguments)
        return seen['images'], seen['target']

    def train_one_epoch(model, loss_fn, loader, optimizer, epoch, device, **settings):
        images, labels = next(iter(loader))[:2]
        seen['loss'] = loss_fn(model, images.to(device), labels.to(device), None)[0]
        seen['logits'] = model(seen['images']).float()  # (no drop path: the same network output again)
        raise Stop  # the fine-tune's first loss is computed: nothing more need run
    monkeypatch.setattr(common, 'mix', mix)
    monkeypatch.setattr(common, 'train_one_epoch', train_one_epoch)
    _, eval_sets = common.build_datasets(args, common.TrainTransform(args.input_size))
    build = build or (lambda classes: common.ViTClassifier(classes, img_size=args.input_size, patch_size=4,
                                                           embed_dim=32, depth=1, num_heads=2))
    state = seeded(0, build, len(eval_sets[0].classes)).state_dict()  # the "pretrained" weights: a random init
    with pytest.raises(Stop):
        common.finetune(args, build, state, eval_sets, **finetune_kwargs)
    return seen


FT_FLAGS = ['--shapes_size', '32', '--batch_size', '8', '--finetune_epochs', '1', '--ft_drop_path', '0', '--amp',
            'none', '--num_workers', '0']


@pytest.mark.parametrize('parse, flags, expected', [
    (mae.parse_args, ['--mixup', '0.3', '--cutmix', '0.6', '--smoothing', '0.2'], (0.3, 0.6, 0.2)),  # typed
    (mae.parse_args, [], (0.8, 1.0, 0.1)),  # FINETUNE.md's command values, main_finetune.py's smoothing
    (spark.parse_args, ['--model', 'resnet_mini_ds8'], (0.1, 1.0, 0.1)),  # resnet50's row: mixup 0.1
    (spark.parse_args, ['--model', 'resnet_mini_ds8', '--mixup', '0'], (0.0, 0.0, 0.1))],  # util.py: cutmix off too
    ids=['mae-typed', 'mae-defaults', 'spark-recipe', 'spark-mixup-0'])
def test_finetune_hands_the_runs_mixup_cutmix_and_smoothing_to_mix(tmp_path, monkeypatch, parse, flags, expected):
    """common.finetune mixes each batch with the run's --mixup, --cutmix and --smoothing (typed, or the recipe's),
    over the data's classes and with the epoch's numpy generator (unused before that first batch)."""
    args = parse(['--data', 'shapes', '--input_size', '16'] * (parse is mae.parse_args) + FT_FLAGS + flags +
                 ['--output_dir', str(tmp_path)])
    seen = first_step(args, monkeypatch)
    images, labels, classes, mixup, cutmix, smoothing, rng = seen['mix']
    assert (mixup, cutmix, smoothing) == expected and classes == len(common.SHAPES)
    assert images.shape == (8, 3, args.input_size, args.input_size) and labels.shape == (8,)
    assert seen['rng_state'] == np.random.default_rng([0, 0, 0]).bit_generator.state  # [seed, rank, epoch]


def test_finetune_mixes_each_epoch_with_that_epochs_generator(tmp_path, monkeypatch):
    """Two fine-tuning epochs: each one's mixup / cutmix draws start from default_rng([seed, rank, epoch]), made
    afresh that epoch (so a resumed fine-tune draws what an uninterrupted one would)."""
    args = mae.parse_args(['--data', 'shapes', '--input_size', '16', *FT_FLAGS, '--finetune_epochs', '2', '--seed',
                           '3', '--output_dir', str(tmp_path)])
    states, real_mix = [], common.mix

    def mix(*arguments):
        states.append(copy.deepcopy(arguments[-1].bit_generator.state))
        return real_mix(*arguments)

    def train_one_epoch(model, loss_fn, loader, optimizer, epoch, device, **settings):  # one step of the epoch
        images, labels = next(iter(loader))[:2]
        return {'train_loss': loss_fn(model, images.to(device), labels.to(device), None)[0].item()}
    monkeypatch.setattr(common, 'mix', mix)
    monkeypatch.setattr(common, 'train_one_epoch', train_one_epoch)
    _, eval_sets = common.build_datasets(args, common.TrainTransform(args.input_size))
    build = lambda classes: common.ViTClassifier(classes, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    common.finetune(args, build, seeded(0, build, len(eval_sets[0].classes)).state_dict(), eval_sets)
    assert states == [np.random.default_rng([3, 0, epoch]).bit_generator.state for epoch in (0, 1)]


@pytest.mark.parametrize('bce', [True, False])
def test_finetune_loss_is_binary_or_soft_target_cross_entropy_of_the_mixed_target(tmp_path, monkeypatch, bce):
    """bce (SparK's ResNets): timm's BinaryCrossEntropy, the mean over samples and classes against mix's target;
    else (MAE, ConvNeXts) SoftTargetCrossEntropy, sum_k -t_k log p_k averaged over samples."""
    args = spark.parse_args(FT_FLAGS + ['--output_dir', str(tmp_path)])  # resnet_mini_ds8 at 32 px, mixing on
    seen = first_step(args, monkeypatch, partial(spark.build_backbone, args.model, 0.0), bce=bce)
    z, t = seen['logits'].double(), seen['target'].double()
    binary = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).mean()
    soft = (-t * F.log_softmax(z, dim=-1)).sum(-1).mean()
    assert t.shape == (8, len(common.SHAPES)) and abs(binary - soft) > 0.1  # the two losses differ here
    assert seen['loss'].item() == pytest.approx((binary if bce else soft).item(), rel=1e-5)


FINETUNE_PARAMETERS = inspect.signature(common.finetune)  # the original's, whatever a test patches


def spark_finetune_call(model, tmp_path, monkeypatch):
    """spark.main --eval_only (random weights, no kNN, no probe) up to its common.finetune call -> that call's
    arguments by name."""
    calls = []
    monkeypatch.setattr(common, 'finetune', lambda *a, **k: calls.append(FINETUNE_PARAMETERS.bind(*a, **k)))
    spark.main(['--model', model, '--input_size', '32' if 'resnet' in model else '16', '--decoder_width', '32',
                '--knn_k', '0', '--probe_epochs', '0', '--eval_only', *FT_FLAGS, '--output_dir', str(tmp_path)])
    (call,) = calls
    call.apply_defaults()
    return call.arguments


@pytest.mark.parametrize('model', ['resnet_mini_ds8', 'convnext_atto_ds8'])
def test_spark_finetunes_resnets_with_lamb_and_bce_convnexts_with_adamw_and_soft_ce(tmp_path, monkeypatch, model):
    """util.py's choice by model (arg.py's opt 'lamb' / 'adam'): ResNets LAMB and binary cross-entropy, ConvNeXts
    common.finetune's AdamW (optimizer None) and soft-target CE; both over the official layer groups."""
    call, resnet = spark_finetune_call(model, tmp_path, monkeypatch), model.startswith('resnet')
    assert call['bce'] is resnet and (call['optimizer'] is None) == (not resnet)
    if resnet:
        assert isinstance(call['optimizer']([torch.nn.Parameter(torch.ones(2))], lr=0.1), spark.LAMB)
    ids = {name: call['layer_id'](name) for name, _ in spark.build_backbone(model, num_classes=3).named_parameters()}
    expected = {'conv1.weight': 0, 'bn1.bias': 0, 'layer1.0.conv1.weight': 1, 'layer2.0.bn2.weight': 2,  # [1, 1, 1, 1]:
                'layer3.0.conv3.weight': 3, 'layer4.0.downsample.0.weight': 4, 'fc.weight': 5, 'fc.bias': 5} \
        if resnet else {'downsample_layers.0.0.weight': 0, 'stages.0.1.gamma': 1, 'downsample_layers.1.1.weight': 2,
                        'stages.1.0.dwconv.weight': 2, 'downsample_layers.2.0.weight': 3,
                        'stages.2.2.pwconv1.weight': 3, 'stages.2.3.norm.weight': 4, 'stages.2.5.pwconv2.bias': 4,
                        'downsample_layers.3.1.weight': 6, 'stages.3.1.gamma': 6, 'norm.weight': 7,
                        'head.weight': 7}  # [2, 2, 6, 2]: N = 6
    top = max(expected.values())
    assert {name: ids[name] for name in expected} == {name: (i, top) for name, i in expected.items()}
    assert {i for i, _ in ids.values()} == set(expected.values())


def test_spark_resnet_finetuning_lamb_steps_equal_timms_lamb_as_util_py_makes_it(tmp_path, monkeypatch):
    """spark.main's ResNet LAMB, two steps by hand (util.py: betas 0.9 / 0.999, eps 1e-6, no bias correction, no
    clip): update m / (sqrt(v) + eps) + wd * w, times ||w|| / ||update|| on every tensor (always_adapt)."""
    factory = spark_finetune_call('resnet_mini_ds8', tmp_path, monkeypatch)['optimizer']
    generator = torch.Generator().manual_seed(0)
    shapes, decays, scales = [(4, 3), (5,), (3, 3)], [0.02, 0.0, 0.02], [1.0, 1.0, 1e-6]  # tiny grads: eps counts
    weights = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) * c * (30 if step == 0 else 1) for s, c in zip(shapes, scales)]
             for step in range(2)]  # step 0's global norm is ~100: a clip to 5 would change step 1
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = factory([{'params': [p], 'weight_decay': d} for p, d in zip(params, decays)], lr=0.01)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    for p, w, decay, gs in zip(params, weights, decays, zip(*grads)):
        w, m, v = w.double(), 0.0, 0.0
        for g in (g.double() for g in gs):
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            update = m / (v.sqrt() + 1e-6) + decay * w
            w = w - 0.01 * w.norm() / update.norm() * update
        assert torch.allclose(p.detach().double(), w, rtol=1e-5, atol=1e-7)


def test_ctrl_c_in_the_fine_tunes_val_top1_names_the_fine_tunes_folder(tmp_path):
    """The per-epoch val top-1 runs in the fine-tune's folder: Ctrl-C there says what that folder keeps (was: the
    pretraining folder's, 'no checkpoint', beside a fine-tune the same command continues)."""
    args = mae.parse_args(TINY + ['--finetune_epochs', '1', '--ft_warmup_epochs', '0', '--ft_batch', '8', '--amp',
                                  'none', '--num_workers', '0', '--output_dir', str(tmp_path)])
    _, eval_sets = common.build_datasets(args, common.TrainTransform(16))
    encoder = common.VisionTransformer(16, 4, 32, 1, 2, learned_pos=True).state_dict()

    class PressedInEval(common.ViTClassifier):
        def forward(self, x):
            if not self.training:
                raise KeyboardInterrupt
            return super().forward(x)
    build = lambda classes: PressedInEval(classes, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(SystemExit, match=rf'^interrupted in the evaluation: no checkpoint in {tmp_path}/finetune yet$'):
        common.finetune(args, build, encoder, eval_sets)
