"""A full disk, on a small tmpfs mounted for the test: every write names its file, and nothing half-written stays."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.replay import ReplayBuffer
from protocol.exits import FatalError, fatal_message
from protocol.files import atomic_write

pytestmark = pytest.mark.timeout(60)


def root_can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not root_can_mount(), reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_volume(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_up(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@needs_mount
def test_a_write_on_a_full_disk_names_the_file_and_leaves_the_old_one_whole(small_volume):
    target = small_volume / "latest.pt"
    atomic_write(target, b"old")
    fill_up(small_volume)
    with pytest.raises(OSError) as exc:
        atomic_write(target, b"x" * 1024 * 1024)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    with pytest.raises(OSError) as exc:  # torch wraps the error in its own; the cause is found again
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(300_000)}, f))
    assert exc.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and not list(small_volume.glob(".*.tmp"))
    assert "no space left on device writing" in fatal_message(exc.value)


@needs_mount
def test_a_checkpoint_that_fills_the_disk_is_named_a_full_disk_though_its_removal_frees_space(small_volume):
    filler = small_volume / "filler"
    fill_up(small_volume)
    os.truncate(filler, max(0, filler.stat().st_size - 2 * 1024 * 1024))  # 2 MiB free
    with pytest.raises(OSError) as exc:  # a 3 MiB checkpoint: torch wraps the ENOSPC in a RuntimeError
        atomic_write(small_volume / "latest.pt", lambda f: torch.save({"w": torch.zeros(800_000)}, f))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(small_volume / "latest.pt")
    assert not (small_volume / "latest.pt").exists() and not list(small_volume.glob(".*.tmp"))


@needs_mount
def test_a_replay_that_does_not_fit_is_refused_at_creation(small_volume):
    with pytest.raises(FatalError, match="no space for the replay"):
        ReplayBuffer(small_volume / "replay", 100_000, (84, 84), np.uint8, 2)
    assert not list((small_volume / "replay").glob("*.npy")), "what it reserved is given back"
