"""``python3 -m fakecarla [CARLA-style flags] [--fault F ...] [--faults-from FILE] [--map NAME]``."""

import logging
import os
import signal
import sys

from .server import FakeCarla, Faults


def parse_args(argv):
    """CARLA's own flags look like ``-carla-rpc-port=2000``; the fake's own options are
    ``--fault SPEC`` (repeatable), ``--faults-from FILE`` (this start's faults: the file's first line,
    space-separated, taken out of it, so that a restarter starts each server with the next line's), ``--map NAME``
    and ``--log-level LEVEL``. Anything else (``-RenderOffScreen``, ``-nosound``, ``-quality-level=Low``, ...) is
    ignored."""
    opts = {"rpc_port": 2000, "stream_port": None, "faults": [], "map": "Town01",
            "log_level": "WARNING"}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        key = name.lstrip("-").lower()
        if key == "carla-rpc-port":
            opts["rpc_port"] = int(value)
        elif key in ("carla-streaming-port", "carla-stream-port"):
            opts["stream_port"] = int(value)
        elif key in ("fault", "faults-from", "map", "log-level"):
            value = value if eq else next(it, "")
            if key == "fault":
                opts["faults"].append(value)
            elif key == "faults-from":
                opts["faults"] += take_line(value).split()
            else:
                opts[key.replace("-", "_")] = value
        # -carla-primary-port and anything unknown: accepted and ignored
    if opts["stream_port"] == 0 or opts["stream_port"] is None:
        opts["stream_port"] = opts["rpc_port"] + 1
    return opts


def take_line(path: str) -> str:
    """The file's first line, taken out of it ("" once it is empty)."""
    with open(path, "r+") as f:
        lines = f.read().splitlines()
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in lines[1:]))
    return lines[0] if lines else ""


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=opts["log_level"].upper(), stream=sys.stderr,
                        format="fakecarla %(levelname)s %(name)s: %(message)s")
    server = FakeCarla(opts["rpc_port"], opts["stream_port"], opts["map"], Faults(opts["faults"]))
    signal.signal(signal.SIGTERM, lambda *_: server.stopped.set())
    signal.signal(signal.SIGINT, lambda *_: server.stopped.set())
    server.start()
    print(f"fakecarla {opts['map']} listening on 127.0.0.1:{server.rpc_port} "
          f"(streaming {server.stream_port}) pid {os.getpid()}", flush=True)
    while not server.stopped.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
