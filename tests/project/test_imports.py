"""No import cycles among the project's modules, lazy imports included.

Each module's AST is read (nothing is imported): every ``import`` and ``from ... import``
at any depth counts, those inside functions and ``if TYPE_CHECKING:`` too, since a
lazy import that closes a cycle still ties the two modules together. An edge goes to
the project module named; ``from pkg import name`` goes to ``pkg.name`` when that is a
module, else to ``pkg``. The implicit import of a package's ``__init__`` by its
submodules is not an edge (every package would be a cycle with its own ``__init__``).

The graph spans every package present, so a cycle through two packages is found too;
one test per package fails on the cycles that pass through a module of it, printing
each cycle as ``a -> b -> a``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = tuple(p for p in ("protocol", "learner", "worker", "policy", "supervisor", "runreport", "harness", "bench")
                 if (ROOT / p / "__init__.py").is_file())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(name: str, path: Path) -> dict[str, int]:
    """The project modules that module ``name`` imports anywhere in its source, each with its first import's line."""
    known = modules()
    is_package = path.name == "__init__.py"

    def project_module(dotted: str) -> str | None:
        """``dotted`` if it is a project module, else its longest prefix that is one."""
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in known:
                return ".".join(parts)
            parts.pop()
        return None

    found: dict[str | None, int] = {}

    def add(target: str | None, line: int) -> None:
        found[target] = min(line, found.get(target, line))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(project_module(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in known else project_module(source), node.lineno)
    found.pop(None, None)
    return found


@cache
def imports() -> dict[str, dict[str, int]]:
    return {name: imported(name, path) for name, path in modules().items()}


@cache
def graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(targets) for name, targets in imports().items()}


def strongly_connected(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def a_cycle(component: list[str], edges: dict[str, frozenset[str]]) -> list[str]:
    """One cycle through the component's first module, by a breadth-first search inside the component."""
    start = component[0]
    inside = set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & inside):
                if child == start:
                    path = [node]  # back to start: node, its predecessor, ..., start
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def tangles() -> list[list[str]]:
    """The groups of modules that import each other, directly or through a cycle (components with a cycle)."""
    edges = graph()
    return [c for c in strongly_connected(edges) if len(c) > 1 or c[0] in edges[c[0]]]


def describe(tangle: list[str]) -> str:
    """One cycle of the tangle, ``a -> b -> a``, with where each import is (``a.py:12 imports b, ...``); the tangle's
    other modules, if it has more, are on other cycles through these."""
    cycle = a_cycle(tangle, graph())
    where = ", ".join(f"{modules()[a].relative_to(ROOT)}:{imports()[a][b]} imports {b}"
                      for a, b in zip(cycle, cycle[1:]))
    more = f"; all of {tangle} import each other" if len(tangle) > len(set(cycle)) else ""
    return f"{' -> '.join(cycle)} ({where}{more})"


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a", "d"}),
             "e": frozenset({"a"})}
    found = {tuple(c) for c in strongly_connected(edges) if len(c) > 1 or c[0] in edges[c[0]]}
    assert found == {("a", "b", "c"), ("d",)}
    assert a_cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]
    assert a_cycle(["d"], edges) == ["d", "d"]


def test_lazy_and_relative_imports_are_edges(tmp_path):
    source = "def f():\n    from protocol import codec\n    import protocol.messages\n    from . import roles\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    assert imported("protocol.x", path) == {"protocol.codec": 2, "protocol.messages": 3, "protocol.roles": 4}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_through_the_package(package):
    mine = [t for t in tangles() if any(m == package or m.startswith(package + ".") for m in t)]
    for tangle in mine:
        print("import cycle:", describe(tangle))
    assert not mine, "import cycles: " + "; ".join(describe(c) for c in mine)


def test_nothing_outside_the_tests_imports_them():
    """The product, the benchmarks and the harness never import a test module (the harness is what they share)."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [t for t in targets if t == "tests" or t.startswith("tests.")], \
                f"{name} (line {node.lineno}) imports {targets}"
