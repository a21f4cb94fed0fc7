"""Which CARLA server each worker slot talks to: the same answer for the supervisor and the worker."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.config import Config

# Exit codes a worker of the carla backend uses to ask the supervisor for its simulator's replacement:
# the simulator stopped answering (a tick or a sensor timed out, the connection was lost), or it has
# served its share of episodes and is due for a fresh start (CARLA leaks memory over long runs).
EXIT_SIMULATOR_STALLED = 76
EXIT_SIMULATOR_RECYCLE = 75


class SimulatorStalled(RuntimeError):
    """The simulator stopped answering: a tick or a sensor timed out, or the connection was lost.

    A worker raising it ends with ``EXIT_SIMULATOR_STALLED``.
    """


@dataclass(frozen=True)
class SlotServer:
    host: str
    rpc_port: int  # CARLA's -carla-rpc-port
    streaming_port: int  # -carla-streaming-port
    secondary_port: int  # -carla-primary-port (multi-GPU)
    tm_port: int  # the Traffic Manager the slot's worker runs

    @property
    def ports(self) -> dict[str, int]:
        return {"rpc": self.rpc_port, "streaming": self.streaming_port, "secondary": self.secondary_port,
                "traffic manager": self.tm_port}


def slot_server(cfg: Config, slot: int) -> SlotServer:
    sims = cfg.simulators
    tm_port = sims.tm_base_port + slot
    if sims.mode == "external":
        host, _, port = sims.external[slot].rpartition(":")
        return SlotServer(host, int(port), int(port) + 1, int(port) + 2, tm_port)
    rpc = sims.base_port + slot * sims.port_stride
    return SlotServer(sims.host, rpc, rpc + 1, rpc + 2, tm_port)
