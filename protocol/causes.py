"""Why a child stalled, named from the evidence captured before its kill.

The supervisor names the cause of each stall once its evidence is written
(``incident.json``: the stall's reason, the last heartbeat, the process's state,
a simulator container's state, the GPUs' memory; ``stack.txt``: every thread's
Python stack; ``log_tail.txt``). The rules are data: :data:`RULES`, tried in
order, the first whose every condition holds names the cause and gives its
one-line advice. Nothing matched is ``unknown``, with the main thread's top
frames: never a wrong name. To teach it a new cause, add a :class:`Rule` (and a
recorded ``stack.txt`` of the real case to ``tests/supervisor/causes/``).

A worker waiting for the learner (``waiting_learner``) is never stalled (that
phase is not one its progress deadline watches); a learner that is stalled is
named by its own evidence (sampling, a checkpoint write, its socket).
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from protocol.exits import EXIT_FATAL, EXIT_NO_SPACE, EXIT_OS_ERROR, EXIT_PERMISSION, EXIT_READ_ONLY
from protocol.files import atomic_write
from protocol.roles import HOST, LEARNER, SIMULATOR, WORKER

GPU_FULL_SHARE = 0.95  # a GPU's memory used at the stall, as a share of its total, that names gpu_memory_full
TOP_FRAMES = 6


@dataclass(frozen=True)
class Rule:
    """A cause and the signs that name it: every condition given must hold. Regular expressions are searched."""
    cause: str
    advice: str
    roles: tuple[str, ...] = ()  # the child's role (empty: any)
    reason: str | None = None  # the stall's reason (which deadline, and how)
    phase: str | None = None  # the last heartbeat's phase
    detail: str | None = None  # what the child said it was doing (the heartbeat's detail)
    frames: str | None = None  # a frame of the main thread, "function (file:line)", innermost first
    process: str | None = None  # the process's state at capture (psutil's: stopped, zombie, ...)
    container: str | None = None  # a simulator container's state: paused, oom_killed, exited, removed, running
    gpu_full: bool = False  # a GPU's memory at least GPU_FULL_SHARE of its total
    log: str | None = None  # a line of the log tail
    no_stack: bool = False  # no Python frame could be read


# Tried in order: the process's and the container's own state first (they explain any stack), then the frames.
# A rule with a container condition holds only for a simulator's container (no role needed).
RULES: tuple[Rule, ...] = (
    Rule("process_stopped", "the process was stopped (SIGSTOP, a debugger, job control): nothing in it ran; "
         "find who stopped it", process=r"^stopped$"),
    Rule("simulator_oom_killed", "the simulator's container ran out of memory and was OOM-killed: raise its memory "
         "limit, or lower its load (camera size, NPCs)", container=r"^oom_killed$"),
    Rule("simulator_paused", "the simulator's container was paused (docker pause): it holds its sockets open and "
         "answers nothing; find who paused it", container=r"^paused$"),
    Rule("simulator_removed", "the simulator's container was removed under the run (docker rm, a cleanup job)",
         container=r"^removed$"),
    Rule("simulator_killed", "the simulator's container was killed (exit 137: docker kill, or the engine's stop "
         "after its grace period)", container=r"^exited \(code 137\)"),
    Rule("simulator_exited", "the simulator's container exited: its log tail and exit code say why",
         container=r"^exited"),
    Rule("simulator_exited", "the simulator's process had ended (a pod's server: its container restarts it)",
         roles=(SIMULATOR,), process=r"^(gone|zombie)$"),
    Rule("traffic_manager_port_in_use", "the Traffic Manager's port was held by another process when the worker "
         "started it: free the port, or move simulators.tm_base_port", reason=r"(?i)traffic.?manager.*bind error"),
    # the simulator's own GPU (its slot's, where it has one) nearly full at the stall, or its log saying so
    Rule("gpu_memory_full", "the simulator's GPU memory was nearly full at the stall: fewer simulators per GPU, a "
         "smaller camera, or a GPU to itself", roles=(SIMULATOR,), gpu_full=True),
    Rule("gpu_memory_full", "the simulator ran out of video memory (its own log says so): fewer simulators per GPU, "
         "a smaller camera, or a GPU to itself", roles=(SIMULATOR,), log=r"Out of video memory"),  # Unreal's words
    # a simulator whose container runs: how its worker found it stalled (the worker's last word, in the reason)
    Rule("simulator_tick", "the simulator runs but did not answer a tick (world.tick() timed out in its worker): "
         "its log tail and the GPU's state are in the incident", roles=(SIMULATOR,),
         reason=r"found it stalled.*(world\.tick|tick_cue|tick\(\))"),
    Rule("sensor_camera", "the simulator ticks but its camera stopped delivering images to the worker (a sensor "
         "stream, or a GPU that stopped rendering)", roles=(SIMULATOR,),
         reason=r"found it stalled.*camera (delivered no image|skipped)"),
    Rule("simulator_connect", "the simulator did not answer its worker's connection (a time-out at connect): it is "
         "not up yet, hung at start, or the port is wrong", roles=(SIMULATOR,),
         reason=r"found it stalled.*CARLA at \S+: time-out"),
    Rule("simulator_start", "the simulator never became ready (no answer to its probe within the startup "
         "deadline): a map that does not load, a GPU it cannot get, a port", roles=(SIMULATOR,),
         reason=r"startup deadline"),
    Rule("simulator_silent", "the simulator's container runs but stopped answering (its probe timed out): its log "
         "tail and the GPU's state are in the incident", container=r"^running$"),
    # the worker's own calls into the simulator, by where its main thread waits
    Rule("traffic_manager", "the Traffic Manager did not answer (blocked in its calls): a deadlocked TM, or two "
         "clients on one TM port", roles=(WORKER,),
         frames=r"(get_trafficmanager|set_synchronous_mode|SetAutopilot|TrafficManager|apply_batch_sync)"),
    Rule("client_holds_gil", "a CARLA client call held the GIL (get_world, load_world): the heartbeat went silent "
         "while it waited on the simulator; give the call a timeout (env.carla.connect_timeout_s)", roles=(WORKER,),
         reason=r"^no heartbeat", frames=r"(load_world|reload_world|get_world|generate_opendrive_world|\.connect \()"),
    Rule("map_load", "the map did not load within the startup deadline: a large map, a slow disk, or a simulator "
         "that is not answering", roles=(WORKER,), frames=r"(load_world|reload_world|generate_opendrive_world)"),
    Rule("simulator_tick", "the simulator did not answer a tick (world.tick()): its own incident says which side "
         "was gone (paused, exited, OOM-killed, silent)", roles=(WORKER,),
         frames=r"(CarlaEnv\.tick|World\.tick|tick_cue|wait_for_tick) \("),
    Rule("sensor_camera", "the camera stopped delivering images while ticks still return: a sensor queue, a stream "
         "that never connected, or a GPU that stopped rendering", roles=(WORKER,),
         frames=r"CarlaEnv\.(observe|first_observation) \("),
    Rule("simulator_connect", "the worker could not connect to its simulator before the startup deadline: the "
         "simulator is not up, or its port is wrong", roles=(WORKER,), frames=r"CarlaEnv\.connect \("),
    Rule("env_reset", "the gymnasium env's own reset() did not return", roles=(WORKER,),
         frames=r"\breset \((worker/faults\.py|worker/envs\.py|[^)]*gymnasium/|[^)]*highway_env/)"),
    Rule("env_step", "the gymnasium env's own step() did not return (a frozen simulator under it, or a loop "
         "that never ends)", roles=(WORKER,),
         frames=r"\bstep \((worker/faults\.py|worker/envs\.py|[^)]*gymnasium/|[^)]*highway_env/)"),
    # the learner's own trouble
    Rule("learner_sampling", "the learner's sampler fails to draw a batch: its error is in the heartbeat's detail",
         roles=(LEARNER,), detail=r"^sampling fails"),
    Rule("learner_checkpoint_write", "a checkpoint or replay write did not finish: a slow, full or failing disk",
         roles=(LEARNER,), frames=r"(Checkpoints\.save|ReplayBuffer\.(flush|save_index)|Learner\.checkpoint|"
                                  r"atomic_write|\bfsync\b)"),
    Rule("learner_socket", "the learner is blocked on its own socket (a send or a receive that never returns)",
         roles=(LEARNER,), frames=r"(zmq/|Learner\.publish_|Receiver\.recv|Intake\.receive_loop)"),
    # a host of the fleet (its agent's evidence: the host supervisor's stack, its last status)
    Rule("host_cut_off_from_learner", "the host's supervisor answers, but the learner has none of its steps while it "
         "has other hosts': its path to the learner (a route, a firewall, its CurveZMQ key)", roles=(HOST,),
         reason=r"the learner has had no steps from"),
    Rule("host_supervisor_unanswering", "the host's supervisor did not answer its agent (frozen, or its host "
         "overloaded) while Ray called its node alive: its stack is in the incident", roles=(HOST,),
         reason=r"^no (heartbeat|progress)"),
    Rule("never_started", "the child never sent a heartbeat: it hung before its first beat (imports, a missing "
         "image, a port it waits for)", reason=r"no heartbeat within the startup deadline"),
    Rule("frozen_native", "the process is frozen in native code: its heartbeat stopped and no Python frame could "
         "be read", reason=r"^no heartbeat", no_stack=True),
)
UNKNOWN = "unknown"
UNKNOWN_ADVICE = "no rule names this stall: its top frames, state and log tail are in the incident (a new rule goes in " \
    "protocol/causes.py)"
# what an exit's cause (of_exit) means
EXIT_ADVICE = {
    "crashed": "it ended with an error: its log tail has the traceback",
    "killed_by_": "a signal from outside it ended it (the kernel's OOM killer, a user, an orchestrator)",
    "fatal": "a restart cannot mend it: its last heartbeat and log say why",
    "os_error": "an operating-system error it cannot get past (disk full or read-only, permissions): its log says "
                "which path",
    "gone": "its driver lost it without an exit status (a container removed, a node gone)",
    "found_simulator_stalled": "its simulator stopped answering: the simulator's own incident names why",
}
ADVICE = {rule.cause: rule.advice for rule in reversed(RULES)} | EXIT_ADVICE | {UNKNOWN: UNKNOWN_ADVICE}


def advice(cause: str) -> str:
    """The one-line advice of a cause (a stall's, from RULES, or an exit's)."""
    if cause.startswith("killed_by_"):
        return EXIT_ADVICE["killed_by_"]
    return ADVICE.get(cause, UNKNOWN_ADVICE)


def of_exit(code: int | None) -> str | None:
    """Why a child that the supervisor did not stop ended, from its exit status: None for a clean exit."""
    from protocol.simulators import EXIT_SIMULATOR_RECYCLE, EXIT_SIMULATOR_STALLED  # (it loads the config's models)

    if code is None:
        return "gone"  # its driver lost it without a status (a container removed, a node gone)
    if code == 0:
        return None
    if code < 0 or code in (128 + 9, 128 + 15):  # a signal; 137 and 143: a container's process killed by one
        number = -code if code < 0 else code - 128
        try:
            return f"killed_by_{signal.Signals(number).name}"
        except ValueError:
            return f"killed_by_signal_{number}"
    if code == EXIT_SIMULATOR_STALLED:
        return "found_simulator_stalled"  # the worker's simulator: named in the simulator's own incident
    if code == EXIT_SIMULATOR_RECYCLE:
        return None  # a fresh simulator asked for: planned
    if code == EXIT_FATAL:
        return "fatal"  # a restart would not help: its last word says why
    if code in (EXIT_NO_SPACE, EXIT_READ_ONLY, EXIT_PERMISSION, EXIT_OS_ERROR):
        return "os_error"
    return "crashed"


def threads(stack: str) -> list[tuple[str, list[str]]]:
    """A ``py-spy dump``'s threads: (its header line, its frames innermost first)."""
    out: list[tuple[str, list[str]]] = []
    for line in stack.splitlines():
        if line.startswith("Thread "):
            out.append((line.strip(), []))
        elif out and line.startswith("    ") and line.strip():
            out[-1][1].append(line.strip())
    return out


def main_thread(found: list[tuple[str, list[str]]]) -> tuple[str, list[str]] | None:
    """The main thread among a dump's :func:`threads` (the first where none is called so)."""
    return next((t for t in found if '"MainThread"' in t[0]), found[0] if found else None)


def container_state(state: dict | None) -> str | None:
    """A container's state at capture, in one word: paused, oom_killed, exited (code N), removed, running."""
    if not state:
        return None
    if state.get("error"):
        return "removed" if re.search(r"(?i)no such container", str(state["error"])) else None
    if state.get("OOMKilled"):
        return "oom_killed"
    if state.get("Status") == "removing":  # its removal under way
        return "removed"
    if state.get("Paused") or state.get("Status") == "paused":
        return "paused"
    if state.get("Status") in ("exited", "dead"):
        return f"exited (code {state.get('ExitCode')})"
    return state.get("Status")


def gpu_full(gpus, own=None) -> bool:
    """A GPU's memory at least GPU_FULL_SHARE used: the slot's own GPU (``own``, an id) where it has one, else any."""
    return any(isinstance(g, dict) and g.get("total_mib") and g.get("used_mib", 0) >= GPU_FULL_SHARE * g["total_mib"]
               and (own is None or str(g.get("index")) == str(own)) for g in gpus or [])


def name(incident: dict, stack: str = "", log_tail: str = "", role: str | None = None) -> dict:
    """The cause of one incident: {cause, advice, because, frames}. ``incident``: its ``incident.json``."""
    hb = incident.get("last_heartbeat") or {}
    role = role or hb.get("role")
    main = main_thread(threads(stack))
    frames = main[1] if main else []
    signs = {"reason": str(incident.get("reason") or ""), "phase": str(hb.get("phase") or ""),
             "detail": str(hb.get("detail") or ""), "process": str((incident.get("process") or {}).get("status") or ""),
             "container": container_state(incident.get("container")) or ""}
    for rule in RULES:
        if rule.roles and role not in rule.roles:
            continue
        because = []
        ok = True
        for key in ("reason", "phase", "detail", "process", "container"):
            pattern = getattr(rule, key)
            if pattern is not None:
                found = re.search(pattern, signs[key])
                ok = ok and found is not None
                because.append(f"{key} {signs[key]!r}")
        if rule.frames is not None:
            hit = next((f for f in frames if re.search(rule.frames, f)), None)
            ok = ok and hit is not None
            because.append(f"frame {hit}")
        if rule.log is not None:
            hit = next((line for line in log_tail.splitlines() if re.search(rule.log, line)), None)
            ok = ok and hit is not None
            because.append(f"log {hit!r:.120}")
        if rule.gpu_full:
            ok = ok and gpu_full(incident.get("gpus"), incident.get("gpu"))
            because.append("GPU memory " + ", ".join(f"{g.get('used_mib')}/{g.get('total_mib')} MiB"
                                                     for g in incident.get("gpus") or []))
        if rule.no_stack:  # py-spy ran (or timed out) and found no frame: not a host without py-spy
            read = stack.startswith("Process ") or "timed out" in stack
            ok = ok and read and not frames
            because.append("no Python frame in its stack")
        if ok:
            return {"cause": rule.cause, "advice": rule.advice, "because": "; ".join(because),
                    "frames": frames[:TOP_FRAMES]}
    return {"cause": UNKNOWN, "advice": UNKNOWN_ADVICE, "because": f"reason {signs['reason']!r}",
            "frames": frames[:TOP_FRAMES]}


def read_texts(directory: Path) -> tuple[str, str]:
    """An incident directory's ``stack.txt`` and ``log_tail.txt`` ("" where missing)."""
    texts = []
    for file in ("stack.txt", "log_tail.txt"):
        try:
            texts.append((Path(directory) / file).read_text(errors="replace"))
        except OSError:
            texts.append("")
    return texts[0], texts[1]


def name_incident(directory: Path, role: str | None = None) -> dict:
    """Name the cause of the incident in ``directory`` and write it into its ``incident.json``; returns it (raises
    OSError or ValueError where ``incident.json`` cannot be read back)."""
    path = Path(directory) / "incident.json"
    incident = json.loads(path.read_text())
    incident["cause"] = name(incident, *read_texts(directory), role)
    atomic_write(path, json.dumps(incident, indent=2, default=str), fsync=False)  # never a torn incident
    return incident["cause"]
