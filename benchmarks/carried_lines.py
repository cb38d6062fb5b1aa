"""How many of common.py's lines each README snippet ("Use a method in your own code") needs a user to carry.

A snippet is run with a trace of the calls into common.py; what it needs is every top-level definition it called,
every common.py name the method files import (`from common import ...`: they must exist for the import), and the
module-level names those use in turn (tables, constants), counted as non-blank lines. common.py's own imports are
not counted.

    python benchmarks/carried_lines.py    # one line per snippet: its count, then the names
"""
import ast, contextlib, io, os, re, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def snippets():
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split('## Use a method in your own code', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def definitions():
    """{name: top-level node of common.py} for functions, classes and assigned names (tuple targets too)."""
    found = {}
    for node in ast.parse(open(common.__file__).read()).body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, 'targets', [])
        for target in targets:
            names = [target.name] if target is node else [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
            found.update({name: node for name in names})
    return found


def carried(code, nodes):
    """-> (non-blank lines, sorted names) of common.py that running `code` needs."""
    called = set()

    def trace(frame, event, arg):
        if event == 'call' and frame.f_code.co_filename == common.__file__:
            called.update(name for name, n in nodes.items() if n.lineno <= frame.f_code.co_firstlineno <= n.end_lineno)

    modules = re.findall(r'^import (.+)$', code, flags=re.M)
    for name in {m.strip() for line in modules for m in line.split(',')} - {'torch', 'common'}:
        source = os.path.join(ROOT, f'{name}.py')
        if os.path.isfile(source):  # a method file: the names it imports from common must exist
            called.update(alias.name for node in ast.walk(ast.parse(open(source).read()))
                          if isinstance(node, ast.ImportFrom) and node.module == 'common' for alias in node.names)
    sys.settrace(trace)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(compile(code, 'snippet', 'exec'), {'__name__': '__main__'})
    finally:
        sys.settrace(None)
    todo = list(called)
    while todo:  # the module-level names that what is carried uses
        for n in ast.walk(nodes[todo.pop()]):
            if isinstance(n, ast.Name) and n.id in nodes and n.id not in called:
                called.add(n.id)
                todo.append(n.id)
    lines = open(common.__file__).read().splitlines()
    blocks = {id(nodes[name]): nodes[name] for name in called}.values()  # a tuple assignment counts once
    first = lambda n: min([n.lineno] + [d.lineno for d in getattr(n, 'decorator_list', [])])
    return sum(1 for n in blocks for line in lines[first(n) - 1:n.end_lineno] if line.strip()), sorted(called)


if __name__ == '__main__':
    os.chdir(ROOT)
    for index, code in enumerate(snippets()):
        count, names = carried(code, definitions())
        print(f'snippet {index}: {count} lines of common.py: {", ".join(names)}')
