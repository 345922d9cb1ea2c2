"""Exit codes and the errors that carry them.

Every command maps its outcome to one of these codes, so that cron wrappers and schedulers can tell
"nothing to do" from "some files were bad" from "the model is broken". Codes above 63 follow BSD
sysexits(3). 1 is left for genuine crashes (an uncaught exception) and 2 for usage errors (Click).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

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


# What each code means, in one place: `--help` prints them, and the README's table is checked against
# them (tests/test_cli.py); docs/scoring.md gives the details of each.
EXIT_CODE_MEANINGS: dict[tuple[int, ...], str] = {
    (ExitCode.OK,): "success",
    (ExitCode.CRASH,): "crash: a bug (please report it with the traceback)",
    (ExitCode.USAGE,): "usage error: a bad option, argument or setting; an output inside the inputs",
    (ExitCode.PARTIAL,): "finished, but some files could not be used (status `error` rows), or, with `--dicom-out`, "
                         "some DICOM results were not made or not sent (kept for the next run), or most films "
                         "of the last list are gone from the inputs (a share that mounted in part?)",
    (ExitCode.DATA,): "missing or invalid model (a missing, altered or edited file; training that diverged)",
    (ExitCode.NO_INPUT,): "no input: a path does not exist, cannot be read (permissions) or holds no files (or only "
                          "files that are neither DICOM nor images), or too few usable films to train or calibrate on",
    (ExitCode.UNAVAILABLE,): "the Dask scheduler cannot be used or was lost (rerun to finish)",
    (ExitCode.CANT_CREATE,): "an output cannot be written (read-only folder, full disk, an output that is a link)",
    (ExitCode.LOCKED,): "another run holds the lock on these outputs: try again later",
    (ExitCode.INTERRUPTED, ExitCode.TERMINATED): "interrupted (Ctrl-C) / stopped by SIGTERM: earlier outputs intact, "
                                                 "rerun to finish (`radscan listen`, a service stopped as asked, "
                                                 "exits 0)",
}


def exit_code_rows() -> list[str]:
    """The README's table of exit codes, one Markdown row per entry of EXIT_CODE_MEANINGS."""
    return [f"| {' / '.join(str(int(code)) for code in codes)} | {meaning} |"
            for codes, meaning in EXIT_CODE_MEANINGS.items()]


def exit_codes_help() -> str:
    """The exit codes for `--help` epilogs (Click keeps a paragraph after \\b as written)."""
    import textwrap

    lines = ["\b", "Exit codes:"]
    for codes, meaning in EXIT_CODE_MEANINGS.items():
        wrapped = textwrap.wrap(meaning.replace("`", ""), 66)
        lines.append(f"  {'/'.join(str(int(code)) for code in codes):<7} {wrapped[0]}")
        lines.extend(f"  {'':<7} {line}" for line in wrapped[1:])
    return "\n".join(lines) + "\n"


class RadscanError(click.ClickException):
    """An error the user can act on: printed as one line, no traceback, with its own exit code."""

    exit_code = ExitCode.CRASH

    def show(self, file: Any = None) -> None:
        """The line on stderr, stamped like the log's lines (radscan.cli), so that a nightly log
        reads in order and says when the run failed."""
        from datetime import datetime

        stamp = datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")
        click.echo(f"{stamp} radscan ERROR: {self.format_message()}", file=file, err=True)


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
