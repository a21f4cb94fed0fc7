"""The CARLA env: a gymnasium env over one CARLA 0.9.16 server in synchronous mode, that cannot hang.

``carla`` is imported here and nowhere else. Every wait is bounded: the client's
timeout is short while the server is only probed, longer for the map load, and
the tick timeout for the episode loop; sensor data is taken from per-sensor
queues matched to the tick's frame number, with a deadline. A tick that times
out, a sensor that does not deliver and a lost connection all raise
:class:`~protocol.simulators.SimulatorStalled`, which ends the worker with
``EXIT_SIMULATOR_STALLED``: the supervisor then replaces the slot's simulator and
the worker at once, instead of waiting for the progress deadline. Calls that hold
the GIL while they block (``get_world``, ``load_world``) stop the worker's
heartbeat thread too, and the heartbeat deadline catches them.

Observations are the camera frame (uint8, channels first; grayscale by default).
Actions are ``[steer, throttle/brake]`` in [-1, 1]: throttle = max(a1, 0), brake =
max(-a1, 0). The reward follows a route of ``route_length_m`` from the spawn
point: progress along it, tracking the target speed, staying on the lane centre;
a collision or leaving the route ends the episode (terminal), as does reaching its
end; standing still for ``stuck_steps`` or ``env.max_episode_steps`` truncates it.
``info["reason"]`` names why an episode ended.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import carla
import gymnasium as gym
import numpy as np

from protocol.config import Config
from protocol.simulators import SimulatorStalled, slot_server

# Tags every actor a slot spawns, so a worker attaching to its simulator can destroy what an earlier
# incarnation of the same slot left behind (and nothing of another slot's).
ROLE_PREFIX = "rlstack-slot"
# A new camera gets this many ticks (within the sensor timeout) to deliver its first image.
FIRST_IMAGE_TICKS = 10


@dataclass
class Route:
    """A polyline of waypoint positions; progress is the arc length of the closest point."""

    points: np.ndarray  # (N, 2)
    cumulative: np.ndarray  # (N,) arc length at each point
    lane_width: float

    @classmethod
    def from_waypoints(cls, waypoints, lane_width: float) -> "Route":
        pts = np.array([[w.transform.location.x, w.transform.location.y] for w in waypoints], dtype=np.float64)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        return cls(pts, np.concatenate([[0.0], np.cumsum(seg)]), lane_width)

    @property
    def length(self) -> float:
        return float(self.cumulative[-1])

    def locate(self, x: float, y: float) -> tuple[float, float]:
        """(progress along the route in metres, distance from it) of the point (x, y)."""
        a, b = self.points[:-1], self.points[1:]
        ab = b - a
        ap = np.array([x, y]) - a
        t = np.clip((ap * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-9), 0.0, 1.0)
        closest = a + ab * t[:, None]
        dist = np.linalg.norm(closest - np.array([x, y]), axis=1)
        i = int(np.argmin(dist))
        return float(self.cumulative[i] + t[i] * np.linalg.norm(ab[i])), float(dist[i])


def to_frame(image, grayscale: bool) -> np.ndarray:
    """A carla.Image (BGRA bytes) as uint8 channels-first: (1, H, W) grayscale or (3, H, W) RGB."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
    rgb = bgra[:, :, 2::-1]
    if grayscale:
        gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(gray + 0.5, 0, 255).astype(np.uint8)[None]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


class CarlaEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, cfg: Config, slot: int, incarnation: int, seed: int = 0):
        self.cfg = cfg
        self.ccfg = cfg.env.carla
        self.slot = slot
        self.incarnation = incarnation
        self.server = slot_server(cfg, slot)
        self.role = f"{ROLE_PREFIX}{slot}-inc{incarnation}"
        cam = self.ccfg.camera
        self.observation_space = gym.spaces.Box(0, 255, (1 if cam.grayscale else 3, cam.height, cam.width), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)  # [steer, throttle/brake]
        self.rng = np.random.default_rng(seed)
        self.seed_value = seed
        self.client = None
        self.world = None
        self.tm = None
        self.actors: list = []  # the episode's vehicles (ego first), destroyed in one batch
        self.sensors: dict[str, object] = {}
        self.queues: dict[str, queue.Queue] = {}
        self.frame: int | None = None
        self.steps = 0
        self.stalled = False  # the server stopped answering: close() does not wait on it again
        self.episodes = 0
        self.pending_events: dict[str, list] = {"collision": [], "lane_invasion": [], "obstacle": []}

    # -- connecting ---------------------------------------------------------------------------

    def connect(self) -> None:
        """Probe with a short timeout, then load (or reuse) the map and set up the Traffic Manager."""
        c = self.ccfg
        client = carla.Client(self.server.host, self.server.rpc_port)
        client.set_timeout(c.connect_timeout_s)
        try:
            client.get_server_version()
            client.set_timeout(c.client_timeout_s)
            world = client.get_world()
            town = world.get_map()  # parsed once: the client builds it from the OpenDRIVE document
            if town.name.split("/")[-1] != c.map:
                world = client.load_world(c.map)
                town = world.get_map()
            self.client, self.world, self.town = client, world, town
            self.destroy_leftovers()
            if c.npcs:
                self.tm = client.get_trafficmanager(self.server.tm_port)
                self.tm.set_synchronous_mode(True)
                self.tm.set_random_device_seed(self.seed_value)
            client.set_timeout(c.tick_timeout_s)  # synchronous mode is applied (and checked) by every reset  # from now on every call is bounded like a tick
        except RuntimeError as exc:
            raise self._stalled(f"CARLA at {self.server.host}:{self.server.rpc_port}: {exc}") from None

    def apply_sync(self) -> None:
        """Synchronous mode with the configured fixed delta; applied, then checked."""
        want = self.ccfg.fixed_delta_seconds
        settings = self.world.get_settings()
        if not settings.synchronous_mode or settings.fixed_delta_seconds is None \
                or abs(settings.fixed_delta_seconds - want) > 1e-6:
            settings.synchronous_mode = True
            settings.fixed_delta_seconds = want
            self.world.apply_settings(settings)
        got = self.world.get_settings()
        if not got.synchronous_mode or got.fixed_delta_seconds is None or abs(got.fixed_delta_seconds - want) > 1e-6:
            raise self._stalled(f"synchronous mode with fixed_delta_seconds={want} did not hold "
                                   f"(server reports {got.synchronous_mode}, {got.fixed_delta_seconds})")

    def destroy_leftovers(self) -> None:
        """Actors an earlier incarnation of this slot left (a killed worker cannot clean up).

        The client lists actors from the last world state it received, and one that just connected may have none
        yet: a server left in synchronous mode by a killed worker sends no state until someone ticks it. So the
        list is taken after a tick (synchronous mode) or the next state (asynchronous), both bounded."""
        if self.world.get_settings().synchronous_mode:
            self.world.tick(self.ccfg.client_timeout_s)
        else:
            self.world.wait_for_tick(self.ccfg.client_timeout_s)
        mine = f"{ROLE_PREFIX}{self.slot}-"
        stale = [a for a in self.world.get_actors() if a.attributes.get("role_name", "").startswith(mine)]
        for a in stale:
            if a.type_id.startswith("sensor."):
                try:
                    a.stop()
                except RuntimeError:
                    pass
        if stale:
            self.client.apply_batch_sync([carla.command.DestroyActor(a.id) for a in stale], False)

    # -- episodes -----------------------------------------------------------------------------

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # a seeded reset (the first one, or an evaluation episode's) draws from its own generator;
        # the training episodes' spawn points go on from where they were
        episode_rng = np.random.default_rng(seed) if seed is not None else self.rng
        if self.episodes == 0:
            self.rng = episode_rng
        self.episodes += 1
        try:
            if self.client is None:
                self.connect()
            self.destroy_episode()
            self.apply_sync()
            self.spawn_episode(episode_rng)
            frame, obs = self.first_observation()
            self.drain_events(frame)
        except RuntimeError as exc:
            if isinstance(exc, SimulatorStalled):
                raise
            raise self._stalled(f"reset: {exc}") from None
        self.steps = 0
        self.still_steps = 0
        self.progress_m, _ = self.route.locate(*self._xy())
        return obs, {"frame": frame}

    def spawn_episode(self, rng: np.random.Generator) -> None:
        c = self.ccfg
        world = self.world
        library = world.get_blueprint_library()
        town = self.town
        points = town.get_spawn_points()
        ego_bp = library.find(c.vehicle)
        ego_bp.set_attribute("role_name", f"{self.role}-ego")
        order = rng.permutation(len(points))
        ego, ego_at = None, -1
        for i in order[:20]:  # a free spawn point with a road ahead of it
            route = self.route_from(town.get_waypoint(points[i].location))
            if route is None:
                continue
            ego, ego_at = world.try_spawn_actor(ego_bp, points[i]), i
            if ego is not None:
                break
        if ego is None:
            raise self._stalled("no free spawn point with a route ahead for the ego vehicle in 20 tries")
        self.route = route
        self.actors = [ego]
        self.ego = ego
        if c.npcs:
            vehicles = library.filter("vehicle.*")
            batch = []
            for i in [j for j in order if j != ego_at][:c.npcs]:
                bp = vehicles[int(rng.integers(len(vehicles)))]
                bp.set_attribute("role_name", f"{self.role}-npc")
                batch.append(carla.command.SpawnActor(bp, points[i]).then(
                    carla.command.SetAutopilot(carla.command.FutureActor, True, self.server.tm_port)))
            for result in self.client.apply_batch_sync(batch, True):
                if not result.has_error():
                    self.actors.append(world.get_actor(result.actor_id))
        self.spawn_sensors(library)

    def route_from(self, wp) -> Route | None:
        """Waypoints ahead along the lane from ``wp``, up to ``route_length_m``; None where the road ends at once."""
        if wp is None:
            return None
        c = self.ccfg
        waypoints = [wp]
        while len(waypoints) * c.waypoint_spacing_m < c.route_length_m:
            nxt = waypoints[-1].next(c.waypoint_spacing_m)
            if not nxt:
                break
            yaw = waypoints[-1].transform.rotation.yaw
            # at a junction, the straightest way on: the camera carries no route command to follow a turn
            waypoints.append(min(nxt, key=lambda w: abs((w.transform.rotation.yaw - yaw + 180.0) % 360.0 - 180.0)))
        route = Route.from_waypoints(waypoints, float(wp.lane_width) or 3.5) if len(waypoints) >= 2 else None
        if route is None or route.length < c.route_length_m / 2:
            return None  # a road that ends soon: no episode worth starting here
        return route

    def spawn_sensors(self, library) -> None:
        cam = self.ccfg.camera
        specs = {
            "camera": ("sensor.camera.rgb", carla.Transform(carla.Location(x=cam.x, z=cam.z),
                                                             carla.Rotation(pitch=cam.pitch)),
                       {"image_size_x": str(cam.width), "image_size_y": str(cam.height), "fov": str(cam.fov),
                        "sensor_tick": "0.0"}),
            "collision": ("sensor.other.collision", carla.Transform(), {}),
            "lane_invasion": ("sensor.other.lane_invasion", carla.Transform(), {}),
            "obstacle": ("sensor.other.obstacle", carla.Transform(carla.Location(x=2.0, z=1.0)),
                         {"distance": "20"}),
        }
        for key, (type_id, transform, attributes) in specs.items():
            bp = library.find(type_id)
            for k, v in attributes.items():
                bp.set_attribute(k, v)
            bp.set_attribute("role_name", f"{self.role}-{key}")
            sensor = self.world.spawn_actor(bp, transform, attach_to=self.ego)
            q: queue.Queue = queue.Queue()
            sensor.listen(q.put)
            self.sensors[key] = sensor
            self.queues[key] = q

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        try:
            self.ego.apply_control(carla.VehicleControl(throttle=float(max(a[1], 0.0)), steer=float(a[0]),
                                                        brake=float(max(-a[1], 0.0))))
            frame = self.tick()
            obs = self.observe(frame)
            events = self.drain_events(frame)
            x, y = self._xy()
            speed = self.ego.get_velocity().length()
        except RuntimeError as exc:
            if isinstance(exc, SimulatorStalled):
                raise
            raise self._stalled(f"step: {exc}") from None
        self.steps += 1
        reward, terminated, truncated, reason = self.judge(x, y, speed, events)
        info = {"frame": frame, "speed": speed, "progress_m": self.progress_m, **({"reason": reason} if reason else {})}
        return obs, reward, terminated, truncated, info

    def judge(self, x: float, y: float, speed: float, events: dict) -> tuple[float, bool, bool, str]:
        """Reward, terminated, truncated and the reason of an episode's end, from one step's state."""
        c, w = self.ccfg, self.ccfg.reward
        dt = self.cfg.env.carla.fixed_delta_seconds
        target = c.target_speed_kmh / 3.6
        progress, off = self.route.locate(x, y)
        gained = progress - self.progress_m
        self.progress_m = max(self.progress_m, progress)
        reward = w.progress * float(np.clip(gained / (target * dt), -1.0, 1.0))
        reward += w.speed * max(0.0, 1.0 - abs(speed - target) / target)
        reward += w.centring * max(0.0, 1.0 - off / (self.route.lane_width / 2.0))
        if events["lane_invasion"]:
            reward -= w.lane_invasion
        self.still_steps = self.still_steps + 1 if speed < 0.1 else 0
        terminated, truncated, reason = False, False, ""
        if events["collision"]:
            reward, terminated, reason = reward - w.collision, True, "collision"
        elif off > c.max_off_route_m:
            reward, terminated, reason = reward - w.off_route, True, "off_route"
        elif progress >= self.route.length - c.waypoint_spacing_m:
            terminated, reason = True, "route_done"
        elif self.still_steps >= c.stuck_steps:
            truncated, reason = True, "stuck"
        elif self.cfg.env.max_episode_steps and self.steps >= self.cfg.env.max_episode_steps:
            truncated, reason = True, "time_limit"
        return float(np.clip(reward, -1.0, 1.0)), terminated, truncated, reason

    # -- the simulator, bounded --------------------------------------------------------------

    def tick(self) -> int:
        try:
            self.frame = int(self.world.tick(self.ccfg.tick_timeout_s))
        except RuntimeError as exc:
            raise self._stalled(f"world.tick() did not complete within {self.ccfg.tick_timeout_s:g}s: {exc}") \
                from None
        return self.frame

    def first_observation(self) -> tuple[int, np.ndarray]:
        """Tick until the new camera's stream delivers: a sensor's first frames can be lost while its stream
        connects (the server drops data nobody subscribed to yet). Bounded by the sensor timeout."""
        deadline = time.monotonic() + self.ccfg.sensor_timeout_s
        per_tick = max(0.05, self.ccfg.sensor_timeout_s / FIRST_IMAGE_TICKS)
        while True:
            frame = self.tick()
            try:
                return frame, self.observe(frame, timeout_s=per_tick)
            except SimulatorStalled:
                self.stalled = False  # not yet: a lost first frame is no stall
                if time.monotonic() >= deadline:
                    raise self._stalled(f"the new camera delivered no image within "
                                        f"{self.ccfg.sensor_timeout_s:g}s of ticking") from None

    def observe(self, frame: int, timeout_s: float | None = None) -> np.ndarray:
        """The camera's image of ``frame``: older ones are dropped, none in time is a stalled simulator."""
        q = self.queues["camera"]
        deadline_s = self.ccfg.sensor_timeout_s if timeout_s is None else timeout_s
        while True:
            try:
                image = q.get(timeout=deadline_s)
            except queue.Empty:
                raise self._stalled(f"the camera delivered no image for frame {frame} within {deadline_s:g}s") \
                    from None
            if image.frame == frame:
                return to_frame(image, self.ccfg.camera.grayscale)
            if image.frame > frame:
                raise self._stalled(f"the camera skipped frame {frame} (got {image.frame})")

    def drain_events(self, frame: int) -> dict[str, list]:
        """Collision, lane invasion and obstacle events up to ``frame`` (they come only when something happens).

        One of a later frame is kept for the step of that frame; one that arrives after its frame's step was
        judged counts in the next step.
        """
        out = {}
        for key in ("collision", "lane_invasion", "obstacle"):
            q, pending = self.queues[key], self.pending_events[key]
            while True:
                try:
                    pending.append(q.get_nowait())
                except queue.Empty:
                    break
            out[key] = [e for e in pending if e.frame <= frame]
            self.pending_events[key] = [e for e in pending if e.frame > frame]
        return out

    def _xy(self) -> tuple[float, float]:
        loc = self.ego.get_location()
        return float(loc.x), float(loc.y)

    def _stalled(self, message: str) -> SimulatorStalled:
        self.stalled = True
        return SimulatorStalled(message)

    # -- cleaning up --------------------------------------------------------------------------

    def destroy_episode(self) -> None:
        for sensor in self.sensors.values():  # one by one: the client must know its sensors are gone
            sensor.stop()
            sensor.destroy()
        self.pending_events = {key: [] for key in self.pending_events}
        npcs = [a.id for a in self.actors[1:]]
        if npcs and self.tm is not None:  # the Traffic Manager lets go of them first (it aborts on a vanished actor)
            self.client.apply_batch_sync([carla.command.SetAutopilot(i, False, self.server.tm_port) for i in npcs],
                                         False)
        ids = [a.id for a in self.actors]
        if ids:
            self.client.apply_batch_sync([carla.command.DestroyActor(i) for i in ids], False)
        self.sensors, self.queues, self.actors = {}, {}, []

    def close(self) -> None:
        """Destroy what this env spawned and restore asynchronous mode, if the server still answers."""
        if self.client is None or self.stalled:
            return  # nothing to clean, or a server that just stopped answering: the supervisor replaces it
        client, self.client = self.client, None
        try:
            client.set_timeout(min(self.ccfg.connect_timeout_s, 2.0))
            client.get_server_version()
        except RuntimeError:
            return  # the server is gone or hung: nothing to clean, nothing to wait for
        try:
            self.client = client
            self.destroy_episode()
            self.world.tick(self.ccfg.tick_timeout_s)  # the Traffic Manager lets go of destroyed actors on a tick
            settings = self.world.get_settings()
            settings.synchronous_mode = False
            settings.fixed_delta_seconds = None
            self.world.apply_settings(settings)
            if self.tm is not None:
                self.tm.set_synchronous_mode(False)
        except RuntimeError:
            pass
        finally:
            self.client = None
