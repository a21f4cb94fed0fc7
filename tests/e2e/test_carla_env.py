"""The CARLA env against the fake server through the real carla client: episodes, reasons, and every way a server can hang or die ending in SimulatorStalled within its timeout."""

import sys
import time

import numpy as np
import pytest

from protocol.simulators import SimulatorStalled  # noqa: E402
from tests.conftest import ROOT
from tests.worker.test_carla_reward import env_config
from worker.envs import make_env  # noqa: E402

carla = pytest.importorskip("carla")


pytestmark = pytest.mark.timeout(90)




def make(server, incarnation=0, **carla_cfg):
    return make_env(env_config(server.port, **carla_cfg), slot=0, incarnation=incarnation, seed=3)


def timed(fn, *args):
    start = time.monotonic()
    try:
        fn(*args)
    except SimulatorStalled as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_episodes_observations_rewards_and_reasons(fake_carla):
    env = make(fake_carla())
    try:
        obs, info = env.reset(seed=1)
        assert obs.shape == (1, 84, 84) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
        assert env.world.get_settings().synchronous_mode and env.world.get_settings().fixed_delta_seconds == \
            pytest.approx(0.05)
        reasons, returns, total, frames = [], [], 0.0, []
        for _ in range(600):
            obs, reward, term, trunc, info = env.step(np.array([0.0, 0.5], np.float32))
            assert -1.0 <= reward <= 1.0
            frames.append(info["frame"])
            total += reward
            if term or trunc:
                reasons.append(info["reason"])
                returns.append(total)
                total = 0.0
                env.reset()
        assert "route_done" in reasons, reasons  # straight ahead along a 60 m route: it gets there
        assert max(returns) > 10.0
        # steering hard leaves the route: a terminal with its penalty
        env.reset()
        for _ in range(300):
            obs, reward, term, trunc, info = env.step(np.array([1.0, 0.6], np.float32))
            if term or trunc:
                break
        assert term and info["reason"] in ("off_route", "collision")
        # braking: standing still is truncated, not terminal
        env2 = make(fake_carla(), stuck_steps=20)
        env2.reset()
        for _ in range(100):
            obs, reward, term, trunc, info = env2.step(np.array([0.0, -1.0], np.float32))
            if term or trunc:
                break
        assert trunc and not term and info["reason"] == "stuck"
        env2.close()
    finally:
        env.close()


def test_seeded_evaluation_resets_leave_the_training_episodes_alone(fake_carla):
    server = fake_carla()

    def spawns(env, seeds):
        out = []
        for seed in seeds:
            env.reset(seed=seed)
            out.append(env.route.points[0].round(1).tolist())
        return out

    a = make(server)
    plain = spawns(a, [1, None, None, None])
    a.close()
    b = make(server)
    with_eval = spawns(b, [1, None, 99, None, None])
    b.close()
    assert with_eval[:2] == plain[:2] and with_eval[3:] == plain[2:], "an evaluation reset does not reseed training"
    c = make(server)
    assert spawns(c, [1, 99])[1] == with_eval[2], "evaluation episodes start where their seed says"
    c.close()


def test_a_tick_that_never_completes_raises_within_the_tick_timeout(fake_carla):
    for fault in ("stop_ticks_after=30", "stop_world_stream_after=30"):
        env = make(fake_carla("--fault", fault))
        env.reset()
        exc, took = timed(lambda: [env.step([0.0, 0.3]) for _ in range(100)])
        assert exc is not None and "world.tick()" in str(exc), fault
        assert took < 2.0 * 30 * 0.1 + 2.5
        env.client = None  # the server is hung: nothing to clean


def test_a_camera_that_stops_delivering_raises_within_the_sensor_timeout(fake_carla):
    env = make(fake_carla("--fault", "stop_camera_after=10"))
    env.reset()
    start = time.monotonic()
    with pytest.raises(SimulatorStalled, match="camera delivered no image"):
        for _ in range(20):
            env.step([0.0, 0.3])
    assert time.monotonic() - start < 3.0
    env.close()


def test_a_server_that_never_answers_is_a_stall_at_connect_within_the_connect_timeout(fake_carla):
    env = make(fake_carla("--fault", "never_answer"))
    exc, took = timed(env.reset)
    assert exc is not None and "time-out" in str(exc) and took < 3.0


def test_slow_ticks_under_the_timeout_are_not_a_stall(fake_carla):
    env = make(fake_carla("--fault", "slow_tick=0.6"), tick_timeout_s=2.0, sensor_timeout_s=1.0)
    env.reset()
    frames = []
    for _ in range(3):
        started = time.monotonic()
        obs, reward, terminated, truncated, info = env.step([0.0, 0.3])  # raises SimulatorStalled on a stall
        took = time.monotonic() - started
        assert 0.5 <= took < 2.0, f"each step waits for its slow tick, and no longer: {took:.2f}s"
        assert obs.shape == env.observation_space.shape and np.isfinite(reward)
        frames.append(info.get("frame"))
    env.close()
    assert None not in frames and frames == sorted(set(frames)), f"one new world frame per step: {frames}"


def test_a_server_that_exits_is_a_stall(fake_carla):
    env = make(fake_carla("--fault", "exit_after=25"))
    env.reset()
    with pytest.raises(SimulatorStalled):
        for _ in range(50):
            env.step([0.0, 0.3])


def test_leftovers_of_an_earlier_incarnation_of_the_slot_are_destroyed_on_attach(fake_carla):
    """A killed worker cannot clean up: its successor on the slot destroys what it left, and nothing else."""
    import subprocess

    server = fake_carla()
    killed = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from tests.worker.test_carla_reward import env_config\nfrom worker.envs import make_env\n"
              f"env = make_env(env_config({server.port}), 0, 0, 3)\nenv.reset()\n"
              "print('IDS', *[a.id for a in env.world.get_actors()], flush=True)\nos._exit(0)\n")
    other = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
             "from tests.worker.test_carla_reward import env_config\nfrom worker.envs import make_env\n"
             f"env = make_env(env_config({server.port}, slots=2), 1, 0, 3)\nenv.reset()\nos._exit(0)\n")
    for script in (killed, other):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-1500:]
    second = make(server, incarnation=1)
    second.reset()
    roles = [a.attributes.get("role_name", "") for a in second.world.get_actors()]
    assert not [r for r in roles if r.startswith("rlstack-slot0-inc0")], roles
    assert [r for r in roles if r.startswith("rlstack-slot1-inc0")], "another slot's actors are not ours to destroy"
    assert [r for r in roles if r.startswith("rlstack-slot0-inc1")]
    second.close()


def test_close_destroys_its_actors_and_restores_asynchronous_mode(fake_carla):
    server = fake_carla()
    env = make(server)
    env.reset()
    env.close()
    client = carla.Client("127.0.0.1", server.port)
    client.set_timeout(2.0)
    world = client.get_world()
    assert not world.get_settings().synchronous_mode
    assert not [a for a in world.get_actors() if a.attributes.get("role_name", "").startswith("rlstack-slot0")]


@pytest.mark.timeout(120)
def test_npcs_on_the_slots_own_traffic_manager(fake_carla, tmp_path):
    """The Traffic Manager lives in the env's process and outlives its client: run it in a child process."""
    import subprocess

    server = fake_carla()
    script = tmp_path / "npcs.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(__import__('tests.conftest', fromlist=['ROOT']).ROOT)!r})
from tests.worker.test_carla_reward import env_config
from worker.envs import make_env
env = make_env(env_config({server.port}, npcs=4, route_length_m=300.0), 0, 0, 3)
env.reset()
npcs = env.actors[1:]
start = [a.get_location() for a in npcs]
for _ in range(60):
    env.step([0.0, 0.0])
moved = [a.get_location().distance(s) for a, s in zip(npcs, start)]
tags = {{a.attributes["role_name"] for a in npcs}}
env.close()
print("NPCS", len(npcs), min(moved), sorted(tags), flush=True)
os._exit(0)
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("NPCS")), None)
    assert line is not None, res.stderr[-2000:]
    _, count, moved, tags = line.split(maxsplit=3)
    assert int(count) == 4 and float(moved) > 3.0 and "rlstack-slot0-inc0-npc" in tags
