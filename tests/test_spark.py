"""SparK: sparse ops vs dense references on visible sites, sparse <-> dense weights, masking, loss, optimizer, key
names, and one run of spark.py per backbone family as a user would start it."""
import hashlib, math, os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import spark
from conftest import TINY, read_log, run_script
from common import (LayerNorm2d, SparseConv2d, SparseLayerNorm, SparseMaxPool2d, sparse_twin,
                   visible_at, visible_sites)


def random_visible(batch=3, grid=4, keep=6, seed=0):
    """(B, 1, grid, grid) bool, True = visible, `keep` visible cells per sample."""
    noise = torch.rand(batch, grid * grid, generator=torch.Generator().manual_seed(seed))
    return (spark.random_masking(noise, keep) == 0).view(batch, 1, grid, grid)


def run(layer, x, visible):
    with visible_sites(layer, visible):
        return layer(x)


def test_visible_at_repeats_each_cell_over_its_sites():
    visible = random_visible()
    up = visible_at(visible, 16, 16)
    assert up.shape == (3, 1, 16, 16)
    assert torch.equal(up[:, :, ::4, ::4], visible) and torch.equal(up[:, :, 3::4, 3::4], visible)
    assert up.float().mean() == visible.float().mean()


@pytest.mark.parametrize('stride', [1, 2])
def test_sparse_conv_equals_dense_conv_summing_visible_inputs_only(stride):
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.randn(3, 5, 16, 16)  # masked sites hold garbage here; a sparse input has them at zero
    conv = SparseConv2d(5, 7, 3, stride, 1)
    out = run(conv, x * visible_at(visible, 16, 16), visible)
    # dense reference: each output sums the kernel over visible input sites only, and only visible outputs exist
    reference = F.conv2d(x * visible_at(visible, 16, 16), conv.weight, conv.bias, stride, 1)
    out_visible = visible_at(visible, *out.shape[2:]).expand_as(out)
    assert torch.allclose(out[out_visible], reference[out_visible], atol=1e-6)
    assert torch.all(out[~out_visible] == 0)  # exactly zero, bias included


def test_sparse_max_pool_takes_the_max_over_visible_neighbours():
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.rand(3, 4, 16, 16) + 0.1  # positive, as after a ReLU (where SparK pools)
    out = run(SparseMaxPool2d(3, 2, 1), x * visible_at(visible, 16, 16), visible)
    reference = F.max_pool2d(x.masked_fill(~visible_at(visible, 16, 16), -math.inf), 3, 2, 1)
    out_visible = visible_at(visible, 8, 8).expand_as(out)
    assert torch.equal(out[out_visible], reference[out_visible]) and torch.all(out[~out_visible] == 0)


def test_sparse_batchnorm_statistics_come_from_visible_sites_only():
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.randn(3, 6, 8, 8) * 3 + 2
    sites = visible_at(visible, 8, 8)[:, 0]  # (B, H, W)
    bn = sparse_twin(nn.BatchNorm2d(6))
    nn.init.uniform_(bn.weight), nn.init.uniform_(bn.bias)
    out = run(bn, x, visible)
    vectors = x.permute(0, 2, 3, 1)[sites]  # (N, C): the visible sites' features
    mean, var = vectors.mean(0), vectors.var(0, unbiased=False)
    expected = (vectors - mean) / (var + bn.eps).sqrt() * bn.weight + bn.bias
    assert torch.allclose(out.permute(0, 2, 3, 1)[sites], expected, atol=1e-5)
    assert torch.all(out.permute(0, 2, 3, 1)[~sites] == 0)
    # running statistics: momentum 0.1 towards the visible sites' mean and unbiased variance
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * vectors.var(0, unbiased=True), atol=1e-5)
    bn.eval()  # evaluation normalises visible sites with the running statistics
    out = run(bn, x, visible)
    expected = (vectors - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias
    assert torch.allclose(out.permute(0, 2, 3, 1)[sites], expected, atol=1e-5)


@pytest.mark.parametrize('channels_first', [True, False])
def test_sparse_layernorm_normalises_visible_sites_and_zeroes_the_rest(channels_first):
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.randn(3, 6, 8, 8) * 3 + 2  # (B, C, H, W)
    norm = sparse_twin(LayerNorm2d(6) if channels_first else nn.LayerNorm(6, eps=1e-6))
    assert isinstance(norm, common.SparseLayerNorm2d if channels_first else SparseLayerNorm)
    assert norm.channels_first == channels_first
    nn.init.uniform_(norm.weight), nn.init.uniform_(norm.bias)
    out = run(norm, x if channels_first else x.permute(0, 2, 3, 1), visible)
    out = out.permute(0, 2, 3, 1) if channels_first else out  # (B, H, W, C)
    sites = visible_at(visible, 8, 8)[:, 0]
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6)
    assert torch.allclose(out[sites], expected[sites], atol=1e-5) and torch.all(out[~sites] == 0)


@pytest.mark.parametrize('model', ['resnet_mini_ds8', 'convnext_atto_ds8'])
def test_masked_sites_stay_exactly_zero_through_every_layer(model):
    torch.manual_seed(0)
    net = sparse_twin(spark.build_backbone(model))
    for block in (m for m in net.modules() if isinstance(m, (spark.Bottleneck, spark.ConvNeXtBlock))):
        nn.init.normal_(block.bn3.weight if model.startswith('resnet') else block.gamma)  # not the zero / 1e-6 init
    visible, seen = random_visible(), []

    def check(module, inputs, output):
        if torch.is_tensor(output) and output.dim() == 4:  # ConvNeXt block: norm, Linears, GELU see (B, H, W, C)
            sparse_last = isinstance(module, common.Sparse) and not module.channels_first
            channels_last = isinstance(module, nn.GELU) or sparse_last
            output = output.permute(0, 3, 1, 2) if channels_last else output
            seen.append(bool(torch.all(output[~visible_at(visible, *output.shape[2:]).expand_as(output)] == 0)))
    for m in net.modules():
        m.register_forward_hook(check)
    x = torch.randn(3, 3, 32, 32) * visible_at(visible, 32, 32)
    with visible_sites(net, visible):
        net(x)
    assert len(seen) > 20 and all(seen)


@pytest.mark.parametrize('model', ['resnet_mini_ds8', 'convnext_atto_ds8'])
def test_sparse_twin_keeps_names_and_loads_strictly_both_ways(model):
    torch.manual_seed(0)
    dense = spark.build_backbone(model)
    twin = sparse_twin(dense)
    assert any(isinstance(m, SparseConv2d) for m in twin.modules())
    assert not any(isinstance(m, common.Sparse) for m in dense.modules())  # the dense network is left as it was
    torch.manual_seed(1)
    other = spark.build_backbone(model)
    other.load_state_dict(twin.state_dict(), strict=True)  # sparse -> dense
    twin.load_state_dict(spark.build_backbone(model).state_dict(), strict=True)  # dense -> sparse
    # with nothing masked the twin computes what the dense network computes (train and eval mode)
    x, everything = torch.randn(4, 3, 32, 32), torch.ones(4, 1, 4, 4, dtype=torch.bool)
    twin.load_state_dict(dense.state_dict())
    for train in (True, False):
        dense.train(train), twin.train(train)
        with visible_sites(twin, everything):
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(dense(x), twin(x)))


def keys_and_shapes_digest(model):
    return hashlib.sha256(repr(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())).encode()).hexdigest()


def test_state_dict_equals_the_official_sparks():
    """Digests of the official SparK's (key, shape) list at 224 px, deprecated buffers imn_m, imn_s, norm_black left
    out, computed from keyu-tian/SparK pretrain/ with timm 0.3.2."""
    torch.manual_seed(0)
    resnet = spark.SparK(spark.build_backbone('resnet50'), 224)
    assert len(resnet.state_dict()) == 422 and keys_and_shapes_digest(resnet).startswith('db40625ba76b174e')
    assert resnet.state_dict()['densify_projs.0.weight'].shape == (768, 2048, 1, 1)
    assert len(resnet.sparse_encoder.sp_cnn.state_dict()) == 318  # = timm resnet50(num_classes=0)
    convnext = spark.SparK(spark.build_backbone('convnext_small'), 224)
    assert len(convnext.state_dict()) == 430 and keys_and_shapes_digest(convnext).startswith('d63ecfe1eca70381')
    assert isinstance(convnext.densify_projs[0], nn.Identity)  # 768 = the decoder's width


def test_masking_keeps_round_of_forty_percent_visible():
    for cells, keep in ((49, 20), (16, 6)):  # 224 px / 32; 32 px / 8
        model = spark.SparK(spark.build_backbone('resnet_mini_ds8'), 8 * math.isqrt(cells), 0.6, 16)
        assert model.keep == keep and model.num_patches == cells
        mask = spark.random_masking(torch.rand(5, cells), keep)
        assert torch.equal(mask.sum(1), torch.full((5,), float(cells - keep)))
        noise = torch.rand(5, cells)
        assert torch.equal(spark.random_masking(noise, keep), spark.random_masking(noise, keep))


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone('resnet_mini_ds8'), 32, 0.6, 16)
    imgs = torch.randn(2, 3, 32, 32)
    mask = spark.random_masking(torch.rand(2, 16), model.keep)
    loss, rec = model(imgs, mask)
    assert torch.equal(model.forward_loss(imgs, rec, mask), loss)
    pixel_mask = spark.unpatchify(mask[..., None].expand(-1, -1, 8 * 8 * 3), 8, 4, 4)  # (B, 3, H, W), 1 = masked
    assert torch.equal(model.forward_loss(imgs, rec + 5.0 * (1 - pixel_mask), mask), loss)
    assert not torch.equal(model.forward_loss(imgs, rec + 5.0 * pixel_mask, mask), loss)
    target = spark.pixel_target(imgs * 3 + 1, 8)  # per-patch normalised, unbiased variance
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-4)


def test_lamb_step_by_hand():
    w, b = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([1.0]))
    optimizer = spark.LAMB([{'params': [b], 'weight_decay': 0.0}, {'params': [w], 'weight_decay': 0.1}], 0.01,
                           (0.9, 0.95))
    w.grad, b.grad = torch.tensor([30.0, 0.0]), torch.tensor([40.0])  # global norm 50: clipped to 5
    optimizer.step()
    g_w, g_b = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    adam = lambda g: (0.1 * g / 0.1) / ((0.05 * g * g / 0.05).sqrt() + 1e-6)  # bias-corrected first step
    update = adam(g_w) + 0.1 * torch.tensor([3.0, 4.0])
    expected_w = torch.tensor([3.0, 4.0]) - 0.01 * update * 5.0 / update.norm()  # trust ratio ||w|| / ||update||
    assert torch.allclose(w.detach(), expected_w, atol=1e-6)
    assert torch.allclose(b.detach(), 1.0 - 0.01 * adam(g_b), atol=1e-6)  # no decay: no trust ratio


def test_lr_and_weight_decay_schedule_endpoints():
    args = SimpleNamespace(lr=1.0, min_lr=None, warmup_epochs=2, epochs=10, weight_decay=0.04, weight_decay_end=0.2,
                           iters_per_epoch=100)
    optimizer = SimpleNamespace(param_groups=[{}, {}])
    at = lambda epoch: (spark.lr_wd_annealing(optimizer, epoch, args), optimizer.param_groups[1]['weight_decay'])
    assert at(0) == pytest.approx((0.005, 0.04)) and at(2)[0] == pytest.approx(1.0)
    assert at(9.99) == pytest.approx((0.001, 0.2))  # the last iteration
    assert optimizer.param_groups[0]['weight_decay'] == 0.0 and at(9.99 / 2)[1] == pytest.approx(0.12)  # halfway


def test_finetune_schedule_endpoints_keep_layer_scales_and_weight_decay():
    """downstream_imagenet's lr_wd_annealing: 0.005x at the start, the peak after warmup, 0.001x at the end, times
    each group's layer scale; the weight decay is left alone."""
    args = SimpleNamespace(lr=1.0, warmup_epochs=2, epochs=10)
    optimizer = SimpleNamespace(param_groups=[{'lr_scale': 0.5, 'weight_decay': 0.0}, {'lr_scale': 1.0,
                                                                                       'weight_decay': 0.02}])
    assert spark.finetune_annealing(optimizer, 0, args) == pytest.approx(0.005)
    assert spark.finetune_annealing(optimizer, 2, args) == pytest.approx(1.0)
    assert spark.finetune_annealing(optimizer, 6, args) == pytest.approx(0.001 + 0.999 * 0.5)
    assert spark.finetune_annealing(optimizer, 10, args) == pytest.approx(0.001)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.0005, 0.001])
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.0, 0.02]


@pytest.mark.parametrize('model,size', [('resnet_mini_ds8', '32'), ('convnext_atto_ds8', '16')])
def test_end_to_end_run(tmp_path, model, size):
    out = str(tmp_path / 'run')
    result = run_script('spark.py', TINY + ['--model', model, '--input_size', size, '--decoder_width', '32',
                                            '--output_dir', out, '--finetune_epochs', '1'])  # ResNet: LAMB + BCE
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and log[0]['images_per_s'] > 0
    evaluation, finetuned = next(line for line in log if line.get('evaluation')), log[-1]  # fine-tuning logs last
    assert finetuned['finetune_epoch'] == 0 and 0 <= finetuned['finetune_top1'] <= 100
    assert os.path.exists(f'{out}/finetuned.pth')
    assert 'trained_knn_top1' in evaluation and 'random_init_probe_top1' in evaluation
    assert os.path.exists(f'{out}/checkpoint-last.pth') and os.path.getsize(f'{out}/reconstruction.png') > 1000
    encoder = torch.load(f'{out}/{model}_1kpretrained_timm_style.pth', weights_only=True)
    spark.build_backbone(model).load_state_dict(encoder, strict=True)  # the dense network takes it as it is
    assert 'linear probe top-1' in result.stdout


def test_rejects_an_input_size_off_the_mask_grid():
    result = run_script('spark.py', TINY + ['--model', 'resnet50', '--input_size', '48'], check=False)
    assert result.returncode != 0 and 'downsample ratio 32' in result.stderr
