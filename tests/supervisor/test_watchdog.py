"""The watchdog's decisions on fake inputs: when the supervisor it watches is done, and which containers it may
remove (no process is started, no Docker engine asked)."""

import json

import pytest

from protocol import events as ev
from supervisor.drivers.container import OWNER_LABEL, RUN_LABEL
from supervisor.watchdog import (
    ENDED,
    GONE,
    decide,
    label_filter,
    owner_tag,
    watch,
    write_event,
)

PID, STARTED = 4242, 1_700_000_000.25


def test_a_supervisor_that_runs_is_left_alone():
    assert decide({}, PID, STARTED, STARTED) is None
    assert decide({"pid": PID, "started": STARTED}, PID, STARTED, STARTED + 0.01) is None  # two readings


def test_a_supervisor_whose_pid_is_free_or_taken_by_another_process_is_gone():
    assert decide({"pid": PID, "started": STARTED}, PID, STARTED, None) == GONE
    assert decide({"pid": PID, "started": STARTED}, PID, STARTED, STARTED + 30.0) == GONE  # a new process, same pid


def test_an_ended_run_of_this_supervisor_ends_the_watch_even_while_it_still_runs():
    state = {"pid": PID, "started": STARTED, "ended": {"exit_code": 0, "reason": "stop requested"}}
    assert decide(state, PID, STARTED, STARTED) == ENDED
    assert decide(state, PID, STARTED, None) == ENDED


def test_the_ended_state_of_another_supervisor_of_the_run_is_not_ours():
    other = {"pid": PID + 1, "started": STARTED, "ended": {"exit_code": 0}}
    assert decide(other, PID, STARTED, STARTED) is None
    earlier = {"pid": PID, "started": STARTED - 100.0, "ended": {"exit_code": 0}}  # the pid reused across runs
    assert decide(earlier, PID, STARTED, STARTED) is None


def test_watch_polls_until_the_supervisor_is_gone(tmp_path):
    (tmp_path / "supervisor.json").write_text(json.dumps({"pid": PID, "started": STARTED}))
    answers = iter([STARTED, STARTED, None])
    sleeps = []
    assert watch(tmp_path, PID, STARTED, start_time_of=lambda pid: next(answers), sleep=sleeps.append) == GONE
    assert sleeps == [1.0, 1.0]


def test_asked_to_end_it_decides_at_once_and_removes_nothing_while_the_run_goes_on(tmp_path):
    state = tmp_path / "supervisor.json"
    state.write_text(json.dumps({"pid": PID, "started": STARTED}))
    never = lambda seconds: pytest.fail("it waited")  # noqa: E731
    assert watch(tmp_path, PID, STARTED, start_time_of=lambda pid: STARTED, sleep=never,
                 asked_to_end=lambda: True) is None
    state.write_text(json.dumps({"pid": PID, "started": STARTED, "ended": {"exit_code": 0}}))
    assert watch(tmp_path, PID, STARTED, start_time_of=lambda pid: STARTED, sleep=never,
                 asked_to_end=lambda: True) == ENDED


def test_the_label_filter_is_the_runs_own_and_its_supervisors_own():
    tag = owner_tag(PID, STARTED)
    filters = label_filter("20260101-000000-abcd", tag)
    assert filters == {"label": [f"{RUN_LABEL}=20260101-000000-abcd", f"{OWNER_LABEL}={tag}"]}
    assert label_filter("other-run", tag) != filters
    assert owner_tag(PID, STARTED) != owner_tag(PID, STARTED + 5.0) != owner_tag(PID + 1, STARTED)


def test_the_event_line_is_a_documented_kind(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"event": "run_started"}\n')
    write_event(tmp_path, {"containers": ["rlstack-r-carla-0"], "reason": "supervisor pid 1 is gone",
                           "supervisor_pid": 1})
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    line = json.loads(lines[1])
    assert line["event"] == ev.ORPHANS_REMOVED and line["name"] == "run" and line["containers"] == ["rlstack-r-carla-0"]
    with pytest.raises(ValueError):
        write_event(tmp_path, {"containers": [], "pids": [1]})
