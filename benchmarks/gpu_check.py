"""GPU check: one command, run once on a machine with one or more GPUs, that measures and checks the training steps.

    python benchmarks/gpu_check.py            # a GPU machine: under 8 minutes (see --time_budget), one table
    python benchmarks/gpu_check.py --smoke    # a CPU: the same code at tiny sizes (the test suite runs it)

What it checks, in the order it runs (the table lists the rows by method):
 1. step rows, eager: each method's training step as benchmarks/throughput.py builds it (as the method's main()
    does: its parse_args, model, optimizer, schedule, loss_fn(model, images, labels, mask_input); a synthetic batch
    already on the device) at ViT-B/16 (mae, hpm, maskfeat, mfm) or ResNet-50 (spark), 224 px, batch 64, bf16
    autocast. --warmup steps, then --steps steps timed as one block (the GPU synchronised before and after it, never
    inside): images/s; MFU = FLOPs per image (throughput.flops_per_image: FlopCounterMode over forward + backward)
    x images/s / the card's dense bf16 peak (PEAK_TFLOPS, by device name; --peak_tflops overrides; an unknown card
    gets no MFU, and the header says so); peak memory = torch.cuda.max_memory_allocated over the timed steps. The
    timed steps run under torch.cuda.set_sync_debug_mode('error'): an operation that makes the host wait for the GPU
    (.item(), bool() of a tensor, boolean indexing, a blocking host-to-device copy such as torch.tensor(...,
    device='cuda')) raises, and the row FAILS, naming the line (and, from one step under the 'warn' mode, every line
    that syncs); its speed is then measured again without the guard.
 2. pretrain row: `mae.py --data shapes --input_size 32` (its shapes preset: ViT-Ti/4, 7 epochs of 10,000 images,
    kNN and linear probe), a minute or so as a subprocess; its first epoch's train_loss must exceed its last's.
 3. torchrun row: mae.py on 2 processes (NCCL, one GPU each), batch 8 each, against 1 process of batch 16, fp32 with
    TF32 off (NVIDIA_TF32_OVERRIDE=0): final weights equal within 1e-5, the key third of each qkv bias left out (its
    true gradient is 0, see tests/test_resume_and_ddp.py, which checks the same on CPUs). With 1 GPU: skipped.
 4. step rows, compiled: as 1, with torch.compile of the method's loss_fn (as common.train_one_epoch(compile=True)
    does; forward and backward compiled, the optimizer step eager), compiled during --warmup. They run last and
    stop starting once --time_budget seconds would be passed (rows left: skipped); a second run is faster (inductor's
    cache).

--smoke runs the same functions on a CPU at tiny sizes: ViT-Ti/4 and resnet_mini_ds8 at 16 px, batch 4, 1 warmup and
2 timed steps, compiled rows only with --compile_smoke (CPU compilation takes minutes per method); pretraining 2
epochs on 64 shapes images (two epochs, so that there is a first and a last to compare); torchrun with 2 CPU
processes and gloo. A CPU has no device queue to wait for, so sync-free is not measured there: a dispatch mode lists,
as a forecast in the notes, the operations of one step that would wait on a GPU (host reads of tensor values, tensors
made from host data). Its numbers say nothing about a GPU; its output says SMOKE.

Output: a line per row as it finishes, then the table (method, model, mode, images/s, MFU, peak MB, sync-free,
status, notes) and every row as a JSON line in --json (default output/gpu_check.jsonl, overwritten), each with the
device name, GPU count, torch version and date. Exit status 1 if any row failed.
"""
import argparse, contextlib, datetime, gc, json, os, re, subprocess, sys, tempfile, time, traceback, warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (its path setup makes the method files importable)
from throughput import ROOT  # noqa: E402

TORCH_DIR = os.path.dirname(torch.__file__)
PEAK_TFLOPS = [  # dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name: first match
    ('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989),  # the SXM card calls itself 'NVIDIA H100 80GB HBM3'
    ('H200 NVL', 835), ('H200', 989), ('A100', 312), ('L40S', 362), ('RTX 4090', 165)]
GPU = dict(models=['vit_base_patch16', 'resnet50'], input_size=224, batch_size=64, warmup=3, steps=10,
           time_budget=420)
SMOKE = dict(models=['vit_tiny_patch4', 'resnet_mini_ds8'], input_size=16, batch_size=4, warmup=1, steps=2,
             time_budget=0)
FIELDS = ['method', 'model', 'mode', 'input_size', 'batch', 'amp', 'images_per_s', 'gflop_per_image', 'mfu',
          'peak_mem_mb', 'sync_free', 'status', 'notes']  # then each kind's own, then device, gpus, torch, run, date
PRETRAIN = ['--data', 'shapes', '--input_size', '32', '--num_workers', '4']  # the shapes preset, workers to feed a GPU
# mae.py at its smallest (tests/conftest.py's TINY and TINY_DECODER): --smoke's pretraining, and the torchrun row's
TINY_MAE = ['--data', 'shapes', '--model', 'vit_tiny_patch4', '--warmup_epochs', '0', '--decoder_embed_dim', '32',
            '--decoder_depth', '1', '--decoder_num_heads', '2', '--probe_epochs', '0']
PRETRAIN_SMOKE = TINY_MAE + ['--input_size', '32', '--shapes_size', '64', '--batch_size', '8', '--epochs', '2',
                             '--knn_k', '5']
TORCHRUN = TINY_MAE + ['--input_size', '16', '--shapes_size', '128', '--epochs', '1', '--knn_k', '0', '--amp',
                       'none']  # tests/test_resume_and_ddp.py's run, then --batch_size 16 (1 process) or 8 (2)


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    add = parser.add_argument
    add('--smoke', action='store_true', help='tiny sizes on a CPU: exercises the code, measures nothing of a GPU')
    add('--compile_smoke', action='store_true', help='with --smoke: run the compiled rows too (minutes per method)')
    add('--methods', nargs='+', default=list(throughput.METHODS), choices=list(throughput.METHODS),
        help='methods of the step rows (all)')
    add('--batch_size', type=int, help='images per step (GPU 64, smoke 4)')
    add('--warmup', type=int, help='untimed steps first, the compilation among them (GPU 3, smoke 1)')
    add('--steps', type=int, help='timed steps (GPU 10, smoke 2)')
    add('--peak_tflops', type=float, help="the card's peak for MFU, TFLOP/s (default: PEAK_TFLOPS by device name)")
    add('--time_budget', type=float, help='seconds after which no further compiled row starts (GPU 420; 0: none)')
    add('--skip', nargs='+', default=[], choices=['eager', 'compile', 'pretrain', 'torchrun'], help='rows to leave out')
    add('--json', default=os.path.join('output', 'gpu_check.jsonl'), help='JSON lines file (output/gpu_check.jsonl)')
    opts = parser.parse_args(argv)
    for key, value in (SMOKE if opts.smoke else GPU).items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    if opts.compile_smoke and not opts.smoke:
        parser.error('--compile_smoke goes with --smoke (the GPU mode always runs the compiled rows)')
    if not opts.smoke and not torch.cuda.is_available():
        parser.error('no CUDA GPU here: run `python benchmarks/gpu_check.py --smoke` on a CPU')
    if min(opts.batch_size, opts.steps) < 1 or opts.warmup < 1:
        parser.error('--batch_size, --steps and --warmup must be at least 1')
    opts.device = torch.device('cpu' if opts.smoke else 'cuda:0')
    opts.gpus = 0 if opts.smoke else torch.cuda.device_count()
    return opts


def peak_tflops(name, override=None):
    """-> (peak TFLOP/s or None, where it comes from) for a device name."""
    if override:
        return override, '--peak_tflops'
    match = next(((key, peak) for key, peak in PEAK_TFLOPS if key.lower() in name.lower()), None)
    return (match[1], f"PEAK_TFLOPS['{match[0]}']") if match else (None, f'unknown card {name!r}: MFU left out, '
                                                                         f'pass --peak_tflops')


# ---- step rows ----------------------------------------------------------------------------------------------------
def repo_frame(frames):
    """The innermost frame in the method files or common.py (else the innermost one) -> 'common.py:409 normalize'."""
    ours = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) == ROOT]  # the repository root's files
    named = [f for f in ours if not f.name.startswith('<')]  # a function, not the <genexpr> inside it
    f = (named or ours or [f for f in frames if not f.filename.startswith(TORCH_DIR)] or list(frames) or [None])[-1]
    return f and f'{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}'


class HostSyncForecast(TorchDispatchMode):
    """The CPU stand-in for set_sync_debug_mode: records each op of a step that would make the host wait on a GPU,
    with the line that called it: reads of tensor values on the host and tensors made from host data (on a GPU a
    blocking copy). A scalar assigned into a slice (x[:, :k] = 0) also makes a tensor from host data on a CPU, but on
    a GPU it is a fill: only tensors of one dimension or more, or made on a line that calls tensor(...), count."""
    READS = {'_local_scalar_dense': '.item() / bool() / float() of a tensor', 'nonzero': 'nonzero',
             'masked_select': 'masked_select', '_unique2': 'unique', 'unique_dim': 'unique',
             'unique_consecutive': 'unique_consecutive', 'equal': 'torch.equal', 'is_nonzero': 'bool() of a tensor',
             'multinomial': 'multinomial'}

    def __init__(self):
        super().__init__()
        self.found = {}  # location: what

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        what = self.READS.get(name)
        if name in ('index', 'index_put', 'index_put_') and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            what = 'boolean-mask indexing'
        if name == 'repeat_interleave' and isinstance(args[0], torch.Tensor) and kwargs.get('output_size') is None \
                and len(args) < 4:
            what = 'repeat_interleave with tensor repeats'
        if name in ('lift_fresh', 'lift_fresh_copy'):
            line = next((f.line for f in reversed(traceback.extract_stack()) if not f.filename.startswith(
                (TORCH_DIR, os.path.abspath(__file__)))), '')  # the line that made it, out of torch and this file
            if args[0].dim() > 0 or re.search(r'\b(tensor|as_tensor|new_tensor)\(', line or ''):
                what = 'a tensor made from host data (on a GPU a blocking copy)'
        if what:
            self.found.setdefault(repo_frame(traceback.extract_stack()[:-1]), what)
        return func(*args, **kwargs)


@contextlib.contextmanager
def sync_errors(device):
    """Inside, on a GPU, an operation that synchronises with the host raises (set_sync_debug_mode('error'))."""
    if device.type != 'cuda':
        yield
        return
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def sync_sites(run, batch, device, loss_fn):
    """Every line of one step that synchronises (set_sync_debug_mode('warn'), its warnings caught) -> 'file:line's."""
    if device.type != 'cuda':
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            throughput.train_step(run, batch, device, loss_fn)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = [f'{os.path.relpath(w.filename, ROOT)}:{w.lineno}' for w in caught if 'synchroniz' in str(w.message)]
    return list(dict.fromkeys(sites))


def timed_steps(run, batch, device, loss_fn, steps, guard):
    """Seconds for `steps` training steps, the device synchronised only before and after; guard: under
    sync_errors."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    with sync_errors(device) if guard else contextlib.nullcontext():
        for _ in range(steps):
            throughput.train_step(run, batch, device, loss_fn)
    sync()
    return time.perf_counter() - start


def model_for(method, opts):  # the model of a method's step rows: the first of opts.models that fits it
    return next(m for m in opts.models if throughput.fits(method, m))


def step_row(method, compiled, opts, output_dir, gflops):
    """One method's step, eager or compiled -> a row. gflops caches the FLOPs per image by method."""
    argv = ['--methods', method, '--model', *opts.models, '--input_size', str(opts.input_size), '--batch_size',
            str(opts.batch_size), '--amp', 'bf16', '--device', opts.device.type, '--warmup', str(opts.warmup),
            '--steps', str(opts.steps)]
    args = throughput.method_args(method, throughput.parse_options(argv), output_dir)
    run, batch, device = throughput.build(method, args), throughput.synthetic_batch(method, args), args.device
    run.model.train()
    if method not in gflops:
        gflops[method] = throughput.flops_per_image(run, batch, device) / 1e9
    loss_fn = torch.compile(run.loss_fn) if compiled else run.loss_fn
    for _ in range(opts.warmup):
        throughput.train_step(run, batch, device, loss_fn)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row = dict(method=method, model=args.model, mode='compile' if compiled else 'eager', input_size=args.input_size,
               batch=args.batch_size, amp=args.amp, gflop_per_image=gflops[method], status='ok')
    notes = []
    try:
        seconds = timed_steps(run, batch, device, loss_fn, opts.steps, guard=True)
        row['sync_free'] = True if device.type == 'cuda' else None  # a CPU has no device queue to wait for
    except RuntimeError as e:
        if 'synchroniz' not in str(e):
            raise
        run.optimizer.zero_grad(set_to_none=True)  # the step stopped half-way
        row.update(sync_free=False, status='fail', sync_sites=sync_sites(run, batch, device, loss_fn))
        notes.append(f'syncs at {repo_frame(traceback.extract_tb(e.__traceback__))}: {str(e).splitlines()[0]} '
                     f'(every site of a step: {", ".join(row["sync_sites"]) or "?"}); speed measured again without '
                     f'the guard')
        seconds = timed_steps(run, batch, device, loss_fn, opts.steps, guard=False)
    if device.type == 'cpu' and not compiled:  # the forecast: one more step, watched
        with HostSyncForecast() as watch:
            throughput.train_step(run, batch, device, loss_fn)
        row['would_sync_on_gpu'] = [f'{where}: {what}' for where, what in watch.found.items()]
        notes.append('cpu, on a GPU would sync at: ' + '; '.join(row['would_sync_on_gpu']) if watch.found else
                     'cpu: no op that would sync on a GPU')
    elif device.type == 'cpu':
        notes.append('cpu: sync forecast not run on compiled code')
    row['notes'] = '; '.join(notes)
    row['images_per_s'] = opts.steps * args.batch_size / seconds
    row['peak_mem_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else \
        throughput.common.peak_resident_memory() / 2 ** 20  # a CPU: the peak RSS of this process so far
    if opts.peak:
        row['mfu'] = row['gflop_per_image'] * row['images_per_s'] / (opts.peak * 1e3)
    return row


# ---- subprocess rows: a real pretraining, torchrun = one process ----------------------------------------------------
def run_mae(flags, output_dir, nproc=1, env=None, timeout=600):
    """python mae.py flags (torchrun with nproc > 1) -> CompletedProcess."""
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, 'mae.py', *flags, '--output_dir', output_dir], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def failure(result):  # the last line of a failed run's stderr
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    return f'exit {result.returncode}: {lines[-1] if lines else "no output"}'


def pretrain_row(opts, output_dir):
    """mae.py's shapes run -> a row; ok when the first epoch's train_loss exceeds the last's."""
    start = time.perf_counter()
    result = run_mae((PRETRAIN_SMOKE if opts.smoke else PRETRAIN) + ['--device', opts.device.type], output_dir)
    row = dict(method='mae', model='vit_tiny_patch4', mode='pretrain', input_size=32, sync_free=None,
               elapsed_s=time.perf_counter() - start)
    if result.returncode:
        return dict(row, status='fail', notes=failure(result))
    with open(os.path.join(output_dir, 'log.txt')) as f:
        log = [json.loads(line) for line in f]
    epochs = [line for line in log if 'train_loss' in line]
    first, last = epochs[0]['train_loss'], epochs[-1]['train_loss']
    evaluation = next((line for line in log if line.get('evaluation')), {})
    knn = ', kNN {trained_knn_top1:.1f}% vs {random_init_knn_top1:.1f}% random init'.format(**evaluation) \
        if 'trained_knn_top1' in evaluation else ''
    with open(os.path.join(output_dir, 'args.json')) as f:
        args = json.load(f)
    return dict(row, model=args['model'], batch=args['batch_size'], images_per_s=epochs[-1]['images_per_s'],
                peak_mem_mb=max(e['peak_mem_mb'] for e in epochs),
                first_loss=first, last_loss=last, loss_fell=first > last, status='ok' if first > last else 'fail',
                notes=f'train_loss {first:.4f} -> {last:.4f} over {len(epochs)} epochs{knn}, '
                      f'{row["elapsed_s"]:.0f} s' + ('' if first > last else ': the loss did not fall'))


def without_key_bias(state):
    """tests/test_resume_and_ddp.py's: drop the key third of every qkv bias (its true gradient is exactly 0)."""
    for name in [n for n in state if n.endswith('qkv.bias')]:
        dim = state[name].shape[0] // 3
        state[name] = torch.cat([state[name][:dim], state[name][2 * dim:]])
    return state


def torchrun_row(opts, output_dir, atol=1e-5):
    """2 processes of batch 8 against 1 of batch 16 (mae.py, 1 epoch, fp32) -> a row; ok when the weights agree."""
    row = dict(method='mae', model='vit_tiny_patch4', mode='torchrun', input_size=16, batch=16, sync_free=None)
    if not opts.smoke and opts.gpus < 2:
        return dict(row, status='skipped', notes=f'skipped ({opts.gpus} GPU)')
    flags = TORCHRUN + ['--device', opts.device.type]
    env = {'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'NVIDIA_TF32_OVERRIDE': '0'}  # fp32 matmuls
    start, weights = time.perf_counter(), []
    for nproc, batch in ((1, 16), (2, 8)):
        out = os.path.join(output_dir, f'{nproc}proc')
        result = run_mae(flags + ['--batch_size', str(batch)], out, nproc, env)
        if result.returncode or 'effective batch 16' not in result.stdout:
            return dict(row, status='fail', notes=f'{nproc} process(es): ' + (
                failure(result) if result.returncode else 'its effective batch is not 16'))
        weights.append(without_key_bias(torch.load(os.path.join(out, 'checkpoint-last.pth'), map_location='cpu',
                                                   weights_only=True)['model']))
    one, two = weights
    diff = max((one[k] - two[k]).abs().max().item() for k in one) if one.keys() == two.keys() else float('inf')
    backend = 'gloo, CPU' if opts.smoke else 'NCCL'
    return dict(row, max_abs_diff=diff, equal=diff <= atol, status='ok' if diff <= atol else 'fail',
                elapsed_s=time.perf_counter() - start,
                notes=f'2 processes ({backend}) vs 1: max |diff| {diff:.1e} over {len(one)} tensors '
                      f'({"within" if diff <= atol else "ABOVE"} {atol:g}; key bias third left out)')


# ---- the run --------------------------------------------------------------------------------------------------------
def guarded(make_row, base):
    """make_row() -> its row; an exception fails the row with its message (the traceback goes to stderr)."""
    try:
        return make_row()
    except (Exception, SystemExit) as e:  # noqa: BLE001 (one broken row must not hide the others)
        traceback.print_exc()
        return dict(base, status='fail', notes=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cell(row, key):
    value = row.get(key)
    if value is None:
        return '-'
    if key == 'sync_free':
        return 'yes' if value else 'NO'
    return {'images_per_s': '{:.1f}', 'mfu': '{:.1%}', 'peak_mem_mb': '{:.0f}'}.get(key, '{}').format(value)


def print_table(rows):
    columns = [('method', 'method'), ('model', 'model'), ('mode', 'mode'), ('images_per_s', 'images/s'),
               ('mfu', 'MFU'), ('peak_mem_mb', 'peak MB'), ('sync_free', 'sync-free'), ('status', 'status'),
               ('notes', 'notes')]
    order = {mode: i for i, mode in enumerate(['eager', 'compile', 'pretrain', 'torchrun'])}
    methods = list(throughput.METHODS)
    rows = sorted(rows, key=lambda r: (order[r['mode']] > 1, methods.index(r['method']), order[r['mode']]))
    cells = [[title for _, title in columns]] + [[cell(r, key) for key, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns) - 1)]
    for c in cells:
        print('  '.join([x.rjust(w) if 3 <= i <= 7 else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))] +
                        [c[-1]]))


def header(opts):
    name = throughput.device_name(opts.device)
    if opts.smoke:
        return name, (f'gpu_check: SMOKE mode on a CPU ({name}): tiny sizes ({", ".join(opts.models)}, '
                      f'{opts.input_size} px, batch {opts.batch_size}); its numbers say nothing about a GPU; compiled '
                      f'rows {"on" if opts.compile_smoke else "off (--compile_smoke)"}')
    return name, (f'gpu_check: GPU mode, {opts.gpus} x {name}; step rows {", ".join(opts.models)} at '
                  f'{opts.input_size} px, batch {opts.batch_size}, bf16, {opts.steps} steps after {opts.warmup}; '
                  + (f'MFU against {opts.peak:g} TFLOP/s ({opts.peak_source})' if opts.peak else opts.peak_source))


def main(argv=None):
    opts = parse_options(argv)
    opts.peak, opts.peak_source = (None, 'cpu: no MFU') if opts.smoke else \
        peak_tflops(torch.cuda.get_device_name(opts.device), opts.peak_tflops)
    name, title = header(opts)
    print(title, flush=True)
    context = dict(device=name, gpus=opts.gpus, torch=torch.__version__, run='smoke' if opts.smoke else 'gpu',
                  date=datetime.datetime.now().isoformat(timespec='seconds'), peak_tflops=opts.peak)
    rows, gflops, start, compile_s = [], {}, time.perf_counter(), 0.0

    def add(row):
        row = {**dict.fromkeys(FIELDS), **row, **context}  # every row has every field (None: not measured)
        rows.append(row)
        print(f'[{time.perf_counter() - start:4.0f} s] {row["method"]} {row["mode"]}: {row["status"]}'
              + (f', {row["images_per_s"]:.1f} images/s' if row.get('images_per_s') else '') +
              (f'; {row["notes"]}' if row.get('notes') else ''), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for method in opts.methods if 'eager' not in opts.skip else ():
            base = dict(method=method, model=model_for(method, opts), mode='eager')
            add(guarded(lambda: step_row(method, False, opts, tmp, gflops), base))
        if 'pretrain' not in opts.skip:
            add(guarded(lambda: pretrain_row(opts, os.path.join(tmp, 'pretrain')), dict(method='mae', mode='pretrain')))
        if 'torchrun' not in opts.skip:
            add(guarded(lambda: torchrun_row(opts, os.path.join(tmp, 'torchrun')), dict(method='mae', mode='torchrun')))
        for method in opts.methods if 'compile' not in opts.skip else ():
            base = dict(method=method, model=model_for(method, opts), mode='compile')
            elapsed = time.perf_counter() - start
            if opts.smoke and not opts.compile_smoke:
                add(dict(base, status='skipped', notes='skipped (smoke: add --compile_smoke)'))
            elif opts.time_budget and elapsed + max(compile_s, 60) > opts.time_budget:
                add(dict(base, status='skipped', notes=f'skipped: --time_budget {opts.time_budget:g} s'))
            else:
                add(guarded(lambda: step_row(method, True, opts, tmp, gflops), base))
                compile_s = max(compile_s, time.perf_counter() - start - elapsed)
            torch._dynamo.reset()  # the methods share code (Block.forward): no recompile limit across them
    print(f'\n{title}\ntorch {torch.__version__}, {context["date"]}, {time.perf_counter() - start:.0f} s')
    print_table(rows)
    print("sync-free: yes / NO on a GPU, under torch.cuda.set_sync_debug_mode('error') over the timed steps; '-' not "
          "measured (a CPU: see the notes' forecast; the subprocess rows)")
    os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
    with open(opts.json, 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    failed = [f'{r["method"]} {r["mode"]}' for r in rows if r['status'] == 'fail']
    print(f'wrote {len(rows)} rows to {opts.json}; ' + (f'FAILED: {", ".join(failed)}' if failed else 'no row failed'))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
