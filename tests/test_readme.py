"""The README's "Use a method in your own code" snippets run as written (from a folder of their own, the repository on
the import path, as a user who copied the files would run them)."""
import os, re, subprocess, sys

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
