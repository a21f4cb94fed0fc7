"""The fleet on a real Ray cluster (a head and two nodes offering carla_host, on this machine): one agent per node,
each running its host's own supervisor against the head's learner over TCP; a host supervisor SIGSTOPped while Ray
calls everything alive is caught, with evidence, and its agent replaced; a node removed is waited for and its agent
placed again when a node comes back; a head supervisor killed and started again takes the running agents over."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from fleet.agent import PID_FILE
from harness.carla import free_port_pair
from harness.ray import host_stepping as stepping
from protocol import events as ev
from protocol.roles import LEARNER
from protocol.states import RUNNING

# alone: a Ray cluster opens dozens of sockets on ports the OS picks, which collide with the free ports other tests
# pick for their servers at the same time
pytestmark = [pytest.mark.timeout(360), pytest.mark.alone]


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def host_supervisor(runs_dir, host) -> int:
    return int((runs_dir / ".agents" / f"test-{host}" / PID_FILE).read_text())


def test_a_fleet_on_ray_catches_a_hung_host_waits_for_a_dead_node_and_is_taken_over_by_a_new_head(stack_factory):
    from harness.ray import MiniCluster

    cluster = MiniCluster(hosts=2)
    runs_dir = stack = None
    try:
        stack = stack_factory({"run": {"engine": "ray"}, "workers": {"count": 1},
                               "learner": {"listen": f"tcp://127.0.0.1:{free_port_pair()}", "checkpoint_every": 50},
                               "cluster": {"address": cluster.address, "probe_interval_s": 0.5,
                                           "probe_timeout_s": 1.5, "host_deadline_s": 4.0}}, start=False)
        runs_dir = stack.run_dir.parent
        stack.start()
        s = stack.wait_for(lambda s: stepping(s, "host-0", 50) and stepping(s, "host-1", 50), 150,
                           "both hosts' workers stepping")
        assert [p["name"] for p in s["processes"]] == [LEARNER, "host-0", "host-1"]
        assert row(s, "host-0")["node"] != row(s, "host-1")["node"], "one agent per node offering carla_host"
        learner = stack.wait_for(lambda s: {h["host"] for h in row(s, LEARNER)["hosts"]} == {"host-0", "host-1"}
                                 and row(s, LEARNER)["updates"] > 0, 60, "the learner training on both hosts' steps")
        assert row(learner, LEARNER)["updates"] > 0
        table = stack.cli("status").stdout
        assert "host-0 (node " in table and "worker-0 running" in table

        # host-0's supervisor SIGSTOPped: its agent and Ray are fine, it answers nothing: caught, evidence, replaced
        hung = host_supervisor(runs_dir, "host-0")
        os.kill(hung, signal.SIGSTOP)
        s = stack.wait_for(lambda s: row(s, "host-0")["incarnation"] >= 1 and stepping(s, "host-0"), 120,
                           "host-0 replaced and stepping")
        assert host_supervisor(runs_dir, "host-0") != hung and not alive(hung), "the hung supervisor was ended"
        stalled = next(e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == "host-0")
        assert "heartbeat" in stalled["reason"] or "progress" in stalled["reason"], stalled
        incident = stack.run_dir / row(s, "host-0")["last_incident"]
        facts = json.loads((incident / "incident.json").read_text())
        assert facts["node_alive"] is True and facts["pid"] == hung, facts  # Ray called it alive all along
        assert "Thread" in (incident / "stack.txt").read_text(), "the hung supervisor's stack, through its agent"
        assert json.loads((incident / "status.json").read_text())["processes"], "its last answered status"
        assert row(s, "host-1")["incarnation"] == 0 and row(s, "host-1")["restarts"] == 0

        # host-1's node removed: waited for (no stall, no kill); a node with carla_host back: the agent is too
        node = next(n for n in cluster.nodes if n.node_id[:16] == row(s, "host-1")["node"])
        cluster.remove(node)
        stack.wait_for(lambda s: row(s, "host-1").get("phase") == "waiting_node", 60, "host-1 waiting for a node")
        cluster.add_host()
        s = stack.wait_for(lambda s: stepping(s, "host-1") and row(s, "host-1")["node"] != node.node_id[:16], 120,
                           "host-1's agent placed again and its workers stepping")
        assert row(s, "host-1")["incarnation"] == 0, "a dead node is waited for, not killed"
        assert not [e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == "host-1"]

        # the head supervisor SIGKILLed and started again: it takes the running agents over by name
        supervisors = {h: host_supervisor(runs_dir, h) for h in ("host-0", "host-1")}
        os.killpg(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(timeout=30)
        stack.start()
        s = stack.wait_for(lambda s: stepping(s, "host-0") and stepping(s, "host-1")
                           and row(s, LEARNER)["state"] == RUNNING, 120, "the new head with both hosts")
        assert {h: host_supervisor(runs_dir, h) for h in supervisors} == supervisors, "the hosts ran on, untouched"

        # stop: the agents end their hosts' supervisors (they are detached: nothing else would)
        assert stack.cli("stop").returncode == 0
        assert stack.proc.wait(timeout=90) == 0
        assert not [pid for pid in supervisors.values() if alive(pid)]
    finally:
        if stack is not None:
            stack.stop_supervisor()
        left = cluster.shutdown(runs_dir)
        assert not left, f"host supervisors left running: {left}"
