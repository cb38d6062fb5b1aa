"""The five methods under one budget on CIFAR-10: kNN, linear-probe and fine-tuning top-1, with random-init rows.

Each method file runs as a user would run it (a subprocess, its own recipe for everything not listed here) on the
same class-balanced subset of CIFAR-10 (`--train_per_class` + `--val_per_class` images of each class, laid out under
<output_dir>/data as symbolic links to the JPEG folder, nothing copied), with the same budget: 32-px images decoded
once (--cache), the same pretraining crop (RandomResizedCrop scale 0.2-1, flip), batch, epochs and warmup, and then
the same evaluation: kNN (k=20), a 30-epoch linear probe on frozen features, and --finetune_epochs of end-to-end
fine-tuning (common.finetune with mixup / cutmix off and a half-epoch warmup for so short a run; the four ViTs share
lr 1e-3 per 256 and layer decay 0.75, MAE's code defaults; SparK keeps its LAMB recipe but at 20x its lr, 0.04 per
256, as its pretraining preset: LAMB steps by lr times |w|, and the official 2e-3 per 256, scaled for batch 2048 and
300 epochs, barely moves a network in 234 steps at batch 64: fine-tuned, it stayed near chance, 10.65%). The
encoder is ViT-Ti/4 (5.4M parameters) for the four ViT methods; SparK, a convnet method, uses resnet_mini_ds8 (0.5M;
convnext_atto_ds8, 3.4M, runs 3x slower than ViT-Ti/4 on a CPU). The pretraining lr is each method's 32-px `shapes`
preset. Random-init rows evaluate each method's network untrained, with the method's own initialisation: kNN and
probe in the same run, fine-tuning in a second run (`--eval_only` without `--resume`).

Writes <output_dir>/results.md (the table, the command, the machine, the date) and results.json; each run keeps its
log.txt and pictures under <output_dir>/<method>. Run from the repository root:
    python benchmarks/compare.py                   # the README table: 61 minutes on a 2-core CPU
    python benchmarks/compare.py --train_per_class 5000 --val_per_class 1000 --epochs 100 --finetune_epochs 20
"""
import argparse, datetime, json, os, platform, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = ['--model', 'vit_tiny_patch4', '--blr', '1.5e-3', '--ft_blr', '1e-3', '--layer_decay', '0.75', '--global_pool']
METHODS = {  # what differs: encoder, pretraining lr (the shapes presets), decoder size; ViTs share one fine-tuning lr
    'mae': VIT + ['--decoder_embed_dim', '128', '--decoder_depth', '2', '--decoder_num_heads', '4'],
    'mae_green': VIT + ['--decoder_embed_dim', '128', '--decoder_depth', '2', '--decoder_num_heads', '4',
                        '--mask_type', 'green'],  # ColorMAE's band-pass masks, MAE otherwise the same run
    'hpm': VIT + ['--decoder_embed_dim', '128', '--decoder_depth', '2', '--decoder_num_heads', '4'],
    'maskfeat': VIT + ['--hog_cell_size', '2'],
    'mfm': VIT + ['--sincos_pos_init'],
    'spark': ['--model', 'resnet_mini_ds8', '--blr', '0.04', '--decoder_width', '64', '--ft_blr', '0.04'],
}


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data_path', default=os.path.join(ROOT, '..', 'shared', 'data', 'cifar10'),
                        help='CIFAR-10 as an ImageFolder tree: train/<class>/*.jpg and test/<class>/*.jpg')
    parser.add_argument('--train_per_class', type=int, default=500, help='pretraining / training images per class')
    parser.add_argument('--val_per_class', type=int, default=200, help='evaluation images per class (from test/)')
    parser.add_argument('--epochs', type=int, default=10, help='pretraining epochs, every method')
    parser.add_argument('--finetune_epochs', type=int, default=3, help='fine-tuning epochs, every method')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                        help='runs; mae_green is mae.py with --mask_type green')
    parser.add_argument('--output_dir', default=os.path.join(ROOT, 'output', 'compare'))
    return parser.parse_args(argv)


def link_subset(source, target, per_class):
    """target/<class>/ holding symbolic links to the first `per_class` images (sorted names) of source/<class>/."""
    for name in sorted(os.listdir(source)):
        os.makedirs(os.path.join(target, name), exist_ok=True)
        for file in sorted(os.listdir(os.path.join(source, name)))[:per_class]:
            link = os.path.join(target, name, file)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source, name, file)), link)


def method_flags(method, opts, data):  # one row of METHODS: the budget every method shares, then what differs
    return ['--data', 'folder', '--data_path', data, '--cache', '--input_size', '32', '--crop_scale', '0.2',
            '--batch_size', str(opts.batch_size), '--epochs', str(opts.epochs), '--warmup_epochs', '1',
            '--num_workers', str(opts.num_workers), '--probe_epochs', '30', '--finetune_epochs',
            str(opts.finetune_epochs), '--ft_warmup_epochs', '0.5', '--mixup', '0', '--cutmix', '0'] + METHODS[method]


RANDOM_INIT_FINETUNE = ['--eval_only', '--knn_k', '0', '--probe_epochs', '0']  # no --resume: the untrained network


def random_init_flags(method, opts, data):  # the same run, fine-tuning only: no kNN / probe feature to pick
    return [f for f in method_flags(method, opts, data) if f != '--global_pool'] + RANDOM_INIT_FINETUNE


def run(method, flags, output_dir):  # method: a row of METHODS, run by its file (mae_green: mae.py)
    """Run `python <method>.py flags`, its output to output_dir/stdout.txt -> (the log.txt lines, seconds). A run that
    finished before (output_dir/done.json) is read back, not repeated: delete its folder to run it again."""
    done = os.path.join(output_dir, 'done.json')
    if os.path.exists(done):
        with open(done) as g:
            return read_logs(output_dir), json.load(g)['seconds']
    os.makedirs(output_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(output_dir, 'stdout.txt'), 'w') as out:
        script = os.path.join(ROOT, f"{method.split('_')[0]}.py")
        code = subprocess.call([sys.executable, script, *flags, '--output_dir', output_dir],
                               cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f'{method}.py exited {code}: see {output_dir}/stdout.txt')
    with open(done, 'w') as f:
        json.dump({'seconds': time.time() - start, 'flags': flags}, f)
    return read_logs(output_dir), time.time() - start


def read_logs(output_dir):  # log.txt, then the fine-tuning's finetune/log.txt
    paths = [os.path.join(output_dir, 'log.txt'), os.path.join(output_dir, 'finetune', 'log.txt')]
    return [json.loads(line) for path in paths if os.path.exists(path) for line in open(path)]


def summary(log):
    """A run's log.txt -> kNN and probe top-1 of the trained and the random-init encoder, and the last fine-tuning
    epoch's top-1."""
    evaluation = next(line for line in log if line.get('evaluation'))
    finetuned = [line['finetune_top1'] for line in log if 'finetune_top1' in line]
    return {**{k: evaluation.get(f'{who}_{metric}_top1') for who in ('trained', 'random_init')
               for metric, k in (('knn', f'{who}_knn'), ('probe', f'{who}_probe'))}, 'finetune': finetuned[-1]}


def main(argv=None):
    opts = parse_options(argv)
    data = os.path.join(opts.output_dir, 'data')
    link_subset(os.path.join(opts.data_path, 'train'), os.path.join(data, 'train'), opts.train_per_class)
    link_subset(os.path.join(opts.data_path, 'test'), os.path.join(data, 'val'), opts.val_per_class)
    rows, seconds = {}, {}
    for method in opts.methods:  # mae_green needs no random-init rows of its own: mae's network and init
        log, seconds[method] = run(method, method_flags(method, opts, data), os.path.join(opts.output_dir, method))
        rows[method] = summary(log)
        print(f'{method}: {rows[method]}, {seconds[method]:.0f} s', flush=True)
    for method in [m for m in opts.methods if m != 'mae_green']:  # fine-tuning from random weights: --eval_only
        name = f'{method}_random'  # without --resume, nothing else
        log, seconds[name] = run(method, random_init_flags(method, opts, data), os.path.join(opts.output_dir, name))
        rows[method]['random_init_finetune'] = summary(log)['finetune']
    if 'mae_green' in rows:  # the same network and initialisation as mae's
        rows['mae_green']['random_init_finetune'] = rows.get('mae', {}).get('random_init_finetune')
    write_results(opts, rows, seconds, argv)


def torch_version():  # of the interpreter the runs use, without importing torch here
    return subprocess.run([sys.executable, '-c', 'import torch; print(torch.__version__)'], capture_output=True,
                          text=True).stdout.strip()


def write_results(opts, rows, seconds, argv):
    cell = lambda row, key: '-' if row.get(key) is None else f'{row[key]:.2f}'
    lines = [f'CIFAR-10 subset: {opts.train_per_class * 10} train / {opts.val_per_class * 10} val images, 32 px; '
             f'{opts.epochs} pretraining epochs, {opts.finetune_epochs} fine-tuning epochs, batch {opts.batch_size}. '
             f'Top-1 (%) on the val images, pretrained (random init).', '',
             '| method | encoder | kNN | linear probe | fine-tune | run time |', '|---|---|---|---|---|---|']
    for method, row in rows.items():
        encoder = METHODS[method][METHODS[method].index('--model') + 1]
        lines.append(f'| {method} | {encoder} | ' + ' | '.join(
            f'{cell(row, "trained_" + k if k != "finetune" else k)} ({cell(row, "random_init_" + k)})'
            for k in ('knn', 'probe', 'finetune')) + f' | {seconds[method] / 60:.1f} min |')
    command = ' '.join(['python benchmarks/compare.py', *(argv if argv is not None else sys.argv[1:])])
    cpu = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')] \
        if os.path.exists('/proc/cpuinfo') else [platform.processor()]
    lines += ['', f'Command: `{command}`. Machine: {cpu[0] if cpu else platform.machine()}, {os.cpu_count()} cores, '
              f'torch {torch_version()}. Date: {datetime.date.today().isoformat()}. All runs: '
              f'{sum(seconds.values()) / 60:.0f} min.']
    with open(os.path.join(opts.output_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(opts.output_dir, 'results.json'), 'w') as f:
        json.dump({'options': vars(opts), 'rows': rows, 'seconds': seconds}, f, indent=1)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
