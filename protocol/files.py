"""Files written so that a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


class _Recording:
    """A file whose write errors are remembered: writers that wrap an OSError in their own exception (torch.save's
    RuntimeError) must not hide a full disk."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None], *, fsync: bool = True,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``.

    ``data`` is the content, or a function that writes it to the open file (for
    writers such as ``torch.save`` that take a file). ``before_replace`` runs once
    the new content is whole, just before the rename (to keep the old file under
    another name, say). A failure leaves ``path`` as it was and no temporary file
    behind; an OSError names ``path``.
    """
    path = Path(path)
    # A fixed name: a writer killed mid-write leaves one stale file that the next write replaces, not one per pid.
    tmp = path.with_name(f".{path.name}.tmp")
    recording = None
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                recording = _Recording(f)
                data(recording)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and not isinstance(exc, OSError) and _volume_full(path.parent)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            if exc.filename is None:  # write() and fsync() name no file: name the one being written
                exc.filename = str(path)
            raise
        cause = recording.error if recording is not None else None
        if cause is None and full:
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if cause is not None:
            raise OSError(cause.errno, cause.strerror or os.strerror(cause.errno or 0), str(path)) from exc
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
