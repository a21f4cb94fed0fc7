"""The Prometheus endpoint: the status payload as gauges and counters, served by the supervisor process.

Off unless ``supervisor.metrics_port`` is set. ``prometheus_client`` is imported
only here and only when the endpoint is on (``supervisor status`` never imports
it). Its HTTP server runs on its own daemon thread; the loop never waits for it.
The loop publishes a fresh status payload every :data:`PUBLISH_EVERY_S` (a new
dict each time, never changed after), and a scrape reads the latest one: the
scrape thread touches nothing the loop changes. The series and their labels:
docs/metrics.md#prometheus-endpoint.
"""

from __future__ import annotations

import errno
import socket
from typing import Callable, Iterator

from protocol.states import STATES

# How often the loop hands the endpoint a fresh status payload (what a scrape sees is at most this old).
PUBLISH_EVERY_S = 0.5
PREFIX = "rlstack_"
CHILD_LABELS = ("child", "role", "host")


def host_name() -> str:
    """The ``host`` label: this host's name (every child of a supervisor runs on its host)."""
    return socket.gethostname()


def families(payload: dict | None, host: str) -> Iterator:
    """The metric families of one status payload (nothing before the loop published the first)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if payload is None:
        return
    rows = payload.get("processes") or []

    def child_gauge(name: str, doc: str, value: Callable[[dict], float | None], counter: bool = False):
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(PREFIX + name, doc, labels=CHILD_LABELS)
        for row in rows:
            v = value(row)
            if v is not None:
                family.add_metric([row["name"], row.get("role") or "", host], float(v))
        return family

    state = GaugeMetricFamily(PREFIX + "child_state", "1 for the child's current state, 0 for every other state",
                              labels=(*CHILD_LABELS, "state"))
    for row in rows:
        for s in STATES:
            state.add_metric([row["name"], row.get("role") or "", host, s], 1.0 if row["state"] == s else 0.0)
    yield state
    yield child_gauge("child_restarts", "Restarts of the child in this run (user restarts included)",
                      lambda r: r.get("restarts") or 0, counter=True)
    yield child_gauge("child_heartbeat_age_seconds", "Seconds since the child's last heartbeat (absent while it "
                      "has none: not alive, or not beating yet)", lambda r: r.get("heartbeat_age_s"))
    yield child_gauge("child_steps_per_second", "Env steps per second, from the child's last heartbeat",
                      lambda r: r.get("steps_per_s") or 0.0)
    yield child_gauge("child_updates", "TD3 updates, from the child's last heartbeat (a worker: those of the "
                      "weights it acts with)", lambda r: r.get("updates") or 0)
    yield child_gauge("child_env_steps", "Env steps, from the child's last heartbeat (a worker's restart from 0 "
                      "with each incarnation; the learner's are those it stored)", lambda r: r.get("env_steps") or 0)
    yield child_gauge("child_dropped_messages", "Messages the child dropped as malformed or unwanted, its "
                      "earlier incarnations included", lambda r: r.get("dropped") or 0, counter=True)
    yield child_gauge("child_refused_connections", "Connections the child (the learner on learner.listen) refused "
                      "because the host's CurveZMQ key is not allowed, this incarnation",
                      lambda r: r.get("refused") or 0)
    yield child_gauge("child_alerts", "Alerts the child's last heartbeat raised (the learner's divergence alerts)",
                      lambda r: len(r.get("alerts") or ()))

    per_host = GaugeMetricFamily(PREFIX + "host_children", "Children of this host in each state",
                                 labels=("host", "state"))
    for s in STATES:
        per_host.add_metric([host, s], float(sum(1 for r in rows if r["state"] == s)))
    yield per_host

    def run_value(family, name: str, doc: str, value) -> object:
        f = family(PREFIX + name, doc, labels=("host",))
        f.add_metric([host], float(value or 0))
        return f

    yield run_value(GaugeMetricFamily, "run_env_steps", "The run's env steps: what the learner has stored",
                    payload.get("env_steps"))
    yield run_value(GaugeMetricFamily, "run_max_timesteps", "The env steps the run ends at",
                    payload.get("max_timesteps"))
    yield run_value(CounterMetricFamily, "incidents", "Incidents (stalls with evidence) since this supervisor "
                    "started", payload.get("incidents"))
    yield run_value(CounterMetricFamily, "supervisor_dropped_messages", "Messages the supervisor's own sockets "
                    "dropped as malformed or unwanted", payload.get("supervisor_dropped"))


class StatusCollector:
    """A prometheus_client collector over the latest published status payload (``latest()``)."""

    def __init__(self, latest: Callable[[], dict | None], host: str | None = None):
        self.latest = latest
        self.host = host if host is not None else host_name()

    def collect(self):
        return list(families(self.latest(), self.host))


class Endpoint:
    """The HTTP server of the endpoint, on its own thread; :meth:`publish` is the loop's only call into it."""

    def __init__(self, host: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        self.payload: dict | None = None
        self.published_at = -1e9
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(lambda: self.payload))
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def due(self, now: float) -> bool:
        return now - self.published_at >= PUBLISH_EVERY_S

    def publish(self, payload: dict, now: float) -> None:
        """Hand a scrape a new payload: one reference replaced, which a scrape reads whole or not at all."""
        self.payload = payload
        self.published_at = now

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def port_problem(host: str, port: int, what: str = "the metrics port",
                 host_key: str = "supervisor.metrics_host") -> str | None:
    """Why ``what`` could not bind ``host:port`` (in use, or an address not of this host), or None.

    The same address family and ``SO_REUSEADDR`` as prometheus_client's server (and ZeroMQ's TCP listener), so a
    port that only lingers in TIME_WAIT is no problem."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"{host_key} {host!r} does not resolve ({exc.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{what} {port} on {host} is in use"
            return f"{what} {port} cannot be bound on {host} ({exc.strerror or exc})"
    return None
