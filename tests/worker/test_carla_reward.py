"""The CARLA env's own arithmetic: route progress, frames, reward terms and episode ends (no server)."""

import numpy as np
import pytest

from harness.carla import free_port_block  # noqa: E402
from protocol.config import load_config  # noqa: E402
from worker.carla_env import CarlaEnv, Route, to_frame  # noqa: E402

carla = pytest.importorskip("carla")


pytestmark = pytest.mark.timeout(30)


def env_config(port, slots=1, tm_port=None, overrides=(), **carla_cfg):
    values = {"npcs": 0, "connect_timeout_s": 1.0, "client_timeout_s": 4.0, "tick_timeout_s": 2.0,
              "sensor_timeout_s": 1.0, "route_length_m": 60.0, **carla_cfg}
    return load_config(None, [("env.backend", "carla"), ("workers.count", slots), ("simulators.mode", "external"),
                              ("simulators.external", [f"127.0.0.1:{port}"] * slots),
                              ("simulators.tm_base_port", tm_port or free_port_block(1)), ("env.max_episode_steps", 400)]
                       + [(f"env.carla.{k}", v) for k, v in values.items()] + list(overrides))


@pytest.mark.timeout(10)
def test_route_progress_and_distance():
    class WP:
        def __init__(self, x, y):
            self.transform = carla.Transform(carla.Location(x=x, y=y))

    route = Route.from_waypoints([WP(0, 0), WP(10, 0), WP(10, 10)], 3.5)
    assert route.length == pytest.approx(20.0)
    assert route.locate(5.0, 1.0) == pytest.approx((5.0, 1.0))
    assert route.locate(11.0, 5.0) == pytest.approx((15.0, 1.0))
    progress, off = route.locate(-3.0, 0.0)
    assert progress == 0.0 and off == pytest.approx(3.0)


@pytest.mark.timeout(10)
def test_frames_are_channels_first_grayscale_or_rgb():
    class Image:
        width, height = 3, 2
        raw_data = bytes([10, 20, 30, 255] * 6)  # BGRA: blue 10, green 20, red 30

    gray = to_frame(Image(), grayscale=True)
    assert gray.shape == (1, 2, 3) and gray.dtype == np.uint8
    assert int(gray[0, 0, 0]) == round(0.299 * 30 + 0.587 * 20 + 0.114 * 10)
    rgb = to_frame(Image(), grayscale=False)
    assert rgb.shape == (3, 2, 3) and list(rgb[:, 0, 0]) == [30, 20, 10]


@pytest.mark.timeout(10)
def test_reward_terms_and_ends():
    env = CarlaEnv(env_config(2000), slot=0, incarnation=0)
    env.route = Route(np.array([[0.0, 0.0], [100.0, 0.0]]), np.array([0.0, 100.0]), 4.0)
    target = 30 / 3.6
    none = {"collision": [], "lane_invasion": [], "obstacle": []}

    def judge(x, y, speed, events=none, progress=0.0):
        env.progress_m, env.steps, env.still_steps = progress, 1, 0
        return env.judge(x, y, speed, events)

    # on the centre line at the target speed, gaining a target-speed step: the full 1.0
    assert judge(target * 0.05, 0.0, target)[0] == pytest.approx(1.0)
    assert judge(0.0, 1.0, target)[0] == pytest.approx(0.3 + 0.2 * 0.5)  # no progress, half a lane off
    assert judge(0.0, 0.0, 0.0)[0] == pytest.approx(0.2)  # standing on the centre line
    assert judge(0.0, 0.0, 0.0, {**none, "lane_invasion": [1]})[0] == pytest.approx(0.0)
    r, term, trunc, reason = judge(0.0, 0.0, target, {**none, "collision": [1]})
    assert term and not trunc and reason == "collision" and r < 0
    r, term, trunc, reason = judge(50.0, 5.0, target)
    assert term and reason == "off_route" and r == pytest.approx(0.5 + 0.3 - 1.0)  # progress, speed, penalty
    r, term, trunc, reason = judge(99.0, 0.0, target, progress=98.0)
    assert term and reason == "route_done"
