"""The learner's files that outlive it: the run's spaces (``spec.json``) and agent checkpoints.

Every file is written atomically (write, fsync, rename), so a learner killed at
any moment restarts from the last whole checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from protocol.files import atomic_write

LATEST = "latest"


class Checkpoints:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def load_spec(self) -> dict | None:
        """The run's observation and action spaces, as the first worker's hello gave them."""
        path = self.dir / "spec.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_spec(self, spec: dict) -> None:
        atomic_write(self.dir / "spec.json", json.dumps(spec))

    def save(self, label: str, agent_state: dict, weights_version: int, replay_index: dict,
             rng: dict | None = None) -> Path:
        """Write ``<label>.pt``: the agent (model, optimizers, update count), weights version, replay index and
        the random generators' states."""
        state = {"agent": agent_state, "weights_version": weights_version, "replay": replay_index,
                 "rng": rng, "time": time.time()}
        path = self.dir / f"{label}.pt"
        atomic_write(path, lambda f: torch.save(state, f))
        return path

    def load(self, device: torch.device, label: str = LATEST) -> dict | None:
        """The checkpoint's contents, or None when there is none yet."""
        path = self.dir / f"{label}.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location=device, weights_only=True)
