"""No simulator outlives its supervisor for long: a SIGKILLed supervisor's containers are removed by its watchdog.

A real stack on two containerised fake-CARLA slots; its supervisor's whole process
group is SIGKILLed (nothing of it can clean up), and without any new ``up`` the
run's containers are gone within the stated bound (the watchdog's poll plus
Docker's removal), with an ``orphans_removed`` line in ``events.jsonl``.
Containers that are not that supervisor's (another run's, and a later supervisor's
of the same run) are left alone.
"""

import os
import secrets
import signal
import time

import psutil
import pytest

from harness.carla import carla_overrides
from harness.stack import Stack
from protocol import events as ev
from protocol.states import RUNNING
from supervisor.drivers.container import OWNER_LABEL, RUN_LABEL

pytestmark = pytest.mark.timeout(300)

BOUND_S = 15.0  # docs/carla.md: the watchdog's poll (1 s) plus Docker's removal, with room for a busy host


@pytest.fixture
def carla_stack(tmp_path, fakecarla_image, docker_engine):
    """A stack on two containerised fake-CARLA slots, under a run id of its own (its containers' names and labels
    are the test's alone). At teardown, also when the test fails: its watchdog killed, every container labelled for
    its run removed, the stack stopped and checked for leftover processes."""
    stacks = []

    def make():
        stack = Stack(tmp_path / f"s{len(stacks)}", carla_overrides(fakecarla_image), "configs/carla.yaml",
                      run_id=f"orphans-{secrets.token_hex(3)}")
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in stacks:
        for p in watchdogs(stack.run_dir):
            p.kill()
        remove(listed(docker_engine, {"label": [f"{RUN_LABEL}={stack.run_id}"]}))
        stack.stop()


def watchdogs(run_dir) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "supervisor.watchdog" in cmd and str(run_dir) in cmd:
            found.append(p)
    return found


def listed(engine, filters) -> list:
    """Containers the filter finds (one removed while being listed is not)."""
    return engine.containers.list(all=True, filters=filters, ignore_removed=True)


def remove(containers) -> None:
    for c in containers:
        try:
            c.remove(force=True)
        except Exception:
            pass


def until(predicate, timeout, what, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_killed_supervisors_containers_are_removed_by_its_watchdog_and_no_one_elses(
        carla_stack, docker_engine, fakecarla_image):
    stack = carla_stack()
    run_filter = {"label": [f"{RUN_LABEL}={stack.run_id}"]}
    strangers = []
    try:
        stack.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"] if p["name"].startswith("carla-")),
                       120, "both simulators running")
        ours = {c.name for c in docker_engine.containers.list(filters=run_filter)}
        assert ours == {f"rlstack-{stack.run_id}-carla-0", f"rlstack-{stack.run_id}-carla-1"}
        assert len(watchdogs(stack.run_dir)) == 1
        # another run's container, and one of the same run that a later supervisor would have started
        for labels in ({RUN_LABEL: f"other-{secrets.token_hex(3)}"},
                       {RUN_LABEL: stack.run_id, OWNER_LABEL: "1-0.00"}):
            strangers.append(docker_engine.containers.run(
                fakecarla_image, ["python3", "-m", "fakecarla", "-carla-rpc-port=2000"], detach=True,
                labels=labels, name=f"rlstack-stranger-{secrets.token_hex(3)}"))
        stranger_names = {c.name for c in strangers}

        killed_at = time.monotonic()
        os.killpg(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(timeout=10)
        until(lambda: not [c for c in listed(docker_engine, run_filter) if c.name not in stranger_names],
              2 * BOUND_S, "the run's containers removed")
        gone_s = time.monotonic() - killed_at
        print(f"containers gone {gone_s:.2f}s after the SIGKILL")
        assert gone_s < BOUND_S

        line = until(lambda: next((e for e in stack.events() if e["event"] == ev.ORPHANS_REMOVED), None), 5,
                     "the orphans_removed line")
        assert sorted(line["containers"]) == sorted(ours)
        assert line["name"] == "run" and "is gone" in line["reason"]
        for c in strangers:
            c.reload()
            assert c.status == "running", f"{c.name} ({c.labels}) is not the killed supervisor's"
        until(lambda: not watchdogs(stack.run_dir), 10, "the watchdog to exit")
    finally:
        remove(strangers)  # another run's is not the fixture's to find


def test_after_a_clean_stop_the_watchdog_is_gone_and_removed_nothing(carla_stack, docker_engine, fakecarla_image):
    stack = carla_stack()
    run_filter = {"label": [f"{RUN_LABEL}={stack.run_id}"]}
    stack.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"] if p["name"].startswith("carla-")),
                   120, "both simulators running")
    assert len(watchdogs(stack.run_dir)) == 1
    assert stack.cli("stop").returncode == 0
    assert stack.proc.wait(timeout=60) == 0
    assert not watchdogs(stack.run_dir), "the supervisor ends its watchdog before it exits"
    assert not listed(docker_engine, run_filter)
    assert not [e for e in stack.events() if e["event"] == ev.ORPHANS_REMOVED]


def test_what_a_clean_stop_left_of_its_supervisors_containers_the_watchdog_removes(
        carla_stack, docker_engine, fakecarla_image):
    """A container of the supervisor that its driver does not know (as when the engine failed at its start) is
    still labelled as its own: after the stop (`ended` written) the watchdog finds it and removes it."""
    stack = carla_stack()
    run_filter = {"label": [f"{RUN_LABEL}={stack.run_id}"]}
    stack.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"] if p["name"].startswith("carla-")),
                   120, "both simulators running")
    owner = docker_engine.containers.get(f"rlstack-{stack.run_id}-carla-0").labels[OWNER_LABEL]
    unknown = docker_engine.containers.run(
        fakecarla_image, ["python3", "-m", "fakecarla", "-carla-rpc-port=2000"], detach=True,
        labels={RUN_LABEL: stack.run_id, OWNER_LABEL: owner}, name=f"rlstack-unknown-{secrets.token_hex(3)}")
    assert stack.cli("stop").returncode == 0
    assert stack.proc.wait(timeout=60) == 0
    until(lambda: not listed(docker_engine, run_filter), 10, "every container of the run removed")
    line = until(lambda: next((e for e in stack.events() if e["event"] == ev.ORPHANS_REMOVED), None), 5,
                 "the orphans_removed line")
    assert line["containers"] == [unknown.name] and "ended" in line["reason"]
    until(lambda: not watchdogs(stack.run_dir), 10, "the watchdog to exit")
