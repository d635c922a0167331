"""The package's own import graph, read from the source with ``ast`` (nothing is imported).

Every ``import`` of a stabguard module counts, wherever it sits: at the top, under ``TYPE_CHECKING`` (an
annotation's import is still an arrow a reader follows) or inside a function (a lazy import defers the
cost, not the dependency). ``plugins/`` is read as ``stabguard.plugins``, as it installs.

    python tests/support_import_graph.py      # the circles and the arrows running back up, with their lines

The layers are in ``tests/test_import_graph.py``; this module only reads and measures.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"stabguard": ROOT / "stabguard", "stabguard.plugins": ROOT / "plugins"}


@dataclass(frozen=True)
class Arrow:
    """``source`` imports ``target`` at ``line`` of ``path``; ``kind`` is top, type-checking or local."""

    source: str
    target: str
    path: str
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target} ({self.kind})"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (templates are not code)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "templates" in parts or (package == "stabguard" and parts[0] == "plugins"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


@functools.cache
def lazy_names() -> dict[str, str]:
    """The package's lazy attributes (``stabguard.GuardTrainer`` -> ``stabguard.trainer``): importing one from
    ``stabguard`` reaches that module, though no import statement names it."""
    tree = ast.parse((SOURCES["stabguard"] / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            return {f"stabguard.{name}": module for name, module in ast.literal_eval(node.value).items()}
    return {}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in: itself, else its nearest known parent."""
    name = lazy_names().get(name, name)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The stabguard modules one import statement reaches (``from pkg import sub`` reaches pkg.sub)."""
    if isinstance(node, ast.Import):
        return [t for a in node.names if (t := _resolve(a.name, known))]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    prefix = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
    if not prefix or not prefix.startswith("stabguard"):
        return []
    reached = [_resolve(f"{prefix}.{a.name}", known) for a in node.names]
    return sorted({t for t in reached if t})


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(import node, kind) for every import in a module, however deep."""
    def walk(node, kind):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from walk(child, "type-checking")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, "local")
            else:
                yield from walk(child, kind)
    yield from walk(tree, "top")


def arrows() -> list[Arrow]:
    """Every import of one stabguard module by another."""
    known = modules()
    found = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, kind in _imports(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    found.append(Arrow(module, target, str(path.relative_to(ROOT)), node.lineno, kind))
    return found


def circles(edges: list[Arrow]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a in edges:
        graph.setdefault(a.source, set()).add(a.target)
        graph.setdefault(a.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The index of the layer naming the module, or the package nearest above it (``stabguard.cli`` covers
    its commands; ``stabguard`` itself is only the package's ``__init__``). A module no layer names raises,
    so a new module is placed on purpose."""
    named = {m: depth for depth, members in enumerate(layers) for m in members}
    name = module
    while name not in named and "." in name:
        name = name.rpartition(".")[0]
    if name not in named or (name == "stabguard" and module != "stabguard"):
        raise LookupError(f"{module} is in no layer of tests/test_import_graph.py: add it to the layer it belongs to")
    return named[name]


def upward(edges: list[Arrow], layers: list[list[str]]) -> list[Arrow]:
    """Arrows from a lower layer (index smaller) to a higher one: a module importing something above it."""
    return [a for a in edges if layer_of(a.source, layers) < layer_of(a.target, layers)]


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_import_graph import LAYERS

    edges = arrows()
    found = circles(edges)
    up = upward(edges, LAYERS)
    print(f"{len(modules())} modules, {len(edges)} arrows; {len(found)} circle(s), {len(up)} arrow(s) running back up")
    for component in found:
        print("circle:", " <-> ".join(component))
    for a in up:
        print("up:", a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
