"""Runs that survive faults and scale: exact resume (also after SIGKILL mid-epoch) and torchrun == one process."""
import os, random, shutil, subprocess, sys

import pytest
import torch

from conftest import ROOT, TINY, TINY_DECODER, kill_then_resume, load_weights, read_log, run_script, without_timing

# 2 epochs of 16 steps: long enough to kill mid-epoch, short enough for CI; a numbered checkpoint every epoch
RUN = TINY + ['--shapes_size', '128', '--epochs', '2', *TINY_DECODER, '--probe_epochs', '0', '--knn_k', '0',
              '--save_freq', '1']
CHECKPOINTS = ['checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth']


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), f'{key} differs by {(a[key] - b[key]).abs().max()}'


def assert_equal_nested(a, b, where):
    """Equal containers of tensors and plain values (an optimizer's state dict), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def assert_same_run_folder(out, reference):
    """What a killed-then-resumed run leaves equals what an uninterrupted one leaves: the same files (no leftover
    temporary file), each checkpoint with the same epoch, weights, optimizer state and log lines, and the same
    log.txt, every field but the wall-clock ones."""
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    assert sorted(f for f in os.listdir(out) if '.pth' in f) == CHECKPOINTS
    for name in CHECKPOINTS:
        a, b = (torch.load(f'{folder}/{name}', map_location='cpu', weights_only=True) for folder in (out, reference))
        assert a['epoch'] == b['epoch'] == (1 if name == 'checkpoint-last.pth' else int(name[11]))
        assert_same_weights(a['model'], b['model'])
        assert_equal_nested(a['optimizer'], b['optimizer'], f'{name} optimizer')
        assert without_timing(a['log']) == without_timing(b['log']), name
    resumed, straight = read_log(out), read_log(reference)
    assert [line['epoch'] for line in straight] == [0, 1, 1] and straight[-1].get('evaluation')
    assert all('images_per_s' in line for line in resumed[:2])  # the timing fields are there, only not compared
    assert without_timing(resumed) == without_timing(straight)
    with open(f'{out}/reconstruction.png', 'rb') as a, open(f'{reference}/reconstruction.png', 'rb') as b:
        assert a.read() == b.read()


def killed_after_epoch_0(out, final):
    """The kill landed where it should: epoch 0 saved by the first run, epoch 1 trained and saved by the resumed one
    (a first run that had finished before the kill would leave nothing to resume, and the test nothing to test)."""
    first = torch.load(f'{out}/checkpoint-0.pth', map_location='cpu', weights_only=True)
    return first['args']['resume'] == '' and final['epoch'] == 1 and final['args']['resume'] == 'auto'


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('straight'))
    run_script('mae.py', RUN + ['--output_dir', out])
    return out


def test_resume_at_epoch_boundary_equals_uninterrupted(tmp_path, uninterrupted):
    out = str(tmp_path / 'boundary')
    final = kill_then_resume('mae.py', RUN, out, 0.0)
    assert killed_after_epoch_0(out, final)
    assert_same_weights(final['model'], load_weights(f'{uninterrupted}/checkpoint-last.pth'))
    assert_same_run_folder(out, uninterrupted)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    fraction = random.Random(os.getpid()).uniform(0.1, 0.9)  # somewhere inside the second epoch
    out = str(tmp_path / 'killed')
    final = kill_then_resume('mae.py', RUN, out, lambda epoch_s: fraction * epoch_s)
    assert killed_after_epoch_0(out, final)
    assert_same_weights(final['model'], load_weights(f'{uninterrupted}/checkpoint-last.pth'))
    assert_same_run_folder(out, uninterrupted)  # issue 17, case 6: checkpoints and log as if never killed


def test_resume_may_change_the_precision(tmp_path, uninterrupted):
    """A run resumed with --amp fp16 continues (a setting a resume may change): a checkpoint saved without fp16 (the
    uninterrupted run's: bf16 or none, as --amp auto chose) holds no loss-scaler state, which the fp16 run must not
    try to load (it used to stop with a RuntimeError)."""
    out = str(tmp_path / 'fp16')
    shutil.copytree(uninterrupted, out)
    resumed = run_script('mae.py', RUN + ['--epochs', '3', '--amp', 'fp16', '--output_dir', out, '--resume', 'auto'])
    assert 'resumed from' in resumed.stdout and 'warning' not in resumed.stdout  # --amp is free to change
    assert read_log(out)[-1]['epoch'] == 2
    saved = torch.load(f'{out}/checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert saved['args']['amp'] == 'fp16' and saved['scaler'].get('scale')  # the last epoch ran with a loss scaler


def test_torchrun_two_processes_equal_one_with_the_same_effective_batch(tmp_path):
    flags = RUN + ['--epochs', '1', '--amp', 'none']
    one = str(tmp_path / 'one')
    run_script('mae.py', flags + ['--batch_size', '16', '--output_dir', one])
    two = str(tmp_path / 'two')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'mae.py', *flags, '--batch_size', '8', '--output_dir', two], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'effective batch 16' in result.stdout
    assert_same_weights(*[without_key_bias(load_weights(f'{out}/checkpoint-last.pth')) for out in (two, one)], 1e-5)


def without_key_bias(state):
    """Drop the key third of every qkv bias. Softmax ignores a constant added to all keys, so its true gradient is
    exactly 0 and what it gets is rounding noise, which Adam normalises into +-lr steps that differ between any two
    summation orders. Every other weight of the two runs agrees to about 1e-9."""
    for name in [n for n in state if n.endswith('qkv.bias')]:
        dim = state[name].shape[0] // 3
        state[name] = torch.cat([state[name][:dim], state[name][2 * dim:]])
    return state
