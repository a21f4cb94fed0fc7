"""The driver of ``container`` children: one CARLA server per slot, through the Docker SDK.

A container runs with host networking on its slot's ports, labelled with the run
and slot, under a stable name. Its health is a real request answered: a prober
thread calls CARLA's ``version`` RPC (what ``client.get_server_version()`` sends)
every ``probe_interval_s`` and turns each answer into a heartbeat for the state
machine. A paused or hung server still accepts TCP connections but answers
nothing, so its heartbeats stop and the machine stalls it. A waiter thread turns
the container's exit into an exit code. Evidence of a stall is the container's
state (exit code, OOM kill, paused) and its log tail. Every Docker call runs with
a timeout; kills run off the main loop.

Errors an operator can cause end in one line naming what to do: no engine, an
image that is missing, a port in use (and who holds it), a GPU request refused
(the container left in ``created`` is removed).
"""

from __future__ import annotations

import itertools
import json
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from protocol import causes
from supervisor.drivers import (
    CRASH,
    FREEZE,
    Beat,
    Exited,
    Gone,
    NotSupported,
    Observation,
    SpawnError,
)
from supervisor.drivers.evidence import gpu_memory, incident_dir
from supervisor.machine import CaptureEvidence
from supervisor.specs import ChildSpec

RUN_LABEL = "rlstack.run"
SLOT_LABEL = "rlstack.slot"
CHILD_LABEL = "rlstack.child"
# The supervisor that started a container (supervisor.watchdog.owner_tag): its watchdog removes only those.
OWNER_LABEL = "rlstack.supervisor"
LOG_TAIL_LINES = 200
# While a server starts, its readiness is asked for this often (then every probe_interval_s).
STARTUP_PROBE_S = 0.1
# How long a spawn waits for its slot's last container to finish a removal under way (the loop waits with it).
REMOVAL_WAIT_S = 3.0
# GPU memory of each simulator is read (nvidia-smi, where there is one) every this many answered probes.
GPU_EVERY_PROBES = 10


class EngineError(RuntimeError):
    """No Docker engine answers; the message says how to start one."""


def connect_engine(timeout_s: float):
    """A Docker client whose engine has answered a ping, or EngineError in one line."""
    import docker

    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        client.ping()
        return client
    except Exception as exc:  # the SDK raises DockerException, requests errors, FileNotFoundError ...
        text = _first_line(exc)
        if "permission denied" in text.lower():
            raise EngineError(f"the Docker engine refused this user ({text}): add the user to the `docker` group "
                              f"(`sudo usermod -aG docker $USER`, then log in again)") from None
        raise EngineError(f"no Docker engine answers ({text}): start one (`sudo systemctl start docker`, "
                          f"or `sudo dockerd &`) or point DOCKER_HOST at it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# -- readiness and liveness: a real request answered ---------------------------------------------------

_msgids = itertools.count(1)


def server_version(host: str, port: int, timeout_s: float) -> str:
    """CARLA's ``version`` RPC over msgpack-rpc; raises OSError or ValueError when no valid answer comes."""
    msgid = next(_msgids) % (2**31)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(msgpack.packb([0, msgid, "version", [[False]]]))
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("connection closed before an answer")
            unpacker.feed(data)
            for reply in unpacker:
                if not (isinstance(reply, list) and len(reply) == 4 and reply[0] == 1 and reply[1] == msgid):
                    raise ValueError(f"not a msgpack-rpc reply: {reply!r:.80}")
                if reply[2] is not None:
                    raise ValueError(f"rpc error: {reply[2]!r:.80}")
                return _unwrap_string(reply[3])
        raise TimeoutError(f"no answer within {timeout_s:g}s")


def _unwrap_string(value) -> str:
    """CARLA wraps results in Response<T> (``[[1, value]]``); take the string wherever it is."""
    while isinstance(value, list) and value:
        value = value[-1]
    if not isinstance(value, str):
        raise ValueError(f"version is not a string: {value!r:.80}")
    return value


# -- ports ------------------------------------------------------------------------------------------

def port_holder(port: int) -> str:
    """Who listens on ``port``, where it can be found."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status in ("LISTEN", "NONE") and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:80]})"
    except Exception:  # no permission to see other users' sockets, or the holder just left
        pass
    return "another process"


def check_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Raise SpawnError naming the first port something listens on, and its holder.

    Bound as the servers bind (SO_REUSEADDR): connections of a killed server lingering
    in TIME_WAIT do not hold its port, a listener does.
    """
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except (OSError, OverflowError):
                raise SpawnError(f"port {port} ({what}) is in use by {port_holder(port)}: free it, or move the "
                                 f"slots with simulators.base_port / simulators.tm_base_port") from None


# -- the driver -------------------------------------------------------------------------------------

@dataclass
class Running:
    name: str
    incarnation: int
    container_id: str
    pid: int | None  # the container's main process on this host; None when it exited at once
    host: str
    rpc_port: int
    stop: threading.Event = field(default_factory=threading.Event)
    killed: bool = False
    probes: int = 0
    last_answer: float | None = None
    last_error: str = ""
    gpu_memory_bytes: int | None = None
    gpu: str | None = None  # the GPU id it was given (its incidents judge that GPU's memory)


class ContainerDriver:
    """Starts a slot's simulator container from its spec's ``launch``.

    ``launch`` holds ``image``, ``command`` (a list), ``container_name``, ``labels``,
    ``ports`` (name -> port, all checked free before launch), ``host`` and
    ``rpc_port`` (probed), ``gpu`` (an id, or None for no GPU request), ``pull``.
    Every container also carries ``OWNER_LABEL`` with ``owner`` (the supervisor's pid and start time), by
    which that supervisor's watchdog (:mod:`supervisor.watchdog`) finds the containers it may remove.
    """

    def __init__(self, run_dir: Path, run_id: str, probe_interval_s: float, probe_timeout_s: float,
                 docker_timeout_s: float, engine=None, owner: str | None = None):
        self.run_dir = Path(run_dir)
        self.owner = owner  # the value of OWNER_LABEL on every container it starts
        self.run_id = run_id
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.docker_timeout_s = docker_timeout_s
        self._engine = engine
        self.running: dict[str, Running] = {}
        self.removing: set[str] = set()  # exited containers whose removal runs in the background
        self.images_seen: set[str] = set()  # checked present once: a respawn does not ask again
        self.seen: queue.SimpleQueue[Observation] = queue.SimpleQueue()

    @property
    def engine(self):
        if self._engine is None:
            self._engine = connect_engine(self.docker_timeout_s)
        return self._engine

    def _fresh_engine(self):
        """A client of its own for a thread (the SDK's HTTP sessions are not shared across threads)."""
        import docker

        return docker.from_env(timeout=int(max(1, self.docker_timeout_s)))

    # -- starting -----------------------------------------------------------------------------

    def ensure_image(self, image: str, pull: bool) -> None:
        import docker

        if image in self.images_seen:
            return
        try:
            self.engine.images.get(image)
            self.images_seen.add(image)
        except docker.errors.ImageNotFound:
            if not pull:
                raise SpawnError(f"image {image} is not on this Docker engine: `docker pull {image}` (or build it), "
                                 f"or set simulators.pull: true") from None
            try:
                self.engine.images.pull(image)
            except docker.errors.APIError as exc:
                raise SpawnError(f"image {image} could not be pulled: {_first_line(exc)}") from None

    def preflight(self, specs: list[ChildSpec], check_ports: bool) -> None:
        """Before a run starts: the engine answers, every image is there, and (for a new run) every port is free."""
        for image, pull in {(s.launch["image"], s.launch.get("pull", False)) for s in specs}:
            self.ensure_image(image, pull)
        if check_ports:
            for spec in specs:
                check_ports_free(spec.launch["ports"])

    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int | None, bool]:
        import docker

        launch = spec.launch
        try:
            engine = self.engine
        except EngineError as exc:
            raise SpawnError(str(exc)) from None
        self._remove_named(launch["container_name"])  # an earlier incarnation's, if its removal was cut short
        check_ports_free(launch["ports"])
        self.ensure_image(launch["image"], launch.get("pull", False))
        labels = {**launch["labels"], "rlstack.incarnation": str(incarnation)}
        if self.owner is not None:
            labels[OWNER_LABEL] = self.owner
        requests = ([docker.types.DeviceRequest(device_ids=[str(launch["gpu"])], capabilities=[["gpu"]])]
                    if launch.get("gpu") is not None else None)
        memory = launch.get("memory_limit")
        limits = {"mem_limit": memory, "memswap_limit": memory} if memory else {}  # swap included: no swapping
        try:
            # create, then start: `containers.run` would pull a missing image on its own
            container = engine.containers.create(launch["image"], launch["command"], name=launch["container_name"],
                                                 network_mode="host", labels=labels,
                                                 device_requests=requests, auto_remove=False, **limits)
            container.start()
        except docker.errors.ImageNotFound:
            self.images_seen.discard(launch["image"])
            self._remove_named(launch["container_name"])
            raise SpawnError(f"image {launch['image']} is not on this Docker engine (any more): "
                             f"`docker pull {launch['image']}`, or set simulators.pull: true") from None
        except docker.errors.APIError as exc:
            self._remove_named(launch["container_name"])  # never leave one behind in `created`
            text = _first_line(exc)
            if requests and ("gpu" in text.lower() or "device driver" in text.lower()):
                raise SpawnError(f"GPU request for {spec.name} (device {launch['gpu']}) refused: {text}; install the "
                                 f"NVIDIA container runtime, or set simulators.gpus: [] to run without") from None
            raise SpawnError(f"container {launch['container_name']} could not start: {text}") from None
        try:
            container.reload()
        except Exception as exc:  # started but not readable: never leave it running untracked
            self._remove_named(launch["container_name"])
            raise SpawnError(f"container {launch['container_name']} started but could not be inspected: "
                             f"{_first_line(exc)}") from None
        pid = int(container.attrs.get("State", {}).get("Pid") or 0) or None  # None: it exited at once
        run = Running(spec.name, incarnation, container.id, pid, launch["host"], launch["rpc_port"],
                      gpu=None if launch.get("gpu") is None else str(launch["gpu"]))
        self.running[spec.name] = run
        threading.Thread(target=self._probe_loop, args=(run,), name=f"probe-{spec.name}", daemon=True).start()
        threading.Thread(target=self._wait_loop, args=(run,), name=f"wait-{spec.name}", daemon=True).start()
        return pid, False

    def _remove_named(self, name: str) -> None:
        """Remove an earlier start's container of this name, waiting a moment for a removal already under way (its
        exit's thread may be removing it): a container created under the name meanwhile would conflict. A removal
        longer than that is a failed spawn (backed off): the supervisor's loop is not held for it."""
        error = self._remove(name, REMOVAL_WAIT_S)
        if error:
            raise SpawnError(f"container {name} of an earlier start could not be removed: {error}")

    # -- watching ------------------------------------------------------------------------------

    def _probe_loop(self, run: Running) -> None:
        """Each answered ``version`` request is a heartbeat; silence is what the machine judges.

        Until the first answer it asks often, so a slot's worker starts as soon as its server is ready.
        """
        while not run.stop.is_set():
            started = time.monotonic()
            interval = self.probe_interval_s if run.probes else min(self.probe_interval_s, STARTUP_PROBE_S)
            try:
                server_version(run.host, run.rpc_port, self.probe_timeout_s)
                run.probes += 1
                run.last_answer = time.time()
                if run.probes % GPU_EVERY_PROBES == 1 and run.pid is not None:
                    run.gpu_memory_bytes = gpu_memory_of(run.pid)
                beat = {"name": run.name, "incarnation": run.incarnation, "pid": run.pid, "phase": "serving",
                        "probes": run.probes, "phase_age_s": 0.0}
                if run.gpu_memory_bytes is not None:
                    beat["gpu_memory_bytes"] = run.gpu_memory_bytes
                self.seen.put(Beat(beat))
            except Exception as exc:  # whatever answers badly (garbage, an oversized reply) is no answer
                run.last_error = _first_line(exc)
            run.stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _wait_loop(self, run: Running) -> None:
        """Report the container's exit; an engine that does not answer for a while is asked again."""
        import docker

        code: int | None = None
        while True:
            try:
                result = self._fresh_engine().containers.get(run.container_id).wait(timeout=None)
                code = int(result.get("StatusCode", -1))
                break
            except docker.errors.NotFound:  # removed under us: by our kill, or by someone else
                code = -int(signal.SIGKILL) if run.killed else None
                break
            except Exception:  # the engine went away or timed out: its liveness probes judge the server
                if run.stop.wait(1.0):
                    code = -int(signal.SIGKILL) if run.killed else None
                    break
        run.stop.set()
        if run.killed and code == 137:
            code = -int(signal.SIGKILL)
        self.seen.put(Exited(run.name, run.incarnation, code, None if run.killed else self._exit_cause(run, code)))

    def _exit_cause(self, run: Running, code: int | None) -> str | None:
        """Why a container ended on its own, from its state (OOM-killed, killed, exited, removed): one inspect. None
        where the engine cannot say (its exit status names it then)."""
        import docker

        try:
            s = self._fresh_engine().containers.get(run.container_id).attrs.get("State", {})
            state = {k: s.get(k) for k in ("Status", "Paused", "ExitCode", "OOMKilled", "Error")}
        except docker.errors.NotFound as exc:  # removed under us
            state = {"error": f"No such container: {_first_line(exc)}"}
        except Exception:  # an engine that does not answer
            return None
        cause = causes.name({"reason": f"exited on its own (code {code})", "container": state})["cause"]
        return None if cause == causes.UNKNOWN else cause

    def poll(self) -> list[Observation]:
        seen = []
        while not self.seen.empty():
            obs = self.seen.get()
            if isinstance(obs, Exited):
                run = self.running.get(obs.name)
                if run is not None and run.incarnation == obs.incarnation:
                    del self.running[obs.name]
                    self.removing.add(run.container_id)
                    threading.Thread(target=self._record_exit_and_remove, args=(run, obs.code), daemon=True).start()
            seen.append(obs)
        return seen

    # -- stopping ------------------------------------------------------------------------------

    def _run_of(self, name: str, incarnation: int) -> Running | None:
        run = self.running.get(name)
        return run if run is not None and run.incarnation == incarnation else None

    def terminate(self, name: str, incarnation: int) -> None:
        """docker kill (a CARLA server is not worth a graceful stop; it works on a paused container too)."""
        run = self._run_of(name, incarnation)
        if run is None or run.killed:
            return
        run.killed = True
        threading.Thread(target=self._kill, args=(run.container_id, False), daemon=True).start()

    def kill(self, name: str, incarnation: int) -> None:
        """The machine's last word after the grace: forced removal when a kill was already sent, else a kill."""
        run = self._run_of(name, incarnation)
        if run is None:
            return
        force = run.killed  # the first kill did not end it in time
        run.killed = True
        threading.Thread(target=self._kill, args=(run.container_id, force), daemon=True).start()

    def inject(self, name: str, incarnation: int, what: str) -> None:
        """FREEZE: docker pause; CRASH: docker kill (as the container's own death: no kill of ours)."""
        if what not in (FREEZE, CRASH):
            raise NotSupported(f"a simulator container cannot take {what!r}")
        run = self._run_of(name, incarnation)
        if run is None:
            raise Gone(f"{name} has no running container")
        container = self.engine.containers.get(run.container_id)
        if what == FREEZE:
            container.pause()
        else:
            container.kill()

    def _kill(self, container_id: str, force: bool) -> None:
        import docker

        try:
            container = self._fresh_engine().containers.get(container_id)
            if force:
                container.remove(force=True)  # the waiter reports the exit
            else:
                container.kill()  # works on a paused container too
        except docker.errors.NotFound:
            pass  # already gone: the waiter reports the exit
        except Exception:
            if not force:
                self._kill(container_id, True)

    def _remove(self, ref: str, wait_s: float | None = None) -> str | None:
        """Remove a container (by id or name) and wait for a removal already under way to finish (for ``wait_s``,
        else the Docker timeout); None once it is gone, else what stood in the way (kill_all tries again)."""
        import docker

        deadline = time.monotonic() + (self.docker_timeout_s if wait_s is None else wait_s)
        try:
            engine = self._fresh_engine()
            while True:
                try:
                    engine.containers.get(ref).remove(force=True)
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError as exc:
                    if "in progress" not in str(exc) or time.monotonic() >= deadline:
                        return _first_line(exc)
                    time.sleep(0.2)
        except Exception as exc:
            return _first_line(exc)
        self.removing.discard(ref)
        return None

    def _record_exit_and_remove(self, run: Running, code: int | None) -> None:
        """A container that died on its own (crash, OOM kill) leaves its state and log tail, then goes."""
        if not run.killed:
            try:
                path = self.write_incident(self.run_dir, run, f"exited on its own (code {code})", run.pid, None,
                                           suffix="exited")
                causes.name_incident(path)  # killed, OOM-killed, exited: from the container's state
            except (OSError, ValueError):
                pass  # evidence is best effort
        self._remove(run.container_id)

    def capture(self, run_dir: Path, action: CaptureEvidence, timeout_s: float) -> Path:
        """The container's state and log tail, and the prober's last word, before the kill."""
        run = self._run_of(action.name, action.incarnation)
        return self.write_incident(Path(run_dir), run, action.reason, run.pid if run else None,
                                   action.heartbeat, name=action.name)

    def write_incident(self, run_dir: Path, run: Running | None, reason: str, pid: int | None, heartbeat: dict | None,
                       name: str | None = None, suffix: str = "") -> Path:
        name = name or run.name
        out = incident_dir(run_dir, name, suffix)
        state: dict = {}
        logs = ""
        if run is not None:
            try:
                container = self._fresh_engine().containers.get(run.container_id)
                s = container.attrs.get("State", {})
                state = {k: s.get(k) for k in ("Status", "Paused", "ExitCode", "OOMKilled", "Error", "StartedAt",
                                               "FinishedAt")}
                logs = container.logs(tail=LOG_TAIL_LINES).decode("utf-8", "replace")
            except Exception as exc:
                state = {"error": _first_line(exc)}
        (out / "incident.json").write_text(json.dumps({
            "name": name, "pid": pid, "reason": reason, "time": time.time(),
            "last_heartbeat": heartbeat, "container": state, "gpus": gpu_memory(), "gpu": run.gpu if run else None,
            "last_probe_answer": run.last_answer if run else None, "last_probe_error": run.last_error if run else None,
        }, indent=2, default=str))
        (out / "log_tail.txt").write_text(f"== docker logs --tail {LOG_TAIL_LINES} {name} ==\n{logs}\n")
        (out / "stack.txt").write_text(_gpu_note())
        return out

    def kill_leftovers(self, saved: dict) -> list[int]:
        """Remove every container labelled for this run (a supervisor that died left them)."""
        try:
            found = self.engine.containers.list(all=True, filters={"label": [f"{RUN_LABEL}={self.run_id}"]})
        except Exception:  # no engine, or one that does not answer: a spawn reports it in one line
            return []
        gone = []
        for container in found:
            pid = int(container.attrs.get("State", {}).get("Pid") or 0)
            try:
                container.remove(force=True)
                gone.append(pid)
            except Exception:
                continue
        return gone

    def pids(self) -> list[int]:
        return [r.pid for r in self.running.values() if r.pid is not None]

    def kill_all(self) -> None:
        """Remove every container of this driver, running or exited, at once, before the supervisor leaves."""
        for run in list(self.running.values()):
            run.stop.set()
            run.killed = True
            self.removing.add(run.container_id)
        self.running.clear()
        threads = [threading.Thread(target=self._remove, args=(cid,), daemon=True) for cid in list(self.removing)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.docker_timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


def parse_gpu_apps(text: str) -> dict[int, int]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` as pid -> bytes."""
    used: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1]) * 1024 * 1024
    return used


def gpu_memory_of(pid: int) -> int | None:
    """GPU memory held by a container's processes (its main pid and descendants); None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None or pid <= 0:
        return None
    try:
        import psutil

        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        root = psutil.Process(pid)
        pids = {pid} | {p.pid for p in root.children(recursive=True)}
    except (OSError, subprocess.TimeoutExpired, Exception):
        return None
    return sum(b for p, b in parse_gpu_apps(out).items() if p in pids)


def _gpu_note() -> str:
    """A CARLA server's stack is not readable from here; what the GPUs were doing is the next best thing."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no stack for a container; no nvidia-smi on this host\n"
    try:
        return subprocess.run([smi], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}\n"
