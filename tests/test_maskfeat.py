"""MaskFeat: HOG target (orientation bins, cells, normalisation, per-patch layout), block masking, loss, key names,
sizes no preset uses, start-up checks; one run of maskfeat.py as a user would start it."""
import math, os, subprocess, sys

import numpy as np
import pytest
import torch

import common
import maskfeat
from conftest import ROOT, TINY, check_run_folder, load_weights, run_script
from test_recipes import first_epoch_of


def edge_image(kind, size=32):
    """A (1, 3, size, size) image with one straight step edge in channels 0 and 2 (opposite polarities) and a flat
    channel 1: a vertical edge between columns 12 and 13, a horizontal one between rows 20 and 21, or x + y = 31.5."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    step = {'vertical': cols >= 13, 'horizontal': rows >= 21, 'diagonal': rows + cols >= 32}[kind].float()
    return torch.stack([step, torch.full_like(step, 0.3), 1 - 2 * step])[None]


@pytest.mark.parametrize('kind, expected_bin, cells', [('vertical', 4, (slice(None), 1)),
                                                       ('horizontal', 0, (2, slice(None)))])
def test_hog_of_a_straight_edge_lands_in_one_bin_and_the_cells_it_crosses(kind, expected_bin, cells):
    hist = maskfeat.hog(edge_image(kind), cell_size=8)  # (1, 3, 9, 4, 4)
    assert hist.shape == (1, 3, 9, 4, 4)
    expected = torch.zeros(4, 4, 9)
    expected[cells + (expected_bin,)] = 1.0  # the gradient sits on the two pixel lines beside the edge, one cell
    for channel in (0, 2):  # both polarities: the bins are unsigned
        assert torch.equal(hist[0, channel].permute(1, 2, 0), expected)
    assert torch.equal(hist[0, 1], torch.zeros(9, 4, 4))  # a flat channel has no gradient at all


def test_hog_of_a_diagonal_edge_and_reflect_padding():
    hist = maskfeat.hog(edge_image('diagonal'), cell_size=8)[0, 0]  # (9, 4, 4)
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing='ij')
    crossed = (i + j >= 2) & (i + j <= 4)  # cells holding a pixel within one of the edge x + y = 31.5
    assert torch.equal(hist.sum(0) > 0, crossed)
    assert torch.all(hist[2][crossed] > 0.99)  # bin 2 = 40..60 degrees (exactly 1 away from the image border)
    # reflect padding: an image that only changes across its border has no gradient there
    assert torch.equal(maskfeat.hog(torch.ones(1, 3, 16, 16), 8), torch.zeros(1, 3, 9, 2, 2))


def test_every_cell_histogram_has_unit_norm_or_is_zero():
    torch.manual_seed(0)
    norms = maskfeat.hog(torch.randn(2, 3, 32, 32), cell_size=4).norm(dim=2)  # (B, 3, 8, 8)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    for kind in ('vertical', 'horizontal', 'diagonal'):
        norms = maskfeat.hog(edge_image(kind), cell_size=4).norm(dim=2)
        assert torch.all(((norms - 1).abs() < 1e-6) | (norms == 0)) and (norms == 0).any()


def test_hog_target_shape_and_official_per_patch_order():
    # ViT-B/16 on 224 px: 196 patches x (3 channels x 9 bins x 2 x 2 cells) = 108, as the official head
    assert maskfeat.hog_target(torch.randn(1, 3, 224, 224), 16, 8).shape == (1, 196, 108)
    assert maskfeat.hog_target(torch.randn(2, 3, 32, 32), 8, 4).shape == (2, 16, 108)  # the shapes preset
    hist = torch.randn(2, 3, 9, 4, 6)  # 2 x 3 patches of 2 x 2 cells
    target = maskfeat.hog_per_patch(hist, 2)
    assert target.shape == (2, 6, 108)
    picks = [(0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 2, 8, 1, 1), (0, 1, 0, 1, 3, 0, 1), (1, 0, 1, 2, 5, 1, 0)]
    for b, i, j, c, n, r, s in picks:  # (sample, patch row, patch col, channel, bin, cell row, cell col)
        patch, index = i * 3 + j, ((c * 9 + n) * 2 + r) * 2 + s  # row-major patches; (channel, bin) slowest
        assert target[b, patch, index] == hist[b, c, n, 2 * i + r, 2 * j + s]
    assert torch.equal(maskfeat.patch_to_cells(maskfeat.hog_per_patch(hist[..., :4], 2), 2, 2), hist[..., :4])


def test_block_masking_count_and_rectangles():
    rng = np.random.default_rng(0)
    masks = np.stack([maskfeat.block_masking(14, 78, rng) for _ in range(300)])  # the official 14 x 14 / 78
    assert masks.shape == (300, 196) and masks.dtype == np.float32 and set(np.unique(masks)) == {0.0, 1.0}
    counts = masks.sum(1)
    assert counts.max() == 78 and counts.min() >= 60  # never more; fewer only when a block adds nothing
    assert 0.6 < (counts == 78).mean() < 0.85  # the official generator hits 78 exactly ~71% of the time
    assert np.array_equal(maskfeat.block_masking(14, 78, np.random.default_rng(5)),
                          maskfeat.block_masking(14, 78, np.random.default_rng(5)))  # drawn from the sample's rng
    for seed in range(50):  # one block on an empty grid is a filled rectangle of at least the minimum area
        mask = np.zeros((14, 14), np.float32)
        added = maskfeat.add_block(mask, np.random.default_rng(seed), 15, 78, (math.log(0.3), math.log(1 / 0.3)))
        rows, cols = np.nonzero(mask)
        assert added == mask.sum() and 0 < added <= 78
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # the bounding box is all masked
        assert rows.max() - rows.min() < 13 and cols.max() - cols.min() < 13  # never the full grid side


def tiny_model():
    torch.manual_seed(0)
    return maskfeat.MaskFeat(16, **common.vit_config('vit_tiny_patch4'), hog_cell_size=2)


def test_loss_ignores_visible_tokens_and_encoder_never_sees_masked_pixels():
    model = tiny_model()
    imgs, mask = torch.randn(2, 3, 16, 16), torch.zeros(2, 16)
    mask[:, [0, 1, 4, 5, 10]] = 1
    loss, pred, target = model(imgs, mask)
    assert pred.shape == target.shape == (2, 16, 108)
    moved = pred + 5.0 * (1 - mask)[..., None]  # change only the visible tokens' predictions
    assert torch.equal(model.forward_loss(moved, target, mask), loss)
    assert not torch.equal(model.forward_loss(pred + 5.0 * mask[..., None], target, mask), loss)
    expected = ((pred - target) ** 2)[mask.bool()].mean()  # official: MSE over masked tokens x 108 values
    assert torch.allclose(loss, expected, rtol=1e-6)
    # the pixels under masked patches reach the target only: the predictions stay exactly the same
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    _, pred2, target2 = model(imgs + 3.0 * pixel_mask * torch.randn_like(imgs), mask)
    assert torch.equal(pred2, pred) and not torch.equal(target2, target)


# ---- the official code written out: SlowFast operators.py HOGLayerC, masked.py, transform.py MaskingGenerator -----
def official_hog_label(imgs, cell):
    """HOGLayerC(nbins=9, pool=cell) then masked.py _get_hog_label_2d, for a 2 x 2-cell patch: (B, 3, H, W) -> (B, L,
    108). Reflect pad 1, Sobel cross-correlation per channel, orientation atan2(gx, gy) into 9 bins with hard votes of
    the magnitude, cell sums, L2 over the bins; then the (channel, bin) index slowest, cell row, cell column."""
    B = len(imgs)
    x = torch.nn.functional.pad(imgs, (1, 1, 1, 1), mode='reflect')
    weight_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    gx = torch.nn.functional.conv2d(x, weight_x, groups=3)
    gy = torch.nn.functional.conv2d(x, weight_x.transpose(2, 3), groups=3)
    norm = torch.stack([gx, gy], dim=-1).norm(dim=-1)  # (B, 3, H, W)
    phase = torch.atan2(gx, gy) / math.pi * 9
    b, c, h, w = norm.shape
    bins = phase.view(b, c, 1, h, w).floor().long() % 9
    out = torch.zeros(b, c, 9, h, w).scatter_add_(2, bins, norm.view(b, c, 1, h, w))
    out = out.unfold(3, cell, cell).unfold(4, cell, cell).sum(dim=[-1, -2])
    out = torch.nn.functional.normalize(out, p=2, dim=2).flatten(1, 2)  # (B, 27, H / cell, W / cell)
    return out.permute(0, 2, 3, 1).unfold(1, 2, 2).unfold(2, 2, 2).flatten(1, 2).flatten(2).reshape(B, -1, 108)


@pytest.mark.parametrize('size, patch', [(32, 16), (16, 8)])
def test_hog_target_equals_the_official_hog_layer_written_out(size, patch):
    """Guards the Sobel weights, the reflect padding, no Gaussian window (masked.py builds HOGLayerC without one) and
    no normalisation beyond each cell's histogram, on images with texture everywhere."""
    imgs = torch.randn(2, 3, size, size)
    assert torch.allclose(maskfeat.hog_target(imgs, patch, patch // 2), official_hog_label(imgs, patch // 2),
                          atol=1e-6)


def official_block_masking(grid, num_mask, rng):
    """MaskingGenerator(grid, num_mask, min_num_patches=num_mask // 5, min_aspect 0.3) as imagenet.py builds it, with
    random.uniform(a, b) and random.randint(a, b) drawn from a numpy generator: a + (b - a) U and integers(a, b + 1)."""
    mask, count = np.zeros((grid, grid), int), 0
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    while count < num_mask:
        budget, delta = num_mask - count, 0
        for _ in range(10):
            area = num_mask // 5 + (budget - num_mask // 5) * rng.random()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
                if 0 < h * w - mask[top:top + h, left:left + w].sum() <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j], delta = 1, delta + 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1)


def test_block_masking_equals_the_official_generator_draw_for_draw():
    """The same random draws give the same mask: the minimum block of num_mask // 5, the aspect log-uniform on both
    sides of 1, the rounded sides, the ten tries and the early stop."""
    for grid, num_mask in [(14, 78), (4, 6), (8, 26)]:
        for seed in range(40):
            expected = official_block_masking(grid, num_mask, np.random.default_rng(seed))
            got = maskfeat.block_masking(grid, num_mask, np.random.default_rng(seed))
            assert np.array_equal(got, expected), (grid, num_mask, seed)


def official_forward(model, imgs, mask):
    """masked.py _maskfeat_forward + MSSeparateHead.forward for the image path: patch embed, masked embeddings
    replaced by the mask token, cls prepended, then the whole (1 + L, D) pos_embed added; every block; the head's
    LayerNorm and Linear, cls dropped. -> predictions (B, L, 108)."""
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # (B, L, D)
    m = mask[..., None]
    x = x * (1 - m) + model.mask_token.expand_as(x) * m
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1) + model.pos_embed
    for block in model.blocks:
        x = block(x)
    return model.pred_head.projections[0](model.pred_head.transforms[0][0](x))[:, 1:]


def test_forward_equals_the_official_forward_written_out():
    model = tiny_model()
    with torch.no_grad():
        model.mask_token.normal_()  # far from the patch embeddings, so that a position lost on it shows
        imgs, mask = torch.randn(2, 3, 16, 16), torch.zeros(2, 16)
        mask[:, [0, 1, 4, 5, 10]] = 1
        loss, pred, target = model(imgs, mask)
        expected = official_forward(model, imgs, mask)
    assert torch.allclose(pred, expected, atol=1e-5)
    assert torch.allclose(loss, ((expected - official_hog_label(imgs, 2)) ** 2)[mask.bool()].mean(), atol=1e-6)


def test_initialisation_is_the_official_one():
    """MViT._init_weights on the encoder: Linear / Conv weights trunc-normal(0.02), Linear and LayerNorm biases 0.02,
    pos_embed / cls_token / mask_token trunc-normal(0.02); MSSeparateHead._init_weights on the head: zero biases."""
    torch.manual_seed(0)
    model = maskfeat.MaskFeat(32, **common.vit_config('vit_small_patch8'), hog_cell_size=4)
    for name in ('pos_embed', 'cls_token', 'mask_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
                 'pred_head.projections.0.weight'):
        value = model.get_parameter(name)
        assert 0.015 < value.std() < 0.025, name  # timm's trunc_normal_ cuts at +-2 (absolute): a plain normal
    for name, module in model.blocks.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert torch.all(module.bias == 0.02), name
    head_norm = model.pred_head.transforms[0][0]
    assert torch.all(model.pred_head.projections[0].bias == 0) and torch.all(head_norm.bias == 0)
    assert torch.all(head_norm.weight == 1) and torch.all(model.blocks[0].norm1.weight == 1)


def test_pretraining_defaults_are_the_official_recipe(monkeypatch):
    """in1k_VIT_B_MaskFeat_PT.yaml: BASE_LR 2e-4 per 256, warmup 30 epochs from WARMUP_START_LR 1e-6 (x shards),
    cosine to COSINE_END_LR 1e-6 (x shards), CLIP_GRAD_L2NORM 0.02, MASK_RATIO 0.4 with round(L * ratio) patches,
    scale (0.5, 1); MAX_EPOCH 300 by default, and 1600 (the released checkpoints) for the ImageNet preset."""
    assert maskfeat.parse_args(['--data', 'cifar10', '--data_path', '.', '--epochs', '5']).crop_scale == 0.5
    args = maskfeat.parse_args(['--data', 'imagenet', '--data_path', '.'])
    assert (args.blr, args.warmup_epochs, args.clip_grad, args.mask_ratio) == (2e-4, 30, 0.02, 0.4)
    assert (args.weight_decay, args.epochs, args.eff_batch_size, args.crop_scale) == (0.05, 1600, 2048, 0.5)
    assert args.min_lr == pytest.approx(1e-6 * 2048 / 256)
    assert maskfeat.DEFAULTS['epochs'] == 300
    masks, build = [], common.build_datasets

    def recorded(args, crop, draw_mask):  # main's mask function, partial(block_masking, grid, num_mask)
        masks.append(draw_mask)
        return build(args, crop, draw_mask)

    monkeypatch.setattr(common, 'build_datasets', recorded)
    argv = TINY + ['--model', 'vit_tiny_patch4', '--hog_cell_size', '2', '--mask_ratio', '0.3', '--warmup_epochs', '1']
    model, optimizer, schedule = first_epoch_of(maskfeat, monkeypatch, argv)
    assert masks[0].args == (4, round(16 * 0.3)) == (4, 5)  # round: int() would mask 4
    run = maskfeat.parse_args(argv)
    assert schedule(optimizer, 0.0) == pytest.approx(run.min_lr) == pytest.approx(1e-6 * 8 / 256)  # warmup's start
    assert schedule(optimizer, 1.0) == pytest.approx(run.lr)


def test_pretraining_cosine_starts_and_ends_at_min_lr_and_peaks_after_warmup(tmp_path, monkeypatch):
    """main's schedule: warmup from --min_lr (unset: 1e-6 x effective batch / 256, difference 4; here 8 x 2 = 16) to
    the peak at warmup_epochs, then the cosine down to --min_lr at the last epoch's end, for every group."""
    argv = TINY + ['--hog_cell_size', '2', '--accum_iter', '2', '--epochs', '4', '--warmup_epochs', '1',
                   '--output_dir', str(tmp_path)]
    model, optimizer, schedule = first_epoch_of(maskfeat, monkeypatch, argv)
    run = schedule.keywords['args']
    assert run.eff_batch_size == 16 and run.min_lr == pytest.approx(1e-6 * 16 / 256) and run.lr > 100 * run.min_lr
    assert schedule(optimizer, 0.0) == pytest.approx(run.min_lr)  # warmup's start (WARMUP_START_LR)
    assert schedule(optimizer, 0.5) == pytest.approx((run.min_lr + run.lr) / 2)  # linear warmup
    assert schedule(optimizer, 1.0) == pytest.approx(run.lr)  # the peak at warmup_epochs
    assert schedule(optimizer, 2.5) == pytest.approx((run.lr + run.min_lr) / 2)  # halfway down the cosine
    assert schedule(optimizer, 4.0) == pytest.approx(run.min_lr, rel=1e-6, abs=0)  # COSINE_END_LR at --epochs
    assert all(group['lr'] == pytest.approx(run.min_lr, rel=1e-6, abs=0) for group in optimizer.param_groups)


def test_state_dict_keys_equal_official_slowfast_vit_base():
    state = maskfeat.MaskFeat(224, 16, 768, 12, 12, hog_cell_size=8).state_dict()  # ViT-B/16
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    official = ({'patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'pos_embed', 'mask_token',
                 'pred_head.transforms.0.0.weight', 'pred_head.transforms.0.0.bias', 'pred_head.projections.0.weight',
                 'pred_head.projections.0.bias'} | {f'blocks.{i}.{k}' for i in range(12) for k in block})
    assert set(state) == official  # no final `norm`: SlowFast deletes it for pretraining
    shapes = {'pos_embed': (1, 197, 768), 'mask_token': (1, 1, 768), 'pred_head.projections.0.weight': (108, 768),
              'pred_head.transforms.0.0.weight': (768,), 'patch_embed.proj.weight': (768, 3, 16, 16)}
    assert all(tuple(state[k].shape) == v for k, v in shapes.items())
    model = maskfeat.MaskFeat(224, **common.vit_config('vit_base_patch16'), hog_cell_size=8)
    assert model.pos_embed.requires_grad and model.blocks[0].attn.qkv.bias.detach().eq(0.02).all()  # SlowFast init


def test_hog_cell_follows_the_patch_and_must_be_half_of_it():
    with pytest.raises(SystemExit, match='must be half the patch size 4'):
        maskfeat.parse_args(['--model', 'vit_tiny_patch4', '--hog_cell_size', '4'])
    assert maskfeat.parse_args([]).hog_cell_size == 4 and maskfeat.parse_args(['--data', 'imagenet', '--data_path',
                                                                                '.']).hog_cell_size == 8
    assert maskfeat.parse_args(['--model', 'vit_tiny_patch4']).hog_cell_size == 2  # another model: its own cells


def test_a_size_no_preset_uses_trains_and_impossible_sizes_are_refused():
    torch.manual_seed(0)
    sizes = dict(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, mlp_ratio=2.0, hog_cell_size=3)
    model = maskfeat.MaskFeat(**sizes)
    state = model.state_dict()
    shapes = {'pos_embed': (1, 17, 40), 'mask_token': (1, 1, 40), 'patch_embed.proj.weight': (40, 3, 6, 6),
              'blocks.1.attn.qkv.weight': (120, 40), 'blocks.1.mlp.fc1.weight': (80, 40),
              'pred_head.projections.0.weight': (108, 40)}  # 3 channels x 9 bins x 2 x 2 cells of 3 px
    assert {k: tuple(state[k].shape) for k in shapes} == shapes and 'blocks.2.norm1.weight' not in state
    imgs, mask = torch.randn(3, 3, 24, 24), torch.zeros(3, 16)
    mask[:, [0, 1, 4, 5, 9, 14]] = 1
    loss, pred, target = model(imgs, mask)
    assert pred.shape == target.shape == (3, 16, 108) and loss.shape == () and torch.isfinite(loss)
    assert torch.equal(target, maskfeat.hog_target(imgs, 6, 3))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.features(imgs).shape == (3, 40)
    for kwargs, message in [(dict(num_heads=6), 'width 40 is not divisible by its 6 heads'),
                            (dict(hog_cell_size=2), 'hog_cell_size 2 must be half the patch size 6'),
                            (dict(img_size=26), 'image side 26 is not divisible by the patch size 6')]:
        with pytest.raises(ValueError, match=message):
            maskfeat.MaskFeat(**{**sizes, **kwargs})


# a 4 x 4 grid: round(16 * 0.97) = 16 masked, round(16 * 0.03) = 0 (a floor, as MAE's count, would accept both)
@pytest.mark.parametrize('ratio, kept', [('0.97', 0), ('0.03', 16)])
def test_a_mask_ratio_that_masks_everything_or_nothing_is_refused_at_start_up(tmp_path, ratio, kept):
    out = tmp_path / 'run'
    result = run_script('maskfeat.py', TINY + ['--output_dir', str(out), '--hog_cell_size', '2', '--mask_ratio', ratio],
                        check=False)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f'--mask_ratio {ratio} keeps {kept} of the 16 cells' in lines[0], result.stderr
    assert not out.exists()  # refused before any work: no output folder


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    result = run_script('maskfeat.py', TINY + ['--output_dir', out, '--hog_cell_size', '2', '--finetune_epochs', '1'])
    check_run_folder(out, 'hog.png')
    assert 'linear probe top-1' in result.stdout


def test_torchrun_two_processes_equal_one_with_the_same_effective_batch(tmp_path):
    """A block mask masks num_mask patches or fewer, so two processes' halves of a batch hold different counts of
    masked patches: the loss is divided by the count of the whole batch over all processes (difference 10), and two
    processes of 8 images give the weights of one process of 16 (each dividing by its own count, they did not)."""
    flags = TINY + ['--input_size', '32', '--hog_cell_size', '2', '--probe_epochs', '0', '--knn_k', '0', '--amp',
                    'none']  # an 8 x 8 grid: 7% of its masks hold 24 or 25 patches, not 26 (a 4 x 4 grid's, all 6)
    run_script('maskfeat.py', flags + ['--batch_size', '16', '--output_dir', str(tmp_path / 'one')])
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'maskfeat.py', *flags, '--batch_size', '8', '--output_dir', str(tmp_path / 'two')],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_weights(f'{tmp_path}/{run}/checkpoint-last.pth') for run in ('one', 'two'))
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), f'{key}: {(one[key] - two[key]).abs().max()}'
