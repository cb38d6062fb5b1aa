"""Our MAE training step against a peer's: Hugging Face transformers' ViTMAEForPreTraining, same weights, same images.

What it compares: mae.MAE ViT-B/16 (224 px, decoder 512 x 8, 16 heads, norm-pix, mask ratio 0.75) and HF's
ViTMAEForPreTraining built from a ViTMAEConfig of the same sizes (layer_norm_eps=1e-6 as ours and the official
code; HF's default is 1e-12), norm_pix_loss=True, mask_ratio 0.75, with our state dict copied in under HF's names
(our fused qkv split into q / k / v; both HF naming schemes, transformers 4.x and 5.x, are mapped; the load is strict).

How equality is checked, first, in fp32: the same normalised images and the same mask noise (drawn as our data loader
draws it, mae.mask_noise) go through both; both mask by an ascending argsort of the noise (keep the K smallest), which
is verified on the masks they return (each keeps exactly the K patches of smallest noise, and the two masks are equal).
The script prints the loss difference, the largest prediction difference and the largest gradient difference
(relative to each tensor's largest gradient), and refuses to time (exit 1) when the losses differ by more than 1e-4.

Then it times, in one process, forward + backward + optimizer step at batch 8 on synthetic images, the rows
interleaved step by step (A B C D A B C D ...), --repeats rounds of --steps steps each after one untimed step per
row; a round's value is the median of its steps, a row's the median of its rounds (min-max shown):
  ours bf16: bf16 autocast, common.adamw (torch's fused AdamW), eager, freed memory kept (the project's defaults);
  HF bf16:   bf16 autocast, torch.optim.AdamW with no fused / foreach arguments (what HF's users get), HF's default
             attention (SDPA; --hf_attention eager for its written-out softmax);
  ours fp32, HF fp32: the same without autocast (--no_fp32 leaves them out);
  ours bf16 compiled (--compile): as ours bf16, the loss (forward and backward) under torch.compile, as training's
             --compile does (compiled in its untimed step: a few minutes on a CPU).
The allocator setting (common.keep_freed_memory, as common.setup makes it on CPUs) is process-wide, so HF's rows run
with it too; --malloc_default runs every row without it.
It prints images/s per row, the ratio ours / HF, and the fraction of the bf16 matmul peak each row reaches: the peak is
measured here, a 4096^3 bf16 matmul, best of 3, right after each round: on a VM it moves by 15% or more within
minutes, so each round's speed is set against its own round's peak, and a row's fraction is the median over rounds
(the peak is also measured once before the timing, best of 5, and printed). GFLOP per image by
torch.utils.flop_counter.FlopCounterMode over one forward + backward of 2 images (halved) under bf16 autocast with
attention on the math kernel, counting matrix products, convolutions and attention (benchmarks/throughput.py's
convention), for both models as a cross-check.
There is no timm row: timm >= 1.0 imports torchvision, and a timm encoder inside an MAE is glue code, not a peer's step.

Command (transformers is not a dependency of this project: install it in a scratch venv, never in requirements.txt):
    python -m venv /tmp/peers_venv && /tmp/peers_venv/bin/pip install torch numpy pillow tqdm transformers
    /tmp/peers_venv/bin/python benchmarks/peers.py        # from the repository root; 2 threads (--threads N)
(torch: the same build as the project's; on a CPU-only machine pin the CPU build, not PyPI's default CUDA one.)
Without transformers it prints these install lines and exits 0. Run it on an otherwise idle machine (it prints the
load average before and after). The numbers go in the README's speed table with the CPU model and the date.
"""
import argparse, datetime, os, platform, re, statistics, sys, time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method files and common.py live in the repository root
import common, mae  # noqa: E402

INSTALL = """transformers is not installed: this comparison needs it, the project does not
(keep it out of requirements.txt).
Install it in a scratch virtual environment and run from the repository root:
    python -m venv /tmp/peers_venv
    /tmp/peers_venv/bin/pip install torch numpy pillow tqdm transformers   # torch: the build you use here
    /tmp/peers_venv/bin/python benchmarks/peers.py"""
SIZE, PATCH, RATIO = 224, 16, 0.75
ENC = dict(embed_dim=768, depth=12, num_heads=12)
DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
# HF's names inside one transformer layer, per naming scheme (transformers 5.x; 4.x)
SCHEMES = {'5.x': dict(layers='vit.layers', q='attention.q_proj', k='attention.k_proj', v='attention.v_proj',
                       o='attention.o_proj', fc1='mlp.fc1', fc2='mlp.fc2'),
           '4.x': dict(layers='vit.encoder.layer', q='attention.attention.query', k='attention.attention.key',
                       v='attention.attention.value', o='attention.output.dense', fc1='intermediate.dense',
                       fc2='output.dense')}


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('--threads', type=int, default=2, help='torch threads (2, the project machine)')
    parser.add_argument('--batch_size', type=int, default=8, help='images per step (8)')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds (3)')
    parser.add_argument('--steps', type=int, default=2, help='steps per row in each round (2)')
    parser.add_argument('--no_fp32', action='store_true', help='time the bf16 rows only')
    parser.add_argument('--compile', action='store_true', help="add a row: ours bf16 with training's --compile")
    parser.add_argument('--malloc_default', action='store_true',
                        help="leave glibc's malloc as it is (the project's CPU runs keep freed memory: "
                             "common.keep_freed_memory)")
    parser.add_argument('--hf_attention', choices=['default', 'sdpa', 'eager'], default='default',
                        help="HF's attention implementation (default: what HF picks, SDPA)")
    parser.add_argument('--tolerance', type=float, default=1e-4, help='largest fp32 loss difference allowed (1e-4)')
    parser.add_argument('--check_only', action='store_true', help='the equality check alone, no timing')
    parser.add_argument('--seed', type=int, default=0)
    opts = parser.parse_args(argv)
    if min(opts.threads, opts.batch_size, opts.repeats, opts.steps) < 1:
        parser.error('--threads, --batch_size, --repeats and --steps must be at least 1')
    return opts


def hf_name(ours, scheme):
    """One of our state-dict names -> HF's (for qkv: the prefix; the caller splits it into q, k, v)."""
    s = SCHEMES[scheme]
    fixed = {'cls_token': 'vit.embeddings.cls_token', 'pos_embed': 'vit.embeddings.position_embeddings',
             'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
             'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
             'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed'}
    if ours in fixed:
        return fixed[ours]
    m = re.fullmatch(r'(blocks|decoder_blocks)\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(\w+)',
                     ours)
    if m:
        stack = s['layers'] if m[1] == 'blocks' else 'decoder.decoder_layers'
        inner = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after', 'attn.qkv': 'qkv', 'attn.proj': s['o'],
                 'mlp.fc1': s['fc1'], 'mlp.fc2': s['fc2']}[m[3]]
        return f'{stack}.{m[2]}.{inner}.{m[4]}'
    head, _, leaf = ours.partition('.')  # norm.weight, decoder_embed.bias, decoder_norm.weight, decoder_pred.weight
    return {'norm': 'vit.layernorm', 'decoder_embed': 'decoder.decoder_embed', 'decoder_norm': 'decoder.decoder_norm',
            'decoder_pred': 'decoder.decoder_pred'}[head] + '.' + leaf


def to_hf(tensors, scheme):
    """{our name: tensor} (a state dict, or gradients) -> {HF name: tensor}; our fused qkv rows are [q | k | v], each
    with its heads contiguous, which is how HF's q_proj / k_proj / v_proj outputs are split into heads."""
    out, s = {}, SCHEMES[scheme]
    for name, t in tensors.items():
        target = hf_name(name, scheme)
        if '.qkv.' in target:
            for part, chunk in zip('qkv', t.chunk(3, dim=0)):
                out[target.replace('qkv', s[part])] = chunk
        else:
            out[target] = t
    return out


def build_pair(opts, transformers):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    torch.manual_seed(opts.seed)
    ours = mae.MAE(SIZE, patch_size=PATCH, **ENC, **DEC, norm_pix_loss=True)
    config = ViTMAEConfig(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=ENC['embed_dim'],
                          num_hidden_layers=ENC['depth'], num_attention_heads=ENC['num_heads'],
                          intermediate_size=4 * ENC['embed_dim'], decoder_hidden_size=DEC['decoder_embed_dim'],
                          decoder_num_hidden_layers=DEC['decoder_depth'],
                          decoder_num_attention_heads=DEC['decoder_num_heads'],
                          decoder_intermediate_size=4 * DEC['decoder_embed_dim'], hidden_act='gelu', qkv_bias=True,
                          layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=RATIO, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0,
                          **({} if opts.hf_attention == 'default' else {'attn_implementation': opts.hf_attention}))
    hf = ViTMAEForPreTraining(config)
    keys = hf.state_dict().keys()
    scheme = '4.x' if any(k.startswith('vit.encoder.layer.') for k in keys) else '5.x'
    notes = []
    # HF's own sin-cos tables (its initialize_weights, run directly) against ours; then ours are copied in anyway
    fresh = float(hf.vit.embeddings.position_embeddings.abs().max())
    try:
        emb = hf.vit.embeddings
        emb.patch_embeddings.projection._is_hf_initialized = False
        emb.initialize_weights()
        hf.decoder.initialize_weights(ours.num_patches)
        diffs = [float((a - b).abs().max()) for a, b in ((emb.position_embeddings, ours.pos_embed),
                                                         (hf.decoder.decoder_pos_embed, ours.decoder_pos_embed))]
        notes.append(f"HF's sin-cos tables (its initialize_weights) vs ours: max |diff| encoder {diffs[0]:.1e}, "
                     f"decoder {diffs[1]:.1e}")
    except Exception as e:  # another transformers version: the check is informative only
        notes.append(f"HF's sin-cos tables not compared ({type(e).__name__}: {e})")
    if fresh == 0:
        notes.append(f"note: transformers {transformers.__version__}'s ViTMAEForPreTraining(config) leaves the "
                     f"position table at zero (its from-scratch init skips it); ours are copied in, so the check "
                     f"does not depend on it")
    state = to_hf(ours.state_dict(), scheme)
    missing, unexpected = set(keys) - set(state), set(state) - set(keys)
    if missing or unexpected:
        sys.exit(f'error: our state dict does not map onto HF {transformers.__version__} ({scheme} names): missing '
                 f'{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}')
    hf.load_state_dict(state, strict=True)
    return ours.train(), hf.train(), scheme, notes


def synthetic(opts, num_patches):
    """Normalised images (B, 3, H, W) and the per-sample mask noise (B, L) as our data loader draws it."""
    gen = torch.Generator().manual_seed(opts.seed)
    images = common.normalize(torch.randint(0, 256, (opts.batch_size, 3, SIZE, SIZE), dtype=torch.uint8,
                                            generator=gen))
    noise = np.stack([mae.mask_noise(num_patches, np.random.default_rng([opts.seed, i]))
                      for i in range(opts.batch_size)])
    return images, torch.from_numpy(noise)


def check_equal(ours, hf, images, noise, scheme, opts):
    """fp32 forward + backward of both on the same input -> the loss difference (exits if above --tolerance)."""
    loss_a, pred_a, mask_a = ours(images, RATIO, noise)
    out = hf(pixel_values=images, noise=noise)
    loss_a.backward()
    out.loss.backward()
    keep = int(ours.num_patches * (1 - RATIO))
    rank = noise.argsort(1).argsort(1)  # 0 for the smallest noise
    expected = (rank >= keep).float()  # ascending argsort: the K smallest stay visible
    masks_ok = torch.equal(mask_a, expected) and torch.equal(out.mask.float(), expected)
    grads_a = to_hf({n: p.grad for n, p in ours.named_parameters() if p.grad is not None}, scheme)
    grads_b = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    # relative to each tensor's largest gradient; key biases left out: their gradient is zero but for rounding (a
    # key bias adds the same amount to all of a query's scores, which softmax ignores), ~1e-11 in both models
    grad_diff = max(float((grads_a[n] - g).abs().max() / g.abs().max()) for n, g in grads_b.items()
                    if not re.search(r'(k_proj|attention\.key)\.bias$', n))
    diff = abs(loss_a.item() - out.loss.item())
    print(f'fp32 equality, {len(images)} images, same noise: loss ours {loss_a.item():.7f}, HF {out.loss.item():.7f}, '
          f'|diff| {diff:.2e} (tolerance {opts.tolerance:g})')
    print(f'  masks: both keep the {keep} patches of smallest noise (ascending argsort) and agree: '
          f'{"yes" if masks_ok else "NO"}; prediction max |diff| {(pred_a - out.logits).abs().max().item():.2e}; '
          f'gradients: {len(grads_b)} tensors (of {len(grads_a)} mapped), largest diff relative to the tensor\'s '
          f'largest gradient (key biases left out: zero but for rounding) {grad_diff:.2e}')
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    if set(grads_a) != set(grads_b) or not masks_ok or not diff <= opts.tolerance:
        sys.exit(f'error: the two models differ (loss |diff| {diff:.2e}, masks equal {masks_ok}, gradient sets equal '
                 f'{set(grads_a) == set(grads_b)}): not timing')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # informative: bf16 rounding differs
        a, b = ours(images, RATIO, noise)[0].item(), hf(pixel_values=images, noise=noise).loss.item()
    print(f'  bf16 autocast (informative): loss ours {a:.5f}, HF {b:.5f}, |diff| {abs(a - b):.1e}')
    return diff


def gflop_per_image(loss_of, images, noise, model):
    """FlopCounterMode over one forward + backward of 2 images, halved (benchmarks/throughput.py's convention)."""
    with FlopCounterMode(display=False) as counter:
        with sdpa_kernel(SDPBackend.MATH), torch.autocast('cpu', dtype=torch.bfloat16):
            loss = loss_of(images[:2], noise[:2])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2 / 1e9


def matmul_peak(n=4096, tries=5):
    """Best GFLOP/s of an n^3 bf16 matmul on this CPU with the threads set."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(tries))
    return 2 * n ** 3 / best / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name():
    info = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    return next(iter(re.findall(r'model name\s*:\s*(.*)', info)), platform.processor() or platform.machine())


def load():
    return ' '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'


def main(argv=None):
    opts = parse_options(argv)
    try:
        import transformers
    except ImportError:
        print(INSTALL)
        return 0
    torch.set_num_threads(opts.threads)
    if not opts.malloc_default:
        common.keep_freed_memory()  # as common.setup does on CPUs; process-wide, so for both models alike
    print(f'{datetime.date.today()}  {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, '
          f'transformers {transformers.__version__}; load average before: {load()}; malloc '
          f"{'glibc default' if opts.malloc_default else 'keeps freed memory'}")
    ours, hf, scheme, notes = build_pair(opts, transformers)
    print(f'models: ours mae.MAE ViT-B/16, HF ViTMAEForPreTraining ({scheme} names, attention '
          f'{hf.config._attn_implementation}), {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters each')
    for line in notes:
        print('  ' + line)
    images, noise = synthetic(opts, ours.num_patches)
    check_equal(ours, hf, images, noise, scheme, opts)
    if opts.check_only:
        return 0

    ours_loss = lambda x, z: ours(x, RATIO, z)[0]
    hf_loss = lambda x, z: hf(pixel_values=x, noise=z).loss
    gflop, gflop_hf = gflop_per_image(ours_loss, images, noise, ours), gflop_per_image(hf_loss, images, noise, hf)
    peak_before = matmul_peak()
    print(f'GFLOP per image (FlopCounterMode, forward + backward): ours {gflop:.2f}, HF {gflop_hf:.2f}')

    lr = 1.5e-4 * opts.batch_size / 256
    opt_ours = common.adamw(ours, argparse.Namespace(weight_decay=0.05, lr=lr), betas=(0.9, 0.95))  # fused
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)  # torch's default

    def hf_update():  # what an HF user's loop does
        opt_hf.step()
        opt_hf.zero_grad()

    def step(loss_of, update, amp):
        def run():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                loss = loss_of(images, noise)
            loss.backward()
            update()
        return run
    no_scaler = torch.amp.GradScaler(enabled=False)  # train_one_epoch's step: no clipping, a disabled scaler
    ours_update = lambda: common.optimizer_step(ours, opt_ours, no_scaler)
    rows = [('ours bf16 (fused AdamW)', step(ours_loss, ours_update, True), 'ours'),
            ('HF bf16 (default AdamW)', step(hf_loss, hf_update, True), 'hf')]
    if not opts.no_fp32:
        rows += [('ours fp32 (fused AdamW)', step(ours_loss, ours_update, False), 'ours'),
                 ('HF fp32 (default AdamW)', step(hf_loss, hf_update, False), 'hf')]
    if opts.compile:
        rows.append(('ours bf16 compiled', step(torch.compile(ours_loss), ours_update, True), 'ours'))
    for _, run, _ in rows:  # one untimed step each (and the compilation)
        run()
    times = {name: [[] for _ in range(opts.repeats)] for name, _, _ in rows}
    peaks = []  # each round's bf16 matmul peak, measured right after it
    for r in range(opts.repeats):
        for _ in range(opts.steps):
            for name, run, _ in rows:  # interleaved: A B C D A B C D ...
                times[name][r].append(timed(run))
        peaks.append(matmul_peak(tries=3))
    print(f'bf16 matmul peak (4096^3): {peak_before:.0f} GFLOP/s before the timing (best of 5), after each round '
          f"(best of 3) {', '.join(f'{p:.0f}' for p in peaks)}; a row's fraction of peak: the median over rounds of "
          f"the round's speed against its round's peak")
    print(f'training step (forward + backward + AdamW), batch {opts.batch_size}, {SIZE} px, synthetic images; '
          f'{opts.repeats} rounds of {opts.steps} interleaved steps after 1 untimed; median of the round medians')
    speed = {}
    header = f'{"row":26}{"img/s":>8}{"min-max":>14}{"step s":>8}{"of bf16 peak":>14}'
    print(header)
    for name, _, who in rows:
        rounds = [len(images) / statistics.median(t) for t in times[name]]
        speed[name] = statistics.median(rounds)
        fraction = statistics.median((gflop if who == 'ours' else gflop_hf) * v / p for v, p in zip(rounds, peaks))
        print(f'{name:26}{speed[name]:8.2f}{f"{min(rounds):.2f}-{max(rounds):.2f}":>14}'
              f'{len(images) / speed[name]:8.2f}{fraction:14.1%}')
    names = [n for n, _, _ in rows if 'compiled' not in n]
    for a, b in zip(names[0::2], names[1::2]):
        print(f'ratio {a.split(" (")[0]} / {b.split(" (")[0]}: {speed[a] / speed[b]:.2f}x')
    if opts.compile:
        print(f'ratio ours bf16 compiled / HF bf16: {speed["ours bf16 compiled"] / speed[names[1]]:.2f}x')
    print(f'load average after: {load()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
