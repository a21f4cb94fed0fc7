"""The suite's root: tests run from the repository root, and tests outside ``tests/e2e/`` start no process.

``tests/<package>/`` holds the unit tests of each package (``make test-fast`` runs
exactly these); ``tests/e2e/`` holds every test that starts a process: a real
stack, the fake CARLA server, containers, the command line.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
E2E = ROOT / "tests" / "e2e"


class StartsAProcess(AssertionError):
    """A unit test started a process: it belongs in tests/e2e/."""


@pytest.fixture(scope="session")
def font_cache():
    """matplotlib builds its font cache once per machine, by running ``fc-list``: build it before any test runs,
    so that a fresh machine's first plot is not taken for a test starting a process."""
    import matplotlib

    if not any(Path(matplotlib.get_cachedir()).glob("fontlist-*.json")):
        import matplotlib.font_manager  # noqa: F401  (its import builds and writes the cache)


@pytest.fixture(autouse=True)
def no_process_outside_e2e(request, monkeypatch, font_cache):
    """A test outside tests/e2e/ that starts a process fails, naming what it started."""
    if Path(str(request.node.fspath)).is_relative_to(E2E):
        yield
        return

    def refuse(self, args, *rest, **kw):
        raise StartsAProcess(f"{request.node.nodeid} starts {str(args)[:120]}: a test that starts a process "
                             "belongs in tests/e2e/")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield

