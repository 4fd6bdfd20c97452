"""The import graph of cloudkitty_proc, and its cycles.

``python tools/import_graph.py`` prints every cycle among the package's
modules, first through module-level imports (those run at import time),
then also counting imports made inside functions (lazy imports that dodge a
cycle still make one in the design). Exit status 1 when a cycle exists.
Imports under ``if TYPE_CHECKING:`` are not counted: they never run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "cloudkitty_proc"
ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.AST, name: str, known: dict[str, Path]) -> list[str]:
    package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    if isinstance(node, ast.Import):
        out = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[:len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.append(full if full in known else base)
    return [t for t in out if t in known and t != name]


def edges(name: str, path: Path, known: dict[str, Path], *, lazy: bool) -> set[str]:
    """Modules of the package that ``name`` imports (lazy: also in functions)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(body, in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, in_function)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if lazy or not in_function:
                    found.update(_targets(node, name, known))
                continue
            inner = in_function or isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    visit(sub, inner)
            for case in getattr(node, "cases", []) or []:
                visit(case.body, inner)

    visit(tree.body, False)
    return found


def cycles(*, lazy: bool, root: Path = ROOT) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    known = modules(root)
    graph = {n: sorted(edges(n, p, known, lazy=lazy)) for n, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return result


def main() -> int:
    status = 0
    for lazy, what in ((False, "module-level imports"), (True, "all imports, lazy ones included")):
        found = cycles(lazy=lazy)
        print(f"{what}: {len(found)} cycle(s)")
        for component in found:
            print("  " + " <-> ".join(component))
        status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main())
