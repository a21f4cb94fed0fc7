"""The learner's files that outlive it: the run's spaces (``spec.json``) and agent checkpoints.

Every file is written atomically (write, fsync, rename), so a learner killed at
any moment restarts from the last whole checkpoint. The one before it is kept as
``previous.pt``: a checkpoint found corrupt at load (a failing disk, a copy cut
short) is named with the ways on, one of which is resuming from that one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import torch

from protocol.exits import FatalError
from protocol.files import atomic_write

LATEST = "latest"
PREVIOUS = "previous"


def corrupt(path: Path, why: str, choices: str) -> FatalError:
    return FatalError(f"{path} is corrupt ({why}); {choices}")


class Checkpoints:
    def __init__(self, directory: Path, run_id: str = ""):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or self.dir.parent.name

    def load_spec(self) -> dict | None:
        """The run's observation and action spaces, as the first worker's hello gave them."""
        path = self.dir / "spec.json"
        if not path.exists():
            return None
        try:
            spec = json.loads(path.read_text())
            if not isinstance(spec, dict) or not {"frame_shape", "frame_dtype", "action_dim"} <= set(spec):
                raise ValueError("not a spec")
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(path, type(exc).__name__, "move it away; the next worker's hello writes it again") \
                from None
        return spec

    def save_spec(self, spec: dict) -> None:
        atomic_write(self.dir / "spec.json", json.dumps(spec))

    def save(self, label: str, agent_state: dict, weights_version: int, replay_index: dict,
             rng: dict | None = None) -> Path:
        """Write ``<label>.pt``: the agent (model, optimizers, update count), weights version, replay index and
        the random generators' states. Saving ``latest`` keeps the one it replaces as ``previous``."""
        state = {"agent": agent_state, "weights_version": weights_version, "replay": replay_index,
                 "rng": rng, "time": time.time()}
        path = self.dir / f"{label}.pt"
        keep = self.keep_previous if label == LATEST and path.exists() else None
        atomic_write(path, lambda f: torch.save(state, f), before_replace=keep)
        return path

    def keep_previous(self) -> None:
        """Once the new checkpoint is whole: the one it replaces becomes previous.pt (latest.pt never goes
        missing; a second name where the file system has hard links, a copy where it has not)."""
        latest, keep = self.dir / f"{LATEST}.pt", self.dir / f".{PREVIOUS}.pt.tmp"
        keep.unlink(missing_ok=True)
        try:
            os.link(latest, keep)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copyfile(latest, keep)
        os.replace(keep, self.dir / f"{PREVIOUS}.pt")

    def load(self, label: str = LATEST) -> dict | None:
        """The checkpoint's contents, or None when there is none yet; raises FatalError naming a corrupt one."""
        path = self.dir / f"{label}.pt"
        if not path.exists():
            return None
        try:
            # on the CPU: a busy GPU's out-of-memory is not a corrupt file (load_state_dict moves it)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not isinstance(state.get("agent"), dict):
                raise ValueError("no agent state in it")
        except OSError as exc:
            if exc.errno is not None:  # the disk or its permissions, not the file's content
                raise
            raise corrupt(path, f"{type(exc).__name__}: {str(exc)[:80]}", self.choices(label)) from None
        except MemoryError:
            raise
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a torn file
            raise corrupt(path, f"{type(exc).__name__}: {str(exc)[:80]}", self.choices(label)) from None
        return state

    def choices(self, label: str) -> str:
        resume = f"supervisor up --run-id {self.run_id} --runs-dir {self.dir.parent.parent}"
        previous, latest = self.dir / f"{PREVIOUS}.pt", self.dir / f"{LATEST}.pt"
        if label == LATEST and previous.exists() and not (latest.exists() and os.path.samefile(previous, latest)):
            return (f"move it away and resume from the checkpoint before it ({resume} --resume-from previous), "
                    "or start a new run (leave out --run-id)")
        return "move it away and start a new run (leave out --run-id)"
