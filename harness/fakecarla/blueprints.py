"""The blueprint library the fake offers: a few vehicles and four sensors.

Each entry becomes an rpc::ActorDefinition. ``role_name`` is modifiable everywhere so
``bp.set_attribute('role_name', ...)`` works as with the real server.
"""

from . import wire
from .wire import ATTR_BOOL, ATTR_FLOAT, ATTR_INT, ATTR_RGBCOLOR, ATTR_STRING

# type id -> (bounding-box half extents in metres, number of wheels, base type, special type)
VEHICLES = {
    "vehicle.tesla.model3": ((2.40, 1.08, 0.76), 4, "car", ""),
    "vehicle.audi.a2": ((1.85, 0.90, 0.77), 4, "car", ""),
    "vehicle.lincoln.mkz_2020": ((2.45, 1.06, 0.76), 4, "car", ""),
    "vehicle.toyota.prius": ((2.27, 1.01, 0.76), 4, "car", ""),
    "vehicle.carlamotors.carlacola": ((2.60, 1.28, 1.27), 4, "truck", ""),
}

SENSORS = ("sensor.camera.rgb", "sensor.other.collision", "sensor.other.lane_invasion",
           "sensor.other.obstacle")

# rpc::ActorDescription ids are uids into this list (1-based).
_ORDER = list(VEHICLES) + list(SENSORS)


def uid_of(type_id):
    return _ORDER.index(type_id) + 1 if type_id in _ORDER else 0


def _role():
    return wire.actor_attribute("role_name", ATTR_STRING, "autopilot",
                                ["autopilot", "scenario", "ego"], True)


def _vehicle(type_id):
    extent, wheels, base_type, special = VEHICLES[type_id]
    return wire.actor_definition(uid_of(type_id), type_id, "vehicle," + base_type, [
        _role(),
        wire.actor_attribute("color", ATTR_RGBCOLOR, "17,37,103", ["17,37,103", "255,255,255"]),
        wire.actor_attribute("sticky_control", ATTR_BOOL, "true", ["true", "false"]),
        wire.actor_attribute("terramechanics", ATTR_BOOL, "false", ["true", "false"]),
        wire.actor_attribute("number_of_wheels", ATTR_INT, str(wheels), [], False),
        wire.actor_attribute("base_type", ATTR_STRING, base_type, [], False),
        wire.actor_attribute("special_type", ATTR_STRING, special, [], False),
        wire.actor_attribute("has_dynamic_doors", ATTR_BOOL, "false", [], False),
        wire.actor_attribute("has_lights", ATTR_BOOL, "true", [], False),
        wire.actor_attribute("generation", ATTR_INT, "2", [], False),
        wire.actor_attribute("object_type", ATTR_STRING, "", [], False),
    ])


def _sensor(type_id):
    attrs = [_role(), wire.actor_attribute("sensor_tick", ATTR_FLOAT, "0.0")]
    if type_id == "sensor.camera.rgb":
        attrs += [
            wire.actor_attribute("image_size_x", ATTR_INT, "800"),
            wire.actor_attribute("image_size_y", ATTR_INT, "600"),
            wire.actor_attribute("fov", ATTR_FLOAT, "90.0"),
            wire.actor_attribute("gamma", ATTR_FLOAT, "2.2"),
            wire.actor_attribute("enable_postprocess_effects", ATTR_BOOL, "true"),
        ]
    elif type_id == "sensor.other.obstacle":
        attrs += [
            wire.actor_attribute("distance", ATTR_FLOAT, "5"),
            wire.actor_attribute("hit_radius", ATTR_FLOAT, "0.5"),
            wire.actor_attribute("only_dynamics", ATTR_BOOL, "false"),
            wire.actor_attribute("debug_linetrace", ATTR_BOOL, "false"),
        ]
    tags = "sensor," + type_id.split(".")[1] + "," + type_id.split(".")[2]
    return wire.actor_definition(uid_of(type_id), type_id, tags, attrs)


def definitions():
    return [_vehicle(t) for t in VEHICLES] + [_sensor(t) for t in SENSORS]


def extent_of(type_id):
    if type_id in VEHICLES:
        return VEHICLES[type_id][0]
    return (0.0, 0.0, 0.0)
