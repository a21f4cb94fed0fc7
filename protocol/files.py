"""Files written so that a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None], *, fsync: bool = True) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``.

    ``data`` is the content, or a function that writes it to the open file (for
    writers such as ``torch.save`` that take a file). A failure leaves ``path`` as
    it was and no temporary file behind.
    """
    path = Path(path)
    # A fixed name: a writer killed mid-write leaves one stale file that the next write replaces, not one per pid.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            if exc.filename is None:  # write() and fsync() name no file: name the one being written
                exc.filename = str(path)
            raise
        if isinstance(exc, Exception) and _volume_full(path.parent):
            # writers that wrap the OSError in their own (torch.save's RuntimeError) hide the cause
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


def _volume_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1024 * 1024
    except OSError:
        return False


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one rename, so it never goes missing in between."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)
