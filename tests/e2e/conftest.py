"""Fixtures of the tests that start processes: real stacks, the Docker engine and the fake CARLA image, the fake
CARLA server as a process. Each cleans up after itself, also when its test fails."""

import pytest

from harness.carla import FakeCarlaProcess, ensure_fakecarla_image


@pytest.fixture
def stack_factory(tmp_path):
    """Start real stacks; each is stopped and checked for leftovers even when the test fails."""
    from harness.stack import Stack

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


@pytest.fixture
def fake_carla(tmp_path):
    """Start fake CARLA servers as processes; each is killed after the test."""
    started = []

    def start(*args):
        server = FakeCarlaProcess(tmp_path, args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
