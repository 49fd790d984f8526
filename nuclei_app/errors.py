"""Errors users can act on, each carrying the exit code the BIDS execution spec documents.

Every library function raises one of these for bad input; the CLI turns it into a
single line on stderr and the exit code, never a traceback.
"""

from __future__ import annotations

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
