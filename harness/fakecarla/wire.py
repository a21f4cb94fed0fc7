"""Serialization: the msgpack shapes of LibCarla's rpc types and the binary layouts of
the streamed sensor payloads, as the carla==0.9.16 client expects them.

Everything here is a pure function from plain Python values to msgpack-ready values or
bytes; nothing here knows about sockets or the simulation.
"""

import struct

# --- rpc::Response<T> -------------------------------------------------------------------
# Response<T> is MSGPACK_DEFINE_ARRAY(variant<ResponseError, T>), the variant packed as
# [index, value]; Response<void> is MSGPACK_DEFINE_ARRAY(optional<ResponseError>).


def ok(value):
    return [[1, value]]


def ok_void():
    return [[False]]


def error(message):
    return [[0, [message]]]


def error_void(message):
    return [[True, [message]]]


def optional(value):
    """boost::optional as CARLA packs it: [False] or [True, value]."""
    return [False] if value is None else [True, value]


# --- geometry ----------------------------------------------------------------------------


def vec3(x=0.0, y=0.0, z=0.0):
    return [float(x), float(y), float(z)]


def transform(t):
    """t: ((x, y, z), (pitch, yaw, roll))."""
    (x, y, z), (p, yw, r) = t
    return [vec3(x, y, z), vec3(p, yw, r)]


def parse_transform(obj):
    (x, y, z), (p, yw, r) = obj
    return ((float(x), float(y), float(z)), (float(p), float(yw), float(r)))


def bounding_box(extent, location=(0.0, 0.0, 0.0)):
    # geom::BoundingBox: MSGPACK_DEFINE_ARRAY(location, extent, rotation)
    return [vec3(*location), vec3(*extent), vec3(0.0, 0.0, 0.0)]


# --- actor attributes and descriptions ----------------------------------------------------

# rpc::ActorAttributeType as the 0.9.16 wheel numbers it (carla.ActorAttributeType.Bool is
# 1 there, although the wheel's own .pyi stub says 0).
ATTR_BOOL, ATTR_INT, ATTR_FLOAT, ATTR_STRING, ATTR_RGBCOLOR = range(1, 6)


def actor_attribute(attr_id, attr_type, value, recommended=(), modifiable=True):
    # rpc::ActorAttribute: (id, type, value, recommended_values, is_modifiable,
    # restrict_to_recommended)
    return [attr_id, attr_type, str(value), list(recommended), bool(modifiable), False]


def actor_definition(uid, type_id, tags, attributes):
    # rpc::ActorDefinition: (uid, id, tags, attributes)
    return [uid, type_id, tags, attributes]


def parse_description(obj):
    """rpc::ActorDescription (uid, id, [ActorAttributeValue (id, type, value)])."""
    uid, type_id, attrs = obj[0], obj[1], obj[2]
    return uid, _s(type_id), {_s(a[0]): (a[1], _s(a[2])) for a in attrs}


def description(uid, type_id, attrs):
    return [uid, type_id, [[k, t, v] for k, (t, v) in attrs.items()]]


def actor(actor_id, parent_id, desc, bbox, semantic_tags=b"", token=b""):
    # rpc::Actor: (id, parent_id, description, bounding_box, semantic_tags, stream_token)
    return [actor_id, parent_id, desc, bbox, bytes(semantic_tags), bytes(token)]


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


# --- episode settings -----------------------------------------------------------------------

SETTINGS_FIELDS = (
    "synchronous_mode", "no_rendering_mode", "fixed_delta_seconds", "substepping",
    "max_substep_delta_time", "max_substeps", "max_culling_distance",
    "deterministic_ragdolls", "tile_stream_distance", "actor_active_distance",
    "spectator_as_ego",
)


def default_settings():
    return {
        "synchronous_mode": False, "no_rendering_mode": False, "fixed_delta_seconds": None,
        "substepping": True, "max_substep_delta_time": 0.01, "max_substeps": 10,
        "max_culling_distance": 0.0, "deterministic_ragdolls": True,
        "tile_stream_distance": 3000.0, "actor_active_distance": 2000.0,
        "spectator_as_ego": True,
    }


def settings(s):
    out = []
    for name in SETTINGS_FIELDS:
        v = s[name]
        out.append(optional(v) if name == "fixed_delta_seconds" else v)
    return out


def parse_settings(obj, current):
    s = dict(current)
    for name, v in zip(SETTINGS_FIELDS, obj):
        if name == "fixed_delta_seconds":
            v = float(v[1]) if (isinstance(v, (list, tuple)) and len(v) > 1 and v[0]) else None
        s[name] = v
    return s


# --- streaming tokens -----------------------------------------------------------------------


def token_bytes(stream_id, port, host="127.0.0.1"):
    """streaming::detail::token_data, 24 bytes packed: u32 stream_id, u16 port,
    u8 protocol (1 = tcp), u8 address type (1 = ip v4), 16 bytes of address."""
    addr = bytes(int(p) for p in host.split(".")) + bytes(12)
    return struct.pack("<IHBB", stream_id, port, 1, 1) + addr


def token(stream_id, port):
    """streaming::Token: MSGPACK_DEFINE_ARRAY(data) with data a 24-byte array (bin)."""
    return [token_bytes(stream_id, port)]


def token_stream_id(tok):
    raw = tok[0] if isinstance(tok, (list, tuple)) else tok
    return struct.unpack_from("<I", raw, 0)[0]


# --- streamed sensor data -------------------------------------------------------------------
# Each message: 48-byte header (u64 sensor type index in the client's SensorRegistry,
# u64 frame, f64 timestamp, 6 x f32 sensor transform), then the sensor's own payload.

# Indices of the serializers in the SensorRegistry type list of the 0.9.16 wheel.
SENSOR_TYPE = {
    "collision": 0,
    "camera": 13,
    "obstacle": 7,
    "episode_state": 17,
}

_HEADER = struct.Struct("<QQd6f")


def sensor_header(sensor_type, frame, timestamp, t=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))):
    (x, y, z), (p, yw, r) = t
    return _HEADER.pack(sensor_type, frame, timestamp, x, y, z, p, yw, r)


# EpisodeStateSerializer::Header: u64 episode_id, f64 platform_timestamp, f32 delta_seconds,
# i32 x 3 map_origin, u32 simulation_state.
_EPISODE = struct.Struct("<QdfiiiI")

# sensor::data::ActorDynamicState, packed, 119 bytes:
# u32 id, u8 actor_state, transform (6 f32), velocity, angular velocity, acceleration
# (3 x 3 f32), then a 54-byte union; for vehicles: PackedVehicleControl (3 f32, 3 bool, i32),
# f32 speed_limit, u8 traffic light state, bool has_traffic_light, u32 traffic light id,
# u8 failure state.
_ACTOR_HEAD = struct.Struct("<IB6f9f")
_VEHICLE_DATA = struct.Struct("<3f3?ifB?IB")
ACTOR_STATE_SIZE = 119
_UNION_SIZE = ACTOR_STATE_SIZE - _ACTOR_HEAD.size


def actor_dynamic_state(actor_id, t, velocity=(0.0, 0.0, 0.0), angular=(0.0, 0.0, 0.0),
                        accel=(0.0, 0.0, 0.0), control=None, speed_limit=30.0):
    (x, y, z), (p, yw, r) = t
    head = _ACTOR_HEAD.pack(actor_id, 1, x, y, z, p, yw, r, *velocity, *angular, *accel)
    if control is not None:
        thr, steer, brake, hand_brake, reverse, manual, gear = control
        union = _VEHICLE_DATA.pack(thr, steer, brake, hand_brake, reverse, manual, gear,
                                   speed_limit, 4, False, 0, 0)
    else:
        union = b""
    return head + union.ljust(_UNION_SIZE, b"\0")


def episode_state(episode_id, frame, timestamp, platform_ts, delta, actor_states):
    return (sensor_header(SENSOR_TYPE["episode_state"], frame, timestamp)
            + _EPISODE.pack(episode_id, platform_ts, delta, 0, 0, 0, 0)
            + b"".join(actor_states))


def image_bgra(frame, timestamp, t, width, height, fov, pixels):
    # ImageSerializer::ImageHeader: u32 width, u32 height, f32 fov_angle
    return (sensor_header(SENSOR_TYPE["camera"], frame, timestamp, t)
            + struct.pack("<IIf", width, height, fov) + pixels)
