"""The update-to-data ratio on both sides, without processes."""

import pytest

from protocol.config import LearnerConfig
from protocol.ratelimit import Allowance, UpdateToData

pytestmark = pytest.mark.timeout(10)


def test_no_updates_are_due_before_learning_starts():
    ratio = UpdateToData(updates_per_step=0.5, learning_starts=200, slack=400)
    assert ratio.updates_due(0) == 0 and ratio.updates_due(199) == 0
    assert ratio.updates_due(200) == 1
    assert ratio.updates_due(400) == 101  # (400 - 200) * 0.5 + 1


def test_learning_from_the_first_step():
    ratio = UpdateToData(updates_per_step=1.0, learning_starts=0, slack=0)
    assert ratio.updates_due(0) == 0 and ratio.updates_due(1) == 2


def test_allowance_grows_with_updates_at_the_ratio():
    ratio = UpdateToData(updates_per_step=0.25, learning_starts=1000, slack=500)
    assert ratio.allowed_steps(0) == 1500
    assert ratio.allowed_steps(100) == 1900
    # at the allowance, the updates due catch up with the updates done (within the slack)
    updates = 1000
    assert ratio.updates_due(ratio.allowed_steps(updates) - 500) == updates + 1


def test_from_config():
    ratio = UpdateToData.from_config(LearnerConfig(updates_per_step=2.0, learning_starts=10, rate_limit_slack=3))
    assert ratio == UpdateToData(2.0, 10, 3)


def test_a_worker_steps_freely_until_it_hears_the_learner():
    a = Allowance("worker-0/0")
    assert a.may_step(10**9)
    a.hear(received=0, allowed=100, streams={})
    assert a.may_step(99) and not a.may_step(100)


def test_a_worker_counts_what_it_sent_that_the_learner_has_not_stored():
    a = Allowance("worker-0/1")
    a.hear(received=500, allowed=600, streams={"worker-0/1": 40, "worker-1/0": 460})
    a.sent = 90  # 50 of ours are in flight
    assert a.run_steps() == 550 and a.run_steps(pending=49) == 599
    assert a.may_step(49) and not a.may_step(50)
    a.hear(received=600, allowed=700, streams={"worker-0/1": 90, "worker-1/0": 510})
    assert a.run_steps() == 600, "once stored, ours are in the learner's count and not counted twice"


def test_another_incarnations_count_is_not_ours():
    a = Allowance("worker-0/2")
    a.hear(received=300, allowed=1000, streams={"worker-0/1": 300})
    assert a.seen_mine == 0 and a.run_steps() == 300


def test_the_reported_ratio_is_the_enforced_one():
    ratio = UpdateToData(updates_per_step=0.25, learning_starts=1000, slack=0)
    collected = 41_000
    assert ratio.ratio(ratio.updates_due(collected), collected) == pytest.approx(0.25, abs=1e-4)
