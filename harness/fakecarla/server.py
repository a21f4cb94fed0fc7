"""The fake server: RPC handlers, ticking (synchronous and asynchronous), stream
publishing, and the fault modes.

One lock guards the world; RPC connection threads and the asynchronous ticker take it.
"""

import logging
import math
import os
import sys
import threading
import time

import msgpack

from . import blueprints, opendrive, wire
from .rpc import NO_REPLY, RpcServer
from .streaming import StreamingServer
from .world import STATIC_OFF_ROAD, World

log = logging.getLogger("fakecarla.server")

VERSION = "0.9.16"
WORLD_STREAM = 1           # stream id of the world states
SENSOR_STREAM_BASE = 1000  # a sensor's stream id is this plus its actor id
ASYNC_PERIOD = 0.05        # seconds between world states in asynchronous mode

# rpc::Command's variant order in the 0.9.16 client (index -> name).
COMMANDS = [
    "SpawnActor", "DestroyActor", "ApplyVehicleControl", "ApplyVehicleAckermannControl",
    "ApplyWalkerControl", "ApplyVehiclePhysicsControl", "ApplyTransform", "ApplyWalkerState",
    "ApplyTargetVelocity", "ApplyTargetAngularVelocity", "ApplyImpulse", "ApplyForce",
    "ApplyAngularImpulse", "ApplyTorque", "SetSimulatePhysics", "SetEnableGravity",
    "SetAutopilot", "ShowDebugTelemetry", "SetVehicleLightState", "ApplyLocation",
    "ConsoleCommand", "SetTrafficLightState",
]


class Faults:
    def __init__(self, specs=()):
        self.never_answer = False
        self.stop_ticks_after = None
        self.stop_world_stream_after = None
        self.stop_camera_after = None
        self.exit_after = None
        self.slow_tick = 0.0
        self.grow_memory_after_s = None  # from then on, 8 MiB more every 20 ms, kept: a leak (an OOM kill's cause)
        for spec in specs:
            name, _, value = spec.partition("=")
            name = name.strip()
            if name == "never_answer":
                self.never_answer = True
            elif name == "slow_tick":
                self.slow_tick = float(value)
            elif name == "grow_memory_after_s":
                self.grow_memory_after_s = float(value)
            elif name in ("stop_ticks_after", "stop_world_stream_after", "stop_camera_after",
                          "exit_after"):
                setattr(self, name, int(value))
            else:
                raise ValueError(f"unknown fault {spec!r}")


class FakeCarla:
    def __init__(self, rpc_port=2000, stream_port=None, map_name="Town01", faults=None):
        self.faults = faults or Faults()
        self.map_name = map_name
        self.lock = threading.RLock()
        self.world = World(map_name)
        self.settings = wire.default_settings()
        self.ticks = 0            # tick_cue calls answered
        self.camera_frames = {}   # camera actor id -> images sent
        self.traffic_managers = {}  # port -> (host, port)
        self.stopped = threading.Event()
        self.xodr = opendrive.xodr(map_name)
        self.spawn_points = opendrive.spawn_points()
        answer = not self.faults.never_answer
        self._exit_pending = False
        self.rpc = RpcServer(rpc_port, self.dispatch, answer=answer, after_reply=self._after_reply)
        self.stream = StreamingServer(stream_port if stream_port is not None else self.rpc.port + 1,
                                      answer=answer, on_subscribe=self._on_subscribe)
        self._last_world_state = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def rpc_port(self):
        return self.rpc.port

    @property
    def stream_port(self):
        return self.stream.port

    def start(self):
        self.rpc.start()
        self.stream.start()
        threading.Thread(target=self._async_loop, name="ticker", daemon=True).start()
        if self.faults.grow_memory_after_s is not None:
            threading.Thread(target=self._leak, name="leak", daemon=True).start()

    def _leak(self):
        """The grow_memory_after_s fault: memory taken and kept, touched so that it counts, until the kernel says."""
        if self.stopped.wait(self.faults.grow_memory_after_s):
            return
        kept = []
        while not self.stopped.wait(0.02):
            kept.append(bytearray(8 * 2**20))  # bytearray zero-fills it: resident at once

    def stop(self):
        self.stopped.set()
        self.rpc.close()
        self.stream.close()

    def _async_loop(self):
        """Asynchronous mode: the world runs on its own, ~20 world states a second."""
        next_at = time.monotonic()
        while not self.stopped.is_set():
            next_at += ASYNC_PERIOD
            if not self.faults.never_answer:
                with self.lock:
                    if not self.settings["synchronous_mode"]:
                        self._advance(self.settings["fixed_delta_seconds"] or ASYNC_PERIOD)
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()
            self.stopped.wait(max(0.0, delay))

    # -- simulation and streaming -----------------------------------------------------------

    def _advance(self, dt):
        """Step the world one frame and stream what it produced. Caller holds the lock."""
        self._sync_listening()
        frame, events = self.world.step(dt)
        self._publish_world_state()
        self._publish_sensors(events)
        return frame

    def _actor_states(self):
        out = []
        for a in self.world.actors.values():
            out.append(wire.actor_dynamic_state(
                a.id, a.transform, a.velocity, a.angular_velocity, a.acceleration,
                control=a.control if a.is_vehicle else None))
        return out

    def _world_state_payload(self):
        w = self.world
        return wire.episode_state(w.episode_id, w.frame, w.sim_time, time.time(), w.delta,
                                  self._actor_states())

    def _publish_world_state(self):
        limit = self.faults.stop_world_stream_after
        if limit is not None and self.ticks > limit:
            self._last_world_state = None
            return
        payload = self._world_state_payload()
        self._last_world_state = payload
        self.stream.publish(WORLD_STREAM, payload)

    def _on_subscribe(self, stream_id):
        # A late subscriber to the world stream gets the latest state right away, so
        # that a client joining a synchronous simulation knows the actors.
        if stream_id == WORLD_STREAM:
            return self._last_world_state
        return None

    def _publish_sensors(self, events):
        w = self.world
        for s in list(w.actors.values()):
            if s.type_id == "sensor.camera.rgb" and s.listening and w.sensor_due(s):
                sent = self.camera_frames.get(s.id, 0)
                limit = self.faults.stop_camera_after
                if limit is not None and sent >= limit:
                    continue
                self.camera_frames[s.id] = sent + 1
                self.stream.publish(SENSOR_STREAM_BASE + s.id, self._image(s))
        for kind, sensor, other, value in events:
            if kind == "collision":
                other_actor = self._rpc_actor(other) if other is not None else wire.actor(
                    0, 0, wire.description(0, STATIC_OFF_ROAD, {}), wire.bounding_box((0, 0, 0)))
                body = [self._rpc_actor(self.world.actors[sensor.parent_id]), other_actor,
                        wire.vec3(*value)]
                stype = wire.SENSOR_TYPE["collision"]
            else:
                body = [self._rpc_actor(self.world.actors[sensor.parent_id]),
                        self._rpc_actor(other), float(value)]
                stype = wire.SENSOR_TYPE["obstacle"]
            payload = (wire.sensor_header(stype, w.frame, w.sim_time, sensor.transform)
                       + msgpack.packb(body, use_bin_type=True))
            self.stream.publish(SENSOR_STREAM_BASE + sensor.id, payload)

    def _image(self, cam):
        width = int(float(cam.attr("image_size_x", "800")))
        height = int(float(cam.attr("image_size_y", "600")))
        fov = float(cam.attr("fov", "90"))
        # A horizon picture: sky above, road below; the sky's shade follows the frame.
        shade = 150 + self.world.frame % 100
        sky = bytes((235, 206, shade, 255)) * width
        road = bytes((90, 90, 90, 255)) * width
        half = height // 2
        pixels = sky * half + road * (height - half)
        return wire.image_bgra(self.world.frame, self.world.sim_time, cam.transform,
                               width, height, fov, pixels)

    # -- rpc types --------------------------------------------------------------------------

    def _rpc_actor(self, a):
        desc = wire.description(a.uid, a.type_id, a.attrs)
        token = (wire.token_bytes(SENSOR_STREAM_BASE + a.id, self.stream_port)
                 if a.type_id in ("sensor.camera.rgb", "sensor.other.collision",
                                  "sensor.other.obstacle") else b"")
        tags = b"\x0e" if a.is_vehicle else b""  # 14 = Car in CityObjectLabel
        return wire.actor(a.id, a.parent_id, desc, wire.bounding_box(a.extent), tags, token)

    # -- RPC dispatch -----------------------------------------------------------------------

    def dispatch(self, method, args):
        log.debug("rpc %s", method)
        handler = getattr(self, "rpc_" + method, None)
        if handler is None:
            log.info("unsupported rpc %s%r", method, args)
            return wire.error(f"fakecarla does not support '{method}'")
        return handler(*args)

    def rpc_version(self):
        return wire.ok(VERSION)

    def rpc_get_episode_info(self):
        return wire.ok([self.world.episode_id, wire.token(WORLD_STREAM, self.stream_port)])

    def rpc_get_sensor_token(self, stream_id):
        # Sensor.listen() asks for the token just before it connects to the stream.
        if stream_id != WORLD_STREAM:
            self.stream.expect(stream_id)
        return wire.ok(wire.token(stream_id, self.stream_port))

    def rpc_get_map_info(self):
        return wire.ok([self.map_name, [wire.transform(t) for t in self.spawn_points]])

    def rpc_get_map_data(self):
        return wire.ok(self.xodr)

    def rpc_get_navigation_mesh(self):
        return wire.ok(b"")

    def rpc_get_required_files(self, folder="", *_):
        return wire.ok([])

    def rpc_request_file(self, name):
        return wire.ok(b"")

    def rpc_get_available_maps(self):
        return wire.ok([f"/Game/Carla/Maps/{self.map_name}"])

    def rpc_load_new_episode(self, map_name, *_):
        with self.lock:
            episode = self.world.episode_id + 1
            self.world = World(self.map_name)
            self.world.episode_id = episode
            self.camera_frames.clear()
        return wire.ok_void()

    def rpc_query_lights_state(self, *_):
        return wire.ok([])

    def rpc_update_lights_state(self, *_):
        return wire.ok_void()

    def rpc_update_day_night_cycle(self, *_):
        return wire.ok_void()

    def rpc_get_actor_definitions(self):
        return wire.ok(blueprints.definitions())

    def rpc_get_spectator(self):
        with self.lock:
            return wire.ok(self._rpc_actor(self.world.spectator))

    def rpc_get_episode_settings(self):
        return wire.ok(wire.settings(self.settings))

    def rpc_set_episode_settings(self, settings):
        with self.lock:
            self.settings = wire.parse_settings(settings, self.settings)
            log.info("settings now %s", self.settings)
            return wire.ok(self.world.frame)

    def rpc_get_actors_by_id(self, ids):
        with self.lock:
            return wire.ok([self._rpc_actor(self.world.actors[i]) for i in ids
                            if i in self.world.actors])

    def _spawn(self, desc, transform, parent=0):
        _, type_id, attrs = wire.parse_description(desc)
        with self.lock:
            try:
                actor = self.world.spawn(type_id, attrs, wire.parse_transform(transform), parent)
            except (KeyError, ValueError) as exc:
                return None, str(exc).strip("'\"")
            return actor, None

    def rpc_spawn_actor(self, desc, transform):
        actor, err = self._spawn(desc, transform)
        return wire.error(err) if err else wire.ok(self._rpc_actor(actor))

    def rpc_spawn_actor_with_parent(self, desc, transform, parent, attachment_type=0, *rest):
        # 0.9.16 adds a fifth argument (the socket name to attach to); ignored.
        actor, err = self._spawn(desc, transform, parent)
        return wire.error(err) if err else wire.ok(self._rpc_actor(actor))

    def rpc_destroy_actor(self, actor_id):
        with self.lock:
            if self.world.destroy(actor_id):
                return wire.ok(True)
        return wire.error("unable to destroy actor: not found")

    def _actor(self, actor_id):
        return self.world.actors.get(actor_id)

    def rpc_apply_control_to_vehicle(self, actor_id, control):
        with self.lock:
            a = self._actor(actor_id)
            if a is not None:
                self._apply_control(a, control)
        return wire.ok_void()

    @staticmethod
    def _apply_control(a, control):
        vals = list(control) + [0.0, 0.0, 0.0, False, False, False, 0][len(control):]
        thr, steer, brake, hand, rev, manual, gear = vals[:7]
        a.control = (float(thr), float(steer), float(brake), bool(hand), bool(rev),
                     bool(manual), int(gear))
        a.controlled = True

    def rpc_set_actor_autopilot(self, actor_id, enabled, *_):
        with self.lock:
            a = self._actor(actor_id)
            if a is not None:
                a.autopilot, a.controlled = bool(enabled), False
        return wire.ok_void()

    def rpc_set_actor_transform(self, actor_id, transform):
        with self.lock:
            a = self._actor(actor_id)
            if a is not None:
                t = wire.parse_transform(transform)
                if a.parent_id:
                    a.rel_transform = t
                else:
                    a.transform = t
        return wire.ok_void()

    def rpc_set_actor_location(self, actor_id, location):
        with self.lock:
            a = self._actor(actor_id)
            if a is not None:
                a.transform = (tuple(float(c) for c in location), a.transform[1])
        return wire.ok_void()

    def rpc_set_actor_target_velocity(self, actor_id, velocity):
        with self.lock:
            a = self._actor(actor_id)
            if a is not None and a.is_vehicle:
                vx, vy, _ = (float(c) for c in velocity)
                yaw = math.radians(a.transform[1][1])
                a.speed = vx * math.cos(yaw) + vy * math.sin(yaw)
                a.velocity = (vx, vy, 0.0)
        return wire.ok_void()

    def _void(self, *_):
        return wire.ok_void()

    rpc_set_actor_simulate_physics = _void
    rpc_set_actor_enable_gravity = _void
    rpc_set_actor_target_angular_velocity = _void
    rpc_add_actor_impulse = _void
    rpc_add_actor_force = _void
    rpc_set_vehicle_light_state = _void
    rpc_show_vehicle_debug_telemetry = _void
    rpc_set_weather_parameters = _void
    rpc_draw_debug_shape = _void
    rpc_freeze_all_traffic_lights = _void
    rpc_reset_all_traffic_lights = _void
    rpc_apply_ackermann_control_to_vehicle = _void
    rpc_apply_physics_control = _void
    rpc_enable_sensor_for_ros = _void
    rpc_disable_sensor_for_ros = _void
    rpc_destroy_traffic_manager = _void
    rpc_stop_recorder = _void

    def rpc_get_actor_bounding_box(self, actor_id):
        # The client-side lane invasion sensor asks for its parent's box on listen().
        with self.lock:
            a = self._actor(actor_id)
            if a is None:
                return wire.error(f"actor {actor_id} not found")
            return wire.ok(wire.bounding_box(a.extent))

    def rpc_get_weather_parameters(self):
        # rpc::WeatherParameters: cloudiness, precipitation, precipitation_deposits,
        # wind_intensity, sun_azimuth_angle, sun_altitude_angle, fog_density, fog_distance,
        # fog_falloff, wetness, scattering_intensity, mie_scattering_scale,
        # rayleigh_scattering_scale, dust_storm (ClearNoon-like).
        return wire.ok([5.0, 0.0, 0.0, 10.0, -1.0, 45.0, 2.0, 0.75, 0.1, 0.0, 1.0, 0.03,
                        0.0331, 0.0])

    def rpc_get_vehicle_light_states(self):
        with self.lock:
            return wire.ok([[v.id, 0] for v in self.world.vehicles()])

    def rpc_get_vehicle_light_state(self, *_):
        return wire.ok(0)

    def rpc_is_sensor_enabled_for_ros(self, *_):
        return wire.ok(False)

    def rpc_get_all_level_BBs(self, *_):
        return wire.ok([])

    def rpc_get_environment_objects(self, *_):
        return wire.ok([])

    def rpc_get_names_of_all_objects(self, *_):
        return wire.ok([])

    def rpc_get_group_traffic_lights(self, *_):
        return wire.ok([])

    # -- traffic manager registry -------------------------------------------------------------

    def rpc_is_traffic_manager_running(self, port):
        return wire.ok(port in self.traffic_managers)

    def rpc_get_traffic_manager_running(self, port):
        host, p = self.traffic_managers.get(port, ("", 0))
        return wire.ok([host, p])

    def rpc_add_traffic_manager_running(self, info):
        host, port = info
        if port in self.traffic_managers:
            return wire.ok(False)
        self.traffic_managers[port] = (host, port)
        return wire.ok(True)

    # -- sensors ------------------------------------------------------------------------------
    # The client subscribes straight to the stream; the server learns that a sensor is
    # listening when its stream gets a subscriber.

    def _sync_listening(self):
        for a in self.world.actors.values():
            if a.is_sensor:
                a.listening = self.stream.has_subscribers(SENSOR_STREAM_BASE + a.id)

    # -- ticking --------------------------------------------------------------------------------

    def rpc_tick_cue(self):
        frame = self._faulty_tick()
        return NO_REPLY if frame is None else wire.ok(frame)

    def _faulty_tick(self):
        """A tick as the faults shape it: None when it must never be answered."""
        f = self.faults
        if f.stop_ticks_after is not None and self.ticks >= f.stop_ticks_after:
            return None
        if f.slow_tick:
            time.sleep(f.slow_tick)
        with self.lock:
            return self._tick()

    def _tick(self):
        self.ticks += 1
        dt = self.settings["fixed_delta_seconds"] or ASYNC_PERIOD
        frame = self._advance(dt) if self.settings["synchronous_mode"] else self.world.frame
        if self.faults.exit_after is not None and self.ticks >= self.faults.exit_after:
            self._exit_pending = True  # acted on once this tick's reply is out
        return frame

    def _after_reply(self):
        if self._exit_pending:
            self.stream.flush(timeout=1.0)  # let the client have this tick's world state
            log.warning("exit_after=%d reached: exiting with code 3", self.faults.exit_after)
            sys.stdout.flush()
            os._exit(3)

    # -- batches --------------------------------------------------------------------------------

    def rpc_apply_batch(self, commands, do_tick_cue=False):
        responses = [self._command(cmd) for cmd in commands]
        if do_tick_cue and self._faulty_tick() is None:
            return NO_REPLY
        return responses

    def _command(self, cmd, future_id=0):
        """Run one rpc::Command; returns its CommandResponse (Response<ActorId>)."""
        try:
            index, body = cmd[0]
            name = COMMANDS[index]
        except (TypeError, ValueError, IndexError):
            return wire.error(f"fakecarla: malformed command {cmd!r}")
        log.debug("command %s %r", name, body)
        if name == "SpawnActor":
            # 0.9.16: (description, transform, optional parent, attachment type,
            # socket name, do_after)
            desc, transform, parent, do_after = body[0], body[1], body[2], body[-1]
            parent_id = parent[1] if (isinstance(parent, list) and len(parent) > 1 and parent[0]) else 0
            actor, err = self._spawn(desc, transform, parent_id)
            if err:
                return wire.error(err)
            for sub in do_after:
                resp = self._command(sub, future_id=actor.id)
                if resp[0][0] == 0:
                    return resp
            return wire.ok(actor.id)
        actor_id = body[0] or future_id
        with self.lock:
            a = self._actor(actor_id)
            if a is None:
                return wire.error(f"actor {actor_id} not found")
            if name == "DestroyActor":
                self.world.destroy(actor_id)
            elif name == "ApplyVehicleControl":
                self._apply_control(a, body[1])
            elif name == "SetAutopilot":
                a.autopilot, a.controlled = bool(body[1]), False
            elif name == "ApplyTransform":
                a.transform = wire.parse_transform(body[1])
            elif name == "ApplyLocation":
                a.transform = (tuple(float(c) for c in body[1]), a.transform[1])
            elif name == "ApplyTargetVelocity":
                self.rpc_set_actor_target_velocity(actor_id, body[1])
        return wire.ok(actor_id)
