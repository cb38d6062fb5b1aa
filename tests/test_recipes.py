"""Faithful at every epoch count and every model: the official recipes written down as numbers, each with the file and
line it comes from, against the values a user gets (each method's parse_args(argv), then its recipe / schedule
functions; the fine-tuning optimizer and schedule through the method's own main, stopped at its first epoch).

Sources (commits as read): facebookresearch/mae @efb2a80, Haochen-Wang409/HPM @c15ae90, facebookresearch/SlowFast
@287ec00, Jiahao000/MFM @c9194b1 (timm v0.4.12 for its scheduler), keyu-tian/SparK @a63e386."""
import math, os

import numpy as np
import pytest
from PIL import Image

import common
import hpm
import mae
import maskfeat
import mfm
import spark
from conftest import Stop


def imagenet(tmp_path, *flags):  # the argv of a user's --data imagenet run (the folder need only exist for parsing)
    os.makedirs(tmp_path / 'imagenet', exist_ok=True)
    return ['--data', 'imagenet', '--data_path', str(tmp_path / 'imagenet'), *flags]


# ---- HPM: the teacher's EMA decay --------------------------------------------------------------------------------
def official_hpm_decay(epoch):  # HPM engine_pretrain.py:39-44, once per (integer) epoch, whatever args.epochs
    return 0.999 + epoch / 100 * (0.9999 - 0.999) if epoch < 100 else 0.9999


@pytest.mark.parametrize('epochs', [400, 1600])
def test_hpm_teacher_decay_at_every_run_length(tmp_path, epochs):
    args = hpm.parse_args(imagenet(tmp_path, '--epochs', str(epochs)))
    assert args.epochs == epochs
    for epoch in (0, 50, 99, 100, 300):
        ours = hpm.teacher_decay(epoch, *args.ema_decay, args.ema_ramp_epochs)
        assert ours == pytest.approx(official_hpm_decay(epoch), rel=0, abs=1e-12), epoch


# ---- HPM and MAE: fine-tuning rows ---------------------------------------------------------------------------------
HPM_FT = {  # HPM scripts/finetune_base.sh:1,3,5,8-10 and finetune_large.sh:1,3,5,8-10 (8 GPUs each)
    'vit_base_patch16': dict(ft_batch=8 * 48, ft_blr=5e-4, layer_decay=0.8, ft_weight_decay=0.05, ft_drop_path=0.1,
                             reprob=0.25, mixup=0.8, cutmix=1.0, ft_warmup_epochs=5),
    'vit_large_patch16': dict(ft_batch=8 * 64, ft_blr=5e-4, layer_decay=0.8, ft_weight_decay=0.05, ft_drop_path=0.1,
                              reprob=0.25, mixup=0.8, cutmix=1.0, ft_warmup_epochs=5)}
HPM_FT_DEFAULTS = dict(smoothing=0.1)  # HPM main_finetune.py:79 (not passed by the scripts)


@pytest.mark.parametrize('model', sorted(HPM_FT))
def test_hpm_finetune_row_per_model(tmp_path, model):
    args = hpm.parse_args(imagenet(tmp_path, '--model', model))
    for key, value in {**HPM_FT[model], **HPM_FT_DEFAULTS}.items():
        assert getattr(args, key) == pytest.approx(value), key


MAE_FT = {  # mae FINETUNE.md: ViT-B :67-73 (batch 32 x 4 nodes x 8 GPUs = 1024, :77), ViT-L :86-92, ViT-H :102-108
    'vit_base_patch16': dict(ft_batch=32 * 4 * 8, ft_blr=5e-4, layer_decay=0.65, ft_drop_path=0.1),
    'vit_large_patch16': dict(ft_batch=32 * 4 * 8, ft_blr=1e-3, layer_decay=0.75, ft_drop_path=0.2),
    'vit_huge_patch14': dict(ft_batch=16 * 8 * 8, ft_blr=1e-3, layer_decay=0.75, ft_drop_path=0.3)}
MAE_FT_SHARED = dict(ft_weight_decay=0.05, reprob=0.25, mixup=0.8, cutmix=1.0,  # FINETUNE.md:73, :92, :108
                     ft_warmup_epochs=5, smoothing=0.1)  # main_finetune.py:76 and :84 (defaults the commands keep)


@pytest.mark.parametrize('model', sorted(MAE_FT))
def test_mae_finetune_row_per_encoder_size(tmp_path, model):
    args = mae.parse_args(imagenet(tmp_path, '--model', model))
    for key, value in {**MAE_FT[model], **MAE_FT_SHARED}.items():
        assert getattr(args, key) == pytest.approx(value), key
    # the same row under any --data (the row follows the encoder, the batch the dataset)
    other = mae.parse_args(['--data', 'cifar10', '--model', model.replace('16', '4').replace('14', '4')])
    assert (other.ft_blr, other.layer_decay, other.ft_drop_path) == pytest.approx(
        (MAE_FT[model]['ft_blr'], MAE_FT[model]['layer_decay'], MAE_FT[model]['ft_drop_path']))


# ---- SparK: downstream_imagenet/arg.py's table -------------------------------------------------------------------
SPARK_FT = {  # downstream_imagenet/arg.py:13-23 (bs, wp_ep, base_lr, lr_scale, wd, mixup, rep_aug, drop_path, ema)
    'convnext_small': (4096, 20, 0.0002, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),  # arg.py:15
    'convnext_base': (4096, 20, 0.0001, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),  # arg.py:16
    'convnext_large': (4096, 10, 0.0001, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),  # arg.py:17
    'resnet50': (2048, 5, 0.002, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),  # arg.py:20
    'resnet101': (2048, 5, 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),  # arg.py:21
    'resnet152': (2048, 5, 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),  # arg.py:22
    'resnet200': (2048, 5, 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999)}  # arg.py:23
SPARK_KEYS = ('ft_batch', 'ft_warmup_epochs', 'ft_blr', 'layer_decay', 'ft_weight_decay', 'mixup', 'ft_repeated_aug',
              'ft_drop_path', 'ft_ema')
SPARK_SHARED = dict(cutmix=1.0, smoothing=0.1,  # util.py:81-85 (BatchMixup: cutmix_alpha 1.0, label_smoothing 0.1)
                    reprob=0.25)  # data.py:37-41 (create_transform re_prob 0.25)


def spark_official_row(model):  # the project's choice for its small-image models: resnet50's or convnext_small's row
    return SPARK_FT.get(model) or SPARK_FT['convnext_small' if model.startswith('convnext') else 'resnet50']


@pytest.mark.parametrize('model', list(spark.MODELS))
def test_spark_finetune_row_of_every_model(tmp_path, model):
    assert set(SPARK_FT) <= set(spark.MODELS)  # every official row has its model here
    args = spark.parse_args(imagenet(tmp_path, '--model', model))
    for key, value in {**dict(zip(SPARK_KEYS, spark_official_row(model))), **SPARK_SHARED}.items():
        assert getattr(args, key) == pytest.approx(value), key
    # the peak lr as arg.py:133-135 derives it, base_lr * global batch / 256: common.finetune's lr is ft_blr times the
    # batch a step makes (batch_size x processes x ft_accum_iter) / 256, so that batch must be the row's
    tuned = spark.parse_args(imagenet(tmp_path, '--model', model, '--finetune_epochs', '1'))
    assert tuned.batch_size * tuned.world_size * tuned.ft_accum_iter == spark_official_row(model)[0]


def test_spark_finetune_row_outside_imagenet_keeps_the_pretraining_batch(tmp_path):
    """Only --data imagenet takes the row's batch (2048 / 4096 images); the rest of the row applies everywhere."""
    args = spark.parse_args(['--data', 'shapes'])
    assert args.ft_batch is None
    row = dict(zip(SPARK_KEYS, spark_official_row(args.model)))
    assert all(getattr(args, k) == pytest.approx(v) for k, v in row.items() if k != 'ft_batch')


def test_spark_convnext_large_at_384_takes_the_384_row(tmp_path):
    args = spark.parse_args(imagenet(tmp_path, '--model', 'convnext_large', '--input_size', '384'))
    official = (1024, 20, 0.00006, 0.7, 0.01, 0.8, 3, 0.5, 0.99995)  # arg.py:18
    assert [getattr(args, k) for k in SPARK_KEYS] == pytest.approx(list(official))
    # pretrain/README.md, "Pretraining ConvNeXt-Large on ImageNet-1k (384x384)": --mask=0.75 --bs=2048 --base_lr=4e-4
    assert (args.mask_ratio, args.eff_batch_size, args.blr, args.lr) == (0.75, 2048, 4e-4, pytest.approx(3.2e-3))
    at_224 = spark.parse_args(imagenet(tmp_path, '--model', 'convnext_large'))
    assert (at_224.mask_ratio, at_224.eff_batch_size, at_224.blr) == (0.6, 4096, 2e-4)


# ---- MaskFeat and MFM: recipe rows ---------------------------------------------------------------------------------
MASKFEAT_FT = {  # SlowFast configs/masked_ssl/in1k_VIT_{B,L}_MaskFeat_FT.yaml: TRAIN.BATCH_SIZE :5 (L :4), SOLVER
    # :54-67 (BASE_LR, LAYER_DECAY, WARMUP_EPOCHS, WEIGHT_DECAY), MVIT.DROPPATH_RATE :32; MIXUP :47-53, AUG :38-46
    'vit_base_patch16': dict(batch=512, base_lr=0.002, layer_decay=0.65, ft_warmup_epochs=20, ft_weight_decay=0.05),
    'vit_large_patch16': dict(batch=256, base_lr=0.001, layer_decay=0.75, ft_warmup_epochs=5, ft_weight_decay=0.05)}
MASKFEAT_SHARED = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, ft_drop_path=0.1)


@pytest.mark.parametrize('model', sorted(MASKFEAT_FT))
def test_maskfeat_finetune_row_per_encoder_size(tmp_path, model):
    row = MASKFEAT_FT[model]
    args = maskfeat.parse_args(imagenet(tmp_path, '--model', model))
    assert args.ft_batch == row['batch'] and args.ft_config_batch == row['batch']
    assert args.ft_blr * row['batch'] / 256 == pytest.approx(row['base_lr'])  # BASE_LR at the config's batch
    for key in ('layer_decay', 'ft_warmup_epochs', 'ft_weight_decay'):
        assert getattr(args, key) == pytest.approx(row[key]), key
    for key, value in MASKFEAT_SHARED.items():
        assert getattr(args, key) == pytest.approx(value), key


def test_mfm_finetune_row(tmp_path):
    """MFM configs/vit_base/finetune__vit_base__img224__100ep.yaml:4,19-25 (DROP_PATH_RATE 0.1, WARMUP_EPOCHS 5,
    BASE_LR 2e-3 per 512, WEIGHT_DECAY 0.05, LAYER_DECAY 0.8); docs/FINETUNE.md:39-55: 16 GPUs x 128 = 2048."""
    args = mfm.parse_args(imagenet(tmp_path))
    assert args.model == 'vit_base_patch16' and args.ft_batch == 16 * 128
    assert args.ft_blr * 512 / 256 == pytest.approx(2e-3)  # main_finetune.py:362: BASE_LR * batch / 512
    assert (args.ft_warmup_epochs, args.layer_decay, args.ft_weight_decay, args.ft_drop_path) == pytest.approx(
        (5, 0.8, 0.05, 0.1))


# ---- the fine-tuning optimizer and lr schedule, through the method's main ----------------------------------------
def finetune_start(module, tmp_path, monkeypatch, *flags):
    """Run `module.main` as a user would (--data imagenet on a tiny folder, a tiny ViT, --eval_only, fine-tuning on)
    until common.finetune starts its first epoch -> (classifier, optimizer, schedule, ft settings)."""
    data = tmp_path / 'imagenet'
    rng = np.random.default_rng(0)
    for split, count in (('train', 16), ('val', 2)):
        for name in ('a', 'b'):
            os.makedirs(data / split / name, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(data / split / name / f'{i}.png')
    argv = ['--data', 'imagenet', '--data_path', str(data), '--model', 'vit_tiny_patch4', '--input_size', '16',
            '--batch_size', '8', '--accum_iter', '1', '--num_workers', '0', '--probe_epochs', '0', '--knn_k', '0',
            '--eval_only', '--output_dir', str(tmp_path / 'out'), '--finetune_epochs', '100', *flags]
    model, optimizer, schedule = first_epoch_of(module, monkeypatch, argv)
    return model, optimizer, schedule, schedule.keywords['args']


def first_epoch_of(module, monkeypatch, argv):
    """Run `module.main(argv)` until common.train_one_epoch is first called -> (its model, optimizer, schedule)."""
    seen = {}

    def first_epoch(model, loss_fn, loader, optimizer, epoch, schedule=None, **kwargs):
        seen.update(model=model, optimizer=optimizer, schedule=schedule)
        raise Stop

    monkeypatch.setattr(common, 'train_one_epoch', first_epoch)
    with pytest.raises(Stop):
        module.main(argv)
    return seen['model'], seen['optimizer'], seen['schedule']


def groups_by_name(model, optimizer):  # -> {parameter name: its optimizer group}
    names = {id(p): n for n, p in model.named_parameters()}
    found = {names[id(p)]: g for g in optimizer.param_groups for p in g['params']}
    assert sorted(found) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return found


def vit_layer(name, depth=12):  # SlowFast optimizer.py:147-160 and MFM optimizer.py:101-112: the same numbering
    return 0 if name.startswith(('cls_token', 'pos_embed', 'patch_embed')) else \
        int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1


def test_maskfeat_finetune_groups_decay_pos_embed_and_cls_token(tmp_path, monkeypatch):
    """SlowFast optimizer.py:188-191 with in1k_VIT_B_MaskFeat_FT.yaml:22 ZERO_DECAY_POS_CLS False and :67
    ZERO_WD_1D_PARAM True: no decay only for 1-D tensors and biases; pos_embed and cls_token are decayed (0.05);
    layer decay 0.65^(13 - layer) (optimizer.py:147-160)."""
    model, optimizer, _, _ = finetune_start(maskfeat, tmp_path, monkeypatch, '--hog_cell_size', '2', '--ft_batch', '16')
    groups = groups_by_name(model, optimizer)
    assert groups['pos_embed']['weight_decay'] == 0.05 and groups['cls_token']['weight_decay'] == 0.05
    for name, group in groups.items():
        param = model.get_parameter(name)
        assert group['weight_decay'] == (0.0 if param.ndim == 1 or name.endswith('.bias') else 0.05), name
        assert group['lr_scale'] == pytest.approx(0.65 ** (13 - vit_layer(name))), name
    assert groups['norm.weight']['lr_scale'] == groups['head.weight']['lr_scale'] == 1.0  # SlowFast's pooled `norm`


def slowfast_lr(epoch, base, start, end, warmup, max_epoch):
    """SlowFast slowfast/utils/lr_policy.py:18-25 (warmup) and :28-49 (cosine, COSINE_AFTER_WARMUP True)."""
    cosine = lambda e: end + (base - end) * (math.cos(math.pi * (e - warmup) / (max_epoch - warmup)) + 1.0) * 0.5
    if epoch < warmup:
        return epoch * (cosine(warmup) - start) / warmup + start
    return cosine(epoch)


def test_maskfeat_finetune_lr_at_fractional_epochs(tmp_path, monkeypatch):
    """in1k_VIT_B_MaskFeat_FT.yaml:57-66: BASE_LR 0.002, WARMUP_EPOCHS 20, WARMUP_START_LR 1e-8, COSINE_END_LR 1e-6,
    MAX_EPOCH 100, all for TRAIN.BATCH_SIZE 512 (:5) and multiplied by the shards (defaults.py:1280-1284), i.e. by the
    global batch / 512; set_lr multiplies the value by each group's layer decay (optimizer.py:251-259)."""
    model, optimizer, schedule, ft = finetune_start(maskfeat, tmp_path, monkeypatch, '--hog_cell_size', '2',
                                                    '--ft_batch', '16')
    shards = 16 / 512  # batch 8 x accum 2 x 1 process
    assert ft.batch_size * ft.accum_iter * ft.world_size == 16 and ft.iters_per_epoch >= 1
    assert (ft.epochs, ft.warmup_epochs) == (100, 20)
    groups = groups_by_name(model, optimizer)
    last = 100 - 1 / ft.iters_per_epoch
    for epoch in (0.0, 10.0, 10 + 1 / ft.iters_per_epoch, 20.0, 60.0, last, 100.0):
        schedule(optimizer, epoch)
        expected = slowfast_lr(epoch, 0.002 * shards, 1e-8 * shards, 1e-6 * shards, 20, 100)
        for name in ('pos_embed', 'blocks.0.attn.qkv.weight', 'blocks.7.norm1.bias', 'head.weight'):
            scale = 0.65 ** (13 - vit_layer(name))
            assert groups[name]['lr'] == pytest.approx(expected * scale, rel=1e-9), (epoch, name)
    schedule(optimizer, 0.0)
    assert groups['head.weight']['lr'] == pytest.approx(1e-8 * shards)  # WARMUP_START_LR, scaled
    assert groups['pos_embed']['lr'] == pytest.approx(1e-8 * shards * 0.65 ** 13)  # ... and by the layer decay
    schedule(optimizer, 20.0)
    assert groups['head.weight']['lr'] == pytest.approx(0.002 * shards)  # BASE_LR at the end of warmup
    schedule(optimizer, 100.0)
    assert groups['blocks.11.mlp.fc1.weight']['lr'] == pytest.approx(1e-6 * shards * 0.65)  # COSINE_END_LR


def test_a_fine_tuning_batch_the_processes_cannot_make_is_said(tmp_path, monkeypatch, capsys):
    ft = finetune_start(mae, tmp_path, monkeypatch, '--ft_batch', '12')[3]  # 8 per step: 12 cannot be made
    assert ft.accum_iter == 1 and ft.lr == pytest.approx(ft.ft_blr * 8 / 256)
    assert '--ft_batch 12 is not a multiple of --batch_size x processes = 8: the effective batch is 8' in \
        capsys.readouterr().out  # was silent


def timm_cosine(t, base, warmup_lr, min_lr, warmup_t, t_initial):
    """timm v0.4.12 scheduler/cosine_lr.py:27-95 as MFM lr_scheduler.py:10-27 builds it (t_in_epochs False, cycle
    limit 1, warmup_prefix False: the cosine runs over the raw t of the whole run, warmup included)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def test_mfm_finetune_lr_at_iterations(tmp_path, monkeypatch):
    """finetune__vit_base__img224__100ep.yaml:19-25: EPOCHS 100, WARMUP_EPOCHS 5, BASE_LR 2e-3, WARMUP_LR = MIN_LR =
    2.5e-7, LAYER_DECAY 0.8, each lr times the global batch / 512 (main_finetune.py:361-373); each group starts at
    BASE_LR x its layer scale 0.8^(13 - layer) (optimizer.py:61-175), WARMUP_LR and MIN_LR shared by all groups.
    The scheduler steps after optimizer.step() (main_finetune.py:209-210): optimizer step t runs at the lr of t - 1,
    step 0 at WARMUP_LR (cosine_lr.py:62-64 sets every group to it at construction)."""
    model, optimizer, schedule, ft = finetune_start(mfm, tmp_path, monkeypatch, '--ft_batch', '8')
    scale = 8 / 512  # batch 8 x 1 process, no accumulation
    n = ft.iters_per_epoch
    assert ft.accum_iter == 1 and n >= 2 and (ft.epochs, ft.warmup_epochs) == (100, 5)
    warmup_t, t_initial = int(5 * n), int(100 * n)  # lr_scheduler.py:11-12
    base, floor = 2e-3 * scale, 2.5e-7 * scale
    groups = groups_by_name(model, optimizer)
    for name, group in groups.items():  # optimizer.py:61-99: no decay on 1-D, biases, pos_embed and cls_token
        no_decay = model.get_parameter(name).ndim == 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')
        assert group['weight_decay'] == (0.0 if no_decay else 0.05), name
    for step in (0, 1, warmup_t // 2, warmup_t, warmup_t + 1, t_initial // 2, t_initial - 1, t_initial):
        schedule(optimizer, step / n)  # optimizer step `step`: timm's lr of iteration step - 1
        t = max(step - 1, 0)
        for name in ('cls_token', 'blocks.0.attn.qkv.weight', 'blocks.9.mlp.fc2.bias', 'fc_norm.weight', 'head.bias'):
            peak = base * 0.8 ** (13 - vit_layer(name))
            assert groups[name]['lr'] == pytest.approx(timm_cosine(t, peak, floor, floor, warmup_t, t_initial),
                                                       rel=1e-9), (step, name)
    schedule(optimizer, 0.0)
    assert all(g['lr'] == pytest.approx(floor) for g in optimizer.param_groups)  # WARMUP_LR for every layer
    schedule(optimizer, (warmup_t + 1) / n)  # the first cosine step is already below the peak: no warmup prefix
    assert groups['head.weight']['lr'] == pytest.approx(floor + 0.5 * (base - floor) * (1 + math.cos(math.pi / 20)))
    assert groups['head.weight']['lr'] < base
    schedule(optimizer, float(ft.epochs) + 1 / n)
    assert all(g['lr'] == pytest.approx(floor) for g in optimizer.param_groups)  # MIN_LR for every layer


# ---- the pretraining optimizer, through the method's main ------------------------------------------------------
def pretrain_start(module, tmp_path, monkeypatch, *flags):
    """Run `module.main` on the built-in shapes until pretraining starts -> (model, optimizer, schedule)."""
    return first_epoch_of(module, monkeypatch, ['--data', 'shapes', '--shapes_size', '16', '--input_size', '16',
                                                '--model', 'vit_tiny_patch4', '--batch_size', '8', '--num_workers',
                                                '0', '--output_dir', str(tmp_path / 'out'), *flags])


# (method, flags, optimizer, betas, tensors decayed besides those of ndim > 1 that are no biases / left undecayed):
# MAE main_pretrain.py (timm 0.3.2's add_weight_decay, no skip list: cls_token and mask_token decayed) and HPM's copy
# of it; SlowFast optimizer.py with SOLVER.BETAS' default (0.9, 0.999) and the PT config's ZERO_DECAY_POS_CLS False;
# MFM's AdamW (0.9, 0.95) skipping the ViT's no_weight_decay() {pos_embed, cls_token}; SparK main.py's LAMB, nowd_keys
# with mask_token, `ada` 0.95 for ResNets and 0.999 for ConvNeXts, max_grad_norm 5
PRETRAINING_OPTIMIZERS = [
    ('mae', [], 'AdamW', (0.9, 0.95), dict(decayed=['cls_token', 'mask_token'])),
    ('hpm', [], 'AdamW', (0.9, 0.95), dict(decayed=['cls_token', 'mask_token'])),
    ('maskfeat', ['--hog_cell_size', '2'], 'AdamW', (0.9, 0.999), dict(decayed=['cls_token', 'pos_embed',
                                                                                'mask_token'])),
    ('mfm', [], 'AdamW', (0.9, 0.95), dict(undecayed=['encoder.cls_token', 'encoder.pos_embed'])),
    ('spark', ['--model', 'resnet_mini_ds8', '--input_size', '32'], 'LAMB', (0.9, 0.95),
     dict(undecayed='mask_token')),
    ('spark', ['--model', 'convnext_atto_ds8', '--input_size', '32'], 'LAMB', (0.9, 0.999),
     dict(undecayed='mask_token'))]


@pytest.mark.parametrize('method, flags, kind, betas, special', PRETRAINING_OPTIMIZERS,
                         ids=[row[0] + ('-' + row[1][1] if row[1] else '') for row in PRETRAINING_OPTIMIZERS])
def test_pretraining_optimizer_of_each_method(method, flags, kind, betas, special, tmp_path, monkeypatch):
    """Each method's pretraining optimizer as its official main builds it: its kind, betas and eps, and which tensors
    are decayed (wd 0.05; SparK's starts at 0.04 and is scheduled, read after its first schedule call)."""
    module = {'mae': mae, 'hpm': hpm, 'maskfeat': maskfeat, 'mfm': mfm, 'spark': spark}[method]
    model, optimizer, schedule = pretrain_start(module, tmp_path, monkeypatch, *flags)
    assert type(optimizer).__name__ == kind and all(g['betas'] == betas for g in optimizer.param_groups)
    if kind == 'AdamW':
        assert optimizer.defaults['eps'] == 1e-8 and not optimizer.defaults['amsgrad']
    else:
        assert (optimizer.max_grad_norm, optimizer.bias_correction, optimizer.always_adapt) == (5.0, True, False)
        schedule(optimizer, 0.0)
    groups = groups_by_name(model, optimizer)
    names = dict(model.named_parameters())
    special_names = [n for n in names if n in special.get('decayed', ()) or n in special.get('undecayed', ()) or
                     isinstance(special.get('undecayed'), str) and special['undecayed'] in n]
    assert special_names, 'the special tensors exist'
    for name, group in groups.items():
        plain_skip = names[name].ndim <= 1 or name.endswith('.bias')
        skip = plain_skip or name in special_names and 'undecayed' in special
        assert group['weight_decay'] == pytest.approx(0.0 if skip else 0.04 if method == 'spark' else 0.05), name


# ---- your own folder of images, or a typed --accum_iter: the batch the recipe's lr was set for, said ---------------
def test_a_run_off_the_imagenet_recipes_batch_says_so(tmp_path, capsys):
    folder = ['--data', 'folder', '--data_path', str(tmp_path)]
    for method, official in ((mae, 4096), (hpm, 2048), (maskfeat, 2048), (mfm, 2048), (spark, 4096)):
        args = method.parse_args(folder)
        assert f"--data folder trains at an effective batch of {args.eff_batch_size}, not the ImageNet recipe's " \
               f'{official}: --accum_iter {official // args.eff_batch_size} reaches it' in capsys.readouterr().out, \
            method.__name__
    spark.parse_args(folder + ['--model', 'convnext_large', '--input_size', '384'])  # the 384 recipe's batch
    assert "not the ImageNet recipe's 2048" in capsys.readouterr().out
    imagenet = ['--data', 'imagenet', '--data_path', str(tmp_path), '--batch_size', '64']
    args = mae.parse_args(imagenet + ['--accum_iter', '2'])  # typed: it overrides the recipe's 64 micro-batches
    assert args.eff_batch_size == 128 and "--data imagenet trains at an effective batch of 128, not the ImageNet " \
        "recipe's 4096: --accum_iter 64 reaches it" in capsys.readouterr().out
    for quiet in (folder + ['--batch_size', '64', '--accum_iter', '64'], folder + ['--eval_only'], imagenet,
                  imagenet + ['--accum_iter', '64']):
        mae.parse_args(quiet)
        assert 'recipe\'s 4096' not in capsys.readouterr().out, quiet


def test_a_model_without_an_official_fine_tuning_row_says_whose_it_takes(capsys):
    """MAE's FINETUNE.md has ViT-B, L, H; SlowFast's MaskFeat FT configs ViT-B and L; SparK's arg.py the ImageNet
    models; MFM's ResNet-50 fine-tuning is outside its repository: any other model's fine-tune says what it uses."""
    cases = [(mae, 'vit_small_patch16', "vit_small_patch16 fine-tunes with ViT-B's (ft_blr 5e-4"),
             (maskfeat, 'vit_huge_patch14', "vit_huge_patch14 fine-tunes with ViT-B's row (ft_blr 1e-3"),
             (spark, 'convnext_atto_ds8', "no convnext_atto_ds8 row: it fine-tunes with convnext_small's"),
             (spark, 'resnet_mini_ds8', "no resnet_mini_ds8 row: it fine-tunes with resnet50's"),
             (mfm, 'resnet_tiny', "MFM's ResNet-50 fine-tuning is timm's training script"),
             (mfm, 'vit_large_patch16', "vit_large_patch16 fine-tunes with their values (ft_blr 1e-3, layer_decay 0.8"),
             (hpm, 'vit_small_patch16', "vit_small_patch16 fine-tunes with their values (ft_blr 5e-4, layer_decay 0.8")]
    for method, model, said in cases:
        size = '32' if model.endswith('ds8') or model == 'resnet_tiny' else '224'
        method.parse_args(['--model', model, '--input_size', size, '--finetune_epochs', '1'])
        assert said in capsys.readouterr().out, model
        method.parse_args(['--model', model, '--input_size', size])  # no fine-tune: nothing to say
        assert 'fine-tunes' not in (out := capsys.readouterr().out) and "timm's training" not in out, model
    for method, model in ((mae, 'vit_huge_patch14'), (maskfeat, 'vit_large_patch16'), (spark, 'resnet101'),
                          (mfm, 'vit_base_patch16'), (mfm, 'vit_small_patch16'), (hpm, 'vit_large_patch16')):
        method.parse_args(['--model', model, '--input_size', '224', '--finetune_epochs', '1'])
        assert 'fine-tunes with' not in (out := capsys.readouterr().out) and "timm's training" not in out, model


def test_spark_mixup_0_turns_its_batch_mixup_off_cutmix_included(tmp_path):
    """downstream_imagenet/util.py:80-86: BatchMixup(mixup_alpha=mixup, cutmix_alpha=1.0), then mixup_enabled =
    mixup > 0: --mixup 0 mixes nothing (label smoothing stays); timm's Mixup, as MAE uses it, would keep cutmix."""
    ft = imagenet(tmp_path, '--finetune_epochs', '1')
    assert spark.parse_args(ft + ['--mixup', '0']).cutmix == 0
    assert spark.parse_args(ft + ['--mixup', '0', '--cutmix', '0.5']).cutmix == 0.5  # typed: kept
    assert spark.parse_args(ft).cutmix == 1.0 and mae.parse_args(ft + ['--mixup', '0']).cutmix == 1.0
