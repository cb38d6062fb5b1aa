import json, math, os, signal, subprocess, sys, time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The smallest settings that still exercise every stage of a method file: 16 px shapes, 4x4 patches.
TINY = ['--data', 'shapes', '--input_size', '16', '--model', 'vit_tiny_patch4', '--batch_size', '8',
        '--shapes_size', '64', '--epochs', '1', '--warmup_epochs', '0', '--probe_epochs', '2', '--knn_k', '5']
# MAE's and HPM's smallest decoder, its heads given with its width rather than left to a preset (32 / 2 = 16-wide)
TINY_DECODER = ['--decoder_embed_dim', '32', '--decoder_depth', '1', '--decoder_num_heads', '2']
TIMING_FIELDS = ('images_per_s', 'epoch_time_s', 'peak_mem_mb')  # log.txt fields that differ between equal runs


class Stop(Exception):
    """Raised by a test's stand-in for a step of a run (e.g. common.train_one_epoch) once it has seen what it needs."""


def run_script(script, args, timeout=300, env=None, check=True):
    """Run `python <script> args` from the repository root, as a user would; return the CompletedProcess."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f'{script} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def without_timing(lines):
    """Log lines (dicts, or JSON strings as a checkpoint's 'log' keeps them) without the wall-clock fields."""
    lines = [json.loads(line) if isinstance(line, str) else line for line in lines]
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines]


def check_run_folder(out, picture, loss='train_loss', finetuned=True):
    """What a method's end-to-end run leaves in `out`: a finite first loss, the evaluation as the log's last line,
    epoch and last checkpoints, its picture, and (finetuned) the fine-tune's own log and weights in out/finetune/;
    each top-1 a count of the --data shapes val images (max(shapes_size // 5, 10)) in percent. -> the log's lines."""
    log = read_log(out)
    assert math.isfinite(log[0][loss]) and log[0]['images_per_s'] > 0
    evaluation = log[-1]  # fine-tuning logs in finetune/log.txt, not here
    assert evaluation.get('evaluation') and not any('finetune_epoch' in line for line in log)
    top1s = {f'{encoder}_{metric}_top1' for encoder in ('trained', 'random_init') for metric in ('knn', 'probe')}
    assert top1s <= set(evaluation)
    top1s = {key: evaluation[key] for key in top1s}
    assert os.path.exists(f'{out}/checkpoint-last.pth') and os.path.exists(f'{out}/checkpoint-0.pth')
    assert os.path.getsize(f'{out}/{picture}') > 1000
    if finetuned:
        tuned = read_log(f'{out}/finetune')[-1]
        assert tuned['finetune_epoch'] == 0
        assert os.path.exists(f'{out}/finetune/finetuned.pth') and not os.path.exists(f'{out}/finetuned.pth')
        top1s['finetune_top1'] = tuned['finetune_top1']
    with open(f'{out}/args.json') as f:
        args = json.load(f)
    assert args['data'] == 'shapes'  # (the val split below is its)
    n_val = max(args['shapes_size'] // 5, 10)
    for key, top1 in top1s.items():  # k of the n_val images right: k * 100 / n_val (a float32 mean: within 1e-4)
        count = top1 * n_val / 100
        assert abs(count - round(count)) < 1e-4 and 0 <= round(count) <= n_val, (key, top1, n_val)
    return log


def load_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)  # small tensors: threads only add noise to timings and contention between tests


def kill_then_resume(script, flags, out, delay):
    """Start a run, SIGKILL it `delay` seconds after its first checkpoint appears (a callable: delay(seconds the first
    epoch took), so that the kill lands inside the second epoch on a fast or slow machine alike), then resume it with
    --resume auto. Returns the final checkpoint."""
    process = subprocess.Popen([sys.executable, script, *flags, '--output_dir', out], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.time() + 240
    while not os.path.exists(f'{out}/checkpoint-last.pth') and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if callable(delay):
        delay = delay(json.loads(open(f'{out}/log.txt').readline())['epoch_time_s'])
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(f'{out}/checkpoint-last.pth', weights_only=True)['epoch'] in (0, 1)  # never a broken file
    run_script(script, flags + ['--output_dir', out, '--resume', 'auto'])
    return torch.load(f'{out}/checkpoint-last.pth', map_location='cpu', weights_only=True)
