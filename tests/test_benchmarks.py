"""The benchmarks run: throughput.py at a tiny CPU size, and gpu_check.py --smoke (every row, the JSON lines)."""
import json, os, re, sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import common, gpu_check  # noqa: E402

THROUGHPUT = ['--device', 'cpu', '--input_size', '32', '--batch_size', '8', '--steps', '2', '--warmup', '1']
METHODS = ['mae', 'hpm', 'maskfeat', 'mfm', 'spark']
FIELDS = {'method', 'model', 'mode', 'images_per_s', 'mfu', 'peak_mem_mb', 'sync_free', 'status', 'notes', 'device',
          'gpus', 'torch', 'date', 'run'}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Both scripts at once (each single-threaded): -> (throughput's stdout, gpu_check's stdout, its JSON rows)."""
    path = tmp_path_factory.mktemp('gpu_check') / 'rows.jsonl'
    with ThreadPoolExecutor(2) as pool:
        tp = pool.submit(run_script, 'benchmarks/throughput.py', THROUGHPUT)
        gc = pool.submit(run_script, 'benchmarks/gpu_check.py', ['--smoke', '--json', str(path)], 300)
        tp, gc = tp.result(), gc.result()  # run_script raises on a non-zero exit, with the output
    with open(path) as f:
        return tp.stdout, gc.stdout, [json.loads(line) for line in f]


def table(stdout, splits=0):
    """The rows of the last table printed, split into cells at 2+ spaces (splits > 0: at most that many)."""
    lines = stdout[stdout.rindex('\nmethod ') + 1:].splitlines()
    return [re.split(r'\s{2,}', line.strip(), maxsplit=splits) for line in lines[1:] if line.split()[0] in METHODS]


def test_throughput_times_every_method(runs):
    rows = table(runs[0])
    assert [r[0] for r in rows] == METHODS
    for method, model, size, batch, amp, images_per_s, step_ms, peak, gflop, mfu in rows:
        assert size == '32' and batch == '8' and float(images_per_s) > 0 and float(gflop) > 0 and mfu == '-'


def test_gpu_check_smoke_says_so_and_lists_every_row(runs):
    _, stdout, rows = runs
    assert stdout.startswith('gpu_check: SMOKE mode on a CPU') and 'no row failed' in stdout
    printed = {(r[0], r[2]): r for r in table(stdout, splits=8)}  # the notes, last, hold single spaces
    expected = {(m, mode) for m in METHODS for mode in ('eager', 'compile')}
    expected |= {('mae', 'pretrain'), ('mae', 'torchrun')}
    assert set(printed) == expected == {(r['method'], r['mode']) for r in rows} and len(rows) == len(expected)
    for row in rows:
        assert FIELDS <= row.keys() and row['run'] == 'smoke' and row['gpus'] == 0, row
        assert row['status'] == ('skipped' if row['mode'] == 'compile' else 'ok'), row  # compile: --compile_smoke
        assert row['sync_free'] is None and row['mfu'] is None  # neither is measured on a CPU
    for row in (r for r in rows if r['mode'] == 'eager'):
        assert row['images_per_s'] > 0 and row['gflop_per_image'] > 0 and row['batch'] == 4 and row['input_size'] == 16
        assert row['would_sync_on_gpu'] == [] and row['notes'].startswith('cpu'), row  # the README's claim: no step
        assert printed[row['method'], 'eager'][1] == row['model'] == (
            'resnet_mini_ds8' if row['method'] == 'spark' else 'vit_tiny_patch4')


def test_gpu_check_smoke_pretraining_loss_falls_and_torchrun_equals_one_process(runs):
    rows = {r['mode']: r for r in runs[2] if r['mode'] in ('pretrain', 'torchrun')}
    pretrain, torchrun = rows['pretrain'], rows['torchrun']
    assert pretrain['loss_fell'] and pretrain['first_loss'] > pretrain['last_loss'] > 0
    assert pretrain['images_per_s'] > 0 and 'over 2 epochs' in pretrain['notes']
    assert torchrun['equal'] and torchrun['max_abs_diff'] <= 1e-5 and 'gloo' in torchrun['notes']


class FakeSyncError(TorchDispatchMode):
    """What set_sync_debug_mode('error') does on a GPU, for a CPU: a tensor made from host data raises."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == 'lift_fresh' and args[0].dim() > 0:
            raise RuntimeError('called a synchronizing CUDA operation')
        return func(*args, **(kwargs or {}))


def test_a_step_that_syncs_fails_its_row_naming_the_line_and_is_timed_without_the_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'sync_errors', lambda device: FakeSyncError())
    fresh = lambda values, device: torch.tensor(values, device=device)  # what common.on_device caches away
    monkeypatch.setattr(common, 'on_device', fresh)
    opts = gpu_check.parse_options(['--smoke', '--methods', 'mae'])
    opts.peak = None
    row = gpu_check.step_row('mae', False, opts, str(tmp_path), {})
    assert row['status'] == 'fail' and row['sync_free'] is False and row['images_per_s'] > 0
    assert row['notes'].startswith('syncs at ') and 'called a synchronizing' in row['notes'], row['notes']


def test_peers_without_transformers_says_how_to_install_it_and_exits_cleanly(monkeypatch, capsys):
    import peers
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers raises ImportError, as uninstalled
    assert peers.main(['--compile']) == 0
    out = capsys.readouterr().out
    assert 'transformers is not installed' in out and 'requirements.txt' in out
    assert 'pip install torch numpy pillow tqdm transformers' in out and 'benchmarks/peers.py' in out


@pytest.mark.parametrize('method', METHODS)
def test_gpu_check_sizes_parse_for_every_method(method, tmp_path):
    """The GPU mode's step rows (ViT-B/16 or ResNet-50, 224 px: the imagenet recipes) get past each method's checks
    (--smoke runs 16 px shapes only: a flag the imagenet recipe refuses, as --shapes_size once was, went unseen)."""
    import throughput
    opts = throughput.parse_options(['--methods', method, '--model', *gpu_check.GPU['models'], '--input_size', '224',
                                     '--batch_size', '64', '--amp', 'bf16', '--device', 'cpu'])
    args = throughput.method_args(method, opts, str(tmp_path))
    assert args.data == 'imagenet' and args.input_size == 224 and args.model in gpu_check.GPU['models']


def test_gpu_check_pretraining_row_flags_parse(tmp_path):
    """The GPU mode's real pretraining (mae.py, the 32 px shapes preset) gets past mae.py's checks: --smoke runs
    other flags (PRETRAIN_SMOKE), so a flag that drifted here would first fail on a GPU."""
    import mae
    args = mae.parse_args(gpu_check.PRETRAIN + ['--device', 'cpu', '--output_dir', str(tmp_path)])
    assert (args.data, args.input_size, args.num_workers, args.epochs) == ('shapes', 32, 4, 7)


def test_step_breakdown_smoke_lists_every_part_and_the_profiler_rows():
    result = run_script('benchmarks/step_breakdown.py', ['--smoke', '--repeats', '2'])
    rows = [line for line in result.stdout.splitlines() if line.startswith('| ') and not line.startswith('| part')]
    assert [row.split(' | ')[0][2:].split(' ')[0] for row in rows] == ['matrix', 'attention', "autocast's", 'GELU,',
                                                                         'fused', 'the']
    assert 'smoke' in result.stdout and result.stdout.count('one step ') == 5
    assert re.search(r'one step unprofiled: \d+ ms, \d+ minor page faults', result.stdout)


@pytest.mark.parametrize('method', ['mae', 'mae_green', 'hpm', 'maskfeat', 'mfm', 'spark'])
def test_compare_gives_each_method_file_flags_it_takes(method, tmp_path):
    """Both of compare.py's runs of a method (pretraining, fine-tuning from random weights) get past its file's checks
    (an hour-long benchmark that stopped at SparK's run on --global_pool, a flag only the ViT methods have)."""
    import compare
    (tmp_path / 'train').mkdir()
    assert set(compare.METHODS) == {'mae', 'mae_green', 'hpm', 'maskfeat', 'mfm', 'spark'}
    opts, out, data = compare.parse_options([]), ['--output_dir', str(tmp_path)], str(tmp_path)
    for run in (compare.method_flags(method, opts, data), compare.random_init_flags(method, opts, data)):
        args = __import__(method.split('_')[0]).parse_args(run + out)
        assert (args.data, args.input_size, args.epochs, args.mixup) == ('folder', 32, 10, 0)
        if not args.eval_only:  # the ViTs' kNN / probe feature (the fine-tune alone has none to pick)
            assert getattr(args, 'global_pool', None) is (None if method == 'spark' else True)


def test_throughput_times_the_data_pipeline_alone_on_an_image_folder(tmp_path, capsys):
    """--data_pipeline (the README's Imagenette row) reads a folder through each method's transform and mask draw."""
    import throughput
    from PIL import Image
    for label, colour in (('a', 'red'), ('b', 'blue')):
        os.makedirs(tmp_path / 'data' / 'train' / label)
        for i in range(8):
            Image.new('RGB', (24, 20), colour).save(tmp_path / 'data' / 'train' / label / f'{i}.jpg')
    throughput.main(['--data_pipeline', '--data', 'folder', '--data_path', str(tmp_path / 'data'), '--input_size', '16',
                     '--batch_size', '4', '--steps', '5', '--warmup', '1', '--num_workers', '0',
                     '--json', str(tmp_path / 'rows.json')])
    rows = json.load(open(tmp_path / 'rows.json'))
    assert [r['method'] for r in rows] == METHODS and 'data pipeline alone (--data folder)' in capsys.readouterr().out
    assert all(r['data'] == 'folder' and r['batch'] == 4 and r['images_per_s'] > 0 for r in rows), rows
