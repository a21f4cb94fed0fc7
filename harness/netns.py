"""A second host on this machine for the tests: a network namespace joined to this one by a veth pair, each end
with a private address of its own (10.213.N.1 here, 10.213.N.2 there), removed with everything in it afterwards.
Traffic goes only between those two addresses. Needs root and iproute2 (`ip`); where a namespace cannot be made,
:class:`OtherHost` raises with the reason (a test fails, it does not skip)."""

from __future__ import annotations

import os
import random
import subprocess


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


class OtherHost:
    def __init__(self):
        n = random.randrange(1, 250)
        tag = f"{os.getpid() % 10000}{n}"
        self.name = f"rlstack-{tag}"
        self.here_dev, self.there_dev = f"rlh{tag}"[:15], f"rlt{tag}"[:15]
        self.here, self.there = f"10.213.{n}.1", f"10.213.{n}.2"
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.here_dev, "type", "veth", "peer", "name", self.there_dev)
            _ip("link", "set", self.there_dev, "netns", self.name)
            _ip("addr", "add", f"{self.here}/30", "dev", self.here_dev)
            _ip("link", "set", self.here_dev, "up")
            for args in (("addr", "add", f"{self.there}/30", "dev", self.there_dev),
                         ("link", "set", self.there_dev, "up"), ("link", "set", "lo", "up")):
                _ip("netns", "exec", self.name, "ip", *args)
        except (RuntimeError, OSError) as exc:
            self.remove()
            raise RuntimeError(f"a network namespace for a second host could not be made (root and iproute2 are "
                               f"needed): {exc}") from None

    def alias(self) -> str:
        """A second address of this host (10.213.N.5), reached from the other host over the same link: a service
        bound to it can be cut off from the other host alone (:meth:`block`) while the link stays up."""
        address = self.here.rsplit(".", 1)[0] + ".5"
        _ip("addr", "add", f"{address}/32", "dev", self.here_dev)
        _ip("netns", "exec", self.name, "ip", "route", "add", f"{address}/32", "dev", self.there_dev)
        return address

    def block(self, address: str) -> None:
        """Nothing the other host sends to ``address`` leaves it (a blackhole route there); the rest flows."""
        _ip("netns", "exec", self.name, "ip", "route", "replace", "blackhole", f"{address}/32")

    def unblock(self, address: str) -> None:
        _ip("netns", "exec", self.name, "ip", "route", "replace", f"{address}/32", "dev", self.there_dev)

    @property
    def prefix(self) -> list[str]:
        """Run a command on the other host: ``[*host.prefix, cmd, ...]``."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """The link down: nothing passes between the hosts (both keep their addresses)."""
        _ip("link", "set", self.here_dev, "down")

    def mend(self) -> None:
        _ip("link", "set", self.here_dev, "up")

    @staticmethod
    def tcp_peers(pid: int) -> set[int]:
        """The remote ports of ``pid``'s established TCP connections, read in its own network namespace (its
        /proc/PID/net; psutil reads this one's)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = set()
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED, one of its sockets
                        ports.add(int(cols[2].rsplit(":", 1)[1], 16))
        return ports

    def pids(self) -> list[int]:
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def remove(self) -> list[int]:
        """Kill whatever still runs there, then remove the namespace and its link; returns the pids killed."""
        left = self.pids()
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _ip("link", "del", self.here_dev, check=False)  # its addresses go with it
        _ip("netns", "del", self.name, check=False)
        return left
