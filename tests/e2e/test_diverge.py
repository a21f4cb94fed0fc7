"""The users' diverging network (configs/users_diverging.yaml) against ours on the same racetrack data: theirs
blows up, an alert fires first, `supervisor report` calls it diverging from the right update; ours does not.
A short version of `python -m bench diverge` (its CI setting, cut at 700 updates)."""

from __future__ import annotations

import pytest

from bench.diverge import collect, report_right, train

pytestmark = pytest.mark.timeout(600)


def test_the_users_network_diverges_where_ours_does_not_and_the_report_says_so(tmp_path):
    collect(tmp_path / "replay", 5000)
    users = train(tmp_path / "replay", "users", 700, 32, tmp_path / "users", after=50)
    ours = train(tmp_path / "replay", "default", 700, 32, tmp_path / "default")
    assert users["blowup"] is not None, users["peak"]
    assert min(a["updates"] for a in users["first_alerts"].values()) < users["blowup"]["updates"]
    assert users["report"]["verdict"] == "diverging" and report_right(users), (users["report"], users["onset"])
    assert ours["blowup"] is None and ours["report"]["verdict"] != "diverging" and report_right(ours), ours["report"]
