"""Imports run one direction: no module of jzero/, models/ or train/ depends (at any depth) on itself.

What counts as an edge A -> B (read from A's source with ``ast``, never by importing it):
- every ``import B`` / ``from B import x`` in A, at module level AND inside functions or methods. A deferred
  import is still a dependency (it runs on the first call instead of at import time); deferring one was how the
  old cycles were hidden, so it does not excuse a cycle here;
- ``from P import name`` is an edge to ``P.name`` when that is a module of the tree, else to ``P``;
- not counted: imports under ``if TYPE_CHECKING:`` (never run), and the implicit edge from a submodule to its
  parent package (Python runs ``P/__init__.py`` before ``P.sub``; a package that re-exports its submodules,
  ``models/__init__.py``, is the normal pattern, not a cycle). Names that ``jzero/__init__.py`` resolves lazily
  through strings are not imports either (they point down the graph, from the package to its modules).

The second test imports every module, in dependency order (leaves first), in one fresh interpreter: each one
must import cleanly once its dependencies are loaded.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jzero", "models", "train")


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file of the three packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """Every (imported module name, lineno) in ``tree``, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {dependency: first line importing it}}`` over the tree's own modules."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        deps: dict[str, int] = {}
        tree = ast.parse(path.read_text(), str(path))
        for base, name, line in _imports(tree, mod, path.name == "__init__.py"):
            target = f"{base}.{name}" if name and f"{base}.{name}" in files else base
            while target and target not in files:   # `import jzero.x.y` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != mod:
                deps.setdefault(target, line)
        graph[mod] = deps
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import cycles: groups of more than one module that all reach each other (each sorted); [] if none."""
    reach = {}
    for v in graph:   # modules reachable from v (a depth-first walk; ~70 modules)
        seen, todo = set(), list(graph[v])
        while todo:
            w = todo.pop()
            if w not in seen:
                seen.add(w)
                todo.extend(graph.get(w, {}))
        reach[v] = seen
    out, placed = [], set()
    for v in sorted(graph):
        if v in placed or v not in reach[v]:
            continue
        comp = sorted(w for w in reach[v] if v in reach[w])
        placed.update(comp)
        out.append(comp)
    return out


def dependency_order(graph: dict[str, dict[str, int]]) -> list[str]:
    """Modules leaves first (every module after all it imports); ties by name, so the order is stable."""
    order, done = [], set()

    def visit(v, path):
        if v in done:
            return
        if v in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(v):] + [v])}")
        for w in sorted(graph[v]):
            visit(w, path + [v])
        done.add(v)
        order.append(v)

    for v in sorted(graph):
        visit(v, [])
    return order


def _describe(cycle: list[str], graph) -> str:
    members = set(cycle)
    return "; ".join(f"{a} -> {b} (line {line})" for a in cycle for b, line in sorted(graph[a].items())
                     if b in members)


def test_graph_reader_sees_deferred_imports_and_skips_type_checking(tmp_path):
    """The reader itself: a function-level import is an edge, a TYPE_CHECKING one is not, and a cycle is found."""
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jzero import c\n"
           "def f():\n    from jzero import b\n")
    edges = [(base, name) for base, name, _ in _imports(ast.parse(src), "jzero.a", False)]
    assert ("jzero", "b") in edges and ("jzero", "c") not in edges
    assert find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)   # the reader found the tree
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module -> dependency, line):\n" + "\n".join(
        f"{len(c)} modules: {_describe(c, graph)}" for c in cycles)


def test_every_module_imports_in_dependency_order():
    order = dependency_order(import_graph())
    script = ("import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
              "    except Exception as exc:\n        print(f'{name}: {type(exc).__name__}: {exc}')\n"
              "        sys.exit(1)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script, *order], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
