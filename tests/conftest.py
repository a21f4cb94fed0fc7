import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


@pytest.fixture
def stack_factory(tmp_path):
    """Start real stacks; each is stopped and checked for leftovers even when the test fails."""
    from tests.stack import Stack

    stacks = []

    def make(overrides=None, base="configs/pendulum.yaml", start=True):
        s = Stack(tmp_path / f"s{len(stacks)}", overrides, base)
        s.tmp.mkdir(parents=True, exist_ok=True)
        stacks.append(s)
        return s.start() if start else s

    yield make
    errors = []
    for s in reversed(stacks):  # a later stack may share an earlier one's run dir
        try:
            s.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, errors


# -- Docker: a real engine and the fake CARLA image, for the container tests -----------------------------

def _fakecarla_tag() -> str:
    """The image's tag names the fake server's sources, so a changed server gets a fresh image."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "tests" / "fakecarla").glob("*.py")) + [ROOT / "deploy" / "fakecarla-image.sh"]:
        digest.update(path.name.encode() + path.read_bytes())
    return f"rlstack/fakecarla:{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def docker_engine():
    """The Docker engine (`deploy/docker-engine.sh start` starts one; CI's .ci/run does)."""
    from supervisor.drivers.container import EngineError, connect_engine

    try:
        return connect_engine(30)
    except EngineError as exc:
        pytest.fail(f"{exc}\n(the container tests need one: `bash deploy/docker-engine.sh start`)")


@pytest.fixture(scope="session")
def fakecarla_image(docker_engine):
    """The fake CARLA server as an image, built locally without any registry when missing."""
    return ensure_fakecarla_image(docker_engine)


def ensure_fakecarla_image(engine) -> str:
    """The fake server's image for its current sources, built when missing; returns its tag."""
    import docker

    tag = _fakecarla_tag()
    try:
        engine.images.get(tag)
    except docker.errors.ImageNotFound:
        res = subprocess.run(["bash", str(ROOT / "deploy" / "fakecarla-image.sh"), tag], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, f"building {tag} failed:\n{res.stdout}\n{res.stderr}"
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


# -- the fake CARLA server as a process, for the env and wire tests -----------------------------------------

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
                [sys.executable, "-m", "tests.fakecarla", f"-carla-rpc-port={self.port}",
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


@pytest.fixture
def fake_carla(tmp_path):
    started = []

    def start(*args):
        server = FakeCarlaProcess(tmp_path, args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
