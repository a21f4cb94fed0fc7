"""The replay's frames where the update reads them: on a GPU, a copy in device memory kept current in order.

The memory-mapped replay stays the durable store (crash recovery, serials and
wrap-around are :mod:`learner.replay`'s). On a GPU the learner keeps a copy of
the frames array in device memory: filled from the map at start, then kept
current from the receive thread's batches, each staged in pinned memory as it is
stored and applied on the update thread, in the order written, **up to the total
of the draw about to be gathered**. So every frame a draw names is there, and no
slot it names is overwritten before its update reads it: writes past its total
wait for a later draw (or for a moment no draw is outstanding). The sampler then
hands over slots, actions, rewards and discounts (kilobytes, not the megabytes
of frames), and an update's stacks are one gather on the device.

On a CPU there is no copy: the sampler thread gathers from the map itself.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

from learner.replay import Draw
from protocol.exits import FatalError

# The share of the device's free memory the frames may take at start; the rest is the model's and the updates'.
DEVICE_SHARE = 0.75
FILL_CHUNK_BYTES = 256 * 2**20  # the map is copied to the device this much at a time


class HostToDevice:
    """The one gate through which an update's inputs go from the host to the device: counted, so a test can hold
    an update to its budget of bytes (kilobytes once the frames live on the device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self.bytes = 0
        self.copies = 0

    def copy(self, array: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
        """``array`` on the device; ``into``: written into that tensor (a CUDA graph's input) instead of a new one."""
        array = np.ascontiguousarray(array)
        self.bytes += array.nbytes
        self.copies += 1
        t = torch.from_numpy(array)
        if self.pin:
            t = t.pin_memory()
        if into is not None:
            return into.copy_(t.view_as(into), non_blocking=self.pin)
        return t.to(self.device, non_blocking=self.pin)


class DeviceFrames:
    """A copy of a replay's frames on ``device``, current up to the draw being gathered."""

    def __init__(self, replay, device: torch.device, copies: HostToDevice, free_bytes: int | None = None):
        """``free_bytes``: the device memory free for it (on CUDA, asked of the device when not given); a capacity
        whose frames do not fit in :data:`DEVICE_SHARE` of it is refused."""
        self.replay = replay
        self.device = device
        self.copies = copies
        src = replay.frames
        need = src.nbytes
        if free_bytes is None and device.type == "cuda":
            free_bytes = torch.cuda.mem_get_info(device)[0]
        if free_bytes is not None and need > DEVICE_SHARE * free_bytes:
            raise FatalError(f"learner.replay_capacity {replay.capacity} needs {need / 2**20:,.1f} MiB of frames on "
                             f"{device}, which has {free_bytes / 2**20:,.1f} MiB free ({DEVICE_SHARE:.0%} of it may "
                             "hold frames); lower learner.replay_capacity, or set learner.frames: host")
        self.frames = torch.empty(src.shape, dtype=torch.from_numpy(src[:0]).dtype, device=device)
        rows = max(1, FILL_CHUNK_BYTES // max(1, src[:1].nbytes))
        for lo in range(0, len(src), rows):
            self.frames[lo:lo + rows].copy_(torch.from_numpy(np.asarray(src[lo:lo + rows])))
        self.applied = replay.total  # every write before this serial is in the copy
        self.staged: collections.deque = collections.deque()  # (first serial, frames) in serial order
        self.staged_bytes = 0  # frames copied to the device after the fill (each stored frame once)

    def stage(self, first_serial: int, frames: np.ndarray) -> None:
        """The frames just stored at ``first_serial`` onwards (the receive thread, under the replay's lock)."""
        t = torch.empty(frames.shape, dtype=self.frames.dtype, pin_memory=self.device.type == "cuda")
        t.numpy()[:] = frames  # one copy, out of the message's buffer
        self.staged.append((first_serial, t))

    def apply(self, upto: int) -> None:
        """Write the staged frames of serials before ``upto`` into the copy, in order (the update thread)."""
        cap = self.replay.capacity
        while self.staged and self.staged[0][0] < upto:
            first, frames = self.staged[0]
            n = min(len(frames), upto - first)
            done = 0
            while done < n:  # at most two runs: the ring may wrap inside a batch
                slot = (first + done) % cap
                run = min(n - done, cap - slot)
                self.frames[slot:slot + run].copy_(frames[done:done + run], non_blocking=True)
                done += run
            self.staged_bytes += frames[:n].nbytes
            if n == len(frames):
                self.staged.popleft()
            else:
                self.staged[0] = (first + n, frames[n:])
            self.applied = first + n

    def stacks(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """The draw's observations and next observations, (N, k * C, H, W) on the device: the copy brought up to
        the draw's total, then one gather (the slots are the only bytes that cross)."""
        self.ready_for(draw)
        return self.gather(self.copies.copy(self.slots(draw)), *draw.obs_slots.shape)

    def ready_for(self, draw: Draw) -> None:
        """Apply the writes before the draw's total; refuse a draw older than writes already applied."""
        if draw.total < self.applied:  # the copy already holds writes the draw's slots may not survive
            raise RuntimeError(f"a draw at total {draw.total} gathered after writes up to {self.applied} were "
                               "applied: its frames may be overwritten")
        self.apply(draw.total)

    def slots(self, draw: Draw) -> np.ndarray:
        """The slots of the draw's observations then its next observations, flat, as the gather takes them."""
        dtype = np.int32 if self.replay.capacity < 2**31 else np.int64
        return np.concatenate([draw.obs_slots, draw.next_slots]).astype(dtype).reshape(-1)

    def gather(self, idx: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacks of ``k`` frames at ``idx`` (from :meth:`slots`, on the device) for ``n`` observations and ``n``
        next observations: one ``index_select``, nothing read on the host."""
        both = self.frames.index_select(0, idx)
        both = both.reshape((2 * n, k * self.frames.shape[1]) + tuple(self.frames.shape[2:]))
        return both[:n], both[n:]
