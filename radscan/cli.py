"""The `radscan` command line: parses options, calls the library, maps outcomes to exit codes.

Every option can also come from a ``RADSCAN_<COMMAND>_<OPTION>`` environment variable (e.g.
``RADSCAN_SCAN_WORKERS=4``), which suits cron jobs.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from radscan import __version__
from radscan.errors import ExitCode
from radscan.policy import DEFAULT_BODY_PARTS, DEFAULT_MODALITIES, FRAME_POLICIES, Policy, parse_list

log = logging.getLogger("radscan")

EXIT_CODES_HELP = """\b
Exit codes:
  0   success
  1   crash (a bug: please report it with the traceback)
  2   usage error (bad option or argument)
  3   finished, but some files could not be used (rows with status "error")
  65  missing or invalid model
  66  no input: a path does not exist or holds no files
  73  an output cannot be written
  75  another run holds the lock on these outputs (try again later)
"""


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("radscan %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="radscan")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr, no progress bar.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """radscan: unsupervised anomaly triage of chest radiographs (DICOM, JPEG, PNG).

    For research and triage support only: radscan does not diagnose.
    """
    _configure_logging(-1 if quiet else verbose)
    ctx.obj = {"quiet": quiet}


def selection_options(command: Callable) -> Callable:
    """The options that decide which DICOM files are used; shared by scan, train and score."""

    @click.option("--modalities", default=",".join(DEFAULT_MODALITIES), show_default=True,
                  help="Comma-separated Modality values to use, or 'all'.")
    @click.option("--body-parts", default=",".join(DEFAULT_BODY_PARTS), show_default=True,
                  help="BodyPartExamined values to use when the tag is set, or 'all'.")
    @click.option("--frames", type=click.Choice(FRAME_POLICIES), default="skip", show_default=True,
                  help="Multi-frame objects: skip them, or use their first or middle frame.")
    @click.option("--for-processing", is_flag=True,
                  help="Also use FOR PROCESSING images (raw detector data, normally skipped).")
    @functools.wraps(command)
    def wrapper(*args, modalities: str, body_parts: str, frames: str, for_processing: bool, **kwargs):
        policy = Policy(modalities=parse_list(modalities), body_parts=parse_list(body_parts),
                        frames=frames, for_processing=for_processing)
        return command(*args, policy=policy, **kwargs)

    return wrapper


workers_option = click.option(
    "--workers", type=int, default=-1, show_default=True,
    help="Decoding processes (-1: one per CPU core; 1: no worker processes).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print a one-object JSON summary on stdout."
)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Inventory CSV to write (replaced atomically).")
@click.option("--previews", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exact 128x128 model inputs as 8-bit PNGs.")
@selection_options
@workers_option
@json_option
@click.pass_context
def scan(ctx: click.Context, paths: tuple[str, ...], out: Path, previews: Path | None, policy: Policy,
         workers: int, as_json: bool) -> None:
    """Inventory PATHS: one CSV row per file with its kind, status, reason, study keys and QC fields.

    Files are recognised by content (any name, no extension needed). With --previews, the exact
    images the model would see are written as PNGs, to check orientation, inversion and windowing.

    \b
    Example:
      radscan scan /data/incoming --out inventory.csv --previews previews/
    """
    from radscan.scan import scan as run_scan

    summary = run_scan(paths, out, previews, policy, workers, progress=not ctx.obj["quiet"])
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=None))
    elif not ctx.obj["quiet"]:
        counts = summary.counts
        click.echo(
            f"{summary.files} files: {counts['ok']} ok, {counts['skipped']} skipped, "
            f"{counts['error']} error -> {summary.inventory}",
            err=True,
        )
    if summary.counts["error"]:
        ctx.exit(ExitCode.PARTIAL)


def main() -> None:
    cli(auto_envvar_prefix="RADSCAN")
