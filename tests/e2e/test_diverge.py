"""The users' diverging network (configs/users_diverging.yaml) against ours on the same racetrack data: theirs
blows up, an alert fires first, `supervisor report` calls it diverging from the right update; ours does not.
A short version of `python -m bench diverge` (its CI setting cut to 2,000 collected steps, batch 16 and at most 700
updates: the users' network blows up at 568 on it, as at 570 on the bench's 5,000 steps at batch 32; ours trains 600). Two tests on one replay, so
that the replay is collected once and each variant's figures are their own test."""

from __future__ import annotations

import fcntl
import os

import pytest

from bench.diverge import collect, report_right, train

# one worker trains both, one after the other, on the replay it collected (the other worker runs the rest)
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("diverge")]
UPDATES, BATCH, STEPS = 700, 16, 2000
OURS_UPDATES = 600  # past where the users' network blows up (568), with the window it is reported in


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """2,000 random-action racetrack steps, collected once per suite run (only sampled from, never written to;
    the lock keeps two processes from collecting it at once)."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    path = shared / "diverge-replay"
    with open(shared / "diverge-replay.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "collected").exists():
            collect(path, STEPS)
            (path / "collected").touch()
    return path


def test_the_users_network_diverges_after_an_alert_and_the_report_says_so(replay, tmp_path):
    users = train(replay, "users", UPDATES, BATCH, tmp_path / "users", after=20)  # the blow-up's window, and no more
    assert users["blowup"] is not None, users["peak"]
    assert min(a["updates"] for a in users["first_alerts"].values()) < users["blowup"]["updates"]
    assert users["report"]["verdict"] == "diverging" and report_right(users), (users["report"], users["onset"])


def test_ours_does_not_diverge_on_the_same_data(replay, tmp_path):
    ours = train(replay, "default", OURS_UPDATES, BATCH, tmp_path / "default")
    assert ours["blowup"] is None and ours["report"]["verdict"] != "diverging" and report_right(ours), ours["report"]
