"""What the commands of the `radscan` command line share: the options that several take, the --json
summary, and how a failure becomes an exit code and words (radscan.cli's commands and entry point
import it; it imports no command)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radscan.errors import ExitCode, exit_codes_help
from radscan.model.config import DEVICES
from radscan.policy import (
    DEFAULT_BODY_PARTS,
    DEFAULT_MODALITIES,
    FOLDER_STUDY_LIMIT,
    FRAME_POLICIES,
    STUDY_KEYS,
    Policy,
    parse_list,
)
from radscan.qc import DEFAULT_VIEWS, KNOWN_VIEWS, QC_MODES
from radscan.recipe import TrainConfig
from radscan.stopping import Terminated, outcome_said

__all__ = ["INPUT_PATH", "EXIT_CODES_HELP", "DISCLAIMER_SHORT", "PRESET_NAMES", "RECIPE", "FiniteFloatRange",
           "selection_options", "workers_option", "json_option", "model_option", "qc_option", "study_key_option",
           "views_option", "device_option", "echo_json", "read_settings", "model_in_use", "failure",
           "json_failure", "log"]

PRESET_NAMES = ("reference", "small", "tiny")  # kept here so that --help does not import torch
RECIPE = TrainConfig()  # the default recipe (radscan.recipe): every default of `radscan train` comes from it
log = logging.getLogger("radscan")

DISCLAIMER_SHORT = "research and triage support only, not a diagnosis"
EXIT_CODES_HELP = exit_codes_help()

# Input paths are checked by radscan, not by Click: a path that is missing or cannot be read is
# exit 66 with the reason (ingest.check_inputs), where Click would make it a usage error (exit 2).
INPUT_PATH = click.Path(path_type=str, readable=False)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass every comparison with a bound)."""

    def convert(self, value, param, ctx):  # noqa: ANN001 (Click's signature)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def read_settings(path: Path) -> dict:
    """Model settings from a JSON or TOML file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    return json.loads(text)


def _check_list(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A comma-separated selection must name something: an empty one would silently mean 'all'."""
    if not parse_list(value) and value.strip().upper() not in ("ALL", "*"):
        raise click.BadParameter(f"give values (e.g. {param.default}), or 'all'")
    return value


def selection_options(command: Callable) -> Callable:
    """The options that decide which DICOM files are used; shared by scan, train and score."""

    @click.option("--modalities", default=",".join(DEFAULT_MODALITIES), show_default=True, callback=_check_list,
                  help="Comma-separated Modality values to use, or 'all'.")
    @click.option("--body-parts", default=",".join(DEFAULT_BODY_PARTS), show_default=True, callback=_check_list,
                  help="BodyPartExamined values to use when the tag is set, or 'all'. A list holding CHEST, "
                       "THORAX or LUNG also takes a value one of whose words names the chest (CHEST PA, TORAX, "
                       "POUMON), not the spine.")
    @click.option("--frames", type=click.Choice(FRAME_POLICIES), default="skip", show_default=True,
                  help="Multi-frame objects: skip them, or use their first or middle frame.")
    @click.option("--for-processing", is_flag=True,
                  help="Also use FOR PROCESSING images (raw detector data, normally skipped).")
    @click.option("--read-timeout", type=FiniteFloatRange(min=1), default=300, show_default=True,
                  help="Seconds after which a file whose decoding hangs is given up (status error).")
    @functools.wraps(command)
    def wrapper(*args, modalities: str, body_parts: str, frames: str, for_processing: bool, read_timeout: float,
                **kwargs):
        policy = Policy(modalities=parse_list(modalities), body_parts=parse_list(body_parts),
                        frames=frames, for_processing=for_processing, read_timeout=read_timeout)
        return command(*args, policy=policy, **kwargs)

    return wrapper


def _check_workers(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value == 0 or value < -1:
        raise click.BadParameter("must be -1 (one per CPU core) or a number of processes >= 1")
    return value


workers_option = click.option(
    "--workers", type=int, default=-1, show_default=True, callback=_check_workers,
    help="Decoding processes (-1: one per CPU core; 1: no worker processes).",
)
_json_requested = False  # set as soon as --json is parsed (flag, RADSCAN_* variable or TOML)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _json_requested
    _json_requested = _json_requested or bool(value)
    return value


# eager: known before any other option can fail, so that a failure still prints its JSON object
json_option = click.option(
    "--json", "as_json", is_flag=True, is_eager=True, callback=_remember_json,
    help='Print a one-object JSON summary on stdout, with "ok" and "exit_code" (also on failure).'
)


def echo_json(payload: dict, exit_code: int = ExitCode.OK) -> None:
    """The --json summary of a finished command: the same two leading keys for every command.
    "ok" is true only for exit code 0: a run that finished with unreadable files or unsent
    results (exit 3) is not a good night for monitoring. A number that is not defined (NaN: the
    precision of a model that flagged nothing) is null: strict JSON has no NaN."""
    click.echo(json.dumps(_defined({"ok": exit_code == ExitCode.OK, "exit_code": int(exit_code), **payload}),
                          allow_nan=False))
    outcome_said()  # the process exits with the code it printed, whatever signal comes now


def _defined(value: Any) -> Any:
    """`value` with every float NaN or infinity, however deeply nested, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _defined(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_defined(item) for item in value]
    return value


model_option = click.option(
    "--model", type=click.Path(file_okay=False, path_type=Path), envvar="RADSCAN_MODEL",
    help="Model directory (default: the model shipped in models/; or RADSCAN_MODEL).",
)
qc_option = click.option(
    "--qc", "qc_mode", type=click.Choice(QC_MODES), default="strict", show_default=True,
    help="Quality control before scoring: strict = films that fail it (turned, inverted, blank, lateral, not a "
         "chest) get status rejected and no score; warn = scored but marked; off.")


def _check_views(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--views: ViewPosition terms (PS3.3 C.8.11.7) or 'all'; an empty or unknown term is refused,
    so that a typo neither switches the check off nor rejects every film."""
    _check_list(ctx, param, value)
    views = parse_list(value)
    unknown = sorted(set(views or ()) - KNOWN_VIEWS)
    if unknown:
        raise click.BadParameter(f"unknown ViewPosition value(s) {', '.join(unknown)}: use "
                                 f"{', '.join(sorted(KNOWN_VIEWS))} (comma-separated), or 'all'")
    return value


study_key_option = click.option(
    "--study-key", type=click.Choice(STUDY_KEYS), default="auto", show_default=True,
    help="What a study is for files that name none (JPEG, PNG, DICOM without StudyInstanceUID): their folder, "
         f"each file, or auto: the folder unless it holds more than {FOLDER_STUDY_LIMIT} files (an export of many "
         "films), when each file is a study. DICOM files with a StudyInstanceUID are grouped by it.")
views_option = click.option(
    "--views", default=",".join(DEFAULT_VIEWS), show_default=True, callback=_check_views,
    help="ViewPosition values that are judged (comma-separated, or 'all'); an absent tag is accepted.")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto",
                             show_default=True, help="Where the model runs: auto picks CUDA, then MPS, then CPU.")


def model_in_use() -> Path:
    """The model a command uses when none is named: RADSCAN_MODEL, else the shipped one."""
    from radscan.score import default_model_dir

    return Path(os.environ["RADSCAN_MODEL"]) if os.environ.get("RADSCAN_MODEL") else default_model_dir()


def failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the words of a command that failed with `exc`: one reading for the
    --json summary, stderr, the worklist page and the metrics file."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt, Terminated)):
        sigterm = isinstance(exc, Terminated)
        return (ExitCode.TERMINATED if sigterm else ExitCode.INTERRUPTED,
                f"{'stopped by SIGTERM' if sigterm else 'interrupted'}: earlier outputs are intact; run again "
                "to finish")
    return ExitCode.CRASH, f"{type(exc).__name__}: {exc} (a bug in radscan: please report it)"


def json_failure(exit_code: int, message: str) -> None:
    # also when --json's own value was the error (RADSCAN_SCORE_JSON=maybe): the wrapper still gets an object
    asked_by_variable = any(name.startswith("RADSCAN_") and name.endswith("_JSON")
                            and value.strip().lower() not in ("", "0", "false", "f", "no", "n", "off")
                            for name, value in os.environ.items())
    if _json_requested or asked_by_variable or "--json" in sys.argv[1:]:
        click.echo(json.dumps({"ok": False, "exit_code": int(exit_code), "error": message}))
