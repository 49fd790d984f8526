"""Errors users can act on, each carrying the exit code the BIDS execution spec documents.

Every library function raises one of these for bad input; the CLI turns it into a
single line on stderr and the exit code, never a traceback.
"""

from __future__ import annotations

import errno
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Documented exit codes (BIDS Apps execution spec + sysexits.h)."""

    OK = 0
    FAILURE = 1
    INVALID_BIDS = 16
    UNKNOWN_LEVEL = 17
    NOTHING_SELECTED = 18
    USAGE = 64
    BAD_DATA = 65
    MISSING_INPUT = 66
    CANNOT_CREATE_OUTPUT = 73
    IO_ERROR = 74


class NucleiAppError(Exception):
    """Base of every error meant for the user: one line naming the file and the fix."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InvalidBIDSError(NucleiAppError):
    exit_code = ExitCode.INVALID_BIDS


class UnknownLevelError(NucleiAppError):
    exit_code = ExitCode.UNKNOWN_LEVEL


class NothingSelectedError(NucleiAppError):
    exit_code = ExitCode.NOTHING_SELECTED


class UsageError(NucleiAppError):
    exit_code = ExitCode.USAGE


class BadDataError(NucleiAppError):
    exit_code = ExitCode.BAD_DATA


class MissingInputError(NucleiAppError):
    exit_code = ExitCode.MISSING_INPUT


class CannotCreateOutputError(NucleiAppError):
    exit_code = ExitCode.CANNOT_CREATE_OUTPUT


class InputOutputError(NucleiAppError):
    exit_code = ExitCode.IO_ERROR


#: errno values of a write that failed for lack of space (disk full, quota, file size limit).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: errno values of a path that cannot be written (permissions, read-only, a file in the way).
_NOT_WRITABLE = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOENT,
    errno.ENAMETOOLONG,
})


def os_error_to_user_error(error: OSError, path: str | Path | None = None) -> NucleiAppError:
    """The user error (and so the exit code) for an operating-system error while writing.

    The one OSError-to-exit-code mapping of the app: no space left (disk full, quota, file
    size limit) is an I/O error (74), a path that cannot be written (permissions, read-only
    file system, a file where a folder should be) cannot be created (73), and any other
    operating-system error is an I/O error (74).

    Parameters
    ----------
    error : OSError
        What the operating system raised.
    path : str or Path, optional
        The output to name in the message (default: the file the error names).

    Returns
    -------
    NucleiAppError
        To be raised by the caller (``raise os_error_to_user_error(error, path) from None``).
    """
    where = path if path is not None else error.filename
    reason = error.strerror or type(error).__name__
    if error.errno in _NO_SPACE:
        return InputOutputError(
            f"disk full or file size limit reached ({reason}); free space or choose another output folder", where
        )
    if error.errno in _NOT_WRITABLE:
        return CannotCreateOutputError(f"cannot write ({reason}); choose a writable output path", where)
    return InputOutputError(f"I/O error ({reason}); check the disk and rerun", where)
