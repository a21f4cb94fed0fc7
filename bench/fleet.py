"""The fleet on Ray, on this machine (a Ray head and two nodes offering carla_host, ``ray.cluster_utils``):

- what Ray costs: RSS of the head's Ray processes and of each idle node's, and the cores they take while the
  cluster waits (CPU over 10 s), before any run;
- a hung host (its supervisor SIGSTOPped, which Ray never notices): seconds from the stop to the host's new agent
  answering with its workers stepping again, against the budget the issue sets (the fleet's deadline + the slots'
  start time + 5 s), the slots' start time measured in the same run (from ``up`` to the first host stepping);
- steps/s of the run's learner with its two hosts' slots over TCP against the same two slots of a one-host run over
  ipc, each for the same wall time in the same run (both ends share this machine's cores: the wire, not a network).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

DEADLINE_S = 4.0
WINDOW_S = 20.0
IDLE_S = 10.0


def ray_processes(cluster) -> dict:
    """RSS and CPU seconds of the head's Ray processes and of each node's (by their session's raylet's children)."""
    import psutil

    out = {}
    for label, node in [("head", cluster.cluster.head_node), *[(f"node-{i}", n) for i, n in enumerate(cluster.nodes)]]:
        pids = {p.process.pid for ps in node.all_processes.values() for p in ps if p.process is not None}
        rss, cpu = 0, 0.0
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                for q in [proc, *proc.children(recursive=True)]:
                    rss += q.memory_info().rss
                    t = q.cpu_times()
                    cpu += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        out[label] = {"rss_mib": round(rss / 2**20, 1), "cpu_s": round(cpu, 2), "processes": len(pids)}
    return out


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def steps_rate(stack, seconds: float) -> float:
    """Steps the learner stored per second over ``seconds``."""
    first = stack.status()["env_steps"]
    t0 = time.monotonic()
    time.sleep(seconds)
    return (stack.status()["env_steps"] - first) / (time.monotonic() - t0)


def run() -> dict:
    from harness.carla import free_port_pair
    from harness.ray import MiniCluster
    from harness.ray import host_stepping as stepping
    from harness.stack import Stack

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    result: dict = {}

    # the same two slots on one host, over ipc: the baseline
    local = Stack(tmp / "local", {"workers": {"count": 2}})
    local.start()
    try:
        local.wait_for(lambda s: all(p["state"] == "running" and (p.get("env_steps") or p.get("updates"))
                                     for p in s["processes"]), 120, "the one-host run stepping")
        result["ipc_steps_per_s"] = round(steps_rate(local, WINDOW_S), 1)
    finally:
        local.stop()

    cluster = MiniCluster(hosts=2)
    runs_dir = None
    stack = None
    try:
        time.sleep(3.0)  # settled: then idle, as a cluster waiting for its run
        before = ray_processes(cluster)
        time.sleep(IDLE_S)
        after = ray_processes(cluster)
        result["ray_idle"] = {k: {"rss_mib": v["rss_mib"], "processes": v["processes"],
                                  "cpu_cores": round((v["cpu_s"] - before[k]["cpu_s"]) / IDLE_S, 3)}
                              for k, v in after.items()}
        stack = Stack(tmp / "fleet", {"run": {"engine": "ray"}, "workers": {"count": 1},
                                      "learner": {"listen": f"tcp://127.0.0.1:{free_port_pair()}"},
                                      "cluster": {"address": cluster.address, "probe_interval_s": 0.5,
                                                  "probe_timeout_s": 1.5, "host_deadline_s": DEADLINE_S}})
        runs_dir = stack.run_dir.parent
        t0 = time.monotonic()
        stack.start()
        stack.wait_for(lambda s: stepping(s, "host-0") and stepping(s, "host-1"), 150, "both hosts stepping")
        result["slots_start_s"] = round(time.monotonic() - t0, 2)
        result["tcp_steps_per_s"] = round(steps_rate(stack, WINDOW_S), 1)
        result["tcp_vs_ipc"] = round(result["tcp_steps_per_s"] / max(1e-9, result["ipc_steps_per_s"]), 3)

        hung = int((runs_dir / ".agents" / "test-host-0" / "supervisor.pid").read_text())
        t0 = time.monotonic()
        os.kill(hung, signal.SIGSTOP)
        stack.wait_for(lambda s: row(s, "host-0")["incarnation"] >= 1 and stepping(s, "host-0"), 150,
                       "host-0 replaced and stepping")
        result["hung_host_recovered_s"] = round(time.monotonic() - t0, 2)
        result["hung_host_budget_s"] = round(DEADLINE_S + result["slots_start_s"] + 5.0, 2)
        result["hung_host_within_budget"] = result["hung_host_recovered_s"] <= result["hung_host_budget_s"]
    finally:
        if stack is not None:
            stack.stop_supervisor()
        cluster.shutdown(runs_dir)
    for key, value in result.items():
        print(f"{key}: {value}", flush=True)
    return result
