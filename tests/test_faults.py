"""Faults a user meets, run as a user would (`python mae.py ...` in a subprocess): each must stop with ONE line on
stderr (no traceback), a non-zero exit, and leave what was already written as it was (checkpoints byte-identical,
log lines intact). One finished tiny run is made once per module and copied for each case; the independent runs of
a case start together, as the machine has few cores and each run spends most of its time importing torch."""
import argparse, errno, glob, hashlib, json, os, re, resource, shutil, signal, subprocess, sys, tempfile, time

import pytest
import torch

import common
from conftest import ROOT

# The smallest MAE run that still exercises every stage: 16 px shapes, 4x4 patches, a 32-wide 1-block decoder.
FLAGS = ['--data', 'shapes', '--input_size', '16', '--model', 'vit_tiny_patch4', '--batch_size', '8',
         '--shapes_size', '64', '--epochs', '1', '--warmup_epochs', '0', '--probe_epochs', '0', '--knn_k', '0',
         '--decoder_embed_dim', '32', '--decoder_depth', '1', '--decoder_num_heads', '1']
EVAL = ['--probe_epochs', '2', '--knn_k', '5']  # later flags win: the base run also evaluates (case 11)
TIMEOUT = 240


class Run:
    """A finished subprocess: rc, stdout, stderr; `error` is its one error line (asserted to be one)."""
    def __init__(self, argv, rc, stdout, stderr):
        self.argv, self.rc, self.stdout, self.stderr = argv, rc, stdout, stderr

    def __repr__(self):
        return f'{" ".join(self.argv)}\nexit {self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n' \
               f'{self.stderr[-3000:]}'

    @property
    def error(self):
        """The run failed as it should: exit 1 (sys.exit / parser.error, not a signal), no traceback, exactly one
        line (of the '\\n'-separated stderr) that starts with 'error:' or '<prog>: error:', and it is the last one:
        nothing (no progress bar) is printed after it."""
        prog = os.path.basename(self.argv[0])
        lines = self.stderr.split('\n')
        assert self.rc == 1, self
        assert not any('Traceback' in line for line in lines), self
        errors = [line for line in lines if line.startswith(('error:', f'{prog}: error:'))]
        assert len(errors) == 1, self
        assert [line for line in lines if line.strip()][-1] == errors[0], f'output after the error line\n{self}'
        return errors[0]

    def ok(self):
        assert self.rc == 0 and 'Traceback' not in self.stderr, self
        return self


def child_env():
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def run_all(*calls, preexec_fn=None):
    """Start every call at once (each a list: script, then its arguments), from the repository root as a user would,
    and wait for all -> [Run]. Their output goes to files, so that no pipe fills while another run is awaited."""
    procs = []
    for script, *args in calls:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        procs.append((script, args, out, err, subprocess.Popen(
            [sys.executable, script, *args], cwd=ROOT, stdout=out, stderr=err, env=child_env(),
            preexec_fn=preexec_fn)))
    runs = []
    for script, args, out, err, proc in procs:
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = []
        for f in (out, err):
            f.seek(0)
            text.append(f.read().decode(errors='replace'))
            f.close()
        runs.append(Run([script, *args], proc.returncode, *text))
    return runs


def mae(out, *flags):  # one call of run_all: the tiny MAE run into `out`, then `flags` (later flags win)
    return ['mae.py', *FLAGS, '--output_dir', str(out), *flags]


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(folder):  # every file below folder -> its sha256
    paths = sorted(glob.glob(f'{glob.escape(str(folder))}/**', recursive=True))
    return {os.path.relpath(p, folder): digest(p) for p in paths if os.path.isfile(p)}


def log_lines(folder):
    with open(os.path.join(folder, 'log.txt')) as f:
        return f.read().splitlines()


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


# ---- fixtures: one finished run, copied into each test's own folder ------------------------------------------
@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """One finished 1-epoch run (with kNN and a 2-epoch probe) -> (folder, its Run, snapshot of its files)."""
    out = tmp_path_factory.mktemp('base') / 'run'
    run, = run_all(mae(out, *EVAL))
    run.ok()
    assert sorted(os.listdir(out)) == ['args.json', 'checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt',
                                       'reconstruction.png'], run
    return out, run, snapshot(out)


@pytest.fixture
def copy(base, tmp_path):
    """copy(name) -> a fresh copy of the finished run's folder under this test's tmp_path."""
    def make(name='run'):
        return shutil.copytree(base[0], tmp_path / name)
    return make


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny MAE run with --model vit_small_patch4 (384 wide, not 192), written by the program's
    own parse_args / build_model / adamw / save_checkpoint, before any step (the weights' values do not matter)."""
    import common, mae as mae_module
    out = tmp_path_factory.mktemp('small')
    args = mae_module.parse_args(FLAGS + ['--model', 'vit_small_patch4', '--epochs', '2', '--output_dir', str(out),
                                          '--device', 'cpu'])
    model = mae_module.build_model(args)
    common.save_checkpoint(args, 0, model, common.adamw(model, args, betas=(0.9, 0.95)))  # checkpoint-last.pth only
    return str(out / 'checkpoint-last.pth')


# ---- 1. one run per folder -------------------------------------------------------------------------------------
def test_second_run_into_a_folder_is_refused_and_resume_auto_continues_it(base, copy, tmp_path):
    folder, again, before = copy(), copy('again'), base[2]  # `again` is `folder` after the refusal: byte-identical
    died = copy('died')  # a run that died before its first checkpoint: its epoch-0 log line, no checkpoint
    stale = json.loads(log_lines(died)[0]) | {'train_loss': 123.0}
    for name in ('checkpoint-0.pth', 'checkpoint-last.pth'):
        os.remove(died / name)
    (died / 'log.txt').write_text(json.dumps(stale) + '\n')
    branch = folder / 'checkpoint-0.pth'  # an earlier epoch's checkpoint into the same folder: its later epochs kept
    second, fresh, resumed = run_all(mae(folder), mae(died), mae(again, '--resume', 'auto'))
    branched, = run_all(mae(folder, '--resume', str(branch)))  # (beside `second`, one would meet the other's lock)
    assert '--resume auto' in second.error and 'to start afresh' in second.error
    assert f'give another --output_dir to continue from {branch} there' in branched.error
    assert snapshot(folder) == before  # checkpoints, log.txt, args.json: byte for byte
    fresh.ok()
    lines = [json.loads(line) for line in log_lines(died)]  # the new start's lines only: one run in log.txt
    assert 'kept as log-1.txt' in fresh.stdout and (died / 'log-1.txt').read_text() == json.dumps(stale) + '\n'
    assert (died / 'args-1.json').read_bytes() == (base[0] / 'args.json').read_bytes()  # the earlier run's: not lost
    assert [line.get('evaluation', False) for line in lines] == [False, True], lines
    assert lines[0]['train_loss'] != 123.0 and lines[0]['epoch'] == 0
    resumed.ok()  # --resume auto continues it (nothing left to train: it evaluates again, here without kNN / probe)
    assert 'resumed from' in resumed.stdout
    lines = log_lines(again)
    assert lines[:2] == log_lines(base[0])  # the training line and the first evaluation's results, as written
    assert 'trained_knn_top1' in lines[1] and 'trained_knn_top1' not in lines[2]
    assert [json.loads(line).get('evaluation', False) for line in lines] == [False, True, True], lines  # one run
    assert digest(again / 'checkpoint-last.pth') == before['checkpoint-last.pth']


def test_a_run_with_numbered_checkpoints_only_is_not_started_afresh_over(base, copy):
    """checkpoint-last.pth deleted (it equals the last numbered one): the run is still refused as a new start, and
    --resume auto with it, naming the checkpoint to continue from; that one continues it."""
    folder = copy()
    os.remove(folder / 'checkpoint-last.pth')
    (fresh,), (auto,) = run_all(mae(folder)), run_all(mae(folder, '--resume', 'auto'))  # (one at a time: see above)
    for refused in (fresh, auto):
        assert f"holds a training run (checkpoint-0.pth): continue it with --resume {folder / 'checkpoint-0.pth'}, " \
            "or give another --output_dir to start afresh" in refused.error, refused  # (auto: was 'from auto there')
    assert digest(folder / 'checkpoint-0.pth') == base[2]['checkpoint-0.pth']  # was overwritten by a new start
    continued, = run_all(mae(folder, '--resume', str(folder / 'checkpoint-0.pth'), '--epochs', '2'))
    assert f"resumed from {folder / 'checkpoint-0.pth'}: epoch 0 done, on at epoch 1" in continued.ok().stdout  # (was
    # "(epoch 0)", read as a restart at epoch 0)


def test_a_finished_run_resumed_with_its_own_flags_logs_its_evaluation_once(base, copy):
    """As after a kill in its fine-tune: nothing left to train, the same weights evaluated again give the same line,
    so log.txt ends as the unbroken run's (it had a second evaluation line)."""
    folder = copy()
    run_all(mae(folder, *EVAL, '--resume', 'auto'))[0].ok()
    assert log_lines(folder) == log_lines(base[0])


def test_ctrl_c_says_in_one_line_what_is_kept(tmp_path):
    out = tmp_path / 'run'
    process = subprocess.Popen([sys.executable, *mae(out, '--epochs', '200', '--shapes_size', '512')], cwd=ROOT,
                               stdout=subprocess.DEVNULL,  # 64 steps an epoch: a save is a sliver of its time
                               stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.time() + TIMEOUT
    while not (out / 'checkpoint-last.pth').exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(json.loads(log_lines(out)[0])['epoch_time_s'] / 2)  # into the next epoch's steps
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=TIMEOUT)[1]
    last = stderr.strip().splitlines()[-1]
    assert process.returncode == 1 and 'Traceback' not in stderr, stderr[-2000:]
    assert re.fullmatch(rf'interrupted in epoch \d+: {re.escape(str(out))}/checkpoint-last.pth \(the last finished '
                        r'epoch\) is intact: continue with --resume auto', last), last


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two runs started into one folder would interleave their log lines and overwrite each other's files: while a
    living process holds the folder's lock (here this test), a run into it stops at once."""
    fcntl = pytest.importorskip('fcntl')
    folder = tmp_path / 'busy'
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        busy, = run_all(mae(folder))
        assert 'another run is writing into' in busy.error and os.listdir(folder) == []
        (folder / 'checkpoint-last.pth').write_bytes(b'its last epoch')  # the living run's files, one being saved
        (folder / 'checkpoint-last.pth.tmp123').write_bytes(b'half of its next save')
        for busy in run_all(mae(folder), mae(folder, '--resume', 'auto')):  # (was: "holds a training run: continue
            assert 'another run is writing into' in busy.error, busy.error  # it with --resume auto", which this is)
        assert sorted(os.listdir(folder)) == ['checkpoint-last.pth', 'checkpoint-last.pth.tmp123']  # (was: deleted)
    finally:
        os.close(fd)  # the lock goes with it


def test_without_a_lock_a_run_refused_from_a_run_folder_leaves_its_save_in_progress(tmp_path, monkeypatch):
    """Windows (no fcntl), or a file system without locks: a living run cannot be told from a dead one, so the refusal
    comes before the killed saves' temporary files are removed (was: after; the living run's save then failed)."""
    import mae
    monkeypatch.setattr(common, 'fcntl', None)
    (tmp_path / 'checkpoint-last.pth').write_bytes(b'its last epoch')
    (tmp_path / 'checkpoint-last.pth.tmp4242').write_bytes(b'half of its next save')
    with pytest.raises(SystemExit, match='holds a training run'):
        common.setup(mae.parse_args(['--output_dir', str(tmp_path)]))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-last.pth', 'checkpoint-last.pth.tmp4242']


def test_a_folder_that_cannot_be_locked_says_it_is_unguarded(tmp_path, monkeypatch, capsys):
    """Some network file systems refuse flock (ENOLCK): the run goes on, unguarded as on Windows, and says so."""
    fcntl = pytest.importorskip('fcntl')

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    common.lock_folder(tmp_path)
    assert f'note: {tmp_path} cannot be locked (No locks available): a second run started into it is not refused' \
        in capsys.readouterr().out
    common.HELD.pop(str(tmp_path))  # (the descriptor closes with the test process)


# ---- 2. --eval_only misuse -------------------------------------------------------------------------------------
def test_eval_only_refuses_a_checkpoint_of_another_size_a_run_folder_and_auto(base, copy, small_checkpoint, tmp_path):
    folder, small = copy(), digest(small_checkpoint)
    other, into_run, auto = run_all(
        mae(tmp_path / 'eval', '--eval_only', '--resume', small_checkpoint, *EVAL),
        mae(folder, '--eval_only', '--resume', str(folder / 'checkpoint-last.pth')),
        mae(tmp_path / 'auto', '--eval_only', '--resume', 'auto'))
    line = other.error
    assert 'does not fit' in line and 'the file holds' in line, line
    assert '384) in the file' in line and '192) here' in line, line  # what the file holds vs this network
    assert 'trained' not in other.stdout + other.stderr  # no accuracy of weights that were never loaded
    assert digest(small_checkpoint) == small
    assert '--eval_only' in into_run.error and 'checkpoint-last.pth' in into_run.error
    assert snapshot(folder) == base[2]
    assert '--eval_only' in auto.error and '--resume' in auto.error
    assert not os.path.exists(tmp_path / 'auto')


# ---- 3. damaged, foreign and pickled checkpoint files ------------------------------------------------------------
def test_bad_checkpoint_files_are_refused_with_one_line(base, small_checkpoint, tmp_path):
    real = base[0] / 'checkpoint-last.pth'
    data = real.read_bytes()
    files = {'truncated': data[:len(data) // 2], 'random': b'\0' + os.urandom(100_000)}
    for name, content in files.items():
        (tmp_path / f'{name}.pth').write_bytes(content)
    torch.save({'a': argparse.ArgumentParser}, tmp_path / 'pickled.pth')
    expected = {'truncated': 'truncated or damaged', 'random': 'not a PyTorch checkpoint', 'pickled': 'pickled'}
    before = {name: digest(tmp_path / f'{name}.pth') for name in expected}
    calls = [mae(tmp_path / f'{name}_{mode}', *(['--eval_only'] if mode == 'eval' else []),
                 '--resume', str(tmp_path / f'{name}.pth')) for name in expected for mode in ('train', 'eval')]
    torch.save(torch.load(real, weights_only=True)['model'], tmp_path / 'weights.pth')  # a state dict, no optimizer
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    torch.save([1, 2], tmp_path / 'list.pth')
    state = torch.load(real, weights_only=True)['model']  # HPM's main_pretrain.py: 'model' is the network's name
    torch.save({'state_dict': state, 'epoch': 3}, tmp_path / 'lightning.pth')  # another framework's layout
    torch.save({'epoch': 1, 'state_dict': state, 'optimizer': {}, 'model': 'mae_vit_tiny_patch4'}, tmp_path / 'hpm.pth')
    *runs, other_model, weights_only, tensor, listed, evaluated, official, foreign, folder = run_all(
        *calls, mae(tmp_path / 'other', '--resume', small_checkpoint),
        mae(tmp_path / 'weights', '--resume', str(tmp_path / 'weights.pth')),
        mae(tmp_path / 'tensor', '--eval_only', '--resume', str(tmp_path / 'tensor.pth')),
        mae(tmp_path / 'list', '--resume', str(tmp_path / 'list.pth')),
        mae(tmp_path / 'weights_eval', '--eval_only', '--resume', str(tmp_path / 'weights.pth')),
        mae(tmp_path / 'hpm', '--resume', str(tmp_path / 'hpm.pth')),
        mae(tmp_path / 'lightning', '--eval_only', '--resume', str(tmp_path / 'lightning.pth')),
        mae(tmp_path / 'folder', '--resume', str(base[0])))
    assert 'holds no weights mae.py reads (its entries: state_dict, epoch)' in foreign.error  # was a KeyError
    assert f'a folder: pass a checkpoint in it, or --resume auto --output_dir {base[0]}' in folder.error
    assert 'hpm.pth holds no model and optimizer state' in official.error  # was an AttributeError traceback
    assert 'weights.pth holds no model and optimizer state' in weights_only.error  # was a KeyError traceback
    assert 'evaluate it with --eval_only --resume' in weights_only.error
    evaluated.ok()  # as that line says (and as --export_encoder's file): was a KeyError traceback
    assert 'tensor.pth holds Tensor, not weights' in tensor.error and 'list.pth holds list' in listed.error
    for run, (name, mode) in zip(runs, [(n, m) for n in expected for m in ('train', 'eval')]):
        assert expected[name] in run.error, (name, mode, run)
        assert f'{name}.pth' in run.error
    assert 'argparse.ArgumentParser' in runs[4].error
    assert {name: digest(tmp_path / f'{name}.pth') for name in expected} == before
    assert 'made by mae.py --model vit_small_patch4' in other_model.error and 'vit_tiny_patch4' in other_model.error
    assert not glob.glob(f'{tmp_path}/*/checkpoint*')


# ---- 4. a dataset smaller than one batch -------------------------------------------------------------------------
def test_dataset_smaller_than_one_batch_is_refused_before_training(tmp_path):
    from PIL import Image
    data = tmp_path / 'images'
    for split, count in (('train', 2), ('val', 1)):
        for label in ('a', 'b'):
            (data / split / label).mkdir(parents=True)
            for i in range(count):
                colour = (40 * i, 200 if label == 'a' else 0, 90)
                Image.new('RGB', (24, 24), colour).save(data / split / label / f'{i}.png')
    i = FLAGS.index('--shapes_size')
    fine_tune, shapes, folder = run_all(
        mae(tmp_path / 'ft', '--finetune_epochs', '1', '--ft_batch', '128'),
        mae(tmp_path / 'shapes', '--shapes_size', '20', '--batch_size', '512'),
        ['mae.py', *FLAGS[:i], *FLAGS[i + 2:], '--output_dir', str(tmp_path / 'folder'), '--data', 'folder',
         '--data_path', str(data)])  # no --shapes_size: it sizes shapes
    for run, count, batch in ((shapes, 20, 512), (folder, 4, 8)):
        assert f'has {count} images' in run.error and f'--batch_size {batch}' in run.error, run
        assert 'epoch 0' not in run.stderr  # refused before training
    assert 'has 64 images, fewer than one fine-tuning step needs (--ft_batch 128: --batch_size 8 x 16' in \
        fine_tune.error and 'lower --ft_batch' in fine_tune.error  # was: after pretraining, advising --accum_iter
    assert 'epoch 0' not in fine_tune.stderr
    assert not glob.glob(f'{tmp_path}/*/checkpoint*')


# ---- 5. output folder faults ---------------------------------------------------------------------------------------
def test_output_dir_where_a_file_is_is_one_line(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    run, = run_all(mae(blocker / 'run'))
    assert 'cannot write to --output_dir' in run.error and str(blocker) in run.error
    assert blocker.read_text() == 'not a folder'


def test_unwritable_output_dir_is_one_line(tmp_path):
    """A read-only folder; as root, who writes into one anyway, a folder below a file (the same failure, ENOTDIR)."""
    root = os.geteuid() == 0
    folder = tmp_path / 'read_only'
    folder.write_text('') if root else folder.mkdir()
    folder.chmod(0o555)
    try:
        run, = run_all(mae(folder / 'run' if root else folder))
        assert 'cannot write to --output_dir' in run.error
        assert folder.is_file() if root else os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def full_disk():  # in the child: writes past 1 MB fail (EFBIG) instead of killing it; args.json and log.txt fit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_full_disk_at_a_save_is_one_line_and_leaves_no_temporary_file(base, copy, tmp_path):
    folder, fresh_dir = copy(), tmp_path / 'fresh'
    assert os.path.getsize(folder / 'checkpoint-last.pth') > 1_000_000
    fresh, resumed = run_all(mae(fresh_dir), mae(folder, '--resume', 'auto', '--epochs', '2'), preexec_fn=full_disk)
    for run, name in ((fresh, 'checkpoint-0.pth'), (resumed, 'checkpoint-1.pth')):
        assert 'could not write' in run.error and name in run.error, run
    for directory in (fresh_dir, folder):
        assert not glob.glob(f'{directory}/**/*.tmp*', recursive=True), os.listdir(directory)
    assert not glob.glob(f'{fresh_dir}/checkpoint*')
    assert [json.loads(line)['epoch'] for line in log_lines(fresh_dir)] == [0]  # the epoch's log line was kept
    json.loads((fresh_dir / 'args.json').read_text())
    now = snapshot(folder)  # the run that was continued: its checkpoints untouched, its epoch-0 line kept
    assert {k: now[k] for k in ('checkpoint-0.pth', 'checkpoint-last.pth')} == \
        {k: base[2][k] for k in ('checkpoint-0.pth', 'checkpoint-last.pth')}
    assert log_lines(folder)[0] == log_lines(base[0])[0]
    assert 'checkpoint-1.pth' not in os.listdir(folder)


def test_leftover_temporary_files_of_a_killed_save_are_removed(base, copy):
    folder = copy()
    (folder / 'checkpoint-last.pth.tmp12345').write_bytes(b'PK\x03\x04half a checkpoint')
    (folder / 'finetune').mkdir()
    (folder / 'finetune' / 'checkpoint-last.pth.tmp999').write_bytes(b'half')
    run, = run_all(mae(folder, '--resume', 'auto'))
    run.ok()
    assert not glob.glob(f'{folder}/**/*.tmp*', recursive=True)
    assert digest(folder / 'checkpoint-last.pth') == base[2]['checkpoint-last.pth']


# ---- 6. a kill during a numbered save: tests/test_resume_and_ddp.py ----------------------------------------------
# ---- 7. resuming with other settings -------------------------------------------------------------------------------
def test_resume_with_changed_settings_warns_stretches_or_refuses(base, copy):
    blr, longer, model, mae_layout = copy('blr'), copy('longer'), copy('model'), copy('mae_layout')
    own = torch.load(mae_layout / 'checkpoint-last.pth', weights_only=True)  # as MAE's misc.save_model writes it:
    torch.save({'model': own['model'], 'optimizer': own['optimizer'], 'epoch': own['epoch'], 'scaler': {},
                'args': argparse.Namespace(**{**own['args'], 'model': 'mae_vit_tiny_patch4'})},  # main_pretrain's
               mae_layout / 'checkpoint-last.pth')  # no RNG, no log; its model name (was refused, advising that name)
    changed, extended, refused, official = run_all(mae(blr, '--resume', 'auto', '--blr', '3e-3', '--export_encoder'),
                                                   mae(longer, '--resume', 'auto', '--epochs', '2'),
                                                   mae(model, '--resume', 'auto', '--model', 'vit_tiny_patch8'),
                                                   mae(mae_layout, '--resume', 'auto', '--epochs', '2'))
    official.ok()  # its arguments as a Namespace used to stop it with a traceback
    assert 'warning' not in official.stdout  # its 'mae_vit_tiny_patch4' is this --model: no "--model (was ...)"
    assert 'resumed from' in official.stdout and torch.load(mae_layout / 'checkpoint-last.pth')['epoch'] == 1
    changed.ok()
    warnings = [line for line in changed.stdout.splitlines() + changed.stderr.splitlines()
                if line.startswith('warning:')]
    assert len(warnings) == 1 and '--blr 0.003 (was 0.0015)' in warnings[0], changed  # not --export_encoder's
    record = json.loads((blr / 'args.json').read_text())  # which settings the epochs ran under: kept in args.json
    assert record['blr'] == 0.003 and record['resumed'][0].startswith('from epoch 1: blr 0.0015 -> 0.003, lr '), record
    extended.ok()
    notes = [line for line in extended.stdout.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and '2 epochs' in notes[0] and 'was 1' in notes[0], extended
    assert not any(line.startswith('warning:') for line in extended.stdout.splitlines())
    lines = log_lines(longer)
    assert lines[0] == log_lines(base[0])[0]
    assert [json.loads(line)['epoch'] for line in lines if 'evaluation' not in line] == [0, 1]
    assert torch.load(longer / 'checkpoint-last.pth', weights_only=True)['epoch'] == 1
    assert torch.load(longer / 'checkpoint-last.pth', weights_only=True)['args']['resumed'] == [
        'from epoch 1: epochs 1 -> 2']  # saved with the run, so a later resume adds to it
    assert digest(longer / 'checkpoint-0.pth') == base[2]['checkpoint-0.pth']
    assert 'made by mae.py --model vit_tiny_patch4' in refused.error and 'vit_tiny_patch8' in refused.error
    assert snapshot(model) == base[2]  # args.json too: a refused run writes nothing


def test_refused_resume_changes_nothing_in_the_folder(base, copy):
    # (a refused --model: test_resume_with_changed_settings_warns_stretches_or_refuses; its args.json changes too)
    damaged, small = copy('damaged'), copy('small')
    (damaged / 'checkpoint-last.pth').write_bytes((base[0] / 'checkpoint-last.pth').read_bytes()[:1_000_000])
    before = snapshot(damaged)
    runs = run_all(mae(damaged, '--resume', 'auto'),
                   mae(small, '--resume', 'auto', '--shapes_size', '20', '--batch_size', '512'))
    for run, expected in zip(runs, ('truncated or damaged', 'fewer than one optimizer step')):
        assert expected in run.error
    changed = {folder.name: [k for k, v in files.items() if snapshot(folder).get(k) != v]
               for folder, files in ((damaged, before), (small, base[2]))}
    assert changed == {'damaged': [], 'small': []}  # args.json and log.txt as they were


def test_resuming_another_methods_run_names_the_method(tmp_path):
    import common, mae
    path = tmp_path / 'hpm.pth'  # what hpm.py --model vit_tiny_patch4 saves, reduced to what resume reads first
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 0, 'args': {'method': 'hpm', 'model': 'vit_tiny_patch4'}}, path)
    args = mae.parse_args(['--model', 'vit_tiny_patch4', '--resume', str(path), '--output_dir', str(tmp_path / 'o')])
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match='was made by hpm.py --model vit_tiny_patch4, this run is mae.py --model '
                                         'vit_tiny_patch4: resume it with hpm.py'):  # was: settings --method differ
        common.resume(args, model, torch.optim.SGD(model.parameters()))


def test_resume_warns_of_another_effective_batch_not_of_another_split_of_it(tmp_path, capsys):
    import common, mae
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parse = lambda *flags: mae.parse_args(['--model', 'vit_tiny_patch4', '--data', 'cifar10', '--output_dir',
                                           str(tmp_path), *flags])  # (CIFAR: a --data that reads --data_path)
    path = tmp_path / 'checkpoint-last.pth'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0,
                'args': common.plain(parse('--batch_size', '16'))}, path)
    common.resume(parse('--batch_size', '8', '--accum_iter', '2', '--resume', str(path)), model, optimizer)
    assert 'warning' not in capsys.readouterr().out  # 8 x 2 steps (or x 2 processes) is the same batch of 16
    common.resume(parse('--batch_size', '32', '--resume', str(path)), model, optimizer)
    warning, = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning:')]
    assert 'effective batch 32 (was 16)' in warning and '--lr' in warning
    common.resume(parse('--batch_size', '16', '--data_path', 'elsewhere', '--resume', str(path)), model, optimizer)
    warning, = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning:')]
    assert '--data_path elsewhere (was ./data)' in warning  # moved, or other data: said either way


def test_resume_with_another_number_of_processes_says_which_draws_restart(tmp_path, capsys):
    import common, mae
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = mae.parse_args(['--model', 'vit_tiny_patch4', '--output_dir', str(tmp_path)])
    rng = {'torch': torch.get_rng_state(), 'cuda': []}
    for saved_by, said in [(1, False), (2, True)]:  # a run of 1 process resumed by 1, then one of 2 resumed by 1
        torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0,
                    'args': common.plain(args), 'rng': [rng] * saved_by}, path := tmp_path / f'{saved_by}.pth')
        common.resume(argparse.Namespace(**{**vars(args), 'resume': str(path)}), model, optimizer)
        out = capsys.readouterr().out
        assert ('random state of 2 process(es), this run has 1' in out) == said, out  # was silent


def test_resuming_past_the_new_epochs_is_refused(tmp_path):
    import common, mae
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters())
    path = tmp_path / 'done.pth'  # a finished 5-epoch run
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 4,
                'args': {'method': 'mae', 'model': 'vit_tiny_patch4', 'epochs': 5}}, path)
    args = mae.parse_args(['--model', 'vit_tiny_patch4', '--resume', str(path), '--epochs', '3',
                           '--output_dir', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='has trained 5 epochs, more than --epochs 3: resume with --epochs 5'):
        common.resume(args, model, optimizer)  # was: no training, evaluated and logged as a 3-epoch run
    assert not os.path.exists(tmp_path / 'o')


# ---- 8. a non-finite loss -----------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(base, copy, tmp_path):
    folder, fresh_dir = copy(), tmp_path / 'fresh'
    huge = ['--epochs', '2', '--blr', '1e30', '--amp', 'none']  # fp32: the first step's lr of 3e28 overflows it
    tuned_dir = tmp_path / 'tuned'  # pretraining is fine; the fine-tune's lr overflows, before its first checkpoint
    fresh, resumed, tuned = run_all(mae(fresh_dir, *huge), mae(folder, '--resume', 'auto', *huge),
                                    mae(tuned_dir, '--finetune_epochs', '1', '--ft_blr', '1e30', '--amp', 'none'))
    assert 'non-finite loss at epoch 0' in fresh.error and f'no checkpoint in {fresh_dir} yet' in fresh.error
    assert f'no checkpoint in {tuned_dir}/finetune yet' in tuned.error and '--ft_blr' in tuned.error
    assert os.path.isfile(tuned_dir / 'checkpoint-last.pth')  # the pretraining's, untouched
    assert not glob.glob(f'{fresh_dir}/checkpoint*')
    line = resumed.error
    assert 'non-finite loss at epoch 1' in line and 'checkpoint-last.pth' in line and 'is intact' in line, line
    now = snapshot(folder)
    assert {k: now[k] for k in ('checkpoint-0.pth', 'checkpoint-last.pth')} == \
        {k: base[2][k] for k in ('checkpoint-0.pth', 'checkpoint-last.pth')}
    assert log_lines(folder) == log_lines(base[0])  # the finished epoch's line and its evaluation; nothing of the
    #                                                 failed epoch
    assert weights(folder / 'checkpoint-last.pth').keys() == weights(base[0] / 'checkpoint-last.pth').keys()


# ---- 9. abbreviated flags ------------------------------------------------------------------------------------------
def test_abbreviated_flag_is_refused(tmp_path):
    i = FLAGS.index('--epochs')
    run, = run_all(['mae.py', *FLAGS[:i], '--epoch', '1', *FLAGS[i + 2:], '--output_dir', str(tmp_path / 'run')])
    assert 'unrecognized arguments: --epoch 1' in run.error
    assert not os.path.exists(tmp_path / 'run')


# ---- 10. a mask ratio that leaves no visible (or no masked) cell ----------------------------------------------------
def test_mask_ratio_that_empties_the_grid_gives_the_valid_range(tmp_path):
    spark = ['spark.py', '--data', 'shapes', '--model', 'resnet_mini_ds8', '--input_size', '32', '--batch_size', '8',
             '--shapes_size', '64', '--epochs', '1', '--probe_epochs', '0', '--knn_k', '0']
    too_much, too_little = run_all(mae(tmp_path / 'mae', '--mask_ratio', '0.99'),
                                   spark + ['--mask_ratio', '0.01', '--output_dir', str(tmp_path / 'spark')])
    ranges = set()
    for run, ratio, kept in ((too_much, '0.99', 0), (too_little, '0.01', 16)):
        line = run.error
        assert f'--mask_ratio {ratio} keeps {kept} of the 16 cells' in line, line
        low, high = map(float, re.search(r'use a value in \[([\d.]+), ([\d.]+)\]', line).groups())
        assert 0 < low < high < 1 and not low <= float(ratio) <= high, line
        ranges.add((low, high))
    assert len(ranges) == 1  # the same 4x4 grid
    import mae as mae_module, spark as spark_module  # the range it gives is accepted, at both ends
    for value in (low, high):
        mae_module.parse_args(FLAGS + ['--mask_ratio', str(value), '--device', 'cpu'])
        spark_module.parse_args(spark[1:] + ['--mask_ratio', str(value), '--device', 'cpu'])
    assert not os.listdir(tmp_path)


def test_a_mask_ratio_that_masks_everything_or_nothing_is_refused_at_start_up(tmp_path):
    cases = [(script, ratio, kept) for script in ('mae.py', 'hpm.py')  # each draws its own mask: each checks it
             for ratio, kept in [('0.99', 0), ('1e-17', 16)]]  # int(16 * 0.01) = 0; 1 - 1e-17 == 1.0
    outs = [tmp_path / f'{script}_{ratio}' for script, ratio, _ in cases]  # --input_size 16 --model vit_tiny_patch4:
    runs = run_all(*[[script, *FLAGS, '--output_dir', str(out), '--mask_ratio', ratio]  # a 4 x 4 grid of 16 patches
                     for (script, ratio, _), out in zip(cases, outs)])
    for (script, ratio, kept), out, run in zip(cases, outs, runs):
        assert f'--mask_ratio {ratio} keeps {kept} of the 16 cells' in run.error, (script, run)
        assert not out.exists()  # refused before any work: no output folder


# ---- 11. evaluation shows its progress ------------------------------------------------------------------------------
def test_evaluation_shows_progress_bars(base):
    run = base[1]
    for text in ('trained train', 'trained val', 'random_init train', 'random_init val', 'linear probe'):
        assert text in run.stderr, (text, run)
    assert re.search(r'kNN \(k=5\) top-1: trained [\d.]+%, random_init [\d.]+%', run.stdout), run
    assert re.search(r'linear probe top-1: trained [\d.]+%', run.stdout), run
