"""Exit codes every child of a run shares with the supervisor (sysexits' EX_CONFIG for the fatal one)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

# A restart would not help: the config does not fit the run, a file the process needs is corrupt, or the
# disk is full. The process's last heartbeat says why in one line (``detail``); the supervisor stops
# restarting it and shows that line.
EXIT_FATAL = 78


class FatalError(RuntimeError):
    """An error a restart cannot mend; its message is the one line the operator sees, with what to do."""


# Exit codes of a supervisor command that met an operating-system error it names in one line.
EXIT_PERMISSION, EXIT_READ_ONLY, EXIT_NO_SPACE, EXIT_OS_ERROR = 7, 8, 9, 10

_OPERATOR_ERRNOS = {errno.ENOSPC: EXIT_NO_SPACE, errno.EDQUOT: EXIT_NO_SPACE, errno.EROFS: EXIT_READ_ONLY,
                    errno.EACCES: EXIT_PERMISSION, errno.EPERM: EXIT_PERMISSION}


def operator_error(exc: BaseException) -> bool:
    """An OS error an operator causes and mends (a full or read-only disk, a refused permission)."""
    return isinstance(exc, OSError) and exc.errno in _OPERATOR_ERRNOS


def os_error_exit(exc: OSError) -> int:
    return _OPERATOR_ERRNOS.get(exc.errno, EXIT_OS_ERROR)


def os_error_line(exc: OSError, path=None, resume: str | None = None) -> str:
    """The one line for an OS error: what went wrong, on which path (the error's own, else ``path``), and what to
    do; ``resume`` is the command that goes on once it is mended."""
    path = exc.filename or (str(path) if path is not None else "a file of the run")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        then = f", then resume ({resume})" if resume else ", or choose another --runs-dir"
        return f"no space left on device writing {path}: free space on that volume (df -h {path}){then}"
    if exc.errno == errno.EROFS:
        return f"read-only file system writing {path}: put the run on a writable volume (--runs-dir)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path}: check its owner and mode (ls -ld {path}), or run as its owner"
    return f"{exc.strerror or exc} on {path}"


def fatal_message(exc: BaseException, run_dir=None) -> str | None:
    """The one line for an error a restart cannot mend (a FatalError, a full or read-only disk, a refused
    permission), naming the path (the run directory when the error names none) and what to do; None for any
    other error."""
    if isinstance(exc, FatalError):
        return str(exc)
    if not operator_error(exc):
        return None
    resume = (f"supervisor up --run-id {Path(run_dir).name} --runs-dir {Path(run_dir).parent}" if run_dir is not None
              else "supervisor up --run-id RUN")
    return os_error_line(exc, run_dir, resume)


def say(line: str) -> None:
    """A line on stderr, which may be a file on a full disk: never an error of its own."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def exit_on_error(exc: Exception, run_dir, name: str, log, heartbeat) -> int:
    """How a child's main ends on an error: 1 (restart it) with the traceback in its log, or, for an error a
    restart cannot mend, its one line in the log, on stderr and in a last heartbeat, and :data:`EXIT_FATAL`."""
    message = fatal_message(exc, run_dir)
    if message is None:
        log.exception(f"{name} failed")
        return 1
    log.error(f"{name} cannot go on", reason=message, exc_info=not isinstance(exc, FatalError))
    say(f"{name}: {message}")
    return heartbeat.fatal(message)
