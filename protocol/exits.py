"""Exit codes every child of a run shares with the supervisor (sysexits' EX_CONFIG for the fatal one)."""

from __future__ import annotations

import errno

# A restart would not help: the config does not fit the run, a file the process needs is corrupt, or the
# disk is full. The process's last heartbeat says why in one line (``detail``); the supervisor stops
# restarting it and shows that line.
EXIT_FATAL = 78


class FatalError(RuntimeError):
    """An error a restart cannot mend; its message is the one line the operator sees, with what to do."""


def fatal_message(exc: BaseException) -> str | None:
    """The one line for an error a restart cannot mend (a FatalError, a full or read-only disk, a refused
    permission), naming the path and what to do; None for any other error."""
    if isinstance(exc, FatalError):
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    path = exc.filename or "a file of the run"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device writing {path}: free space on that volume (df -h {path}), "
                "then resume the run (supervisor up --run-id RUN)")
    if exc.errno == errno.EROFS:
        return f"read-only file system writing {path}: put the run on a writable volume (--runs-dir)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path}: check its owner and mode (ls -ld {path})"
    return None
