import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


@pytest.fixture
def stack_factory(tmp_path):
    """Start real stacks; each is stopped and checked for leftovers even when the test fails."""
    from tests.stack import Stack

    stacks = []

    def make(overrides=None, base="configs/pendulum.yaml", start=True):
        s = Stack(tmp_path / f"s{len(stacks)}", overrides, base)
        s.tmp.mkdir(parents=True, exist_ok=True)
        stacks.append(s)
        return s.start() if start else s

    yield make
    errors = []
    for s in reversed(stacks):  # a later stack may share an earlier one's run dir
        try:
            s.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, errors
