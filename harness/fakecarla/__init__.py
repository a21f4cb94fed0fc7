"""fakecarla: a fake CARLA 0.9.16 simulator that the real ``carla==0.9.16`` client talks to.

Run it as ``python3 -m fakecarla -carla-rpc-port=2000 [--fault SPEC ...] [--map Town01]``
from the directory holding this package (or ``python -m harness.fakecarla`` from the repo
root). Standard library plus ``msgpack`` only. It listens on 127.0.0.1 only: RPC on the
given port, sensor/world-state streaming on ``-carla-streaming-port`` (default port + 1).

What is faked
-------------
* The RPC protocol (rpclib msgpack-rpc) for the calls a training stack makes: version,
  episode info and settings (synchronous mode, fixed delta), map info and an OpenDRIVE
  document, blueprints, spawning (alone, attached, in batches with ``then`` commands),
  destroying, vehicle controls, actor lookups, ``tick_cue``, and the Traffic Manager's
  calls (TM registry, light states, weather, bounding boxes).
* World-state streaming: ~20 Hz in asynchronous mode, one per tick in synchronous mode,
  with every actor's transform, velocity and last control.
* One map: a ~650 m closed loop of two roads, one lane each way, with lane markings (see
  ``opendrive``). Spawn points lie along both lanes. The client parses the map itself, so
  waypoints, ``next()``, topology and the client-side lane invasion sensor all work.
* Vehicles: a kinematic bicycle model driven by the last control; the Traffic Manager (in
  the client) drives autopilot vehicles through ordinary control batches.
* Sensors: ``sensor.camera.rgb`` (a synthetic BGRA horizon picture of the requested size,
  one per frame or per ``sensor_tick``), ``sensor.other.collision`` (vehicle boxes
  overlapping, or the vehicle more than 0.5 m off the road, reported against a
  ``static.road_edge`` actor with id 0), ``sensor.other.obstacle`` (the nearest vehicle
  ahead within ``distance``), ``sensor.other.lane_invasion`` (computed by the client).
* Faults (``--fault``, repeatable): ``never_answer``, ``stop_ticks_after=N``,
  ``stop_world_stream_after=N``, ``stop_camera_after=N``, ``exit_after=N``,
  ``slow_tick=SECONDS``. Tick counts include the tick the client makes inside
  ``apply_settings`` and the ones ``apply_batch_sync(..., True)`` makes.

What is not faked
-----------------
Rendering (images carry no scene), physics beyond the bicycle model (no collisions
response, no suspension, z stays at the spawn height), walkers, traffic lights and signs,
other sensor types (lidar, radar, GNSS, IMU, depth, segmentation), weather effects,
recording/replay, map loading (``load_world`` resets the actors but keeps the one map),
``get_physics_control`` and other vehicle internals. Unsupported calls answer with a
CARLA error, which the client raises as ``RuntimeError``.

Modules: ``rpc`` (msgpack-rpc server), ``streaming`` (stream server and framing), ``wire``
(rpc types and sensor payload layouts), ``world`` (actors, kinematics, sensor events),
``opendrive`` (the map), ``blueprints`` (the actor definitions), ``server`` (RPC handlers,
ticking, faults), ``__main__`` (command line).
"""
