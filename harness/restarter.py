"""A stand-in for the kubelet of a pod's container: runs a command and starts it again whenever it ends.

``python -m harness.restarter [--delay-s S] -- CMD ...``: each start is a new process (a new pid), as a container
restarted by its kubelet is; SIGTERM ends the restarter and its current child.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-s", type=float, default=0.5, help="wait before each restart (the kubelet's backoff)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    starts = 0
    while not stopping:
        child = subprocess.Popen(command)
        starts += 1
        print(f"restarter: start {starts}: pid {child.pid}", flush=True)
        while child.poll() is None and not stopping:
            time.sleep(0.05)
        if stopping:
            child.kill()
            child.wait()
            break
        time.sleep(args.delay_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
