"""The package's layout: no import circles, and no class too long to find one's way in."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from itertools import pairwise
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "karbor_async"


@attrs.frozen
class Edge:
    """``source`` imports ``target`` at ``path``:``line``."""

    source: str
    target: str
    path: str
    line: int


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package (subpackages included) by dotted name."""
    root = package_dir.name
    names: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        # A directory without __init__.py is no package of ours (a stray folder).
        parents = [package_dir.joinpath(*parts[:i], "__init__.py") for i in range(len(parts))]
        if all(p.is_file() for p in parents):
            names[".".join([root, *parts])] = path
    return names


def _imported(
    node: ast.AST, module: str, is_package: bool, modules: Mapping[str, Path]
) -> Iterator[str]:
    """The package's modules one AST node imports (any node: a nested one counts the same)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:
            # `from pkg import sub` imports the submodule; `from pkg import Name`, pkg itself.
            sub = f"{origin}.{alias.name}"
            yield sub if sub in modules else origin
    elif (
        isinstance(node, ast.Call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and (
            (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        )
    ):
        yield node.args[0].value


def import_graph(package_dir: Path) -> list[Edge]:
    """Every import between the package's modules: at module level, under ``if
    TYPE_CHECKING:``, inside functions, relative or absolute.

    An import names the module it imports (``from a.b import C`` is an edge to
    ``a.b``, ``from a import b`` to the submodule ``a.b``); the parent packages
    Python initialises on the way are not counted, so a package's ``__init__``
    may re-export its modules, but a module that imports the package itself
    (``from karbor_async import x``, ``x`` no submodule) is an edge to it.
    """
    modules = module_names(package_dir)
    edges: list[Edge] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(package_dir.parent))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in _imported(node, name, is_package, modules):
                if target in modules:
                    edges.append(Edge(name, target, rel, getattr(node, "lineno", 0)))
    return edges


def strongly_connected(nodes: list[str], succ: Mapping[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _path(succ: Mapping[str, list[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest path ``start ~> goal`` inside ``within`` (breadth first)."""
    came: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in succ.get(node, ()):
            if child in within and child not in came:
                came[child] = node
                queue.append(child)
    path: list[str] = []
    at: str | None = goal
    while at is not None:
        path.append(at)
        at = came[at]
    return path[::-1]


def cycles(edges: list[Edge]) -> list[list[str]]:
    """For every import that takes part in a circle, the shortest circle through it
    (``[a, b, a]``), each circle once, starting at its smallest module."""
    succ: dict[str, list[str]] = {}
    for e in edges:
        targets = succ.setdefault(e.source, [])
        if e.target not in targets:
            targets.append(e.target)
    nodes = sorted({e.source for e in edges} | {e.target for e in edges})
    found: set[tuple[str, ...]] = set()
    for component in strongly_connected(nodes, succ):
        members = set(component)
        for source in component:
            for target in succ.get(source, ()):
                if target not in members or (len(component) == 1 and target != source):
                    continue
                ring = [source, *_path(succ, target, source, members)[:-1]]
                first = ring.index(min(ring))
                ring = ring[first:] + ring[:first]
                found.add((*ring, ring[0]))
    return [list(c) for c in sorted(found)]


def describe(circles: list[list[str]], edges: list[Edge]) -> str:
    where: dict[tuple[str, str], list[str]] = {}
    for e in edges:
        where.setdefault((e.source, e.target), []).append(f"{e.path}:{e.line}")
    lines = []
    for circle in circles:
        lines.append(" -> ".join(circle))
        for a, b in pairwise(circle):
            lines.append(f"    {a} imports {b} at {', '.join(where[(a, b)])}")
    return "\n".join(lines)


def test_no_module_imports_a_module_that_imports_it() -> None:
    """No module of the package imports, directly or through others, a module that
    imports it: every import counts (module level, under ``if TYPE_CHECKING:``, inside
    functions), so each module can be read, typed and split without its importers."""
    edges = import_graph(PACKAGE)
    assert len(module_names(PACKAGE)) > 20, f"{PACKAGE} does not hold the package"
    assert edges, "no imports between the package's modules were found"
    circles = cycles(edges)
    assert not circles, "import circles in src/karbor_async:\n" + describe(circles, edges)


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_every_kind_of_import_is_an_edge(tmp_path: Path) -> None:
    """The graph sees imports under TYPE_CHECKING, inside functions, relative ones,
    submodules imported by name, the package root and modules of subpackages."""
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\nfrom pkg import _sub\n",
            "pkg/a.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.b import B\n"
                "def f():\n    from . import c\n"
            ),
            "pkg/b.py": "import pkg._sub.x\nimport anyio\n",
            "pkg/c.py": "from .._other import thing\nfrom pkg import A\n",
            "pkg/_sub/__init__.py": "from .x import X\n",
            "pkg/_sub/x.py": "import importlib\nimportlib.import_module('pkg.a')\n",
            "pkg/stray/y.py": "import pkg.a\n",
        },
    )
    got = {(e.source, e.target) for e in import_graph(package)}
    assert got == {
        ("pkg", "pkg.a"),
        ("pkg", "pkg._sub"),
        ("pkg.a", "pkg.b"),
        ("pkg.a", "pkg.c"),
        ("pkg.b", "pkg._sub.x"),
        ("pkg.c", "pkg"),
        ("pkg._sub", "pkg._sub.x"),
        ("pkg._sub.x", "pkg.a"),
    }
    assert cycles(import_graph(package)) == [
        ["pkg", "pkg._sub", "pkg._sub.x", "pkg.a", "pkg.c", "pkg"],
        ["pkg", "pkg.a", "pkg.c", "pkg"],
        ["pkg._sub.x", "pkg.a", "pkg.b", "pkg._sub.x"],
    ]


MAX_CLASS_LINES = 400


def test_no_class_is_over_400_lines() -> None:
    """Each rule stays findable from a file name: no class of the package, docstrings and
    comments included, is longer than 400 lines (split it into rooms instead)."""
    big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big.append(f"{path.relative_to(PACKAGE)}: {node.name} ({lines} lines)")
    assert not big, "classes over 400 lines: " + ", ".join(big)


# anyio names newer than the lowest version pyproject.toml declares (anyio>=4.6)
_NEWER_THAN_DECLARED_ANYIO = (
    "move_on_at",
    "fail_at",
)  # move_on_at: 4.15 (the audit); fail_at its twin


def test_the_engine_calls_no_anyio_newer_than_it_declares() -> None:
    """`anyio>=4.6` must be true: code calling `anyio.move_on_at` failed every run there."""
    declared = (ROOT / "pyproject.toml").read_text()
    assert '"anyio>=4.6"' in declared
    found = [
        f"{path.relative_to(ROOT)}: anyio.{name}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for name in _NEWER_THAN_DECLARED_ANYIO
        if f"anyio.{name}(" in path.read_text()
    ]
    assert found == []
