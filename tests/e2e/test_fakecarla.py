"""End-to-end tests of tests/fakecarla with the real carla==0.9.16 client.

Each test starts the fake as its own process (``python -m tests.fakecarla``) on a free
port and kills it in the fixture's teardown, also when the test fails. The client runs in
the test process, except for the Traffic Manager test, whose client runs in a child
process (the TM leaves threads and a listening port behind in whatever process runs it).
"""

import math
import queue
import signal
import subprocess
import sys
import textwrap
import time

import pytest

carla = pytest.importorskip("carla")

from harness.carla import free_port_pair  # noqa: E402


def _client(server, timeout=2.0):
    client = carla.Client("127.0.0.1", server.port)
    client.set_timeout(timeout)
    return client


def _sync_world(client, delta=0.05):
    world = client.get_world()
    settings = world.get_settings()
    settings.synchronous_mode = True
    settings.fixed_delta_seconds = delta
    world.apply_settings(settings)
    return world


# -- P1 ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_command_line_version_async_stream_and_sigterm(fake_carla):
    server = fake_carla("-carla-primary-port=9999", "--map", "Town01")
    assert f"127.0.0.1:{server.port}" in server.line
    client = _client(server)
    assert client.get_server_version() == "0.9.16"
    world = client.get_world()  # needs world states streaming in asynchronous mode
    settings = world.get_settings()
    assert settings.synchronous_mode is False
    assert settings.fixed_delta_seconds is None
    first = world.wait_for_tick(2.0).frame
    second = world.wait_for_tick(2.0).frame
    assert second > first
    assert world.get_map().name == "Town01"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(5) == 0


@pytest.mark.timeout(30)
def test_map_waypoints_and_blueprints(fake_carla):
    server = fake_carla()
    world = _client(server).get_world()
    town = world.get_map()
    spawn_points = town.get_spawn_points()
    assert len(spawn_points) >= 20
    wp = town.get_waypoint(spawn_points[0].location)
    assert wp.lane_type == carla.LaneType.Driving
    assert wp.transform.location.distance(spawn_points[0].location) < 1.0
    travelled, prev = 0.0, wp
    for _ in range(100):  # 1 km: more than one lap of the loop
        nxt = prev.next(10.0)
        assert nxt, "the road must not end"
        travelled += nxt[0].transform.location.distance(prev.transform.location)
        prev = nxt[0]
    assert travelled > 900.0
    library = world.get_blueprint_library()
    model3 = library.find("vehicle.tesla.model3")
    model3.set_attribute("role_name", "hero")
    assert model3.get_attribute("role_name").as_str() == "hero"
    assert len(library.filter("vehicle.*")) >= 3
    camera = library.find("sensor.camera.rgb")
    for name in ("image_size_x", "image_size_y", "fov", "sensor_tick", "role_name"):
        assert camera.has_attribute(name)
    for sensor in ("sensor.other.collision", "sensor.other.lane_invasion", "sensor.other.obstacle"):
        library.find(sensor).set_attribute("role_name", "x")


@pytest.mark.timeout(60)
def test_sync_ticks_camera_and_driving(fake_carla):
    server = fake_carla()
    client = _client(server)
    world = _sync_world(client)
    assert world.get_settings().fixed_delta_seconds == pytest.approx(0.05)
    library = world.get_blueprint_library()
    spawn = world.get_map().get_spawn_points()[0]
    bp = library.find("vehicle.tesla.model3")
    bp.set_attribute("role_name", "hero")
    ego = world.spawn_actor(bp, spawn)
    assert world.try_spawn_actor(bp, spawn) is None  # occupied
    cam_bp = library.find("sensor.camera.rgb")
    cam_bp.set_attribute("image_size_x", "84")
    cam_bp.set_attribute("image_size_y", "48")
    cam_bp.set_attribute("fov", "100")
    cam_bp.set_attribute("sensor_tick", "0.0")
    camera = world.spawn_actor(cam_bp, carla.Transform(carla.Location(x=1.5, z=2.0)), attach_to=ego)
    images = queue.Queue()
    camera.listen(images.put)
    frames = []
    for _ in range(5):
        frame = world.tick(2.0)
        image = images.get(timeout=2.0)
        assert isinstance(image, carla.Image)
        assert image.frame == frame
        assert (image.width, image.height) == (84, 48)
        assert len(image.raw_data) == 84 * 48 * 4
        frames.append(frame)
    assert frames == list(range(frames[0], frames[0] + 5))

    start = ego.get_location()
    ego.apply_control(carla.VehicleControl(throttle=0.8, steer=0.0, brake=0.0))
    for _ in range(40):  # 2 s
        world.tick(2.0)
    moved = ego.get_location().distance(start)
    assert 3.0 < moved < 40.0
    assert ego.get_velocity().length() > 2.0
    yaw = math.radians(ego.get_transform().rotation.yaw)
    heading = ego.get_location() - start
    assert heading.x * math.cos(yaw) + heading.y * math.sin(yaw) > 0.9 * moved  # forwards
    ego.apply_control(carla.VehicleControl(throttle=0.0, brake=1.0))
    for _ in range(40):
        world.tick(2.0)
    assert ego.get_velocity().length() < 0.1

    vehicles = world.get_actors().filter("vehicle.*")
    assert [v.attributes["role_name"] for v in vehicles] == ["hero"]
    camera.stop()
    assert camera.destroy()
    assert ego.destroy()
    world.tick(2.0)
    assert len(world.get_actors().filter("vehicle.*")) == 0


@pytest.mark.timeout(30)
def test_batches(fake_carla):
    server = fake_carla()
    client = _client(server)
    world = _sync_world(client)
    spawn_points = world.get_map().get_spawn_points()
    bps = world.get_blueprint_library().filter("vehicle.*")
    results = client.apply_batch_sync(
        [carla.command.SpawnActor(bps[i], spawn_points[i]) for i in range(3)]
        + [carla.command.SpawnActor(bps[0], spawn_points[0])], True)  # the last one collides
    assert [r.has_error() for r in results] == [False, False, False, True]
    ids = [r.actor_id for r in results[:3]]
    world.tick(2.0)
    assert sorted(a.id for a in world.get_actors().filter("vehicle.*")) == sorted(ids)
    client.apply_batch([carla.command.DestroyActor(i) for i in ids])
    world.tick(2.0)
    assert len(world.get_actors().filter("vehicle.*")) == 0


# -- P2 ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_collision_obstacle_and_lane_invasion(fake_carla):
    server = fake_carla()
    world = _sync_world(_client(server))
    library = world.get_blueprint_library()
    spawn = world.get_map().get_spawn_points()[1]
    ego = world.spawn_actor(library.find("vehicle.tesla.model3"), spawn)
    ahead = carla.Transform(carla.Location(spawn.location.x + 9.0, spawn.location.y, spawn.location.z),
                            spawn.rotation)
    npc = world.spawn_actor(library.find("vehicle.audi.a2"), ahead)
    obstacle_bp = library.find("sensor.other.obstacle")
    obstacle_bp.set_attribute("distance", "10")
    sensors, events = [], {}
    for type_id, bp in (("obstacle", obstacle_bp),
                        ("collision", library.find("sensor.other.collision")),
                        ("lane", library.find("sensor.other.lane_invasion"))):
        sensor = world.spawn_actor(bp, carla.Transform(), attach_to=ego)
        events[type_id] = queue.Queue()
        sensor.listen(events[type_id].put)
        sensors.append(sensor)

    ego.apply_control(carla.VehicleControl(throttle=0.6))
    for _ in range(60):
        world.tick(2.0)
        if not events["collision"].empty():
            break
    seen = events["obstacle"].get(timeout=1.0)
    assert isinstance(seen, carla.ObstacleDetectionEvent)
    assert seen.other_actor.id == npc.id and 0.0 <= seen.distance <= 10.0
    hit = events["collision"].get(timeout=1.0)
    assert isinstance(hit, carla.CollisionEvent)
    assert hit.actor.id == ego.id and hit.other_actor.id == npc.id
    assert hit.normal_impulse.length() > 0.0

    # Now steer off the road: lane markings first, then a collision with the road edge.
    npc.destroy()
    ego.apply_control(carla.VehicleControl(throttle=0.6, steer=0.4))
    edge = None
    for _ in range(80):
        world.tick(2.0)
        while not events["collision"].empty():
            event = events["collision"].get()
            if event.other_actor.type_id.startswith("static."):
                edge = event
        if edge is not None:
            break
    assert edge is not None
    crossing = events["lane"].get(timeout=1.0)
    assert isinstance(crossing, carla.LaneInvasionEvent)
    assert crossing.crossed_lane_markings
    for sensor in sensors:
        sensor.stop()
        sensor.destroy()


_TM_SCRIPT = textwrap.dedent("""
    import sys, carla
    port, tm_port = int(sys.argv[1]), int(sys.argv[2])
    client = carla.Client("127.0.0.1", port)
    client.set_timeout(5.0)
    world = client.get_world()
    tm = client.get_trafficmanager(tm_port)
    tm.set_synchronous_mode(True)
    tm.set_random_device_seed(7)
    settings = world.get_settings()
    settings.synchronous_mode = True
    settings.fixed_delta_seconds = 0.05
    world.apply_settings(settings)
    spawn_points = world.get_map().get_spawn_points()
    bps = world.get_blueprint_library().filter("vehicle.*")
    batch = [carla.command.SpawnActor(bps[i], spawn_points[3 * i]).then(
                 carla.command.SetAutopilot(carla.command.FutureActor, True, tm.get_port()))
             for i in range(4)]
    results = client.apply_batch_sync(batch, True)
    assert not any(r.has_error() for r in results), [r.error for r in results]
    vehicles = [world.get_actor(r.actor_id) for r in results]
    start = [v.get_location() for v in vehicles]
    for _ in range(100):
        world.tick(2.0)
    moved = [v.get_location().distance(s) for v, s in zip(vehicles, start)]
    town = world.get_map()
    on_lane = [town.get_waypoint(v.get_location(), project_to_road=False) is not None for v in vehicles]
    print("MOVED", min(moved), all(on_lane), flush=True)
    settings.synchronous_mode = False
    world.apply_settings(settings)
    tm.set_synchronous_mode(False)
""")


@pytest.mark.timeout(90)
def test_traffic_manager_autopilot_in_sync_mode(fake_carla, tmp_path):
    server = fake_carla()
    script = tmp_path / "tm_client.py"
    script.write_text(_TM_SCRIPT)
    tm_port = free_port_pair()
    run = subprocess.run([sys.executable, str(script), str(server.port), str(tm_port)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("MOVED")][0]
    _, min_moved, on_lane = line.split()
    assert float(min_moved) > 10.0  # 5 s at the TM's speed is ~40 m
    assert on_lane == "True"


# -- faults -----------------------------------------------------------------------------------


def _timed(fn, *args):
    start = time.monotonic()
    try:
        return fn(*args), None, time.monotonic() - start
    except RuntimeError as exc:
        return None, exc, time.monotonic() - start


@pytest.mark.timeout(30)
def test_fault_never_answer(fake_carla):
    server = fake_carla("--fault", "never_answer")
    client = _client(server, timeout=1.0)
    _, exc, took = _timed(client.get_server_version)
    assert exc is not None and "time-out" in str(exc)
    assert 0.9 < took < 3.0
    _, exc, took = _timed(client.get_world)
    assert exc is not None and 0.9 < took < 3.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["stop_ticks_after", "stop_world_stream_after"])
def test_fault_ticks_stop(fake_carla, fault):
    server = fake_carla("--fault", f"{fault}=5")
    client = _client(server)
    world = _sync_world(client)  # apply_settings makes one tick itself
    for _ in range(4):
        world.tick(2.0)
    _, exc, took = _timed(world.tick, 2.0)
    assert exc is not None and "time-out" in str(exc)
    assert 1.9 < took < 4.0
    assert client.get_server_version() == "0.9.16"  # the connection still works


@pytest.mark.timeout(30)
@pytest.mark.parametrize("delay, answered", [(1.5, True), (2.5, False)])
def test_fault_slow_tick(fake_carla, delay, answered):
    """slow_tick=1.5 is slow but answered within tick(seconds=2.0); its negative twin,
    a delay past the client's timeout, is what a stall looks like."""
    server = fake_carla("--fault", f"slow_tick={delay}")
    client = _client(server, timeout=5.0)
    world = _sync_world(client)  # apply_settings' own tick is slow too
    client.set_timeout(2.0)
    frame, exc, took = _timed(world.tick, 2.0)
    if answered:
        assert exc is None and frame > 0
        assert delay - 0.1 < took < 2.0
    else:
        assert exc is not None and "time-out" in str(exc)
        assert 1.9 < took < delay


@pytest.mark.timeout(30)
def test_fault_stop_camera_after(fake_carla):
    server = fake_carla("--fault", "stop_camera_after=3")
    world = _sync_world(_client(server))
    library = world.get_blueprint_library()
    ego = world.spawn_actor(library.find("vehicle.tesla.model3"), world.get_map().get_spawn_points()[0])
    cam_bp = library.find("sensor.camera.rgb")
    cam_bp.set_attribute("image_size_x", "32")
    cam_bp.set_attribute("image_size_y", "32")
    camera = world.spawn_actor(cam_bp, carla.Transform(), attach_to=ego)
    images = queue.Queue()
    camera.listen(images.put)
    ticks = [world.tick(2.0) for _ in range(6)]  # ticks keep working
    time.sleep(0.3)
    got = []
    while not images.empty():
        got.append(images.get().frame)
    assert got == ticks[:3]
    camera.stop()


@pytest.mark.timeout(30)
def test_fault_exit_after(fake_carla):
    server = fake_carla("--fault", "exit_after=4", "--fault", "slow_tick=0.01")
    world = _sync_world(_client(server))  # tick 1
    for _ in range(3):  # ticks 2..4 are answered, then the server exits
        world.tick(2.0)
    assert server.proc.wait(5) == 3
    _, exc, _ = _timed(world.tick, 1.0)
    assert exc is not None
