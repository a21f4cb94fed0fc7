"""The fleet on Ray, started by deploy/ray's scripts (``harness.ray.DeployedCluster``): a head and a node offering
carla_host on this machine, and a second node on another host, a network namespace joined by a veth pair (needs root
and iproute2, as the tests do):

- what Ray costs: RSS of the head's Ray processes and of each idle node's, and the cores they take while the
  cluster waits (CPU over 10 s), before any run;
- a hung host (its supervisor SIGSTOPped, which Ray never notices): seconds from the stop to the host's new agent
  answering with its workers stepping again, against the budget the issue sets (the fleet's deadline + the slots'
  start time + 5 s), the slots' start time measured in the same run (from ``up`` to the first host stepping);
- steps/s of the run's learner with its two hosts' slots over TCP with CurveZMQ (one host's across the veth link)
  against the same two slots of a one-host run over ipc, each for the same wall time in the same run (both ends
  share this machine's cores: the wire and a kernel's link, not a physical network).
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
    """RSS and CPU seconds of the head's Ray processes and of each node's (each started process's tree, less the
    stand-in for a node's systemd unit)."""
    import psutil

    out = {}
    for label, proc in cluster.started.items():
        rss, cpu, count = 0, 0.0, 0
        try:
            root = psutil.Process(proc.pid)
            tree = root.children(recursive=True) + ([root] if label == "head" else [])
        except psutil.NoSuchProcess:
            tree = []
        for q in tree:
            try:
                rss += q.memory_info().rss
                t = q.cpu_times()
                cpu += t.user + t.system
                count += 1
            except psutil.NoSuchProcess:
                pass
        out[label] = {"rss_mib": round(rss / 2**20, 1), "cpu_s": round(cpu, 2), "processes": count}
    return out


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def _per_host(status) -> dict:
    learner = next((p for p in status["processes"] if p.get("role") == "learner"), None)
    return {h["host"]: h["steps"] for h in (learner or {}).get("hosts") or []}


def steps_rate(stack, seconds: float, hosts: dict | None = None) -> float:
    """Steps the learner stored per second over ``seconds`` (and, into ``hosts``, each sending host's steps per
    second, from the learner's hosts table)."""
    first = stack.status()
    t0 = time.monotonic()
    time.sleep(seconds)
    last = stack.status()
    dt = time.monotonic() - t0
    if hosts is not None:
        a, b = _per_host(first), _per_host(last)
        hosts.update({h: round((b[h] - a.get(h, 0)) / dt, 1) for h in b})
    return (last["env_steps"] - first["env_steps"]) / dt


def run() -> dict:
    from fleet.agent import HOST_KEY_ENV
    from harness.carla import free_port_pair
    from harness.keys import ironhouse
    from harness.netns import OtherHost
    from harness.ray import DeployedCluster
    from harness.ray import host_stepping as stepping
    from harness.ray import host_supervisor
    from harness.stack import Stack

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    result: dict = {}
    # the learner's pair, each host's own, both hosts' public keys allowed
    _, learner_secret, secrets, clients = ironhouse(tmp / "keys", "near", "far")

    # the same two slots on one host, over ipc: the baseline
    local = Stack(tmp / "local", {"workers": {"count": 2}})
    local.start()
    try:
        local.wait_for(lambda s: all(p["state"] == "running" and (p.get("env_steps") or p.get("updates"))
                                     for p in s["processes"]), 120, "the one-host run stepping")
        result["ipc_steps_per_s"] = round(steps_rate(local, WINDOW_S), 1)
    finally:
        local.stop()

    other = OtherHost()
    cluster = runs_dir = stack = None
    try:
        cluster = DeployedCluster(tmp, other.here)
        cluster.add_host("near", other.here)
        cluster.add_host("far", other.there, other.prefix, env={HOST_KEY_ENV: str(secrets["far"])})
        os.environ.update(cluster.env)  # this process joins as a driver with the cluster's token
        cluster.wait_for_hosts(2)
        time.sleep(3.0)  # settled: then idle, as a cluster waiting for its run
        before = ray_processes(cluster)
        time.sleep(IDLE_S)
        after = ray_processes(cluster)
        result["ray_idle"] = {k: {"rss_mib": v["rss_mib"], "processes": v["processes"],
                                  "cpu_cores": round((v["cpu_s"] - before[k]["cpu_s"]) / IDLE_S, 3)}
                              for k, v in after.items()}
        stack = Stack(tmp / "fleet", {"run": {"engine": "ray"}, "workers": {"count": 1},
                                      "learner": {"listen": f"tcp://{other.here}:{free_port_pair()}",
                                                  "curve_key": str(learner_secret), "curve_clients": str(clients)},
                                      "cluster": {"address": cluster.address, "host_key": str(secrets["near"]),
                                                  "probe_interval_s": 0.5, "probe_timeout_s": 1.5,
                                                  "host_deadline_s": DEADLINE_S}})
        runs_dir = stack.run_dir.parent
        t0 = time.monotonic()
        stack.start()
        stack.wait_for(lambda s: stepping(s, "host-0") and stepping(s, "host-1"), 150, "both hosts stepping")
        result["slots_start_s"] = round(time.monotonic() - t0, 2)
        far = next(h for h in ("host-0", "host-1") if host_supervisor(runs_dir, stack.run_id, h) in other.pids())
        per_host: dict = {}
        result["tcp_steps_per_s"] = round(steps_rate(stack, WINDOW_S, per_host), 1)
        # each host's own rate: the far one's slot crosses the veth link, the near one's stays on this host
        result["tcp_far_host_steps_per_s"] = per_host.get(f"far.{far}")
        result["tcp_near_host_steps_per_s"] = next((v for k, v in per_host.items() if k.startswith("near.")), None)
        result["tcp_vs_ipc"] = round(result["tcp_steps_per_s"] / max(1e-9, result["ipc_steps_per_s"]), 3)

        hung = host_supervisor(runs_dir, stack.run_id, "host-0")
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
        if cluster is not None:
            cluster.shutdown(runs_dir)
        other.remove()
    for key, value in result.items():
        print(f"{key}: {value}", flush=True)
    return result
