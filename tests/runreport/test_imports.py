"""runreport reads runs on the base install: it imports protocol, numpy, matplotlib and the stdlib only, and none of
its modules import each other in a circle (lazy imports inside functions count)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "runreport"
ALLOWED = {"protocol", "numpy", "matplotlib", "runreport", "__future__"} | set(sys.stdlib_module_names)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports (absolute dotted names, lazy ones included), with the line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package itself
                base = "runreport" + (f".{base}" if base else "")
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from runreport import status`
    return found


def modules() -> dict[str, Path]:
    return {f"runreport.{p.stem}" if p.stem != "__init__" else "runreport": p for p in sorted(PACKAGE.glob("*.py"))}


def test_runreport_imports_only_protocol_numpy_matplotlib_and_the_stdlib():
    bad = [f"{path.name}:{line} imports {name}" for mod, path in modules().items() for name, line in imports(path)
           if name.split(".")[0] not in ALLOWED]
    assert not bad, bad


def test_no_runreport_modules_import_each_other_in_a_circle():
    mods = modules()
    graph = {m: {name for name, _ in imports(p) if name in mods and name not in (m, "runreport")}
             for m, p in mods.items()}
    assert graph["runreport.report"], "the graph is empty: the parser misses imports"
    cycles = []

    def visit(m, path):
        for n in sorted(graph[m]):
            if n in path:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            else:
                visit(n, path + [n])

    for m in mods:
        visit(m, [m])
    assert not cycles, sorted(set(cycles))
