"""The learner's table of the hosts that send it steps (learner/intake.py), and what `status` makes of it."""

import time

import pytest

from learner.intake import MAX_HOSTS, Intake
from supervisor.control import sending_hosts
from supervisor.display import status_notes

pytestmark = pytest.mark.timeout(10)


def intake() -> Intake:
    return Intake(inbox=None, lock=None, progress=None, log=None, on_spec=None, on_episode=None)


def test_each_host_is_listed_with_its_slots_steps_and_when_it_last_sent():
    i = intake()
    i.seen("host-b:worker-0", 16)
    i.seen("host-b:worker-1", 16)
    i.seen("host-b:worker-0", 8)
    i.seen("worker-0", 4)  # this run's own worker, over ipc
    rows = i.host_rows()
    assert [(r["host"], r["slots"], r["steps"]) for r in rows] == [("host-b", 2, 40), ("local", 1, 4)]
    assert all(0 <= r["last_seen_s"] < 5 for r in rows)
    i.hosts["host-b"]["last_seen"] = time.monotonic() - 30
    assert i.host_rows()[0]["last_seen_s"] >= 30


def test_made_up_names_do_not_grow_the_table():
    i = intake()
    for n in range(10 * MAX_HOSTS):
        i.seen(f"h{n}:worker-{n}", 1)
        i.seen(f"h0:worker-{n}", 1)
    assert len(i.hosts) == MAX_HOSTS and len(i.hosts["h0"]["workers"]) == MAX_HOSTS


def test_status_shows_each_sending_host_and_ignores_malformed_rows():
    hosts = sending_hosts([{"host": "host-b", "slots": 2, "steps": 12345, "last_seen_s": 0.4},
                           {"host": 7, "slots": 1, "steps": 1, "last_seen_s": 0.0}, "garbage", None,
                           {"host": "x", "slots": True, "steps": 1, "last_seen_s": 0.0}])
    assert hosts == [{"host": "host-b", "slots": 2, "steps": 12345, "last_seen_s": 0.4}]
    assert sending_hosts({"not": "a list"}) == [] and sending_hosts(None) == []
    status = {"processes": [{"name": "learner", "state": "running", "hosts": hosts}]}
    assert "learner hears from host host-b: 2 slot(s), 12,345 steps, last 0.4s ago" in status_notes(status)
