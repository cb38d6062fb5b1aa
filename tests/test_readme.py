"""The README's "Use a method in your own code" snippets run as written (from a folder of their own, the repository on
the import path, as a user who copied the files would run them); every command the README and the method files'
docstrings give gets past its method's checks."""
import os, re, shlex, subprocess, sys

import pytest

from conftest import ROOT


def snippets():
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split('## Use a method in your own code', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def test_the_section_has_its_three_snippets():
    assert len(snippets()) == 3


@pytest.mark.parametrize('index', range(3))
def test_snippet_runs(tmp_path, index):
    script = tmp_path / f'snippet{index}.py'
    script.write_text(snippets()[index])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_lines_of_common_py_each_snippet_needs_are_those_the_readme_says():
    result = subprocess.run([sys.executable, 'benchmarks/carried_lines.py'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in re.findall(r'^snippet \d: (\d+) lines of common.py', result.stdout, flags=re.M)]
    section = open(os.path.join(ROOT, 'README.md')).read().split('## Use a method in your own code', 1)[1]
    stated = [int(n) for n in re.findall(r'\((\d+)\s+lines of common.py', section.split('\n## ', 1)[0])]
    assert len(counts) == 3 and counts == stated, (counts, stated)


def written_commands():
    """(file, method, flags, processes) of each `python <method>.py ...` / `torchrun ... <method>.py ...` written in
    the README (code blocks and inline code, continued lines joined) and in the method files' docstrings; processes:
    torchrun's --nproc_per_node x --nnodes, else 1."""
    found = []
    for name in ('README.md', 'mae.py', 'hpm.py', 'maskfeat.py', 'mfm.py', 'spark.py'):
        text = re.sub(r'\\\n\s*', ' ', open(os.path.join(ROOT, name)).read())
        lines = [line.split(' #')[0] for block in re.findall(r'```\w*\n(.*?)```', text, flags=re.S)
                 for line in block.splitlines()]
        spans = re.findall(r'`([^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
        for command in lines + spans:
            if found_one := re.match(r'(python|torchrun(?: --\S+)*) (mae|hpm|maskfeat|mfm|spark)\.py\b(.*)',
                                     ' '.join(command.split())):
                launcher = dict(re.findall(r'--(\w+)=(\d+)', found_one[1]))
                processes = int(launcher.get('nproc_per_node', 1)) * int(launcher.get('nnodes', 1))
                found.append((name, found_one[2], shlex.split(found_one[3]), processes))
    return found


def test_every_written_command_is_found():  # the extraction itself: a README rewrite must not hide them all
    found = written_commands()
    assert len(found) >= 25 and {method for _, method, _, _ in found} == {'mae', 'hpm', 'maskfeat', 'mfm', 'spark'}
    assert (['--data', 'imagenet', '--data_path', '/datasets/imagenet'], 16) in [command[2:] for command in found]


@pytest.mark.parametrize('name, method, flags, processes', written_commands(),
                         ids=lambda value: ' '.join(value)[:60] if isinstance(value, list) else str(value))
def test_a_written_command_parses(name, method, flags, processes, tmp_path, monkeypatch, capsys):
    """Each written command gets past its method's parse_args (paths replaced by a folder and a file that exist):
    a flag renamed or removed, or a recipe that refuses the sizes shown, fails here and not in a user's hands. A --help
    one exits 0 listing each of the method's flags as an entry of its options (README: "lists every flag")."""
    if '--help' in flags:
        module = __import__(method)
        with pytest.raises(SystemExit) as exited:
            module.parse_args(flags)
        options = re.split(r'\n(?:options|optional arguments):\n', capsys.readouterr().out, maxsplit=1)[1]
        listed = {flag for line in options.splitlines() if (entry := re.match(r'  (-.*?)(?:  |$)', line))
                  for flag in re.findall(r'--?[\w-]+', entry[1])}  # '  --model MODEL   help': the entry's flags
        assert exited.value.code == 0
        assert listed == {flag for action in module.get_args_parser()._actions for flag in action.option_strings}
        return
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    (tmp_path / 'checkpoint.pth').touch()
    paths = {'--data_path': str(tmp_path / 'data'), '--resume': str(tmp_path / 'checkpoint.pth'),
             '--output_dir': str(tmp_path / 'run')}
    flags = [paths[flags[i - 1]] if i and flags[i - 1] in paths and flag != 'auto' else flag
             for i, flag in enumerate(flags)]
    monkeypatch.setenv('WORLD_SIZE', str(processes))  # as torchrun sets it: the accumulation towards a recipe's batch
    args = __import__(method).parse_args(flags + (['--output_dir', paths['--output_dir']] if '--output_dir' not in
                                                   flags else []))
    assert args.method == method and args.world_size == processes
