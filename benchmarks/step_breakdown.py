"""Where MAE's CPU training step spends its time: the full step and each of its parts timed alone, in one process.

The step is mae.MAE (ViT-B/16, 224 px, decoder 512 x 8, 16 heads, norm-pix, mask 0.75) at --batch_size 8 under bf16
autocast with common.adamw (fused AdamW), freed memory kept (common.keep_freed_memory), as mae.py runs it on a CPU.
One forward with hooks records what each part sees; each part is then timed alone at those shapes and layouts:
  - the matrix products of every nn.Linear and of the patch embedding (its Conv2d as a matrix product): forward
    addmm(bias, x, W^T), and the backward's dY @ W and dY^T @ X (the patch embedding computes no input gradient);
  - attention: common.attention forward + backward on q, k, v laid out as Attention.forward makes them;
  - GELU forward + backward; autocast's casts (every matrix weight to bf16, its gradient back to fp32);
  - the fused AdamW step on the step's own gradients;
and "the rest" is the full step less these parts. Each figure is a median of --repeats runs; the full step is timed
before and after the parts, and the 4096^3 bf16 matmul peak (best of 5) right after, so that all of them come from
one moment of the machine. Before the parts, in the steady state: one step unprofiled, two under torch.profiler and
two with its record_shapes=True, with the minor page faults each takes (resource.getrusage): a profiled step faults
pages in that an unprofiled one does not, and a profile charges them to whatever op first touches the fresh memory.

    python benchmarks/step_breakdown.py            # the README table; 2 threads (--threads N), about a minute
    python benchmarks/step_breakdown.py --smoke    # a tiny MAE, seconds: the test suite runs it
"""
import argparse, contextlib, os, resource, statistics, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common, mae  # noqa: E402
from peers import matmul_peak  # noqa: E402  (peers.py imports transformers only in its main)

VIT_B = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
             decoder_depth=8, decoder_num_heads=16, peak_side=4096)
SMOKE = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
             decoder_num_heads=2, peak_side=256)
BF16 = torch.bfloat16


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('--batch_size', type=int, default=8, help='images per step (8)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (2, the project machine)')
    parser.add_argument('--repeats', type=int, default=7, help='runs per median (7)')
    parser.add_argument('--smoke', action='store_true', help='a tiny MAE: checks the script, measures nothing')
    opts = parser.parse_args(argv)
    if min(opts.batch_size, opts.threads, opts.repeats) < 1:
        parser.error('--batch_size, --threads and --repeats must be at least 1')
    return opts


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def recorded_shapes(model, images, noise):
    """One forward with hooks -> {module: its input's shape} for the Linears, the patch embedding, GELUs, Attentions."""
    shapes, kinds = {}, (nn.Linear, nn.Conv2d, nn.GELU, common.Attention)
    hooks = [m.register_forward_pre_hook(lambda m, inputs: shapes.setdefault(m, inputs[0].shape) and None)
             for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad(), torch.autocast('cpu', dtype=BF16):
        model(images, 0.75, noise)
    for hook in hooks:
        hook.remove()
    return shapes


def matmul_parts(shapes, repeats):
    """-> (ms, GFLOP) of the Linears' and the patch embedding's products, forward and backward, at their shapes."""
    ms = flops = 0.0
    for m, shape in shapes.items():
        if isinstance(m, nn.Conv2d):  # the patch embedding: (B * L, C * p * p) @ (C * p * p, D)
            p = m.kernel_size[0]
            rows, fan_in, fan_out, backward = shape[0] * (shape[2] // p) * (shape[3] // p), m.weight[0].numel(), \
                m.out_channels, 1
        elif isinstance(m, nn.Linear):
            rows, fan_in, fan_out, backward = shape[:-1].numel(), m.in_features, m.out_features, 2
        else:
            continue
        x, w, dy, b = (torch.randn(*size, dtype=BF16) for size in ((rows, fan_in), (fan_out, fan_in),
                                                                    (rows, fan_out), (fan_out,)))
        ms += median_ms(lambda: torch.addmm(b, x, w.t()), repeats) + median_ms(lambda: dy.t() @ x, repeats)
        ms += median_ms(lambda: dy @ w, repeats) if backward == 2 else 0.0
        flops += 2 * rows * fan_in * fan_out * (1 + backward)
    return ms, flops / 1e9


def attention_part(shapes, repeats):
    """-> (ms, GFLOP) of common.attention forward + backward for every Attention module, q, k, v as it lays them."""
    ms = flops = 0.0
    for m, (B, N, D) in ((m, s) for m, s in shapes.items() if isinstance(m, common.Attention)):
        heads = m.num_heads
        qkv = torch.randn(B, N, 3, heads, D // heads, dtype=BF16, requires_grad=True)

        def run():
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            common.attention(q, k, v).sum().backward()
        ms += median_ms(run, repeats)
        flops += 2 * 2 * B * N * N * D * 3  # q k^T and (softmax) v, forward + backward
    return ms, flops / 1e9


def main(argv=None):
    opts = parse_options(argv)
    torch.set_num_threads(opts.threads)
    common.keep_freed_memory()
    sizes = SMOKE if opts.smoke else VIT_B
    torch.manual_seed(0)
    model = mae.MAE(**{k: v for k, v in sizes.items() if k != 'peak_side'}, norm_pix_loss=True)
    optimizer = common.adamw(model, argparse.Namespace(weight_decay=0.05, lr=1e-4), betas=(0.9, 0.95))
    images = torch.randn(opts.batch_size, 3, sizes['img_size'], sizes['img_size'])
    noise = torch.rand(opts.batch_size, model.num_patches)

    def loss():
        with torch.autocast('cpu', dtype=BF16):
            return model(images, 0.75, noise)[0]

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    before = median_ms(step, opts.repeats)
    profiler_lines = []
    for how in ('unprofiled', 'profiled', 'profiled', 'record_shapes', 'record_shapes'):  # the steady state's
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with contextlib.nullcontext() if how == 'unprofiled' else \
                profile(activities=[ProfilerActivity.CPU], record_shapes=how == 'record_shapes'):
            step()
        ms, faults = (time.perf_counter() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        how = {'profiled': 'under torch.profiler', 'record_shapes': 'under torch.profiler(record_shapes=True)'}.get(
            how, how)
        profiler_lines.append(f'one step {how}: {ms:.0f} ms, {faults} minor page faults')
    for _ in range(3):
        step()
    shapes, parts = recorded_shapes(model, images, noise), {}
    parts['matrix products of the Linears and the patch embedding, forward + backward'], gemm_gflop = \
        matmul_parts(shapes, opts.repeats)
    parts['attention (common.attention), forward + backward'], attention_gflop = attention_part(shapes, opts.repeats)
    weights = [m.weight for m in shapes if isinstance(m, (nn.Linear, nn.Conv2d))]
    low = [w.to(BF16) for w in weights]
    parts["autocast's casts: the matrix weights to bf16, their gradients back to fp32"] = \
        median_ms(lambda: [w.to(BF16) for w in weights], opts.repeats) + \
        median_ms(lambda: [w.float() for w in low], opts.repeats)
    hidden = [torch.randn(shape, dtype=BF16) for m, shape in shapes.items() if isinstance(m, nn.GELU)]
    parts['GELU, forward + backward'] = sum(median_ms(lambda: F.gelu(h), opts.repeats) + median_ms(
        lambda: torch.ops.aten.gelu_backward(h, h), opts.repeats) for h in hidden)
    loss().backward()  # the step's own gradients, for the optimizer alone
    parts['fused AdamW step'] = median_ms(optimizer.step, opts.repeats)
    optimizer.zero_grad(set_to_none=True)
    after = median_ms(step, opts.repeats)
    side = sizes['peak_side']
    peak = matmul_peak(side)  # GFLOP/s, best of 5
    full, total_gflop = min(before, after), gemm_gflop + attention_gflop
    print(f"MAE {'(smoke: tiny sizes, measures nothing)' if opts.smoke else 'ViT-B/16'}, batch {opts.batch_size}, "
          f'bf16, {torch.get_num_threads()} threads, torch {torch.__version__}')
    print(f'full step {before:.0f} ms before the parts, {after:.0f} after; {total_gflop:.1f} GFLOP of matrix products '
          f'and attention: {total_gflop / full * 1e3:.0f} GFLOP/s, {total_gflop / full * 1e3 / peak:.0%} of the '
          f'{side}^3 bf16 matmul peak measured after them ({peak:.0f} GFLOP/s)')
    print('| part of the step | ms | share |\n|---|---|---|')
    for name, ms in {**parts, 'the rest (LayerNorms, loss, masking, adds): the step less the parts':
                     full - sum(parts.values())}.items():
        print(f'| {name} | {ms:.0f} | {ms / full:.0%} |')
    print(f'the matrix products alone: {gemm_gflop:.1f} GFLOP at {gemm_gflop / parts[next(iter(parts))] * 1e3:.0f} '
          f'GFLOP/s; attention {attention_gflop:.1f} GFLOP ({attention_gflop / total_gflop:.1%} of the FLOPs)')
    print('\n'.join(profiler_lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
