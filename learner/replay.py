"""Replay that stores each frame once, in memory-mapped files, and survives the learner's death.

The buffer is one ring of *entries*. An entry is either an episode start (its
first frame) or a transition (action, reward, terminated, truncated, and the
frame after the step). Entries of one worker incarnation form a *stream*, linked
by ``prev``/``next`` serial numbers (a serial counts entries ever written; the
slot is ``serial % capacity``). Every slot also stores the serial of the entry it
holds, so an entry is alive only while its slot still proves to hold it: within
the last ``capacity`` serials *and* ``serials[slot] == serial``. That keeps a
reopened replay honest after a crash: entries written after the last index save
may have overwritten slots the index still counts, and those slots then hold
another serial and are never served as the entry the index names. Frame stacks and n-step returns are rebuilt at sample time by
walking those links, so they never cross an episode start (``prev`` is -1
there) or the write cursor (``next`` only points at entries already written).

The arrays live in ``replay/*.npy`` memory maps; ``replay/index.json`` (written
atomically) records how many entries are valid and the stream table. A learner
killed with SIGKILL reopens the maps and the index and loses only what arrived
after the index was last written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.exits import FatalError
from protocol.files import atomic_write

FIRST, TERMINATED, TRUNCATED, ORPHAN = 1, 2, 4, 8


@dataclass
class Batch:
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray  # n-step discounted sum
    discount: np.ndarray  # gamma^m, 0 where the chain hit a terminal
    next_obs: np.ndarray
    age: np.ndarray  # entries written since each sampled transition
    augmented: bool = False  # frames already randomly shifted (on the host, by the sampler thread)

    def shift_on_host(self, pad: int, rng: np.random.Generator) -> "Batch":
        """Randomly shift obs and next_obs (uint8, on the host) and mark the batch augmented."""
        self.obs = host_random_shift(self.obs, pad, rng)
        self.next_obs = host_random_shift(self.next_obs, pad, rng)
        self.augmented = True
        return self


@dataclass
class Draw:
    """A sample named by slots: what :meth:`ReplayBuffer.draw` hands over instead of frames (kilobytes)."""
    obs_slots: np.ndarray  # (N, k) int64: the frames of each observation's stack, oldest first
    next_slots: np.ndarray  # (N, k): the n-step next observation's
    action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    age: np.ndarray
    total: int  # the replay's total when drawn: its frames are those of the writes before it
    augmented: bool = False


def host_random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """DrQ's random shift on uint8 (N, C, H, W) arrays: replicate-pad, then crop at a random offset per image."""
    n, _, h, w = frames.shape
    padded = np.pad(frames, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W)
    oy = rng.integers(0, 2 * pad + 1, n)
    ox = rng.integers(0, 2 * pad + 1, n)
    return np.ascontiguousarray(windows[np.arange(n), :, oy, ox])


class Stream:
    __slots__ = ("last", "seq", "transitions", "lost")

    def __init__(self, last: int = -1, seq: int = -1, transitions: int = 0, lost: int = 0):
        self.last, self.seq, self.transitions, self.lost = last, seq, transitions, lost


class ReplayBuffer:
    """A memory-mapped ring of single frames with per-stream links."""

    def __init__(self, directory: Path, capacity: int, frame_shape: tuple, frame_dtype, action_dim: int,
                 fallback_index: dict | None = None):
        """``fallback_index``: the index saved with the checkpoint, used when ``index.json`` is missing (moved
        away as corrupt): entries written after it are dropped, nothing else."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index_lock = threading.Lock()  # index.json's writers (intake, checkpoints); the sampler never takes it
        self._index_written = -1  # the total of the newest index written
        self.capacity = int(capacity)
        self.frame_shape = tuple(frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self.action_dim = int(action_dim)
        meta = {"capacity": self.capacity, "frame_shape": list(self.frame_shape),
                "frame_dtype": self.frame_dtype.str, "action_dim": self.action_dim}
        meta_path = self.dir / "meta.json"
        fresh = not meta_path.exists()
        if not fresh:
            found = self._read_json(meta_path, "move the replay directory away to start with an empty replay")
            if found != meta:
                raise FatalError(f"replay in {self.dir} was made for {found}, but the run now needs {meta}; "
                                 "move it away to start with an empty replay")
        mode = "w+" if fresh else "r+"
        n = self.capacity
        self.frames = self._map("frames", mode, (n,) + self.frame_shape, self.frame_dtype)
        self.actions = self._map("actions", mode, (n, self.action_dim), np.float32)
        self.rewards = self._map("rewards", mode, (n,), np.float32)
        self.flags = self._map("flags", mode, (n,), np.uint8)
        self.prev = self._map("prev", mode, (n,), np.int64)
        self.next = self._map("next", mode, (n,), np.int64)
        older = not fresh and not (self.dir / "serials.npy").exists()  # a replay from before per-slot serials
        self.serials = self._map("serials", "w+" if fresh or older else mode, (n,), np.int64)
        if fresh or older:
            self.serials[:] = -1
        self.total = 0
        self.streams: dict[str, Stream] = {}
        self.transitions_total = 0
        if fresh:
            atomic_write(meta_path, json.dumps(meta))
        else:
            self._load_index(fallback_index)
            if older:  # trust its index, as it was trusted before
                held = np.arange(max(0, self.total - n), self.total)
                self.serials[held % n] = held

    def _map(self, name: str, mode: str, shape: tuple, dtype) -> np.memmap:
        path = self.dir / f"{name}.npy"
        if mode != "w+" and not path.exists():
            raise FatalError(f"{path} is missing from the replay; move the replay directory {self.dir} away to "
                             "start with an empty replay (the model is kept)")
        try:
            arr = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)
        except ValueError as exc:  # a torn or foreign .npy header
            raise FatalError(f"{path} is corrupt ({str(exc)[:80]}); move the replay directory {self.dir} away to "
                             "start with an empty replay (the model is kept)") from None
        if mode == "w+":
            # Reserve the space now: a sparse map written on a full disk kills the process with SIGBUS.
            try:
                with open(path, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    del arr
                    for made in self.dir.glob("*.npy"):  # what was reserved goes back: the disk is not left full
                        made.unlink(missing_ok=True)
                    free = shutil.disk_usage(self.dir).free
                    raise FatalError(f"no space for the replay in {self.dir}: it needs "
                                     f"{self.capacity * self.bytes_per_entry() / 2**30:.2f} GiB, the volume has "
                                     f"{free / 2**30:.2f} GiB free; free space or lower learner.replay_capacity") \
                        from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: sparse then
                    raise
        if shape[0] and arr.shape != shape:
            raise FatalError(f"{path} holds shape {arr.shape}, expected {shape}; move the replay directory "
                             f"{self.dir} away to start with an empty replay")
        return arr

    # -- bookkeeping ---------------------------------------------------------

    @property
    def size(self) -> int:
        return min(self.total, self.capacity)

    def alive(self, serial: np.ndarray | int, total: int | None = None):
        """Entries that are still stored: recent enough, and their slot proves it holds them."""
        total = self.total if total is None else total
        serial = np.asarray(serial)
        in_range = (serial >= 0) & (serial >= total - self.capacity) & (serial < total)
        held = self.serials[np.where(in_range, serial, 0) % self.capacity] == serial
        return in_range & held

    def bytes_per_entry(self) -> int:
        return int(self.frame_dtype.itemsize * np.prod(self.frame_shape) + 4 * self.action_dim + 4 + 1 + 8 + 8 + 8)

    def index(self) -> dict:
        return {"total": self.total, "transitions_total": self.transitions_total,
                "streams": {k: [s.last, s.seq, s.transitions, s.lost] for k, s in self.streams.items()}}

    def save_index(self, fsync: bool = False, index: dict | None = None) -> None:
        """``index.json``, atomic; without fsync after each batch (that guards against a killed learner, not a dead
        host). ``index``: a snapshot the caller took under the replay's lock, so that the write holds no lock the
        sampler waits for. The intake's writes and a checkpoint's race: an older index never replaces a newer one
        (the newer, already there, is fsynced instead where ``fsync`` asks for it)."""
        index = self.index() if index is None else index
        path = self.dir / "index.json"
        with self._index_lock:
            if index["total"] < self._index_written:
                if fsync:
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
                return
            atomic_write(path, json.dumps(index), fsync=fsync)
            self._index_written = index["total"]

    def flush(self, lock=None) -> dict:
        """The maps and the index to disk, fsynced: what a checkpoint promises survives a host crash too; returns
        the index flushed. ``lock``: the replay's lock, held only to take the index: the msyncs and the fsync go
        without it, so sampling and intake go on meanwhile (entries written during the flush are past the index:
        the serials keep any that did not reach the disk from ever being served)."""
        if lock is None:
            index = self.index()
        else:
            with lock:
                index = self.index()
        for arr in (self.frames, self.actions, self.rewards, self.flags, self.prev, self.next, self.serials):
            arr.flush()
        self.save_index(fsync=True, index=index)
        return index

    def _read_json(self, path: Path, choices: str) -> dict:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            return data
        except (ValueError, UnicodeDecodeError) as exc:
            raise FatalError(f"{path} is corrupt ({type(exc).__name__}); {choices}") from None

    def _load_index(self, fallback: dict | None = None) -> None:
        path = self.dir / "index.json"
        if path.exists():
            idx = self._read_json(path, f"move it away to resume with the replay index saved in the latest "
                                       f"checkpoint, or move {self.dir} away to start with an empty replay")
        elif fallback:
            idx, path = fallback, Path("the replay index saved in the checkpoint")
        else:
            return
        try:
            total = int(idx["total"])
            transitions = int(idx.get("transitions_total", 0))
            streams = {str(k): Stream(*map(int, v)) for k, v in idx["streams"].items()}
            if total < 0 or transitions < 0:
                raise ValueError("negative counts")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FatalError(f"{path} is corrupt ({type(exc).__name__}: {exc}); move it away to resume with the "
                             "replay index saved in the latest checkpoint") from None
        self.total, self.transitions_total, self.streams = total, transitions, streams
        # entries written after the index are lost: unlink anything that points at them
        self.next[self.next >= self.total] = -1

    # -- writing -------------------------------------------------------------

    def add_batch(self, stream_key: str, seq: int, first, frames, actions, rewards, terminated, truncated,
                  worker_env_steps: int | None = None) -> int:
        """Append one batch of a stream; returns how many of the stream's transitions were lost before it."""
        st = self.streams.get(stream_key)
        if st is None:
            st = self.streams[stream_key] = Stream()
        lost = 0
        if seq <= st.seq:
            return 0  # a duplicate (resent after a learner restart): already stored
        gap = seq != st.seq + 1
        n = len(first)
        transitions = int(n - np.count_nonzero(first))
        if gap and worker_env_steps is not None:
            lost = max(0, worker_env_steps - transitions - st.transitions)
        for i in range(n):
            serial = self.total
            slot = serial % self.capacity
            flag = ((FIRST if first[i] else 0) | (TERMINATED if terminated[i] else 0)
                    | (TRUNCATED if truncated[i] else 0))
            prev = st.last if (not first[i] and not gap and st.last >= 0) else -1
            # alive *after* this write: the slot being overwritten (serial - capacity) is no predecessor
            if prev >= 0 and not self.alive(prev, total=serial + 1):
                prev = -1
            if not first[i] and prev < 0:
                flag |= ORPHAN  # its predecessor is lost: a state to start from, not a transition
            self.frames[slot] = frames[i]
            self.actions[slot] = actions[i]
            self.rewards[slot] = rewards[i]
            self.flags[slot] = flag
            self.prev[slot] = prev
            self.next[slot] = -1
            self.serials[slot] = serial
            if prev >= 0:
                self.next[prev % self.capacity] = serial
            st.last = serial
            gap = False
            self.total += 1
        st.seq = seq
        st.transitions += transitions + lost
        st.lost += lost
        self.transitions_total += transitions
        return lost

    # -- reading -------------------------------------------------------------

    def stack_slots(self, slots: np.ndarray, k: int) -> np.ndarray:
        """The slots of the frame stacks ending at ``slots``, oldest first, as (N, k): earlier frames of the same
        episode, the episode's first one repeated where the stack reaches before it."""
        cols = [slots]
        cur = slots
        for _ in range(k - 1):
            p = self.prev[cur]
            cur = np.where(self.alive(p), p % self.capacity, cur)
            cols.append(cur)
        cols.reverse()
        return np.stack(cols, axis=1)

    def stack(self, slots: np.ndarray, k: int) -> np.ndarray:
        """Frame stacks ending at ``slots``, (N, k * C, H, W): the frames of :meth:`stack_slots`."""
        return gather_stacks(self.frames, self.stack_slots(slots, k))

    def sampleable(self) -> int:
        return self.transitions_total

    def sample(self, batch_size: int, k: int, n_step: int, gamma: float, rng: np.random.Generator) -> Batch:
        """Uniform over stored transitions, their frames gathered on the host (see :meth:`draw`)."""
        d = self.draw(batch_size, k, n_step, gamma, rng)
        return Batch(obs=gather_stacks(self.frames, d.obs_slots), action=d.action, reward=d.reward,
                     discount=d.discount, next_obs=gather_stacks(self.frames, d.next_slots), age=d.age)

    def draw(self, batch_size: int, k: int, n_step: int, gamma: float, rng: np.random.Generator) -> "Draw":
        """Uniform over stored transitions; n-step targets stop at terminals and stream ends. The frames are named
        by their slots, not copied: whoever gathers them must do so before those slots are written again (before
        the replay's total passes ``Draw.total + capacity - age``: :class:`learner.frames.DeviceFrames` applies
        writes only up to the total of the draw it gathers for)."""
        if self.total < 2:
            raise RuntimeError("replay holds no transition yet")
        lo = max(0, self.total - self.capacity)
        chosen = np.empty(0, np.int64)
        for _ in range(100):
            cand = rng.integers(lo, self.total, size=2 * batch_size)
            # a stored entry with a stored successor: a transition starts here
            cand = cand[self.alive(cand) & self.alive(self.next[cand % self.capacity])]
            chosen = np.concatenate([chosen, cand])[:batch_size]
            if len(chosen) == batch_size:
                break
        else:
            raise RuntimeError("replay has too few transitions to sample from")
        start = chosen % self.capacity
        step = self.next[start] % self.capacity
        action = self.actions[step]
        reward = np.zeros(batch_size, np.float32)
        discount = np.ones(batch_size, np.float32)
        running = np.ones(batch_size, bool)
        last = step.copy()
        for m in range(n_step):
            reward += np.where(running, discount * self.rewards[step], 0.0).astype(np.float32)
            discount = np.where(running, discount * gamma, discount)
            last = np.where(running, step, last)
            terminal = (self.flags[step] & TERMINATED) != 0
            discount = np.where(running & terminal, 0.0, discount)
            running &= ~terminal
            if m + 1 < n_step:
                nxt = self.next[step]
                running &= self.alive(nxt)
                step = np.where(running, nxt % self.capacity, step)
        return Draw(obs_slots=self.stack_slots(start, k), next_slots=self.stack_slots(last, k),
                    action=np.asarray(action), reward=reward, discount=discount.astype(np.float32),
                    age=(self.total - chosen).astype(np.int64), total=self.total)


def gather_stacks(frames, slots: np.ndarray) -> np.ndarray:
    """Frames at (N, k) ``slots`` as (N, k * C, H, W) stacks: one gather on the host."""
    n, k = slots.shape
    return frames[slots.reshape(-1)].reshape((n, k * frames.shape[1]) + frames.shape[2:])
