"""The fleet on a real Ray cluster started by deploy/ray's scripts (token authentication on): a head, one node
offering carla_host on this machine and one on another host, a network namespace joined by a veth pair, each node
under a stand-in for its systemd unit, each host's CARLA server the fake one under a stand-in for its pod's kubelet
(simulators.mode pod). One agent per node, each running its host's own supervisor against the head's learner over
TCP with CurveZMQ and a key of its own; the learner's weights come back across the link. A host supervisor
SIGSTOPped while Ray calls everything alive is caught, with evidence, and its agent replaced; at the same time the
other host, cut off from the learner's address alone, is caught by the learner's "last seen" and replaced; a frozen
worker is replaced by its host's own supervisor, the head leaving the host alone; the far host's link cut until Ray
declares its node dead is waited for, never killed, and when the link is back its node rejoins and the agent is placed
again, ending what the old one left; a head supervisor killed and started again takes the running agents over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fleet.agent import HOST_KEY_ENV
from harness.carla import carla_overrides, free_port_block, free_port_pair
from harness.keys import ironhouse
from harness.netns import OtherHost
from harness.ray import host_stepping as stepping
from harness.ray import host_supervisor
from protocol import events as ev
from protocol.roles import LEARNER
from protocol.states import RUNNING

# alone: a Ray cluster opens dozens of sockets on ports the OS picks, which collide with the free ports other tests
# pick for their servers at the same time
pytestmark = [pytest.mark.timeout(360), pytest.mark.alone]
ROOT = Path(__file__).resolve().parents[2]


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_fleet_on_ray_catches_a_hung_host_waits_for_a_cut_off_node_and_is_taken_over_by_a_new_head(
        stack_factory, tmp_path, monkeypatch):
    from harness.ray import DeployedCluster

    other = OtherHost()
    cluster = runs_dir = stack = None
    kubelets: list[subprocess.Popen] = []
    try:
        cluster = DeployedCluster(tmp_path, other.here)
        learner_ip = other.alias()  # the learner on an address of its own: the far host can lose it alone
        # each machine its own key: the near one's at cluster.host_key, the far one's named in its node's
        # environment; each public key in the learner's allowed directory
        _, learner_secret, secrets, clients = ironhouse(tmp_path / "keys", "near", "far")
        cluster.add_host("near", other.here)
        cluster.add_host("far", other.there, other.prefix, env={HOST_KEY_ENV: str(secrets["far"])})
        for key, value in cluster.env.items():  # the head's supervisor joins with the cluster's token
            monkeypatch.setenv(key, value)
        # each host's CARLA server as a pod's sibling container would run it (simulators.mode pod): the fake server
        # under a stand-in for its kubelet, on the same port on each host's own network
        port = free_port_block(20)
        for name, prefix in (("near", []), ("far", other.prefix)):
            kubelets.append(subprocess.Popen(
                [*prefix, sys.executable, "-m", "harness.restarter", "--delay-s", "0.5", "--", sys.executable, "-m",
                 "harness.fakecarla", f"-carla-rpc-port={port}"], cwd=ROOT,
                stdout=open(tmp_path / f"{name}-carla.out", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        cluster.wait_for_hosts(2)
        overrides = carla_overrides("unused")
        overrides["workers"]["count"] = 1
        overrides["simulators"].update(mode="pod", base_port=port, tm_base_port=port + 5)
        stack = stack_factory({**overrides, "run": {"engine": "ray"}, "workers": {**overrides["workers"]},
                               "learner": {"listen": f"tcp://{learner_ip}:{free_port_pair()}", "checkpoint_every": 50,
                                           "rate_limit_slack": 10**6,  # the hosts never held back by the learner
                                           "curve_key": str(learner_secret), "curve_clients": str(clients)},
                               "cluster": {"address": cluster.address, "host_key": str(secrets["near"]),
                                           "probe_interval_s": 0.5, "probe_timeout_s": 1.5,
                                           "host_deadline_s": 8.0, "learner_silence_s": 2.0}},
                              base="configs/carla.yaml", start=False)
        runs_dir = stack.run_dir.parent

        def supervisor_of(host: str) -> int:  # the pid of the supervisor host's agent runs
            return host_supervisor(runs_dir, stack.run_id, host)

        stack.start()
        s = stack.wait_for(lambda s: stepping(s, "host-0", 50) and stepping(s, "host-1", 50), 150,
                           "both hosts' workers stepping")
        assert [p["name"] for p in s["processes"]] == [LEARNER, "host-0", "host-1"]
        assert row(s, "host-0")["node"] != row(s, "host-1")["node"], "one agent per node offering carla_host"
        far = [h for h in ("host-0", "host-1") if supervisor_of(h) in other.pids()]
        assert len(far) == 1, "one host's supervisor runs on the other host's network"
        far, near = far[0], next(h for h in ("host-0", "host-1") if h != far[0])
        names = {f"near.{near}", f"far.{far}"}  # each host under its key's name and the head's name for it
        learner = stack.wait_for(lambda s: {h["host"] for h in row(s, LEARNER)["hosts"]} == names
                                 and row(s, LEARNER)["updates"] > 0, 60, "the learner training on both hosts' steps")
        assert row(learner, LEARNER)["refused"] == 0 and row(learner, LEARNER)["dropped"] == 0, \
            "each host's workers let in under its key's name"
        stack.wait_for(lambda s: all(c["weights"] is not None for h in (near, far) for c in row(s, h)["children"]
                                     if c["name"].startswith("worker-")),
                       60, "the learner's weights back on both hosts' workers (the far one's across the link)")
        table = stack.cli("status").stdout
        for host, key in ((near, "near"), (far, "far")):
            line = next(x for x in table.splitlines() if x.startswith(f"{host} (node "))
            assert line.startswith(f"{host} (node {row(s, host)['node']}, as {key}.{host}): carla-0 running") \
                and "worker-0 running" in line, table

        # at once: the near host's supervisor SIGSTOPped (its agent and Ray are fine, it answers nothing), and the
        # far host cut off from the learner alone (its supervisor answers, Ray's link is up, its workers' steps go
        # nowhere): each caught, with evidence, and its agent replaced
        hung = supervisor_of(near)
        cut_off = supervisor_of(far)
        os.kill(hung, signal.SIGSTOP)
        other.block(learner_ip)
        try:
            s = stack.wait_for(lambda s: row(s, near)["incarnation"] >= 1 and stepping(s, near)
                               and [e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == far], 120,
                               f"{near} replaced and stepping, and {far} caught delivering nothing")
        finally:
            other.unblock(learner_ip)
        assert supervisor_of(near) != hung and not alive(hung), "the hung supervisor was ended"
        stalled = next(e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == near)
        assert "heartbeat" in stalled["reason"] or "progress" in stalled["reason"], stalled
        incident = stack.run_dir / row(s, near)["last_incident"]
        facts = json.loads((incident / "incident.json").read_text())
        assert facts["node_alive"] is True and facts["pid"] == hung, facts  # Ray called it alive all along
        assert facts["cause"]["cause"] == "host_supervisor_unanswering", facts["cause"]
        assert "Thread" in (incident / "stack.txt").read_text(), "the hung supervisor's stack, through its agent"
        assert json.loads((incident / "status.json").read_text())["processes"], "its last answered status"

        silent = next(e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == far)
        assert f"the learner has had no steps from far.{far}" in silent["reason"], silent
        assert f"from near.{near}" in silent["reason"], "judged against the host the learner does hear"
        s = stack.wait_for(lambda s: row(s, far)["incarnation"] >= 1 and stepping(s, far) and next(
            h for h in row(s, LEARNER)["hosts"] if h["host"] == f"far.{far}")["last_seen_s"] < 1.0, 120,
            f"{far} replaced, stepping, and heard by the learner again")
        incident = stack.run_dir / row(s, far)["last_incident"]
        facts = json.loads((incident / "incident.json").read_text())
        assert facts["pid"] == cut_off and "no steps from" in facts["learner_silence"], facts
        assert facts["cause"]["cause"] == "host_cut_off_from_learner" and row(s, far)["cause"] == facts["cause"]["cause"]
        assert not alive(cut_off), "the cut-off host's supervisor was ended"

        # the far host's link cut: Ray declares its node dead (its health checks fail), and the host is waited for,
        # neither stalled nor killed; the link mended, its raylet learns it was declared dead and exits, its unit
        # starts a new node, Ray places the agent there, and the new agent ends the supervisor the old one left
        old_node, old_supervisor = row(s, far)["node"], supervisor_of(far)
        stalls = len([e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == far])
        other.cut()
        # meanwhile a slot of the near host frozen: its own supervisor replaces the worker, the head leaves the host
        near_incarnation = row(s, near)["incarnation"]
        frozen = next(p for p in psutil.Process(supervisor_of(near)).children()
                      if "worker" in " ".join(p.cmdline()))
        frozen.suspend()
        try:
            stack.wait_for(lambda s: row(s, far).get("phase") == "waiting_node", 60, f"{far} waiting for a node")
            assert alive(old_supervisor), "a host cut off runs on, out of reach"
        finally:
            other.mend()
        s = stack.wait_for(lambda s: row(s, near)["children"][-1]["restarts"] >= 1 and stepping(s, near), 60,
                           f"{near}'s frozen worker replaced by its own supervisor")
        assert row(s, near)["incarnation"] == near_incarnation and not alive(frozen.pid)
        s = stack.wait_for(lambda s: stepping(s, far) and row(s, far)["node"] != old_node, 120,
                           f"{far}'s agent placed on the rejoined node and its workers stepping")
        assert row(s, far)["incarnation"] == 1, "a dead node is waited for, not killed"
        assert len([e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == far]) == stalls
        assert not alive(old_supervisor), "the old agent's supervisor, left running in the cut, was ended"
        assert supervisor_of(far) in other.pids(), "placed again on the far host"
        stack.wait_for(lambda s: next(h for h in row(s, LEARNER)["hosts"]
                                      if h["host"] == f"far.{far}")["last_seen_s"] < 1.0,
                       60, "the learner hearing from the far host again")

        # the head supervisor SIGKILLed and started again: it takes the running agents over by name
        supervisors = {h: supervisor_of(h) for h in ("host-0", "host-1")}
        os.killpg(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait(timeout=30)
        stack.start()
        s = stack.wait_for(lambda s: stepping(s, "host-0") and stepping(s, "host-1")
                           and row(s, LEARNER)["state"] == RUNNING, 120, "the new head with both hosts")
        assert {h: supervisor_of(h) for h in supervisors} == supervisors, "the hosts ran on, untouched"

        # stop: the agents end their hosts' supervisors (they are detached: nothing else would)
        assert stack.cli("stop").returncode == 0
        assert stack.proc.wait(timeout=90) == 0
        assert not [pid for pid in supervisors.values() if alive(pid)]
    finally:
        if stack is not None:
            stack.stop_supervisor()
        for kubelet in kubelets:
            kubelet.terminate()
            kubelet.wait(timeout=10)
        left = cluster.shutdown(runs_dir) if cluster is not None else []
        stray = other.remove()
        assert not left, f"host supervisors left running: {left}"
        assert not stray, f"processes left on the other host: {stray}"
