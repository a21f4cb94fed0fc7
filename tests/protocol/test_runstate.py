"""Whether a pid from a file is still the process it named (protocol/runstate.py)."""

import os

import psutil

import pytest

from protocol.runstate import runs_naming

pytestmark = pytest.mark.timeout(10)


def test_a_live_process_is_found_by_what_its_command_line_names_and_nothing_else_is():
    me = os.getpid()
    assert runs_naming(me, psutil.Process(me).cmdline()[0])  # this process, by its interpreter's path
    assert not runs_naming(me, "a marker no command line here holds: 7f3c")
    assert not runs_naming(2**22 + 12345, "python"), "no such pid"
