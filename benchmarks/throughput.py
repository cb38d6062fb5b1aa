"""Training throughput of every method file, and of its data pipeline alone.

Step mode (default): each method is built as its main() builds it (its parse_args(argv), presets and checks,
common.setup (on a CPU: its threads, freed memory kept), build_model or its own construction, its optimizer, schedule
and the body of its loss_fn closure, loss_fn(model, images, labels, mask_input) -> (loss, logs); for HPM the EMA teacher
scoring inside the step and common.update_ema after it) and fed synthetic input already on the device: random uint8
images, labels, and the mask input its loader would give (MAE, HPM, SparK: the noise (B, L); MaskFeat:
maskfeat.block_masking; MFM: the low-pass choice (B, 1)), so data loading is excluded. A step is
common.train_one_epoch's with accum_iter 1: the schedule sets the lr (at the end of warmup), forward under the training
autocast (--amp), backward through the GradScaler (on with fp16), common.optimizer_step (the method's gradient clipping,
the step, zero_grad, the EMA); the loop's bookkeeping (loss sums, the finiteness flag it reads every 20 steps) is left
out. --compile compiles the loss_fn, as train_one_epoch(compile=True) does. After --warmup steps, --steps steps are
timed one by one, the GPU synchronised before and after each (never inside the method code): step ms is their median,
images/s = batch / median. Peak memory is torch.cuda.max_memory_allocated, reset per method; on a CPU the peak RSS of
the whole process (common.peak_resident_memory), which never decreases: a row shows the largest of itself and the rows
above it.

FLOPs are measured with torch.utils.flop_counter.FlopCounterMode over one forward + backward of the method's loss (2
images, halved), attention on the math kernel so that every backend counts alike: matrix products, convolutions and
attention at 2*m*n*k per product, with their backward (about twice the forward); elementwise ops, norms, softmax and
FFTs are left out (the usual "model FLOPs", for ViTs and convnets alike). All work of the step counts, HPM's no-grad
teacher forward too. MFU (GPU only) = GFLOP per image * images/s / --peak_tflops. Check: by hand, MAE ViT-B/16 at
224 px, mask 0.75, decoder 512 x 8 is 3 x 19.56 = 58.7 GFLOP per image (forward: patch embed 0.23, encoder on 1 + 49
tokens 8.59, decoder on 1 + 196 tokens 10.55, its embed and prediction 0.19); FlopCounterMode gives 58.46, 0.23
less, as the patch embedding computes no gradient for its input.

--data_pipeline times the data path alone: the method's training transform and mask input (the draw_mask its main()
passes to common.build_datasets) over --data / --data_path through common.make_loader with --num_workers workers;
images/s over --steps batches after --warmup, and per worker: compare with the step mode to see which one bounds a run.

Examples, from the repository root:
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --device cpu --input_size 32 --batch_size 8 --steps 5
    python benchmarks/throughput.py --model vit_base_patch16 --input_size 224 --methods mae --flops_only
    python benchmarks/throughput.py --model vit_base_patch16 resnet50 --input_size 224 --batch_size 64 \\
        --json /tmp/h100.json        # a GPU; add --peak_tflops 798 for MFU against what a large bf16 matmul reaches
    python benchmarks/throughput.py --data_pipeline --data folder --data_path /data/imagenet --input_size 224 \\
        --batch_size 64 --num_workers 8 --methods mae
"""
import contextlib, copy, gc, inspect, io, json, os, platform, re, statistics, sys, tempfile, time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method files and common.py live in the repository root
import common, hpm, mae, maskfeat, mfm, spark  # noqa: E402

METHODS = {'mae': mae, 'hpm': hpm, 'maskfeat': maskfeat, 'mfm': mfm, 'spark': spark}


def parse_options(argv=None):
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    add = parser.add_argument
    add('--methods', nargs='+', default=list(METHODS), choices=list(METHODS), help='methods to time (all)')
    add('--model', nargs='+', default=[], help="encoders; each method takes the first that fits it (ViTs: mae, hpm, "
        "maskfeat, mfm; mfm.RESNETS: mfm; spark.MODELS: spark), else its --data recipe's model for this size")
    add('--input_size', type=int, default=224, help='image side in pixels (224)')
    add('--batch_size', type=int, help="images per step (default: the method's recipe)")
    add('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'], help='autocast, as in training (auto)')
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    add('--warmup', type=int, default=5, help='untimed steps (or batches) first (5)')
    add('--steps', type=int, default=20, help='timed steps (or batches); 0: count FLOPs only (20)')
    add('--flops_only', action='store_true', help='count the FLOPs per image, run no timing loop')
    add('--compile', action='store_true', help="torch.compile the method's loss_fn (forward and backward), as "
                                               "training's --compile does, before timing")
    add('--peak_tflops', type=float, default=989.0, help='peak FLOP/s for MFU: 989 is the H100 SXM dense bf16 spec; '
        'a large bf16 matmul reaches about 798 on an H100 (pass that for an attainable-peak MFU)')
    add('--data_pipeline', action='store_true', help='time the data pipeline alone instead of the training step')
    add('--data', choices=['shapes', 'cifar10', 'cifar100', 'imagenet', 'folder'],
        help='the dataset whose recipe (preset) each method uses, and that --data_pipeline reads (default: shapes '
             'up to 64 px, else imagenet; --data_pipeline: shapes)')
    add('--data_path', default='./data', help='dataset root (--data_pipeline with cifar, imagenet or folder)')
    add('--num_workers', type=int, help="loader processes for --data_pipeline (default: the method's recipe)")
    add('--seed', type=int, default=0, help='seeds the model init and the synthetic batch')
    add('--json', help='also write the rows to this JSON file')
    opts = parser.parse_args(argv)
    opts.steps = 0 if opts.flops_only else opts.steps
    opts.data = opts.data or ('imagenet' if opts.input_size > 64 and not opts.data_pipeline else 'shapes')
    checks = [(opts.input_size >= 1, f'--input_size must be at least 1, got {opts.input_size}'),
              (opts.batch_size is None or opts.batch_size >= 1, f'--batch_size must be >= 1, got {opts.batch_size}'),
              (opts.warmup >= 0 and opts.steps >= 0, '--warmup and --steps must not be negative'),
              (opts.steps >= 1 or not opts.data_pipeline, '--data_pipeline needs --steps of at least 1'),
              (not (opts.data_pipeline and (opts.compile or opts.flops_only)),
               '--compile and --flops_only concern the training step: drop them with --data_pipeline'),
              (opts.num_workers is None or opts.num_workers >= 0, '--num_workers must not be negative'),
              (not opts.compile or opts.warmup >= 2, '--compile compiles in the first steps: use --warmup 2 or more'),
              (opts.peak_tflops > 0, f'--peak_tflops must be positive, got {opts.peak_tflops}'),
              (not opts.device.startswith('cuda') or torch.cuda.is_available(), 'no CUDA GPU: use --device cpu'),
              (not opts.json or os.path.isdir(os.path.dirname(os.path.abspath(opts.json))),
               f'--json {opts.json}: its folder does not exist')]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return opts


def fits(method, model):  # can this method's --model take this encoder?
    if method == 'spark':
        return model in spark.MODELS
    return model.startswith('vit_') or (method == 'mfm' and model in mfm.RESNETS)


def method_args(method, opts, output_dir):
    """The method's args from its own parse_args(argv) (presets, checks), then common.setup with its printing
    silenced."""
    module, small = METHODS[method], opts.input_size <= 64
    # no --model fits: the --data recipe's model if that recipe is for this scale, else the shapes or default one
    recipes = [{**module.DEFAULTS, **module.PRESETS.get(key, {})} for key in (opts.data, 'shapes' if small else '')]
    recipe = next((r for r in recipes if (r['input_size'] <= 64) == small), recipes[-1])
    model = next((m for m in opts.model if fits(method, m)), recipe['model'])
    if opts.model and model not in opts.model:
        print(f'note: no --model fits {method}; it runs {model}')
    # the step mode reads no files: any existing folder passes the imagenet / folder presets' path check
    path = opts.data_path if opts.data_pipeline or os.path.isdir(opts.data_path) else ROOT
    argv = ['--data', opts.data, '--model', model, '--input_size', str(opts.input_size),
            '--amp', opts.amp, '--device', opts.device, '--seed', str(opts.seed), '--output_dir', output_dir]
    argv += ['--shapes_size', str(max(10, (opts.warmup + opts.steps) * (opts.batch_size or recipes[0]['batch_size'])))
             ] if opts.data == 'shapes' else ['--data_path', path]  # each the methods refuse with the other data
    argv += ['--batch_size', str(opts.batch_size)] if opts.batch_size else []
    argv += ['--num_workers', str(opts.num_workers)] if opts.num_workers is not None else []
    if method == 'maskfeat' and model.startswith('vit_'):  # its check wants HOG cells of half the patch (2x2 cells)
        argv += ['--hog_cell_size', str(common.vit_config(model)['patch_size'] // 2)]
    try:
        args = module.parse_args(argv)
    except (SystemExit, ValueError) as e:
        sys.exit(f'{method}: {e}')
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every flag (and writes args.json to a temp folder)
        common.setup(args)
    args.accum_iter = 1  # one optimizer step per batch
    return args


def grid_size(method, args):  # the side of the method's mask grid
    return args.input_size // (spark.MODELS[args.model][3] if method == 'spark' else
                               common.vit_config(args.model)['patch_size'] if args.model.startswith('vit_') else 1)


def recipe(method, args):
    """The training transform and the draw_mask that the method's main() hands to common.build_datasets."""
    ratio = (0.75, 1.3333) if method == 'maskfeat' else (3 / 4, 4 / 3)  # as each main() builds it
    transform, grid = common.TrainTransform(args.input_size, scale=(args.crop_scale, 1.0), ratio=ratio), \
        grid_size(method, args)
    draw_mask = {'mae': lambda: mae.mask_drawer(args.mask_type, grid),
                 'hpm': lambda: partial(hpm.mask_noise, grid * grid),
                 'maskfeat': lambda: partial(maskfeat.block_masking, grid, round(grid * grid * args.mask_ratio)),
                 'mfm': lambda: partial(mfm.low_pass_choice, args.sample_ratio),
                 'spark': lambda: partial(spark.mask_noise, grid * grid)}[method]()
    return transform, draw_mask


def schedule(method, args, iters_per_epoch=1):
    """The schedule(optimizer, epoch) that the method's main() passes to common.train_one_epoch (those that take
    iters_per_epoch or batches_per_epoch get it: the loop's optimizer steps per epoch, one batch each here)."""
    function, fixed = {'mae': (common.adjust_learning_rate, {}), 'hpm': (common.adjust_learning_rate, {}),
                       'maskfeat': (maskfeat.warmup_cosine, dict(start=args.min_lr, end=args.min_lr)),
                       'mfm': (mfm.pretrain_schedule, {}), 'spark': (spark.lr_wd_annealing, {})}[method]
    for name in {'iters_per_epoch', 'batches_per_epoch'} & set(inspect.signature(function).parameters):
        fixed[name] = iters_per_epoch
    return partial(function, args=args, **fixed)


def build(method, args):
    """-> SimpleNamespace(model, optimizer, loss_fn, on_step, schedule, step): as the method's main() builds them,
    for one process; step is common.step_settings(args) (amp dtype, clip_grad, scaler)."""
    if method == 'spark':
        model = spark.SparK(spark.build_backbone(args.model, args.drop_path), args.input_size, args.mask_ratio,
                            args.decoder_width)
        for part in (model.to(args.device).sparse_encoder, model.densify_projs, model.dense_decoder):
            part.to(memory_format=torch.channels_last)
        groups = common.param_groups(model, 0.0, [n for n, _ in model.named_parameters() if 'mask_token' in n])
        optimizer = spark.LAMB(groups, args.lr, betas=(0.9, 0.95 if spark.MODELS[args.model][0] == 'resnet' else 0.999))
    else:
        model = METHODS[method].build_model(args).to(args.device)
        no_decay = ('encoder.pos_embed', 'encoder.cls_token') if method == 'mfm' else ()
        optimizer = common.adamw(model, args, (0.9, 0.999) if method == 'maskfeat' else (0.9, 0.95), no_decay)
    on_step = teacher = None
    if method == 'hpm':  # the teacher is called inside loss_fn, compiled with it under --compile
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        decay = hpm.teacher_decay(0, *args.ema_decay, args.ema_ramp_epochs)  # epoch 0's, as main() sets it per epoch
        on_step = partial(common.update_ema, teacher, model, decay)
    k = hpm.hard_count(model.num_patches, args.mask_ratio, args.alpha_final) if method == 'hpm' else None  # alpha_T's

    def loss_fn(net, images, labels, mask_input):  # the body of each main()'s loss_fn closure, for one process
        if method == 'mae':
            loss, _, _ = net(common.normalize(images), args.mask_ratio, mask_input)
            return loss, {}
        if method == 'hpm':
            imgs = common.normalize(images)
            order = hpm.hard_patches_order(teacher.teacher_losses(imgs), mask_input, k)
            (loss, rank_loss), _, _ = net(imgs, args.mask_ratio, order)
            return loss + rank_loss, {'reconstruction': loss, 'relative': rank_loss}
        if method == 'maskfeat':
            loss, _, _ = net(common.normalize(images), mask_input.float())
            return loss, {}
        if method == 'mfm':
            removed = mfm.frequency_mask(args.input_size, args.mask_radius, mask_input[:, 0])
            loss, _, _ = net(images.float() / 255, removed)
            return loss, {}
        loss, _ = net(common.normalize(images), spark.mask_from_noise(mask_input, model.keep))
        return loss, {}
    return SimpleNamespace(model=model, optimizer=optimizer, loss_fn=loss_fn, on_step=on_step,
                           schedule=schedule(method, args), epoch=args.warmup_epochs, step=common.step_settings(args))


def synthetic_batch(method, args):
    """(images, labels, mask_input) on the device: random uint8 images and labels, the mask input drawn as the
    method's data loader draws it (sample i from the generator of (seed, i))."""
    B, S, draw_mask = args.batch_size, args.input_size, recipe(method, args)[1]
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (B,), generator=generator)
    mask_input = torch.from_numpy(np.stack([draw_mask(np.random.default_rng([args.seed, i])) for i in range(B)]))
    return tuple(t.to(args.device) for t in (images, labels, mask_input))


def autocast(run, device):  # the training autocast: step_settings' amp dtype, or off
    return torch.autocast(device.type, dtype=run.step['amp'], enabled=run.step['amp'] is not None)


def flops_per_image(run, batch, device):
    """FlopCounterMode over one forward + backward of 2 images (the convention is in the module docstring)."""
    with FlopCounterMode(display=False) as counter:
        with sdpa_kernel(SDPBackend.MATH), autocast(run, device):  # attention as plain matmuls on every backend
            loss, _ = run.loss_fn(run.model, *[t[:2] for t in batch])
        loss.backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch[0][:2])


def train_step(run, batch, device, loss_fn=None):
    """common.train_one_epoch's step with accum_iter 1 (loss_fn: the compiled one, else run.loss_fn) -> the loss."""
    scaler = run.step['scaler']
    run.schedule(run.optimizer, run.epoch)
    with autocast(run, device):
        loss, _ = (loss_fn or run.loss_fn)(run.model, *batch)
    scaler.scale(loss).backward()
    common.optimizer_step(run.model, run.optimizer, scaler, run.step['clip_grad'], run.on_step)
    return loss


def time_steps(method, opts, output_dir):
    args = method_args(method, opts, output_dir)
    cuda, timed = args.device.type == 'cuda', opts.warmup + opts.steps if opts.steps else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    run, batch = build(method, args), synthetic_batch(method, args)
    run.model.train()
    gflop = flops_per_image(run, batch, args.device) / 1e9
    loss_fn, times = torch.compile(run.loss_fn) if opts.compile else run.loss_fn, []
    sync = partial(torch.cuda.synchronize, args.device) if cuda else lambda: None  # around the step, never inside
    for _ in range(timed):
        sync()
        start = time.perf_counter()
        train_step(run, batch, args.device, loss_fn)
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[opts.warmup:]) if timed else None
    peak = torch.cuda.max_memory_allocated(args.device) / 2 ** 20 if cuda else \
        common.peak_resident_memory() / 2 ** 20  # a CPU: the peak RSS of this process so far
    return dict(method=method, model=args.model, input_size=args.input_size, batch=args.batch_size, amp=args.amp,
                compile=opts.compile, images_per_s=step_s and args.batch_size / step_s, step_ms=step_s and 1e3 * step_s,
                peak_mem_mb=step_s and peak, gflop_per_image=gflop, flop_counter='FlopCounterMode, forward + backward',
                mfu=gflop * args.batch_size / step_s / (opts.peak_tflops * 1e3) if cuda and step_s else None,
                device=device_name(args.device))


def time_pipeline(method, opts, output_dir):
    args = method_args(method, opts, output_dir)
    train_set, _ = common.build_datasets(args, *recipe(method, args))
    loader = common.make_loader(train_set, args, train=True)

    def batches():  # epoch after epoch, as in training (each epoch starts fresh workers)
        for epoch in range(10 ** 9):
            loader.sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            yield from loader
    stream = batches()
    for _ in range(opts.warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(opts.steps):
        next(stream)
    images_per_s = opts.steps * args.batch_size / (time.perf_counter() - start)
    return dict(method=method, model=args.model, input_size=args.input_size, batch=args.batch_size, data=args.data,
                num_workers=args.num_workers, images_per_s=images_per_s, device=device_name(torch.device('cpu')),
                images_per_s_per_worker=images_per_s / max(args.num_workers, 1))  # 0 workers: the main process


def device_name(device):  # the GPU's name, or the CPU's model name (as lscpu shows it) and the threads used
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpuinfo = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    name = next(iter(re.findall(r'model name\s*:\s*(.*)', cpuinfo)), platform.processor() or platform.machine())
    return f'{name}, {torch.get_num_threads()} threads'


def print_table(rows, columns):  # columns: (key, title, format); a missing value prints as '-'
    cells = [[title for _, title, _ in columns]] + [['-' if row.get(key) is None else fmt.format(row[key])
                                                     for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print('  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv=None):
    opts = parse_options(argv)
    rows, cuda = [], opts.device.startswith('cuda')
    with tempfile.TemporaryDirectory() as output_dir:
        for method in opts.methods:
            run = time_pipeline if opts.data_pipeline else time_steps
            rows.append({**run(method, opts, output_dir), 'torch': torch.__version__})
            gc.collect()  # free this method's model and optimizer before the next one's peak is measured
            torch.cuda.empty_cache()
            if opts.compile:
                torch._dynamo.reset()  # the methods share code (Block.forward): no recompile limit across them
    print(f"device: {rows[0]['device']}; torch {torch.__version__}")
    columns = [('method', 'method', '{}'), ('model', 'model', '{}'), ('input_size', 'size', '{}'),
               ('batch', 'batch', '{}')]
    if opts.data_pipeline:
        print(f'data pipeline alone (--data {opts.data}): decode, augment, collate; {opts.steps} batches after '
              f'{opts.warmup}')
        print_table(rows, columns + [('num_workers', 'workers', '{}'), ('images_per_s', 'img/s', '{:.1f}'),
                                     ('images_per_s_per_worker', 'img/s/worker', '{:.1f}')])
    else:
        memory = 'CUDA max_memory_allocated' if cuda else 'peak RSS of the whole process so far'
        print(f'training step, synthetic data on the device{", torch.compile" if opts.compile else ""}: ' +
              (f'median of {opts.steps} steps after {opts.warmup}; peak MB: {memory}; ' if opts.steps else '') +
              'GFLOP/img: FlopCounterMode, forward + backward' +
              (f'; MFU against {opts.peak_tflops:g} TFLOP/s' if cuda else ''))
        print_table(rows, columns + [('amp', 'amp', '{}'), ('images_per_s', 'img/s', '{:.1f}'),
                                     ('step_ms', 'step ms', '{:.1f}'), ('peak_mem_mb', 'peak MB', '{:.0f}'),
                                     ('gflop_per_image', 'GFLOP/img', '{:.2f}'), ('mfu', 'MFU', '{:.1%}')])
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump(rows, f, indent=1)
        print(f'wrote {len(rows)} rows to {opts.json}')


if __name__ == '__main__':
    main()
