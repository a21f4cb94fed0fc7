"""The fake's one map: a closed "stadium" loop of two roads, as an OpenDRIVE document.

Two straights of ``STRAIGHT`` metres joined by two half circles of radius ``RADIUS``: four
roads (straight, arc, straight, arc), each linked end to start to the next in a ring. (With
two roads, each both predecessor and successor of the other, the client's topology was
right but ``Waypoint.next`` stopped at the end of the first road.)
Each road has one driving lane each way (OpenDRIVE lanes -1 and 1, ``LANE_WIDTH`` wide),
a broken centre line and solid edge lines, so the client's own map code (waypoints,
``next()``, lane invasion) has real lane markings to work with.

The server uses the same geometry (``project``) to tell whether a vehicle is on the road
and to place spawn points. OpenDRIVE is right-handed and CARLA left-handed: a point
(x, y) in the document is (x, -y) in CARLA, and a heading h is a yaw of -h.
"""

import math

STRAIGHT = 200.0
RADIUS = 40.0
LANE_WIDTH = 3.5
LOOP_LENGTH = 2 * STRAIGHT + 2 * math.pi * RADIUS
HALF_WIDTH = LANE_WIDTH  # two lanes of LANE_WIDTH, one each side of the centre line


def _segments():
    """(kind, x0, y0, h0, length, curvature) in document coordinates, in loop order."""
    k = 1.0 / RADIUS
    arc = math.pi * RADIUS
    return [
        ("line", 0.0, 0.0, 0.0, STRAIGHT, 0.0),
        ("arc", STRAIGHT, 0.0, 0.0, arc, k),
        ("line", STRAIGHT, 2 * RADIUS, math.pi, STRAIGHT, 0.0),
        ("arc", 0.0, 2 * RADIUS, math.pi, arc, k),
    ]


def pose(u, t=0.0):
    """Centre-line pose at arc length u along the loop, offset t to the left.
    Returns (x, y, heading) in document coordinates."""
    u %= LOOP_LENGTH
    for kind, x0, y0, h0, length, k in _segments():
        if u <= length:
            if kind == "line":
                x, y, h = x0 + u * math.cos(h0), y0 + u * math.sin(h0), h0
            else:
                h = h0 + k * u
                x = x0 + (math.sin(h) - math.sin(h0)) / k
                y = y0 - (math.cos(h) - math.cos(h0)) / k
            return x - t * math.sin(h), y + t * math.cos(h), h
        u -= length
    raise AssertionError("unreachable")


def project(x, y):
    """Nearest centre-line point of a document-coordinate point: (u, t), u the arc length
    along the loop and t the signed offset to the left of the driving direction."""
    if 0.0 <= x <= STRAIGHT:
        # Either straight: pick the nearer one.
        if abs(y) <= abs(y - 2 * RADIUS):
            return x, y
        return STRAIGHT + math.pi * RADIUS + (STRAIGHT - x), 2 * RADIUS - y
    if x > STRAIGHT:
        theta = math.atan2(y - RADIUS, x - STRAIGHT)  # -pi/2 at the arc's start
        d = math.hypot(x - STRAIGHT, y - RADIUS)
        return STRAIGHT + (theta + math.pi / 2) * RADIUS, RADIUS - d
    theta = math.atan2(y - RADIUS, x) % (2 * math.pi)  # pi/2 at the arc's start
    d = math.hypot(x, y - RADIUS)
    return 2 * STRAIGHT + math.pi * RADIUS + (theta - math.pi / 2) * RADIUS, RADIUS - d


def carla_transform(u, t=0.0, z=0.5, reverse=False):
    """A CARLA transform ((x, y, z), (pitch, yaw, roll)) on the loop."""
    x, y, h = pose(u, t)
    if reverse:
        h += math.pi
    yaw = -math.degrees(h)
    yaw = (yaw + 180.0) % 360.0 - 180.0
    return ((x, -y, z), (0.0, yaw, 0.0))


def lateral_offset(carla_x, carla_y):
    """Signed offset (metres) of a CARLA point from the centre line."""
    return project(carla_x, -carla_y)[1]


def spawn_points(spacing=20.0):
    """Spawn points along both lanes: the right lane (-1, driving along the road) first,
    then the left lane (1, driving against it)."""
    n = int(LOOP_LENGTH // spacing)
    right = [carla_transform(i * spacing + 5.0, -LANE_WIDTH / 2) for i in range(n)]
    left = [carla_transform(i * spacing + 15.0, LANE_WIDTH / 2, reverse=True) for i in range(n)]
    return right + left


def _lane(lane_id, mark_type, lane_change):
    return (
        f'          <lane id="{lane_id}" type="driving" level="false">\n'
        f'            <link><predecessor id="{lane_id}"/><successor id="{lane_id}"/></link>\n'
        f'            <width sOffset="0.0" a="{LANE_WIDTH}" b="0.0" c="0.0" d="0.0"/>\n'
        f'            <roadMark sOffset="0.0" type="{mark_type}" weight="standard" color="standard"'
        f' material="standard" width="0.15" laneChange="{lane_change}"/>\n'
        f'            <speed sOffset="0.0" max="30" unit="km/h"/>\n'
        f"          </lane>\n"
    )


def _road(road_id, previous, following, geom):
    planview = []
    s = 0.0
    for kind, x0, y0, h0, length, k in [geom]:
        inner = "<line/>" if kind == "line" else f'<arc curvature="{k:.12f}"/>'
        planview.append(
            f'        <geometry s="{s:.12f}" x="{x0:.12f}" y="{y0:.12f}" hdg="{h0:.12f}"'
            f' length="{length:.12f}">{inner}</geometry>\n')
        s += length
    return (
        f'  <road name="Loop{road_id}" length="{s:.12f}" id="{road_id}" junction="-1">\n'
        f"    <link>\n"
        f'      <predecessor elementType="road" elementId="{previous}" contactPoint="end"/>\n'
        f'      <successor elementType="road" elementId="{following}" contactPoint="start"/>\n'
        f"    </link>\n"
        f'    <type s="0.0" type="town"><speed max="30" unit="km/h"/></type>\n'
        f"    <planView>\n{''.join(planview)}    </planView>\n"
        f'    <elevationProfile><elevation s="0.0" a="0.0" b="0.0" c="0.0" d="0.0"/></elevationProfile>\n'
        f"    <lateralProfile/>\n"
        f"    <lanes>\n"
        f'      <laneOffset s="0.0" a="0.0" b="0.0" c="0.0" d="0.0"/>\n'
        f'      <laneSection s="0.0">\n'
        f"        <left>\n{_lane(1, 'solid', 'none')}        </left>\n"
        f"        <center>\n"
        f'          <lane id="0" type="none" level="false">\n'
        f'            <roadMark sOffset="0.0" type="broken" weight="standard" color="standard"'
        f' material="standard" width="0.15" laneChange="both"/>\n'
        f"          </lane>\n"
        f"        </center>\n"
        f"        <right>\n{_lane(-1, 'solid', 'none')}        </right>\n"
        f"      </laneSection>\n"
        f"    </lanes>\n"
        f"    <objects/>\n"
        f"    <signals/>\n"
        f"  </road>\n"
    )


def xodr(map_name="Town01"):
    seg = _segments()
    return (
        '<?xml version="1.0" standalone="yes"?>\n'
        "<OpenDRIVE>\n"
        f'  <header revMajor="1" revMinor="4" name="{map_name}" version="1.00" date="2025"'
        ' north="0.0" south="0.0" east="0.0" west="0.0" vendor="fakecarla">\n'
        "    <geoReference><![CDATA[+proj=tmerc +lat_0=49 +lon_0=8 +k=1 +x_0=0 +y_0=0"
        " +datum=WGS84 +units=m +geoidgrids=egm96_15.gtx +vunits=m +no_defs ]]></geoReference>\n"
        "  </header>\n"
        + "".join(_road(i + 1, (i - 1) % 4 + 1, (i + 1) % 4 + 1, g) for i, g in enumerate(seg))
        + "</OpenDRIVE>\n"
    )
