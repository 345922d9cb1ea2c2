"""Exit codes and the errors that carry them.

Every command maps its outcome to one of these codes, so that cron wrappers and schedulers can tell
"nothing to do" from "some files were bad" from "the model is broken". Codes above 63 follow BSD
sysexits(3). 1 is left for genuine crashes (an uncaught exception) and 2 for usage errors (Click).
"""

from __future__ import annotations

from enum import IntEnum

import click

__all__ = [
    "ExitCode",
    "RadscanError",
    "NoInputError",
    "ModelError",
    "LockHeldError",
    "OutputError",
    "UnavailableError",
    "SettingError",
]


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1  # an unexpected exception: a bug, please report it
    USAGE = 2  # bad options or arguments (Click's own code)
    PARTIAL = 3  # finished, but some files could not be used (status "error" rows)
    DATA = 65  # EX_DATAERR: a missing or invalid model file
    NO_INPUT = 66  # EX_NOINPUT: a path does not exist or holds no files
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a service the run needs cannot be used (the Dask scheduler)
    CANT_CREATE = 73  # EX_CANTCREAT: an output cannot be written
    LOCKED = 75  # EX_TEMPFAIL: another run holds the lock on these outputs; try again later
    INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C), as shells report it
    TERMINATED = 143  # 128 + SIGTERM (systemd stop, kill): the run unwound, earlier outputs intact


class RadscanError(click.ClickException):
    """An error the user can act on: printed as one line, no traceback, with its own exit code."""

    exit_code = ExitCode.CRASH


class NoInputError(RadscanError):
    exit_code = ExitCode.NO_INPUT


class ModelError(RadscanError):
    exit_code = ExitCode.DATA


class LockHeldError(RadscanError):
    exit_code = ExitCode.LOCKED


class UnavailableError(RadscanError):
    exit_code = ExitCode.UNAVAILABLE


class OutputError(RadscanError):
    exit_code = ExitCode.CANT_CREATE


class SettingError(RadscanError):
    """A setting that cannot be honoured here (e.g. --device cuda without a GPU): a usage error."""

    exit_code = ExitCode.USAGE
