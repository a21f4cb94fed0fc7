"""The simulated world: actors, simple vehicle kinematics, and the events sensors see.

No networking here. ``World.step(dt)`` advances everything by one frame and returns the
sensor events of that frame; the server turns them into stream messages.

Vehicles follow a kinematic bicycle model driven by the last ``VehicleControl`` applied
(throttle, brake, steer, reverse, hand brake). Vehicles with autopilot on and no control
from a client drive themselves round the loop at a modest speed, keeping their lane.
"""

import math
import time

from . import blueprints, opendrive

MAX_ACCEL = 4.0      # m/s^2 at full throttle
MAX_BRAKE = 9.0      # m/s^2 at full brake
DRAG = 0.02          # 1/s, rolling and air drag as a fraction of speed
MAX_SPEED = 45.0     # m/s
MAX_STEER = math.radians(40.0)
WHEELBASE = 2.9      # m
AUTOPILOT_SPEED = 8.0  # m/s
OFF_ROAD_MARGIN = 0.5  # m past the road edge before the vehicle counts as off the road

STATIC_OFF_ROAD = "static.road_edge"


class Actor:
    def __init__(self, actor_id, type_id, attrs, transform, parent_id=0, uid=0):
        self.id = actor_id
        self.type_id = type_id
        self.uid = uid
        self.attrs = attrs          # name -> (attribute type, value string)
        self.parent_id = parent_id
        self.rel_transform = transform if parent_id else None
        self.transform = transform  # world transform ((x, y, z), (pitch, yaw, roll))
        self.velocity = (0.0, 0.0, 0.0)
        self.angular_velocity = (0.0, 0.0, 0.0)
        self.acceleration = (0.0, 0.0, 0.0)
        self.speed = 0.0            # signed speed along the heading
        self.control = (0.0, 0.0, 0.0, False, False, False, 0)
        self.autopilot = False
        self.controlled = False     # a client applied a control since autopilot was set
        self.listening = False
        self.last_emit = -math.inf  # sim time of the sensor's last message
        self.alive = True

    @property
    def is_vehicle(self):
        return self.type_id.startswith("vehicle.")

    @property
    def is_sensor(self):
        return self.type_id.startswith("sensor.")

    @property
    def extent(self):
        return blueprints.extent_of(self.type_id)

    def attr(self, name, default=None):
        item = self.attrs.get(name)
        return item[1] if item is not None else default


def compose(parent, rel):
    """World transform of a transform rel relative to parent (yaw only is enough here,
    plus pitch/roll added as offsets)."""
    (px, py, pz), (pp, pyaw, pr) = parent
    (rx, ry, rz), (rp, ryaw, rr) = rel
    c, s = math.cos(math.radians(pyaw)), math.sin(math.radians(pyaw))
    return ((px + c * rx - s * ry, py + s * rx + c * ry, pz + rz), (pp + rp, pyaw + ryaw, pr + rr))


def _corners(a):
    (x, y, _), (_, yaw, _) = a.transform
    ex, ey, _ = a.extent
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    return [(x + c * dx - s * dy, y + s * dx + c * dy)
            for dx, dy in ((ex, ey), (ex, -ey), (-ex, -ey), (-ex, ey))]


def _overlap(a, b):
    """Separating-axis test of two vehicles' 2D bounding boxes."""
    pa, pb = _corners(a), _corners(b)
    for poly in (pa, pb):
        for i in range(4):
            x1, y1 = poly[i]
            x2, y2 = poly[(i + 1) % 4]
            nx, ny = y2 - y1, x1 - x2
            da = [nx * x + ny * y for x, y in pa]
            db = [nx * x + ny * y for x, y in pb]
            if max(da) < min(db) or max(db) < min(da):
                return False
    return True


class World:
    def __init__(self, map_name="Town01"):
        self.map_name = map_name
        self.episode_id = 1
        self.frame = 0
        self.sim_time = 0.0
        self.delta = 0.05
        self.actors = {}
        self._next_id = 1
        self.spectator = self.spawn("spectator", {}, ((0.0, 0.0, 50.0), (-90.0, 0.0, 0.0)))

    # -- actors ---------------------------------------------------------------------------

    def spawn(self, type_id, attrs, transform, parent_id=0):
        if parent_id and parent_id not in self.actors:
            raise KeyError(f"parent actor {parent_id} not found")
        if type_id.startswith("vehicle.") and self._blocked(type_id, transform):
            raise ValueError("Spawn failed because of collision at spawn position")
        actor = Actor(self._next_id, type_id, dict(attrs), transform, parent_id,
                      blueprints.uid_of(type_id))
        if parent_id:
            actor.transform = compose(self.actors[parent_id].transform, transform)
        self._next_id += 1
        self.actors[actor.id] = actor
        return actor

    def _blocked(self, type_id, transform):
        probe = Actor(0, type_id, {}, transform)
        return any(a.is_vehicle and _overlap(a, probe) for a in self.actors.values())

    def destroy(self, actor_id):
        actor = self.actors.pop(actor_id, None)
        if actor is None:
            return False
        actor.alive = False
        for child in [a for a in self.actors.values() if a.parent_id == actor_id]:
            self.destroy(child.id)
        return True

    def vehicles(self):
        return [a for a in self.actors.values() if a.is_vehicle]

    # -- stepping -------------------------------------------------------------------------

    def step(self, dt):
        """Advance one frame. Returns (frame, events); events are tuples
        ("collision", sensor, other_actor_or_None, impulse) or ("obstacle", sensor, other,
        distance) for the sensors that are listening."""
        self.frame += 1
        self.delta = dt
        self.sim_time += dt
        for v in self.vehicles():
            self._drive(v, dt)
        for a in self.actors.values():
            if a.parent_id and a.parent_id in self.actors:
                a.transform = compose(self.actors[a.parent_id].transform, a.rel_transform)
                a.velocity = self.actors[a.parent_id].velocity
        return self.frame, self._sensor_events()

    def _drive(self, v, dt):
        if v.autopilot and not v.controlled:
            throttle, steer, brake, reverse, hand_brake = self._autopilot(v)
        else:
            throttle, steer, brake, hand_brake, reverse = v.control[:5]
        throttle = min(max(throttle, 0.0), 1.0)
        brake = min(max(brake, 0.0), 1.0)
        steer = min(max(steer, -1.0), 1.0)
        speed = v.speed
        accel = (-1.0 if reverse else 1.0) * throttle * MAX_ACCEL - DRAG * speed
        stop = brake * MAX_BRAKE + (MAX_BRAKE if hand_brake else 0.0)
        if stop > 0.0 and speed != 0.0:
            accel -= math.copysign(stop, speed)
        new_speed = speed + accel * dt
        if speed != 0.0 and new_speed * speed < 0.0 and (stop > 0.0 or throttle == 0.0):
            new_speed = 0.0  # braking never reverses the car
        new_speed = max(-MAX_SPEED / 3, min(MAX_SPEED, new_speed))
        (x, y, z), (pitch, yaw, roll) = v.transform
        yaw_rate = new_speed / WHEELBASE * math.tan(steer * MAX_STEER)
        yaw_r = math.radians(yaw) + yaw_rate * dt
        x += new_speed * math.cos(yaw_r) * dt
        y += new_speed * math.sin(yaw_r) * dt
        yaw = (math.degrees(yaw_r) + 180.0) % 360.0 - 180.0
        v.transform = ((x, y, z), (pitch, yaw, roll))
        v.acceleration = ((new_speed - speed) / dt * math.cos(yaw_r),
                          (new_speed - speed) / dt * math.sin(yaw_r), 0.0)
        v.velocity = (new_speed * math.cos(yaw_r), new_speed * math.sin(yaw_r), 0.0)
        v.angular_velocity = (0.0, 0.0, math.degrees(yaw_rate))
        v.speed = new_speed

    def _autopilot(self, v):
        """Keep the lane the vehicle is in, at AUTOPILOT_SPEED (a pure-pursuit controller)."""
        (x, y, _), (_, yaw, _) = v.transform
        u, t = opendrive.project(x, -y)
        heading_road = -opendrive.pose(u)[2]  # the road's direction as a CARLA yaw
        along = math.cos(math.radians(yaw) - heading_road) >= 0.0
        lane_t = -opendrive.LANE_WIDTH / 2 if along else opendrive.LANE_WIDTH / 2
        look = 8.0 if along else -8.0
        tx, ty, _ = opendrive.pose(u + look, lane_t)
        ty = -ty
        ang = math.atan2(ty - y, tx - x) - math.radians(yaw)
        ang = (ang + math.pi) % (2 * math.pi) - math.pi
        steer = max(-1.0, min(1.0, ang / MAX_STEER))
        err = AUTOPILOT_SPEED - v.speed
        return (min(1.0, max(0.0, err * 0.5)), steer, min(1.0, max(0.0, -err * 0.5)), False, False)

    def _sensor_events(self):
        events = []
        vehicles = self.vehicles()
        for s in self.actors.values():
            if not (s.is_sensor and s.listening and s.parent_id in self.actors):
                continue
            parent = self.actors[s.parent_id]
            if s.type_id == "sensor.other.collision":
                hit = False
                for other in vehicles:
                    if other.id != parent.id and _overlap(parent, other):
                        rel = [a - b for a, b in zip(parent.velocity, other.velocity)]
                        events.append(("collision", s, other, tuple(-1500.0 * r for r in rel)))
                        hit = True
                (x, y, _), _ = parent.transform
                if not hit and abs(opendrive.lateral_offset(x, y)) > opendrive.HALF_WIDTH + OFF_ROAD_MARGIN:
                    impulse = tuple(-1500.0 * c for c in parent.velocity)
                    events.append(("collision", s, None, impulse))
            elif s.type_id == "sensor.other.obstacle":
                found = self._obstacle(parent, s, vehicles)
                if found is not None:
                    events.append(("obstacle", s, found[0], found[1]))
        return events

    def _obstacle(self, parent, sensor, vehicles):
        distance = float(sensor.attr("distance", "5"))
        radius = float(sensor.attr("hit_radius", "0.5"))
        (x, y, _), (_, yaw, _) = parent.transform
        c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
        best = None
        for other in vehicles:
            if other.id == parent.id:
                continue
            (ox, oy, _), _ = other.transform
            ahead = c * (ox - x) + s * (oy - y)
            side = -s * (ox - x) + c * (oy - y)
            gap = ahead - parent.extent[0] - other.extent[0]
            if ahead > 0 and gap <= distance and abs(side) <= radius + other.extent[1] + parent.extent[1]:
                if best is None or gap < best[1]:
                    best = (other, max(gap, 0.0))
        return best

    def sensor_due(self, sensor):
        """Whether a camera sends an image this frame, given its sensor_tick."""
        tick = float(sensor.attr("sensor_tick", "0.0") or 0.0)
        if self.sim_time - sensor.last_emit + 1e-6 >= tick:
            sensor.last_emit = self.sim_time
            return True
        return False

    @staticmethod
    def platform_time():
        return time.time()
