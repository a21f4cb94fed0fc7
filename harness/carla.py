"""Stand-ins for CARLA that tests, benchmarks and the soak share: the fake server as a process or an image,
free ports for it, and a run config that uses it.

The fake server itself is :mod:`harness.fakecarla` (stdlib and msgpack only, so it
also runs inside a minimal image); the real ``carla`` client talks to it.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SCRIPT = ROOT / "deploy" / "fakecarla-image.sh"


def fakecarla_tag() -> str:
    """The image's tag names the fake server's sources, so a changed server gets a fresh image."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "harness" / "fakecarla").glob("*.py")) + [IMAGE_SCRIPT]:
        digest.update(path.name.encode() + path.read_bytes())
    return f"rlstack/fakecarla:{digest.hexdigest()[:12]}"


def ensure_fakecarla_image(engine) -> str:
    """The fake server's image for its current sources, built when missing; returns its tag."""
    import docker

    tag = fakecarla_tag()
    try:
        engine.images.get(tag)
    except docker.errors.ImageNotFound:
        res = subprocess.run(["bash", str(IMAGE_SCRIPT), tag], capture_output=True,
                             text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"building {tag} failed:\n{res.stdout}\n{res.stderr}")
    return tag


def free_port_block(size: int, start: int = 20000, end: int = 40000) -> int:
    """A port P with P .. P+size-1 free on 127.0.0.1 (TCP and UDP), taken from a range random per call."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(start, end - size)
        try:
            for port in range(base, base + size):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def free_port_pair():
    """A port P such that P and P + 1 (the streaming port) are both free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class FakeCarlaProcess:
    def __init__(self, tmp_path, args):
        self.tmp_path = tmp_path
        self.args = list(args)
        self.proc = None
        self.port = None
        self.line = ""

    def start(self, attempts=5):
        for attempt in range(attempts):
            self.port = free_port_pair()
            self.stderr = open(self.tmp_path / f"fakecarla-{self.port}.err", "w")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.fakecarla", f"-carla-rpc-port={self.port}",
                 "-RenderOffScreen", "-nosound", "-quality-level=Low", *self.args],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
            ready, _, _ = select.select([self.proc.stdout], [], [], 10.0)
            if ready:
                self.line = self.proc.stdout.readline()
                if "listening" in self.line:
                    return self
            self.kill()  # the port was taken meanwhile, or it did not start: try again
        raise RuntimeError(f"fakecarla did not start: {self.stderr_text()}")

    def stderr_text(self):
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()




def carla_overrides(image: str) -> dict:
    """A run of two containerised fake-CARLA slots with short deadlines (ports drawn free for it)."""
    base = free_port_block(20)
    return {
        "env": {"max_episode_steps": 300, "carla": {
            "npcs": 0, "connect_timeout_s": 1.0, "client_timeout_s": 4.0, "tick_timeout_s": 1.5,
            "sensor_timeout_s": 0.5, "route_length_m": 100.0, "camera": {"width": 64, "height": 64}}},
        "workers": {"count": 2, "eval_freq": 0, "start_steps": 300, "torch_threads": 1},
        "simulators": {"image": image, "gpus": [], "base_port": base, "port_stride": 10, "tm_base_port": base + 5,
                       "command": "python3 -m fakecarla -carla-rpc-port={rpc_port}",
                       "ready_timeout_s": 30.0, "probe_interval_s": 0.5, "probe_timeout_s": 2.0,
                       "liveness_deadline_s": 6.0, "kill_grace_s": 1.0},
        "supervisor": {"heartbeat_deadline_s": 5.0, "progress_deadline_s": 4.0},
    }
