"""The shape of the code: no class over 300 lines, no function over 100, and imports that go one way.

Imports inside functions count for the cycle check (they hide a cycle, they do not break it); only
``TYPE_CHECKING`` imports are left out. Imports of wordlm's own modules inside functions are allowed only in the
CLI module, whose import must stay cheap (``--help``, a Ctrl-C during imports), and each says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "wordlm"
MAX_CLASS, MAX_FUNCTION = 300, 100
DEFERRED_OK = {"wordlm.cli"}  # the entry point's module: torch loads when a job runs, not on import


def _modules():
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(mod: str, f: Path, known: dict):
    """(target module, line, inside a function) of every wordlm import of ``mod``, TYPE_CHECKING aside."""
    tree = ast.parse(f.read_text())
    skip, inner = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip.update(id(m) for m in ast.walk(n))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(m) for m in ast.walk(n))
    pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for n in ast.walk(tree):
        if not isinstance(n, (ast.Import, ast.ImportFrom)) or id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                base = ".".join(up + ([n.module] if n.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in n.names]
        else:
            targets = [a.name for a in n.names]
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != mod:
                yield t, n.lineno, id(n) in inner


def test_no_class_over_300_lines_and_no_function_over_100():
    big = []
    for f in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            size = (getattr(n, "end_lineno", 0) or 0) - getattr(n, "lineno", 0) + 1
            if isinstance(n, ast.ClassDef) and size > MAX_CLASS or (
                    isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION):
                big.append(f"{f.relative_to(PKG.parent)}:{n.lineno} {n.name} ({size} lines)")
    assert not big, "split by responsibility: " + "; ".join(big)


def test_imports_form_no_cycle_even_counting_imports_inside_functions():
    known = _modules()
    graph = {m: {t for t, _, _ in _imports(m, f, known)} for m, f in known.items()}
    # A module imports its package's __init__ on the way; the package importing the module back is the
    # registration pattern only when the module imports the package itself, which counts as an edge here.
    seen, on_path, cycles = set(), [], []

    def visit(m):
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_of_wordlm_inside_functions_only_where_startup_needs_them_and_each_says_why():
    known = _modules()
    bad = []
    for m, f in known.items():
        lines = f.read_text().splitlines()
        for t, line, inner in _imports(m, f, known):
            if not inner:
                continue
            # the reason: a comment on the import's line, or above the block of imports it belongs to
            said, i = "#" in lines[line - 1], line - 2
            while not said and i >= 0 and lines[i].strip().startswith(("from ", "import ", "#")):
                said, i = lines[i].strip().startswith("#"), i - 1
            if m not in DEFERRED_OK or not said:
                bad.append(f"{m}:{line} imports {t} inside a function")
    assert not bad, "; ".join(bad)


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    """The check above could pass by seeing nothing: a planted cycle through a function-level import fails it."""
    pkg = tmp_path / "wordlm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_imports_form_no_cycle_even_counting_imports_inside_functions()
    except AssertionError as e:
        assert "wordlm.a -> wordlm.b -> wordlm.a" in str(e)
    else:  # pragma: no cover
        raise AssertionError("a cycle through a function-level import was not seen")
