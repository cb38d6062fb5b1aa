"""SparK: sparse ops vs dense references on visible sites, sparse <-> dense weights, masking, loss, optimizer, key
names, samplers, schedules, and one run of spark.py per backbone family as a user would start it."""
import collections, hashlib, math, os, pickle, subprocess, sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import common
import spark
from conftest import ROOT, TINY, Stop, read_log, run_script
from common import (LayerNorm2d, SparseBatchNorm2d, SparseConv2d, SparseLayerNorm, SparseMaxPool2d, sparse_twin,
                    visible_at, visible_sites)


def random_visible(batch=3, grid=4, keep=6, seed=0):
    """(B, 1, grid, grid) bool, True = visible, `keep` visible cells per sample."""
    noise = torch.rand(batch, grid * grid, generator=torch.Generator().manual_seed(seed))
    return (spark.mask_from_noise(noise, keep) == 0).view(batch, 1, grid, grid)


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


def test_sparse_avg_pool_averages_with_masked_zeros_and_keeps_masked_sites_zero():  # official SparseAvgPooling
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.randn(3, 4, 16, 16) * visible_at(visible, 16, 16)
    out = run(sparse_twin(nn.AvgPool2d(3, 1, 1)), x, visible)  # (was left dense: masked sites by a visible cell
    out_visible = visible_at(visible, 16, 16).expand_as(out)   # took their neighbours' mean)
    assert torch.equal(out[out_visible], F.avg_pool2d(x, 3, 1, 1)[out_visible]) and torch.all(out[~out_visible] == 0)


@pytest.mark.parametrize('mixer', [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                   nn.AdaptiveMaxPool2d(2), nn.ConvTranspose2d(4, 4, 2, 2), nn.LPPool2d(2, 3, 1)])
def test_a_layer_that_would_carry_masked_sites_into_visible_ones_is_refused_when_it_runs(mixer):
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), mixer)
    twin = sparse_twin(net)  # (was taken, and ran: masked sites leaked into the visible ones)
    with pytest.raises(ValueError, match=f'^{type(mixer).__name__} has no sparse twin'):
        run(twin, torch.randn(2, 4, 8, 8), random_visible(2))
    assert run(twin[:1], torch.randn(2, 4, 8, 8), random_visible(2)).shape == (2, 4, 8, 8)  # unused, it may stay
    assert twin.state_dict().keys() == net.state_dict().keys()
    assert type(pickle.loads(pickle.dumps(twin))[1]) is type(twin[1])  # (spawn, torch.save(model): its class is named)


def test_sparse_batchnorm_statistics_come_from_visible_sites_only():
    torch.manual_seed(0)
    visible = random_visible()
    x = torch.randn(3, 6, 8, 8) * 3 + 2
    sites = visible_at(visible, 8, 8)[:, 0]  # (B, H, W)
    bn = sparse_twin(nn.BatchNorm2d(6))
    assert type(bn) is SparseBatchNorm2d and isinstance(bn, nn.BatchNorm2d)  # a BatchNorm2d: same state, same names
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


def batchnorm1d_like(bn):
    """nn.BatchNorm1d in float64 with bn's settings and state: the official SparseBatchNorm2d, BN on the gathered
    (N, C) vectors of the visible sites. float64, so that the reference adds no rounding of its own."""
    reference = nn.BatchNorm1d(bn.num_features, bn.eps, bn.momentum).double()
    reference.load_state_dict(bn.state_dict())  # the same keys: weight, bias, running_mean / var, num_batches_tracked
    return reference


# x * 3 + 2 as a nonzero-mean input; x * 3 + 50 because float32 hides E[x^2] - E[x]^2 cancellation at a mean of 2
# (measured: 5e-7 off either way at 2; at 50 the two-pass sums are 2.5e-6 off, E[x^2] - E[x]^2 3e-5)
@pytest.mark.parametrize('offset', [2.0, 50.0])
def test_sparse_batchnorm_equals_batchnorm1d_on_the_visible_vectors(offset):
    torch.manual_seed(0)
    bn = sparse_twin(nn.BatchNorm2d(6))
    nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -1, 1)
    reference = batchnorm1d_like(bn)
    for step in range(3):  # train mode: output, gradients and the running statistics' updates
        visible = random_visible(4, 4, 6, seed=step)
        sites = visible_at(visible, 8, 8)[:, 0]  # (B, H, W)
        x = (torch.randn(4, 6, 8, 8) * 3 + offset).requires_grad_()
        x_in = x.to(memory_format=torch.channels_last) if step == 1 else x  # the layout spark.main uses
        out = run(bn, x_in, visible)
        x64 = x.detach().double().requires_grad_()
        expected = reference(x64.permute(0, 2, 3, 1)[sites])  # (N, C)
        assert torch.allclose(out.permute(0, 2, 3, 1)[sites].double(), expected, atol=1e-5)
        assert torch.all(out.permute(0, 2, 3, 1)[~sites] == 0)
        upstream = torch.randn(4, 6, 8, 8)
        (out * upstream).sum().backward()
        (expected * upstream.double().permute(0, 2, 3, 1)[sites]).sum().backward()
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)  # masked sites: no gradient
        for ours, theirs in ((bn.weight, reference.weight), (bn.bias, reference.bias)):
            assert torch.allclose(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)
            ours.grad, theirs.grad = None, None
        assert torch.allclose(bn.running_mean.double(), reference.running_mean, atol=1e-5)
        assert torch.allclose(bn.running_var.double(), reference.running_var, atol=1e-5)
    assert bn.num_batches_tracked == reference.num_batches_tracked == 3
    bn.eval(), reference.eval()  # eval mode: the running statistics, on visible sites only, left as they are
    visible, before = random_visible(4, 4, 6, seed=9), [t.clone() for t in bn.buffers()]
    sites, x = visible_at(visible, 8, 8)[:, 0], torch.randn(4, 6, 8, 8) * 3 + offset
    with torch.no_grad():
        out, expected = run(bn, x, visible), reference(x.double().permute(0, 2, 3, 1)[sites])
    assert torch.allclose(out.permute(0, 2, 3, 1)[sites].double(), expected, atol=1e-5)
    assert torch.all(out.permute(0, 2, 3, 1)[~sites] == 0)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))


def test_sparse_batchnorm_under_bf16_autocast():
    """A bf16 input (a conv's output under autocast): the statistics are BatchNorm1d's on the visible vectors within
    bf16's rounding (the sums run in bf16 with fp32 accumulation, centred on a rough mean first: a plain bf16 sum of
    values near 50 would be off by whole units), the output bf16 within bf16's rounding of values of order 1."""
    torch.manual_seed(0)
    bn = sparse_twin(nn.BatchNorm2d(6))
    nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -1, 1)
    reference = batchnorm1d_like(bn)
    for train in (True, True, False):
        bn.train(train), reference.train(train)
        visible = random_visible(4, 4, 6, seed=int(train))
        sites = visible_at(visible, 8, 8)[:, 0]
        x = (torch.randn(4, 6, 8, 8) * 3 + 50).bfloat16().to(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = run(bn, x, visible)
        x64 = x.detach().double().requires_grad_()
        expected = reference(x64.permute(0, 2, 3, 1)[sites])
        assert out.dtype == torch.bfloat16 and torch.all(out.permute(0, 2, 3, 1)[~sites] == 0)
        torch.testing.assert_close(out.permute(0, 2, 3, 1)[sites], expected.bfloat16(), atol=1e-3, rtol=1.6e-2)
        upstream = torch.randn(4, 6, 8, 8)  # the gradient reaching out is bf16 (rounded by 2^-9 relative): the
        # parameters' sums of about 100 rounded terms differ by about 10 x 2^-9 x their size of 1 (0.02)
        (out.float() * upstream).sum().backward()
        (expected * upstream.double().permute(0, 2, 3, 1)[sites]).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-3, rtol=1.6e-2)
        for ours, theirs in ((bn.weight, reference.weight), (bn.bias, reference.bias)):
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=5e-2, rtol=1.6e-2)
            ours.grad, theirs.grad = None, None
        assert torch.allclose(bn.running_mean.double(), reference.running_mean, atol=1e-5)
        assert torch.allclose(bn.running_var.double(), reference.running_var, rtol=4e-3)  # 2 bf16 roundings



def test_sparse_batchnorm_in_fp16_does_not_overflow():
    """fp16 inputs (--amp fp16) near 50 on 64 x 64 maps: their per-image sums (about 10^5) and squares would pass
    fp16's 65504; the statistics are taken in fp32, so output and gradients are those of the fp32 computation within
    fp16's rounding."""
    torch.manual_seed(0)
    ours, reference = sparse_twin(nn.BatchNorm2d(6)), sparse_twin(nn.BatchNorm2d(6))
    visible = torch.rand(4, 1, 8, 8) > 0.4
    x16 = (torch.randn(4, 6, 64, 64) * 3 + 50).half().requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    out16, out32 = run(ours, x16, visible), run(reference, x32, visible)
    upstream = torch.randn(4, 6, 64, 64)
    (out16.float() * upstream).sum().backward()
    (out32 * upstream).sum().backward()
    assert out16.dtype == x16.grad.dtype == torch.float16
    torch.testing.assert_close(out16.float(), out32, atol=4e-3, rtol=2e-3)  # fp16: 2^-11 relative, values up to ~4
    torch.testing.assert_close(x16.grad.float(), x32.grad, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-3, atol=0.1)  # sums of ~4e4 terms

class CountHostSyncs(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device: boolean-mask indexing (x[mask], x[mask] = y),
    nonzero, masked_select, and reading a value (.item(), bool(tensor))."""
    SYNCING = {'aten.nonzero', 'aten.nonzero_static', 'aten.masked_select', 'aten._local_scalar_dense',
               'aten.is_nonzero', 'aten.item', 'aten.unique', 'aten._unique2', 'aten.unique_consecutive'}
    INDEXING = {'aten.index', 'aten.index_put', 'aten.index_put_', 'aten._index_put_impl_', 'aten._unsafe_index'}

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        masks = [i for i in (args[1] if name in self.INDEXING and len(args) > 1 else ()) if torch.is_tensor(i)
                 and i.dtype in (torch.bool, torch.uint8)]
        if name in self.SYNCING or masks or (name == 'aten.repeat_interleave' and not kwargs.get('output_size')):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('model,size', [('resnet_mini_ds8', 32), ('convnext_atto_ds8', 16)])
def test_sparse_forward_and_backward_never_wait_for_the_device(model, size):
    """No boolean indexing, nonzero or value reads in SparK's training step (forward and backward): on a GPU such an
    op stalls the host every layer, and torch.compile breaks the graph there."""
    torch.manual_seed(0)
    spark_model = spark.SparK(spark.build_backbone(model, 0.1), size, 0.6, 16)  # drop path on: its draw too
    imgs = torch.randn(2, 3, size, size)
    mask = spark.mask_from_noise(torch.rand(2, spark_model.num_patches), spark_model.keep)
    with CountHostSyncs() as counter:
        loss, _ = spark_model(imgs, mask)
        loss.backward()
    assert not counter.calls, counter.calls
    assert all(p.grad is not None for n, p in spark_model.named_parameters() if 'sp_cnn' in n)
    with CountHostSyncs() as control:  # the counter does see what the old code did
        x = torch.randn(4, 3)
        x[x[:, 0] > 0].sum(), x.masked_select(x > 0), x.sum().item()
    assert set(control.calls) >= {'aten.index', 'aten.masked_select', 'aten._local_scalar_dense'}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (the CPU test above counts the ops)')
def test_sparse_training_step_runs_without_host_sync_on_cuda():
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone('resnet_mini_ds8', 0.1), 32, 0.6, 16).cuda()
    imgs = torch.randn(4, 3, 32, 32, device='cuda')
    mask = spark.mask_from_noise(torch.rand(4, model.num_patches, device='cuda'), model.keep)
    model(imgs, mask)[0].backward()  # warm-up: lazy initialisations outside the checked step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        loss, _ = model(imgs, mask)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize('layer', [SparseConv2d(4, 4, 3, 1, 1), SparseMaxPool2d(3, 1, 1), sparse_twin(LayerNorm2d(4)),
                                   sparse_twin(nn.BatchNorm2d(4)), sparse_twin(nn.BatchNorm2d(4)).eval()])
def test_a_sparse_layer_outside_visible_sites_refuses_to_run(layer):
    with pytest.raises(RuntimeError, match='visible_sites'):
        layer(torch.randn(2, 4, 8, 8))
    assert run(layer, torch.randn(2, 4, 8, 8), random_visible(2)).shape == (2, 4, 8, 8)
    with pytest.raises(ZeroDivisionError), visible_sites(layer, random_visible(2)):  # the mask is gone afterwards,
        1 / 0  # even when the block raised
    with pytest.raises(RuntimeError, match='visible_sites'):
        layer(torch.randn(2, 4, 8, 8))


def test_a_mask_grid_that_does_not_divide_the_map_is_an_error():
    with pytest.raises(ValueError, match='mask grid'):
        run(SparseConv2d(4, 4, 3, 1, 1), torch.randn(2, 4, 6, 6), random_visible(2))  # 6 px over 4 cells
    with pytest.raises(ValueError, match='mask grid'):
        run(sparse_twin(nn.BatchNorm2d(4)), torch.randn(2, 4, 8, 10), random_visible(2))
    with pytest.raises(ValueError, match='mask grid'):
        visible_at(random_visible(2), 10, 8)


@pytest.mark.parametrize('model', ['resnet_mini_ds8', 'convnext_atto_ds8'])
def test_sparse_twin_of_a_classifier_runs_its_head_densely(model):
    """With num_classes the network ends in pool -> (norm ->) Linear on (B, C): inside visible_sites those 2-D
    inputs pass through the twins densely (no mask applies to them)."""
    torch.manual_seed(0)
    dense = spark.build_backbone(model, num_classes=5)
    twin = sparse_twin(dense)
    assert isinstance(twin.fc if model.startswith('resnet') else twin.head, common.Sparse)
    last = twin.layer4 if model.startswith('resnet') else twin.stages[3]
    stage_out = []
    last.register_forward_hook(lambda module, inputs, output: stage_out.append(output))
    visible = random_visible(3)
    with visible_sites(twin, visible):
        logits = twin(torch.randn(3, 3, 32, 32) * visible_at(visible, 32, 32))
    pooled = stage_out[0].mean((2, 3))  # (B, C)
    head = (lambda f: twin.fc(f)) if model.startswith('resnet') else (lambda f: twin.head(twin.norm(f)))
    expected = F.linear(pooled if model.startswith('resnet') else F.layer_norm(
        pooled, pooled.shape[1:], twin.norm.weight, twin.norm.bias, twin.norm.eps), *(
        (twin.fc.weight, twin.fc.bias) if model.startswith('resnet') else (twin.head.weight, twin.head.bias)))
    assert logits.shape == (3, 5) and torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(head(pooled), expected, atol=1e-5)
    x, everything = torch.randn(3, 3, 32, 32), torch.ones(3, 1, 4, 4, dtype=torch.bool)
    twin.load_state_dict(dense.state_dict())  # the masked step above moved the twin's running statistics
    dense.eval(), twin.eval()
    with visible_sites(twin, everything):  # nothing masked: the twin's logits are the dense network's
        assert torch.allclose(twin(x), dense(x), atol=1e-4)


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
        mask = spark.mask_from_noise(torch.rand(5, cells), keep)
        assert torch.equal(mask.sum(1), torch.full((5,), float(cells - keep)))
        noise = torch.rand(5, cells)
        assert torch.equal(spark.mask_from_noise(noise, keep), spark.mask_from_noise(noise, keep))
        drawn = spark.mask_noise(cells, np.random.default_rng(0))  # the loader's per-sample draw
        assert drawn.shape == (cells,) and drawn.dtype == np.float32 and 0 <= drawn.min() and drawn.max() < 1
        assert np.array_equal(drawn, spark.mask_noise(cells, np.random.default_rng(0)))
        visible = torch.from_numpy(drawn)[None].argsort(1)[0, :keep]  # the `keep` smallest draws stay visible
        assert torch.equal(spark.mask_from_noise(torch.from_numpy(drawn)[None], keep)[0, visible], torch.zeros(keep))


def test_loss_ignores_visible_patches():
    """forward's loss is the per-patch MSE against pixel_target averaged over the masked patches, computed by hand;
    the visible patches' predictions do not move it."""
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone('resnet_mini_ds8'), 32, 0.6, 16)
    imgs = torch.randn(2, 3, 32, 32)
    mask = spark.mask_from_noise(torch.rand(2, 16), model.keep)
    loss, rec = model(imgs, mask)
    per_patch = ((spark.patchify(rec, 8) - spark.pixel_target(imgs, 8)) ** 2).mean(-1)  # (B, L)
    assert torch.allclose(loss, per_patch[mask == 1].mean(), rtol=1e-6, atol=0)  # 20 masked patches of 32
    pixel_mask = spark.unpatchify(mask[..., None].expand(-1, -1, 8 * 8 * 3), 8, 4, 4)  # (B, 3, H, W), 1 = masked
    assert torch.equal(model.forward_loss(imgs, rec + 5.0 * (1 - pixel_mask), mask), loss)
    assert not torch.equal(model.forward_loss(imgs, rec + 5.0 * pixel_mask, mask), loss)
    target = spark.pixel_target(imgs * 3 + 1, 8)  # per-patch normalised, unbiased variance
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-4)


def official_forward(model, imgs, mask):
    """The official SparK.forward (pretrain/spark.py) written out with plain ops on the model's weights: zero the
    masked 8-px cells, the sparse encoder, then per scale (smallest first) a norm whose statistics come from the active
    sites only, the mask token in the inactive ones, the projection, the active map upsampled x2 for the next scale;
    the decoder's UNet blocks (ConvTranspose2d, conv, BN, ReLU6, conv, BN) adding one densified map before each block
    while there is one, the 1x1 conv to RGB; the loss on per-patch normalised pixels over the masked patches only."""
    B, p, h = imgs.shape[0], model.patch_size, model.grid_size
    active = (mask == 0).view(B, 1, h, h)  # official: True = visible
    inp = imgs * active.repeat_interleave(p, 2).repeat_interleave(p, 3)
    with visible_sites(model.sparse_encoder.sp_cnn, active):
        features = model.sparse_encoder.sp_cnn(inp)[::-1][:len(model.mask_tokens)]
    cur_active, to_dec, channel = active, [], lambda t: t[:, None, None]  # (C,) -> (C, 1, 1)
    for i, feature in enumerate(features):
        norm = model.densify_norms[i]
        if isinstance(norm, nn.BatchNorm2d):  # BN1d on the active sites' vectors (train mode: their statistics)
            vectors = feature.permute(0, 2, 3, 1)[cur_active[:, 0]]  # (N, C)
            normed = (feature - channel(vectors.mean(0))) / channel(vectors.var(0, unbiased=False) + norm.eps).sqrt()
            normed = normed * channel(norm.weight) + channel(norm.bias)
        else:  # channels-first LayerNorm, per site
            normed = F.layer_norm(feature.permute(0, 2, 3, 1), feature.shape[1:2], norm.weight, norm.bias, norm.eps)
            normed = normed.permute(0, 3, 1, 2)
        filled = torch.where(cur_active, normed, model.mask_tokens[i].expand_as(feature))
        proj = model.densify_projs[i]
        to_dec.append(filled if isinstance(proj, nn.Identity) else F.conv2d(filled, proj.weight, proj.bias,
                                                                           padding=proj.kernel_size[0] // 2))
        cur_active = cur_active.repeat_interleave(2, 2).repeat_interleave(2, 3)
    batch_norm = lambda x, bn: F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    x = 0
    for i, block in enumerate(model.dense_decoder.dec):
        x = x + to_dec[i] if i < len(to_dec) else x
        x = F.conv_transpose2d(x, block.up_sample.weight, block.up_sample.bias, stride=2, padding=1)
        conv1, bn1, _, conv2, bn2 = block.conv
        x = batch_norm(F.conv2d(x, conv1.weight, padding=1), bn1).clamp(0, 6)
        x = batch_norm(F.conv2d(x, conv2.weight, padding=1), bn2)
    rec = F.conv2d(x, model.dense_decoder.proj.weight, model.dense_decoder.proj.bias)
    patches = lambda t: t.reshape(B, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * h, p * p * 3)
    target = patches(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((patches(rec) - target) ** 2).mean(-1)  # (B, L)
    non_active = (~active).flatten(1).float()
    return (loss * non_active).sum() / (non_active.sum() + 1e-8), rec


@pytest.mark.parametrize('model_name,size', [('resnet_mini_ds8', 32), ('convnext_atto_ds8', 16)])
def test_forward_equals_the_official_forward_written_out(model_name, size):
    """Guards the wiring of SparK.forward against official_forward: masked input zeroed, which cells are visible, the
    densify step (norm statistics from active sites, a mask token per scale, projection), the decoder's skips and
    ReLU6, the target and the loss's normalisation over masked patches."""
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone(model_name), size, 0.6, 16)
    for m in model.modules():  # away from the init, so that every part shows: the residual branches, large decoder
        if isinstance(m, spark.Bottleneck):  # gains (activations past ReLU6's cap), mask tokens of order 1
            nn.init.normal_(m.bn3.weight)
        elif isinstance(m, spark.ConvNeXtBlock):
            nn.init.normal_(m.gamma)
    for block in model.dense_decoder.dec:
        nn.init.uniform_(block.conv[1].weight, 5, 10)
    for token in model.mask_tokens:
        nn.init.normal_(token)
    imgs = torch.randn(3, 3, size, size)
    mask = spark.mask_from_noise(torch.rand(3, model.num_patches), model.keep)
    loss, rec = model(imgs, mask)
    with torch.no_grad():
        expected_loss, expected_rec = official_forward(model, imgs, mask)
    assert rec.shape == imgs.shape
    assert torch.allclose(rec, expected_rec, atol=1e-4, rtol=1e-4)
    assert torch.allclose(loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_initialisation_is_the_official_one():
    """timm's ResNet init (convs Kaiming-normal fan_out, zero_init_last_bn: every Bottleneck's bn3 gain 0), the
    official ConvNeXt's (trunc-normal 0.02 weights, zero biases, layer scale 1e-6), decoder.py's (Conv2d trunc-normal
    0.02 with zero bias, ConvTranspose2d Kaiming-normal fan_out) and the mask tokens' (trunc-normal std 0.02 cut at
    +-0.02, i.e. at one std: std 0.02 x 0.5396)."""
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone('resnet_mini_ds8'), 32, 0.6, 64)
    resnet = model.sparse_encoder.sp_cnn
    blocks = [m for m in resnet.modules() if isinstance(m, spark.Bottleneck)]
    assert blocks and all(torch.all(b.bn3.weight == 0) and torch.all(b.bn1.weight == 1) for b in blocks)
    conv = resnet.layer4[0].conv2  # 128 -> 128, 3x3: fan_out 1152
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
    tokens = torch.cat([t.flatten() for t in model.mask_tokens])  # 512 + 256 + 128 values
    assert tokens.abs().max() <= 0.02 and tokens.std().item() == pytest.approx(0.02 * 0.5396, rel=0.15)
    for block in model.dense_decoder.dec:
        up = block.up_sample  # (cin, cin, 4, 4): fan_out = cin x 16
        assert up.weight.std().item() == pytest.approx(math.sqrt(2 / (up.weight.shape[0] * 16)), rel=0.1)
        assert torch.all(up.bias == 0) and block.conv[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(type(norm) is SparseBatchNorm2d for norm in model.densify_norms)  # densify_norm 'bn' for ResNets
    sparse_convnext = spark.SparK(spark.build_backbone('convnext_atto_ds8'), 16, 0.6, 16)  # 'ln', eps 1e-6
    assert all(type(norm) is common.SparseLayerNorm2d and norm.eps == 1e-6 for norm in sparse_convnext.densify_norms)
    convnext = spark.build_backbone('convnext_atto_ds8')
    blocks = [m for m in convnext.modules() if isinstance(m, spark.ConvNeXtBlock)]
    assert blocks and all(torch.all(b.gamma == 1e-6) for b in blocks)
    linear = blocks[-1].pwconv1  # 320 -> 1280
    assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05) and torch.all(linear.bias == 0)


def test_pretraining_defaults_are_the_official_ones(tmp_path):
    """pretrain/utils/arg_util.py's defaults (base lr 2e-4, weight decay 0.04 -> 0.2, 40 warmup epochs of 1600, mask
    0.6, crop scale 0.67, decoder width 768, ResNet-50 at 224 px) and models/__init__.py's pretraining drop path."""
    os.makedirs(tmp_path / 'imagenet')
    args = spark.parse_args(['--data', 'imagenet', '--data_path', str(tmp_path / 'imagenet')])
    official = dict(model='resnet50', input_size=224, blr=2e-4, weight_decay=0.04, weight_decay_end=0.2,
                    warmup_epochs=40, epochs=1600, mask_ratio=0.6, crop_scale=0.67, decoder_width=768)
    assert {k: getattr(args, k) for k in official} == official
    drop_path = {'resnet50': 0.05, 'resnet101': 0.08, 'resnet152': 0.10, 'resnet200': 0.15,
                 'convnext_small': 0.2, 'convnext_base': 0.3, 'convnext_large': 0.4}
    assert {name: spark.MODELS[name][4] for name in drop_path} == drop_path
    assert args.drop_path is None  # so the model's own rate applies (build_backbone)


def test_sync_batchnorm_swaps_every_batchnorm_and_keeps_the_sparse_ones_sparse():
    """The official `sbn`: the encoder's and the densify step's sparse BNs become sparse SyncBNs (statistics still over
    visible sites only), the decoder's dense BNs nn.SyncBatchNorm; nothing else changes, nor any state-dict name."""
    torch.manual_seed(0)
    model = spark.SparK(spark.build_backbone('resnet_mini_ds8'), 32, 0.6, 16)
    before, keys = {name: type(m) for name, m in model.named_modules()}, list(model.state_dict())
    assert spark.sync_batchnorm(model) is model and list(model.state_dict()) == keys
    swapped = collections.Counter()
    for name, m in model.named_modules():
        expected = {SparseBatchNorm2d: common.SparseSyncBatchNorm2d, nn.BatchNorm2d: nn.SyncBatchNorm}.get(
            before[name], before[name])
        assert type(m) is expected, name
        swapped[name.split('.')[0], expected] += expected is not before[name]
    assert swapped['sparse_encoder', common.SparseSyncBatchNorm2d] > 0
    assert swapped['densify_norms', common.SparseSyncBatchNorm2d] == 3
    assert swapped['dense_decoder', nn.SyncBatchNorm] == 6  # 3 UNet blocks, 2 BNs each


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


def lamb_reference(weights, decays, grads, lrs, betas, eps, max_grad_norm, bias_correction, always_adapt):
    """timm's LAMB, written out in float64 over plain lists: per step, clip all gradients to one global norm, Adam
    moments, bias correction, weight decay added to the update, then the trust ratio ||w|| / ||update||."""
    (b1, b2), w = betas, [t.double().clone() for t in weights]
    m, v = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in step_grads))
        clip = max(norm / max_grad_norm, 1.0)
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
        for i, g in enumerate(step_grads):
            g = g.double() / clip
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = (m[i] / c1) / (torch.sqrt(v[i] / c2) + eps)
            if decays[i] or always_adapt:
                update = update + decays[i] * w[i]
                w_norm, u_norm = w[i].norm().item(), update.norm().item()
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            w[i] = w[i] - lr * update
    return w


@pytest.mark.parametrize('recipe', ['pretraining', 'finetuning'])
def test_lamb_three_steps_equal_the_reference_loop(recipe):
    """Pretraining: bias correction, global clip to 5, trust ratio on decayed tensors; fine-tuning (spark.main's
    partial): no bias correction, no clip, trust ratio on every tensor (a zero tensor keeps ratio 1)."""
    torch.manual_seed(0)
    shapes, decays = [(4, 3), (3,), (2, 2, 3), (5,)], [0.04, 0.0, 0.2, 0.0]
    weights = [torch.randn(s) for s in shapes]
    weights[3].zero_()  # a zero bias: ||w|| = 0
    settings = dict(betas=(0.9, 0.95), eps=1e-6, max_grad_norm=5.0, bias_correction=True, always_adapt=False) \
        if recipe == 'pretraining' else dict(betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1e7, bias_correction=False,
                                             always_adapt=True)
    params = [nn.Parameter(w.clone()) for w in weights]
    frozen = nn.Parameter(torch.randn(3))  # no gradient: left alone
    optimizer = spark.LAMB([{'params': [params[1], params[3], frozen], 'weight_decay': 0.0},
                            {'params': [params[0]], 'weight_decay': 0.04},
                            {'params': [params[2]], 'weight_decay': 0.2}], lr=0.01, **settings)
    grads = [[torch.randn(s) * (10 if step == 0 else 0.5) for s in shapes] for step in range(3)]  # step 0 clipped
    lrs = [0.01, 0.05, 0.02]
    frozen_before = frozen.detach().clone()
    for step_grads, lr in zip(grads, lrs):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.step()
    expected = lamb_reference(weights, decays, grads, lrs, **settings)
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach().double(), e, rtol=1e-5, atol=1e-6)
    assert torch.equal(frozen.detach(), frozen_before) and all(g['step'] == 3 for g in optimizer.param_groups)
    moved = [(p.detach() - w).norm() / max(w.norm(), 1e-12) for p, w in zip(params, weights)]
    assert all(m > 0 for m in moved)


def test_lr_and_weight_decay_schedule_endpoints():
    args = SimpleNamespace(lr=1.0, min_lr=None, warmup_epochs=2, epochs=10, weight_decay=0.04, weight_decay_end=0.2)
    optimizer = SimpleNamespace(param_groups=[{}, {}])
    at = lambda epoch, iters=100: (spark.lr_wd_annealing(optimizer, epoch, args, iters),
                                   optimizer.param_groups[1]['weight_decay'])
    assert at(0) == pytest.approx((0.005, 0.04)) and at(2)[0] == pytest.approx(1.0)
    assert at(9.99) == pytest.approx((0.001, 0.2))  # the last iteration: 10 - 1 / iters_per_epoch
    assert at(9.9, iters=10) == pytest.approx((0.001, 0.2)) and at(9.9)[0] > 0.001  # the end moves with iters
    assert optimizer.param_groups[0]['weight_decay'] == 0.0 and at(9.99 / 2)[1] == pytest.approx(0.12)  # halfway
    args.min_lr = 0.01
    assert at(9.99)[0] == pytest.approx(0.01)


def test_finetune_schedule_endpoints_keep_layer_scales_and_weight_decay():
    """downstream_imagenet's lr_wd_annealing: 0.005x at the start, the peak after warmup, 0.001x at the last
    iteration (epochs - 1 / iters_per_epoch), times each group's layer scale; the weight decay is left alone."""
    args = SimpleNamespace(lr=1.0, warmup_epochs=2, epochs=10, iters_per_epoch=100)
    optimizer = SimpleNamespace(param_groups=[{'lr_scale': 0.5, 'weight_decay': 0.0}, {'lr_scale': 1.0,
                                                                                       'weight_decay': 0.02}])
    assert spark.finetune_annealing(optimizer, 0, args) == pytest.approx(0.005)
    assert spark.finetune_annealing(optimizer, 1, args) == pytest.approx(0.005 + 0.995 * 0.5)
    assert spark.finetune_annealing(optimizer, 2, args) == pytest.approx(1.0)
    assert spark.finetune_annealing(optimizer, (2 + 9.99) / 2, args) == pytest.approx(0.001 + 0.999 * 0.5)
    assert spark.finetune_annealing(optimizer, 9.99, args) == pytest.approx(0.001)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.0005, 0.001])
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.0, 0.02]
    args.iters_per_epoch = 4
    assert spark.finetune_annealing(optimizer, 9.75, args) == pytest.approx(0.001)


def optimizer_step_lrs(monkeypatch, argv):
    """Run spark.main(argv) through its first training loop (pretraining, or with --eval_only the fine-tune), every
    epoch in the real common.train_one_epoch, then stop -> (each optimizer step's lr over the last group's lr_scale,
    the schedule's args, main's loader)."""
    lrs, seen, train = [], {}, common.train_one_epoch

    def recorded(model, loss_fn, loader, optimizer, epoch, schedule=None, on_step=None, **kwargs):
        group, args = optimizer.param_groups[-1], schedule.keywords['args']
        seen.update(args=args, loader=loader)
        stats = train(model, loss_fn, loader, optimizer, epoch, schedule=schedule, **kwargs,
                      on_step=lambda: (lrs.append(group['lr'] / group.get('lr_scale', 1.0)), on_step and on_step()))
        if epoch + 1 == args.epochs:
            raise Stop
        return stats

    monkeypatch.setattr(common, 'train_one_epoch', recorded)
    monkeypatch.setattr(common, 'evaluate', lambda *_, **__: None)  # --eval_only: straight on to the fine-tune
    with pytest.raises(Stop):
        spark.main(argv)
    return lrs, seen['args'], seen['loader']


@pytest.mark.parametrize('which', ['pretraining', 'finetuning'])
def test_schedules_reach_their_floor_at_the_last_optimizer_step_of_the_loop(tmp_path, monkeypatch, which):
    """spark.main's schedule (common.finetune's), through common.train_one_epoch (6 micro-batches, accum_iter 2: 3 steps
    an epoch; iters_per_epoch len(loader) // 2, not len(loader)): the last step's lr is the floor, the first 0.005x."""
    argv = TINY + ['--model', 'resnet_mini_ds8', '--input_size', '16', '--decoder_width', '32', '--shapes_size', '48',
                   '--accum_iter', '2', '--epochs', '2', '--warmup_epochs', '1', '--output_dir', str(tmp_path)]
    argv += ['--eval_only', '--finetune_epochs', '2', '--ft_warmup_epochs', '1'] if which == 'finetuning' else []
    lrs, args, loader = optimizer_step_lrs(monkeypatch, argv)
    assert len(loader) == 6 and args.accum_iter == 2 and args.epochs == 2
    assert len(lrs) == 6 and lrs[0] == pytest.approx(0.005 * args.lr) and lrs[-1] == pytest.approx(0.001 * args.lr)
    assert lrs[3] == pytest.approx(args.lr) and all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # warmup, then down
    if which == 'finetuning':  # its official name says pretrained (was: written for --eval_only's weights too)
        assert not os.path.exists(tmp_path / 'resnet_mini_ds8_1kpretrained_timm_style.pth')


@pytest.mark.parametrize('model,size', [('resnet_mini_ds8', '32'), ('convnext_atto_ds8', '16')])
def test_end_to_end_run(tmp_path, model, size):
    """ResNet: LAMB + BCE; ConvNeXt: AdamW, soft-target CE and repeated augmentation x3. Both fine-tune with the
    recipe's EMA of the network (0.9999) and log its top-1 next to the network's."""
    out = str(tmp_path / 'run')
    result = run_script('spark.py', TINY + ['--model', model, '--input_size', size, '--decoder_width', '32',
                                            '--output_dir', out, '--finetune_epochs', '1'])
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and log[0]['images_per_s'] > 0
    evaluation = next(line for line in log if line.get('evaluation'))
    assert not any('finetune_epoch' in line for line in log)  # fine-tuning logs in its own folder
    finetuned = read_log(f'{out}/finetune')
    assert len(finetuned) == 1 and finetuned[0]['finetune_epoch'] == 0
    n_val = max(int(TINY[TINY.index('--shapes_size') + 1]) // 5, 10)  # 12 validation images (common.build_datasets)
    for top1 in (finetuned[0]['finetune_top1'], finetuned[0]['finetune_ema_top1']):  # a percentage of whole images
        correct = top1 * n_val / 100
        assert correct == pytest.approx(round(correct), abs=1e-4) and 0 <= round(correct) <= n_val
    assert math.isfinite(finetuned[0]['train_loss'])
    saved = torch.load(f'{out}/finetune/finetuned.pth', weights_only=True)
    assert {'model', 'ema', 'name', 'args', 'top1'} <= set(saved)
    assert saved['top1'] == max(finetuned[0]['finetune_top1'], finetuned[0]['finetune_ema_top1'])
    assert saved['args']['ft_ema'] == 0.9999 and saved['args']['ft_repeated_aug'] == (3 if 'convnext' in model else 0)
    spark.build_backbone(model, num_classes=len(common.SHAPES)).load_state_dict(saved['ema'], strict=True)
    assert not os.path.exists(f'{out}/finetune/checkpoint-last.pth')  # removed once the fine-tune is done
    assert 'trained_knn_top1' in evaluation and 'random_init_probe_top1' in evaluation
    assert os.path.exists(f'{out}/checkpoint-last.pth') and os.path.getsize(f'{out}/reconstruction.png') > 1000
    encoder = torch.load(f'{out}/{model}_1kpretrained_timm_style.pth', weights_only=True)
    spark.build_backbone(model).load_state_dict(encoder, strict=True)  # the dense network takes it as it is
    assert 'linear probe top-1' in result.stdout and '(finetune_ema_top1)' in result.stdout


def test_rejects_an_input_size_off_the_mask_grid():
    result = run_script('spark.py', TINY + ['--model', 'resnet50', '--input_size', '48'], check=False)
    assert result.returncode != 0 and 'downsample ratio 32' in result.stderr


def test_spark_refuses_a_backbone_without_the_contract():
    plain_net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match='downsample_ratio.*feature_channels'):
        spark.SparK(plain_net, 32)
    plain_net.downsample_ratio = 8
    with pytest.raises(ValueError, match=r"missing: \['feature_channels'\]"):
        spark.SparK(plain_net, 32)
    with pytest.raises(ValueError, match='divides input_size 36'):
        spark.SparK(spark.build_backbone('resnet_mini_ds8'), 36)  # 36 px is no whole number of 8-px cells


def repeated_aug_stream(n, world_size, repeats, seed=0, epoch=0, truncate=True):
    """Each rank's indices from spark.RepeatedAugSampler; truncate=False: its whole share of the padded stream."""
    sampler_type = spark.RepeatedAugSampler if truncate else type(
        'Untruncated', (spark.RepeatedAugSampler,), {'__len__': lambda self: 10 ** 9})
    shares = []
    for rank in range(world_size):
        sampler = sampler_type(n, world_size, rank, repeats, seed)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    return shares


@pytest.mark.parametrize('n', [10, 11])
def test_repeated_aug_sampler_deals_each_image_repeats_times_to_different_ranks(n):
    repeats = 3
    shares = repeated_aug_stream(n, 2, repeats)
    assert [len(s) for s in shares] == [n // 2] * 2
    assert len(spark.RepeatedAugSampler(n, 2, 1, repeats)) == n // 2
    assert all(0 <= i < repeats * n for s in shares for i in s)
    # the padded stream, before each rank's share is cut: rank r holds entries r, r + 2, ...
    full = repeated_aug_stream(n, 2, repeats, truncate=False)
    stream = [i for pair in zip(*full) for i in pair]
    assert [len(s) for s in full] == [math.ceil(n * repeats / 2)] * 2 and full[0][:n // 2] == shares[0]
    assert full[1][:n // 2] == shares[1]
    body, padding = stream[:n * repeats], stream[n * repeats:]
    assert len(padding) == (-n * repeats) % 2 and padding == body[:len(padding)]  # padded with the first entries
    for image in range(n):  # copies k = 0 .. repeats - 1 of every image, each copy once: index image + k * n
        assert sorted(i for i in body if i % n == image) == [image + k * n for k in range(repeats)]
        ranks = {position % 2 for position, i in enumerate(stream) if i % n == image}
        assert ranks == {0, 1}  # its copies go to both ranks
    full3 = repeated_aug_stream(n, 3, 3, truncate=False)  # as many repeats as ranks: one copy per rank
    for image in range(n):
        held = [sum(1 for i in share[:n] if i % n == image) for share in full3]
        assert held == [1, 1, 1]


def test_repeated_aug_sampler_orders_depend_on_seed_and_epoch_only():
    first = repeated_aug_stream(20, 2, 3, seed=0, epoch=0)
    assert repeated_aug_stream(20, 2, 3, seed=0, epoch=0) == first  # the same seed and epoch: the same order
    assert repeated_aug_stream(20, 2, 3, seed=0, epoch=1) != first  # another epoch: another order
    assert repeated_aug_stream(20, 2, 3, seed=1, epoch=0) != first
    assert set(repeated_aug_stream(20, 2, 3, epoch=1, truncate=False)[0] +
               repeated_aug_stream(20, 2, 3, epoch=1, truncate=False)[1]) == set(range(60))


def test_repeated_aug_indices_are_the_same_image_with_other_draws():
    """ImageDataset's half of the contract: index i + k * n is image i % n with other random draws."""
    n = 5
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    dataset = common.ImageDataset(images, list(range(n)), [str(i) for i in range(n)])
    dataset = dataset.with_transform(lambda img, rng: (int(np.asarray(img)[0, 0, 0]), rng.random()))
    for i in spark.RepeatedAugSampler(n, 1, 0, 3):
        (pixel, draw), label = dataset[i]
        assert pixel == label == i % n
        assert i < n or draw != dataset[i % n][0][1]


@pytest.mark.parametrize('ratio', ['0.01', '0.97'])
def test_a_mask_ratio_that_masks_nothing_or_everything_is_refused(tmp_path, ratio):
    """4x4 grid (32 px / 8): 0.01 keeps round(16 * 0.99) = 16 cells (nothing masked), 0.97 keeps round(0.48) = 0."""
    argv = ['--model', 'resnet_mini_ds8', '--input_size', '32', '--mask_ratio', ratio, '--device', 'cpu']
    with pytest.raises(SystemExit) as refused:
        spark.parse_args(argv)
    message = str(refused.value.code)
    assert f'--mask_ratio {ratio}' in message and '16 cells' in message and '\n' not in message
    assert spark.parse_args(argv[:-3] + ['0.6'] + argv[-2:]).mask_ratio == 0.6  # the preset's 0.6 keeps 6
    if ratio == '0.01':  # as a user starts it: one line, non-zero exit, no traceback, nothing written
        out = tmp_path / 'run'
        result = run_script('spark.py', argv + ['--output_dir', str(out)], check=False)
        assert result.returncode != 0 and 'Traceback' not in result.stderr
        assert result.stderr.strip().count('\n') == 0 and '--mask_ratio 0.01' in result.stderr
        assert not out.exists()



SYNC_BATCHNORM = """
import os, sys, socket, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, sys.argv[1])
import common

def data():
    g = torch.Generator().manual_seed(0)
    x, visible = torch.randn(4, 3, 4, 4, generator=g) * 2 + 1, torch.rand(4, 1, 2, 2, generator=g) > 0.4
    visible[:, 0, 0, 0] = True
    return x, visible, torch.randn(4, 3, 4, 4, generator=g)

def worker(rank, port):  # half the batch through SparseSyncBatchNorm2d, this rank's share of the loss
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    (x, visible, up), bn = data(), common.sparse_twin(torch.nn.BatchNorm2d(3))
    bn.__class__, bn.process_group = common.SparseSyncBatchNorm2d, None
    half = x[2 * rank:2 * rank + 2].clone().requires_grad_()
    with common.visible_sites(bn, visible[2 * rank:2 * rank + 2]):
        out = bn(half)
    (out * up[2 * rank:2 * rank + 2]).sum().backward()
    outs, grads = [torch.zeros_like(out) for _ in range(2)], [torch.zeros_like(half) for _ in range(2)]
    dist.all_gather(outs, out.detach())
    dist.all_gather(grads, half.grad)
    if rank == 0:
        (x, visible, up), bn = data(), common.sparse_twin(torch.nn.BatchNorm2d(3))
        whole = x.clone().requires_grad_()
        with common.visible_sites(bn, visible):
            reference = bn(whole)
        (reference * up).sum().backward()
        print((torch.cat(outs) - reference).abs().max().item(), (torch.cat(grads) - whole.grad).abs().max().item())
    dist.destroy_process_group()

if __name__ == '__main__':
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=2)
"""


def test_sync_batchnorm_over_two_processes_equals_one_process_forward_and_backward(tmp_path):
    """The statistics are all-reduced and so are the backward's gradient sums (without the latter each rank would
    miss the other's terms of the shared mean and variance: input gradients were off by 0.39 on a scale of 2.2)."""
    script = tmp_path / 'sync_bn.py'
    script.write_text(SYNC_BATCHNORM)
    result = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    forward, backward = map(float, result.stdout.split())
    assert forward < 1e-5 and backward < 1e-5


EVERY_RANK = """import sys, torch
sys.path.insert(0, {root!r})
import common, spark
save_checkpoint = common.save_checkpoint
def save_every_rank(args, epoch, model, *rest, **extra):  # each process's own weights, not rank 0's alone
    torch.save(model.state_dict(), f'{{args.output_dir}}/rank{{args.rank}}.pth')
    return save_checkpoint(args, epoch, model, *rest, **extra)
common.save_checkpoint = save_every_rank
spark.main()
"""


def test_torchrun_two_processes_on_cpus_run_and_say_their_batchnorm_is_per_process(tmp_path):
    """PyTorch's SyncBatchNorm is GPU-only, so two CPU processes of batch 8 equal one of 16 only approximately
    (difference 4): the run says so in one line, and its loss stays close to the one-process run's. That closeness
    cannot tell a run whose processes never share their gradients (measured: the weights of such a run were as far
    from the one-process run's as a synchronised run's), so the two processes' own weights must be equal: DDP keeps
    the replicas identical (every parameter; the BN running statistics are each process's own)."""
    flags = TINY + ['--model', 'resnet_mini_ds8', '--input_size', '32', '--decoder_width', '32', '--amp', 'none',
                    '--probe_epochs', '0', '--knn_k', '0']
    run_script('spark.py', flags + ['--batch_size', '16', '--output_dir', str(tmp_path / 'one')])
    (wrapper := tmp_path / 'spark_every_rank.py').write_text(EVERY_RANK.format(root=ROOT))
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(wrapper), *flags, '--batch_size', '8', '--output_dir', str(tmp_path / 'two')],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("note: PyTorch's SyncBatchNorm needs GPUs") == 1, result.stdout
    assert 'effective batch 16' in result.stdout
    one, two = (read_log(tmp_path / name)[0]['train_loss'] for name in ('one', 'two'))
    assert abs(one - two) < 1e-2 * one
    rank0, rank1 = (torch.load(tmp_path / 'two' / f'rank{r}.pth', weights_only=True) for r in (0, 1))
    spark_model = spark.SparK(spark.build_backbone('resnet_mini_ds8', 0.0), 32, 0.6, 32)
    parameters = [name for name, _ in spark_model.named_parameters()]
    assert parameters and set(parameters) <= set(rank0)
    assert all(torch.equal(rank0[name], rank1[name]) for name in parameters), \
        [name for name in parameters if not torch.equal(rank0[name], rank1[name])][:5]
