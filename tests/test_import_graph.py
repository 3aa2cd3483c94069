"""The import graph of ``src/npuconv``: no cycles, no arrows between ``readers/`` and ``writers/``.

Every ``import`` / ``from … import`` of an npuconv module counts, at module level or inside a function
(a deferred import is still a dependency); imports under ``if TYPE_CHECKING:`` do not (they never run).
``from npuconv.pkg import name`` depends on ``npuconv.pkg.name`` when that is a module, else on the
package ``npuconv.pkg`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "npuconv"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """All nodes except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str) -> set[str]:
    deps = set()
    for node in _runtime_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        deps.update(name for name in names if name in MODULES and name != module)
    return deps


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_known_edges():  # the walk itself works (a test that cannot fail is a defect)
    assert "npuconv.layouts" in GRAPH["npuconv.model"]
    assert "npuconv.registry" in GRAPH["npuconv.runtime"]  # a function-level import counts too


def test_no_import_cycles():
    assert _cycles() == []


def test_readers_and_writers_do_not_import_each_other():
    crossing = sorted(
        (a, b) for a, deps in GRAPH.items() for b in deps
        if (a.startswith("npuconv.readers") and b.startswith("npuconv.writers"))
        or (a.startswith("npuconv.writers") and b.startswith("npuconv.readers"))
    )
    assert crossing == []


def test_registry_imports_nothing_heavy():
    assert GRAPH["npuconv.registry"] <= {"npuconv.errors"}  # names listable without torch
