"""Record real stalls of the CARLA env, as fixtures for the cause rules (protocol/causes.py).

``python -m harness.record_stacks OUT_DIR [CASE ...]``: for each case, a fake
CARLA server with the case's fault and a child process stepping the CARLA env
through the real ``carla`` client:

- ``said.txt``: with the env's own timeouts (short, as a valid config has them),
  the ``SimulatorStalled`` message it raises: the worker's last word, which the
  supervisor puts in the reason of the simulator's stall;
- ``stack.txt`` (cases that name where it waits): with timeouts long enough that
  it blocks instead, ``py-spy dump`` of the child once its main thread waits
  there (bounded): a worker's own stall, were its timeouts longer than its
  deadlines (a valid config forbids that; a call that never returns does not ask).

The tests build each incident's ``incident.json`` around them as the supervisor would.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness.carla import FakeCarlaProcess
from supervisor.drivers.evidence import stack_of

ROOT = Path(__file__).resolve().parent.parent

# case -> (the fake server's faults, the env's long timeouts, where the main thread must then wait (None: no stack),
# whether another process holds the slot's Traffic Manager port)
CASES = {
    "carla_tick": (["stop_ticks_after=40"], {"tick_timeout_s": 600}, r"CarlaEnv\.tick", False),
    "carla_world_stream": (["stop_world_stream_after=40"], {"tick_timeout_s": 600}, r"CarlaEnv\.tick", False),
    "carla_camera": (["stop_camera_after=25"], {"sensor_timeout_s": 600}, r"CarlaEnv\.observe", False),
    "carla_connect": (["never_answer"], {"connect_timeout_s": 600}, r"CarlaEnv\.connect", False),
    "carla_exit": (["exit_after=40"], {}, None, False),
    "carla_tm_port_held": ([], {"npcs": 1}, None, True),  # NPCs: the worker runs the slot's Traffic Manager
}

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from protocol.simulators import SimulatorStalled
    from tests.worker.test_carla_reward import env_config
    from worker.envs import make_env
    # long timeouts: deadlines past them, so that it blocks where a worker would raise (a valid config forbids it)
    cfg = env_config({port}, tm_port={tm}, overrides=[("supervisor.progress_deadline_s", 1800),
                                                             ("supervisor.startup_deadline_s", 1800)], **{timeouts!r})
    env = make_env(cfg, slot=0, incarnation=0, seed=3)
    try:
        env.reset(seed=3)
        while True:
            _, _, term, trunc, _ = env.step(np.array([0.0, 0.5]))
            if term or trunc:
                env.reset()
    except SimulatorStalled as exc:
        print(exc, flush=True)
""")


def record(case: str, out: Path, wait_s: float = 60.0) -> Path:
    """The case's ``said.txt``, and its ``stack.txt`` where it names where the env waits; returns its directory."""
    faults, timeouts, where, _ = CASES[case]
    folder = out / case
    folder.mkdir(parents=True, exist_ok=True)
    said, _ = run(case, {k: v for k, v in timeouts.items() if k == "npcs"}, None, wait_s)
    (folder / "said.txt").write_text(said)
    if where is not None:
        _, stack = run(case, timeouts, where, wait_s)
        (folder / "stack.txt").write_text(stack)
    return folder


def run(case: str, timeouts: dict, where: str | None, wait_s: float) -> tuple[str, str]:
    """The child against the case's server: its SimulatorStalled message (``where`` None), or its stack once its
    main thread waits in ``where``."""
    faults, _, _, hold_tm = CASES[case]
    stack = ""
    with tempfile.TemporaryDirectory() as tmp:
        server = FakeCarlaProcess(Path(tmp), [a for f in faults for a in ("--fault", f)]).start()
        holder = None
        try:
            tm = None
            if hold_tm:  # another process's listener on the slot's Traffic Manager port
                holder = socket.socket()
                holder.bind(("127.0.0.1", 0))
                holder.listen()
                tm = holder.getsockname()[1]
            script = Path(tmp) / "env_child.py"
            script.write_text(CHILD.format(root=str(ROOT), port=server.port, timeouts=timeouts, tm=tm))
            child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            if where is None:
                try:
                    said, err = child.communicate(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.communicate()
                    raise RuntimeError(f"{case}: the env never gave up") from None
                if not said.strip():
                    raise RuntimeError(f"{case}: the env ended without SimulatorStalled: {err[-800:]}")
                return said.strip() + "\n", ""
            try:
                deadline = time.monotonic() + wait_s
                while True:
                    stack = stack_of(child.pid, 10.0)
                    main = stack.split('"MainThread"', 1)[-1].split("\nThread ", 1)[0]
                    if re.search(where, main):
                        break
                    if child.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{case}: the child never waited in {where}: exit {child.poll()}, "
                                           f"{child.stderr.read()[-800:] if child.poll() is not None else stack}")
                    time.sleep(0.5)
            finally:
                child.kill()
                child.communicate()
        finally:
            if holder is not None:
                holder.close()
            server.kill()
    return "", stack


def main() -> int:
    out = Path(sys.argv[1])
    for case in sys.argv[2:] or CASES:
        print(record(case, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
