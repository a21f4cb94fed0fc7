"""Importing all of protocol, in a fresh process, loads neither torch nor gymnasium."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)




def test_protocol_imports_neither_torch_nor_gymnasium():
    """By construction: no module of protocol names them, and importing all of protocol loads neither."""
    heavy = {"torch", "gymnasium", "highway_env", "tensorboard"}
    modules = sorted(p.stem for p in (ROOT / "protocol").glob("*.py") if p.stem != "__init__")
    for path in (ROOT / "protocol").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in heavy, f"protocol/{path.name} imports {name}"
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module('protocol.' + m)\n"
            f"loaded = sorted(m for m in {sorted(heavy)!r} if m in sys.modules)\n"
            "assert not loaded, loaded\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
