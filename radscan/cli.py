"""The `radscan` command line: parses options, calls the library, maps outcomes to exit codes.

Every option can also come from a ``RADSCAN_<COMMAND>_<OPTION>`` environment variable (e.g.
``RADSCAN_SCAN_WORKERS=4``), which suits cron jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radscan import __version__
from radscan.errors import ExitCode, exit_codes_help
from radscan.model.config import FIELDS, SCORE_KINDS
from radscan.policy import (
    DEFAULT_BODY_PARTS,
    DEFAULT_MODALITIES,
    FOLDER_STUDY_LIMIT,
    FRAME_POLICIES,
    STUDY_KEYS,
    Policy,
    parse_list,
)
from radscan.qc import DEFAULT_VIEWS, KNOWN_VIEWS, QC_MODES, QCReference, quality_control
from radscan.recipe import MODEL_SETTINGS, PRESET, TrainConfig
from radscan.records import counted

PRESET_NAMES = ("reference", "small", "tiny")  # kept here so that --help does not import torch
_RECIPE = TrainConfig()  # the default recipe (radscan.recipe): every default of `radscan train` comes from it

log = logging.getLogger("radscan")

DISCLAIMER_SHORT = "research and triage support only, not a diagnosis"
EXIT_CODES_HELP = exit_codes_help()


# Input paths are checked by radscan, not by Click: a path that is missing or cannot be read is
# exit 66 with the reason (ingest.check_inputs), where Click would make it a usage error (exit 2).
INPUT_PATH = click.Path(path_type=str, readable=False)


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s radscan %(levelname)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="radscan")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr, no progress bar.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="RADSCAN_CONFIG", help="TOML settings file with one table per command (e.g. [score]).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, config_file: Path | None) -> None:
    """radscan: unsupervised anomaly triage of chest radiographs (DICOM, JPEG, PNG).

    For research and triage support only: radscan does not diagnose.

    Settings come from, highest first: command-line options, RADSCAN_<COMMAND>_<OPTION>
    environment variables, the --config TOML file (tables [scan], [train], [score]; keys are
    option names with underscores), then the defaults.
    """
    _configure_logging(-1 if quiet else verbose)
    ctx.obj = {"quiet": quiet, "config": config_file}
    if config_file:
        ctx.default_map = _read_config(config_file)


def _read_config(path: Path) -> dict:
    """TOML tables [scan], [train], [score] of option names -> Click's default_map."""
    try:
        settings = _read_settings(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    default_map = {}
    for name, table in settings.items():
        command = cli.commands.get(name)
        if command is None or not isinstance(table, dict):
            raise click.BadParameter(f"[{name}] in {path} is not a radscan command", param_hint="--config")
        by_option = {opt.lstrip("-").replace("-", "_"): param for param in command.params
                     for opt in param.opts if opt.startswith("--")}
        unknown = sorted(k for k in table if k.replace("-", "_") not in by_option)
        if unknown:
            raise click.BadParameter(f"[{name}] in {path}: unknown option(s) {', '.join(unknown)}",
                                     param_hint="--config")
        default_map[name] = {by_option[k.replace("-", "_")].name: _setting(by_option[k.replace("-", "_")], v)
                             for k, v in table.items()}
    return default_map


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass every comparison with a bound)."""

    def convert(self, value, param, ctx):  # noqa: ANN001 (Click's signature)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _setting(param: click.Parameter, value: object) -> object:
    """A TOML value as the option expects it: a list for a comma-separated option (modalities =
    ["CR", "DX"]) is joined with commas; options given several times take the list as it is."""
    if isinstance(value, list) and not getattr(param, "multiple", False):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool) and not getattr(param, "is_flag", False):
        raise click.BadParameter(f"{param.name} = {str(value).lower()}: expected a value, not true/false",
                                 param_hint="--config")
    if isinstance(param.type, click.types.IntParamType) and isinstance(value, float) and not value.is_integer():
        raise click.BadParameter(f"{param.name} = {value!r}: expected a whole number", param_hint="--config")
    wants_text = isinstance(param.type, (click.Path, click.types.StringParamType, click.Choice))
    if wants_text and not getattr(param, "is_flag", False) and not isinstance(value, (str, list)):
        raise click.BadParameter(f"{param.name} = {value!r}: expected text in quotes", param_hint="--config")
    return value


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
                  help="BodyPartExamined values to use when the tag is set, or 'all'.")
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


def _echo_json(payload: dict, exit_code: int = ExitCode.OK) -> None:
    """The --json summary of a finished command: the same two leading keys for every command.
    "ok" is true only for exit code 0: a run that finished with unreadable files or unsent
    results (exit 3) is not a good night for monitoring."""
    click.echo(json.dumps({"ok": exit_code == ExitCode.OK, "exit_code": int(exit_code), **payload}))


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


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, required=True, type=INPUT_PATH)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Inventory CSV to write (replaced atomically).")
@click.option("--previews", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exact 128x128 model inputs as 8-bit PNGs.")
@model_option
@study_key_option
@qc_option
@views_option
@selection_options
@workers_option
@json_option
@click.pass_context
def scan(ctx: click.Context, paths: tuple[str, ...], out: Path, previews: Path | None, model: Path | None,
         study_key: str, qc_mode: str, views: str, policy: Policy, workers: int, as_json: bool) -> None:
    """Inventory PATHS: one CSV row per file with its kind, status, reason, study keys and QC fields.

    Files are recognised by content (any name, no extension needed). Usable images get the quality
    control verdict `radscan score` would give them with --model (status rejected, qc_status,
    qc_reason). With --previews, the exact images the model would see are written as PNGs, to check
    orientation, inversion and windowing.

    \b
    Example:
      radscan scan /data/incoming --out inventory.csv --previews previews/
      radscan scan /data/incoming --out inventory.csv --qc off --modalities all
    """
    from radscan.model.metadata import read_metadata, verify_without_loading
    from radscan.policy import for_model
    from radscan.scan import scan as run_scan
    from radscan.score import default_model_dir

    qc = None
    if model is not None or qc_mode != "off":  # read films as that model does: a thorax-box model's box
        model_dir = model or default_model_dir()
        metadata = read_metadata(model_dir)
        verify_without_loading(model_dir, metadata)
        policy = for_model(policy, metadata)
        qc = quality_control(model_dir, metadata, qc_mode, parse_list(views)) if qc_mode != "off" else None
    summary = run_scan(paths, out, previews, policy, workers, progress=not ctx.obj["quiet"], qc=qc,
                       study_key=study_key)
    if as_json:
        _echo_json(summary.as_dict(), ExitCode.PARTIAL if summary.counts["error"] else ExitCode.OK)
    elif not ctx.obj["quiet"]:
        counts = summary.counts
        click.echo(
            f"{counted(summary.files, 'file')}: {counts['ok']} ok, {counts['rejected']} rejected by QC, "
            f"{counts['skipped']} skipped, {counts['error']} error -> {summary.inventory}",
            err=True,
        )
    if summary.counts["error"]:
        ctx.exit(ExitCode.PARTIAL)


def _read_settings(path: Path) -> dict:
    """Model settings from a JSON or TOML file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    return json.loads(text)


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                             show_default=True, help="Where the model runs: auto picks CUDA, then MPS, then CPU.")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("normals", nargs=-1, required=True, type=INPUT_PATH)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory to create (weights, metadata, training log).")
@click.option("--val-abnormal", multiple=True, type=INPUT_PATH,
              help="Labelled abnormal images (repeatable): every epoch's validation AUC goes into the "
                   "training log. Measured only: the model and its threshold do not depend on them.")
@click.option("--val-normal", multiple=True, type=INPUT_PATH,
              help="Labelled normal images for validation (default: the held-out calibration normals).")
@click.option("--preset", type=click.Choice(sorted(PRESET_NAMES)), default=PRESET, show_default=True,
              help="Architecture size: reference (~46 M parameters, for GPUs), small or tiny (CPU).")
@click.option("--model-config", "settings_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON or TOML file of model settings that override the preset (see SimSIDConfig).")
@click.option("--memory", type=click.Choice(["queue", "learned"]), help="Memory matrix variant (overrides the preset).")
@click.option("--score", "score_kind", type=click.Choice(list(SCORE_KINDS)), default=MODEL_SETTINGS["score_kind"],
              show_default=True, help="What the anomaly score is made of (see docs/model.md, 'Score kinds').")
@click.option("--density-grid", type=click.IntRange(0), default=MODEL_SETTINGS["density_grid"], show_default=True,
              help="Regions per side of the feature density model (the density score and its map); 0: none.")
@click.option("--field", type=click.Choice(list(FIELDS)), default=MODEL_SETTINGS["field"], show_default=True,
              help="What the networks see: the whole film; the thorax of the training normals' mean film (the "
                   "rest mid grey); or that thorax's bounding box cut from each film at its own resolution, "
                   "the density over the lung fields (docs/model.md).")
@click.option("--critic-blur", type=FiniteFloatRange(0, 8), metavar="SIGMA",
              help="Gaussian low-pass (pixels) in front of the discriminator, so that the critic judges "
                   "anatomy and opacity rather than sharpness (overrides the preset; 0 = none).")
@click.option("--critic-snapshots", type=click.IntRange(1), default=MODEL_SETTINGS["critic_snapshots"],
              show_default=True, help="Average the critics of the last K epochs (the critic score).")
@click.option("--epochs", type=click.IntRange(1), default=_RECIPE.epochs, show_default=True)
@click.option("--keep", type=click.Choice(["last", "best", "synthetic"]), default=_RECIPE.keep, show_default=True,
              help="Which epoch's model is saved: the last; 'best', the highest validation AUC of its score "
                   "(needs --val-abnormal; judge that model on other films); or 'synthetic', without labels, the "
                   "epoch whose density best tells the calibration normals from copies of them given one "
                   "synthetic local defect each (for populations whose training drifts, e.g. adults with "
                   "--field thorax-box; see docs/training.md).")
@click.option("--max-minutes", type=FiniteFloatRange(0, min_open=True),
              help="Time budget; training stops after the batch that crosses it.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=_RECIPE.batch_size, show_default=True)
@click.option("--lr", type=FiniteFloatRange(0), default=_RECIPE.lr, show_default=True,
              help="Adam learning rate of both networks.")
@click.option("--cosine-epochs", type=click.IntRange(1), default=_RECIPE.cosine_t_max, show_default=True,
              help="Length of the generator's cosine learning-rate decay, in epochs.")
@click.option("--aspect", type=FiniteFloatRange(0), default=_RECIPE.aspect, show_default=True,
              help="Augmentation: width/height ratio changed by a factor in [1/(1+A), 1+A] per image.")
@click.option("--gamma", type=FiniteFloatRange(0), default=_RECIPE.gamma, show_default=True,
              help="Augmentation: gamma drawn in [1/(1+G), 1+G] per image.")
@click.option("--contrast", type=FiniteFloatRange(0), default=_RECIPE.contrast, show_default=True,
              help="Augmentation: contrast factor drawn in [1/(1+C), 1+C] per image.")
@click.option("--blur", type=FiniteFloatRange(0), default=_RECIPE.blur, show_default=True,
              help="Augmentation: on half the images a Gaussian blur of sigma drawn in [0, 2B] pixels "
                   "(at 128 px; mean B).")
@click.option("--noise", type=FiniteFloatRange(0), default=_RECIPE.noise, show_default=True,
              help="Augmentation: Gaussian noise up to this standard deviation (grey range 0..1).")
@click.option("--synthetic", type=FiniteFloatRange(0), default=_RECIPE.synthetic, show_default=True,
              help="Weight of local synthetic defects (haze, brighter or darker region, lost contrast, noise) "
                   "shown to the discriminator as abnormal (0 = off).")
@click.option("--seed", type=int, default=_RECIPE.seed, show_default=True,
              help="Same seed + same data + CPU = same model.")
@click.option("--calibration-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              default=_RECIPE.calibration_fraction,
              show_default=True,
              help="Share of the normals held out (never trained on) for calibration.")
@click.option("--target-specificity", type=FiniteFloatRange(0.5, 0.999), default=_RECIPE.target_specificity,
              show_default=True, help="The flag threshold keeps this share of the calibration normals unflagged.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint in --out.")
@click.option("--init-from", type=click.Path(file_okay=False, path_type=Path),
              help="Start from the weights of this model directory (same architecture), e.g. to train on.")
@click.option("--name", help="Model name recorded in the metadata (default: the folder name).")
@click.option("--age-range", type=str, metavar="MIN-MAX",
              help="Patient ages (years) of the training population, e.g. 1-5: when scoring, DICOM films of "
                   "patients outside it are marked qc_status warn.")
@device_option
@selection_options
@workers_option
@json_option
@click.pass_context
def train(ctx: click.Context, normals: tuple[str, ...], out: Path, val_normal: tuple[str, ...],
          val_abnormal: tuple[str, ...], preset: str, settings_file: Path | None, memory: str | None,
          score_kind: str, density_grid: int, field: str, critic_blur: float | None, critic_snapshots: int, epochs: int,
          keep: str, max_minutes: float | None,
          batch_size: int, lr: float, cosine_epochs: int, aspect: float, gamma: float, contrast: float, blur: float,
          noise: float, synthetic: float, seed: int,
          calibration_fraction: float, target_specificity: float, resume: bool, init_from: Path | None,
          name: str | None, age_range: str | None, device: str, policy: Policy, workers: int,
          as_json: bool) -> None:
    """Train a SimSID model on NORMALS (folders or files of normal studies: DICOM, JPEG, PNG).

    The defaults are the recipe of the shipped model (about 20 minutes for 1,000 films on 2 CPU
    cores). A calibration share of the normals is held out; it sets the score's scale and the
    flag threshold. The last epoch's weights are shipped (or, with --keep best, the epoch's with the
    highest validation AUC), with the critics of the last --critic-snapshots epochs, and the feature
    density is fitted to the training normals.
    Checkpoints are written every epoch: an interrupted run continues with --resume.

    \b
    Examples:
      radscan train /data/normals --out models/site-2026
      radscan train /data/normals --out models/try --val-abnormal /data/pneumonia-val --max-minutes 30
    """
    from radscan.model.config import preset as make_preset
    from radscan.model.runtime import resolve_device
    from radscan.train import TrainConfig
    from radscan.train import train as run_train

    overrides = _read_settings(settings_file) if settings_file else {}
    for option, key in (("memory", "memory_kind"), ("score_kind", "score_kind"),
                        ("critic_snapshots", "critic_snapshots"), ("density_grid", "density_grid"),
                        ("field", "field")):
        given = ctx.get_parameter_source(option) is not click.core.ParameterSource.DEFAULT
        if ctx.params[option] is not None and (given or key not in overrides):  # a settings file beats a default
            overrides[key] = ctx.params[option]
    if critic_blur is not None:
        overrides["critic_blur_sigma"] = critic_blur
    try:
        model_cfg = make_preset(preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        torch_device = resolve_device(device)
        tcfg = TrainConfig(epochs=epochs, keep=keep, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                           cosine_t_max=cosine_epochs, aspect=aspect, gamma=gamma, contrast=contrast, blur=blur,
                           noise=noise, synthetic=synthetic, seed=seed, calibration_fraction=calibration_fraction,
                           target_specificity=target_specificity)
        ages = _age_range(age_range) if age_range else None
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    result = run_train(normals, out, model_cfg, tcfg, val_normal, val_abnormal, policy, torch_device, workers,
                       resume, progress=not ctx.obj["quiet"], name=name, init_from=init_from, age_range=ages)
    summary = {"model": str(result.model_dir), "epochs_run": result.epochs_run,
               "stopped_by_budget": result.stopped_by_budget, **result.metrics}
    if as_json:
        _echo_json(summary)
    elif not ctx.obj["quiet"]:
        click.echo(f"model written to {result.model_dir} ({counted(result.epochs_run, 'epoch')})", err=True)


def _model_in_use() -> Path:
    """The model a command uses when none is named: RADSCAN_MODEL, else the shipped one."""
    from radscan.score import default_model_dir

    return Path(os.environ["RADSCAN_MODEL"]) if os.environ.get("RADSCAN_MODEL") else default_model_dir()


def _age_range(text: str) -> tuple[float, float]:
    """'1-5' -> (1.0, 5.0) years; ValueError otherwise."""
    low, sep, high = text.partition("-")
    try:
        ages = (float(low), float(high))
    except ValueError:
        ages = None
    if not sep or ages is None or not 0 <= ages[0] <= ages[1] <= 130:
        raise ValueError(f"--age-range must be MIN-MAX in years, e.g. 1-5, not {text!r}")
    return ages


def _describe_box(crop: list[float]) -> str:
    left, top, right, bottom = (100 * float(f) for f in crop)
    return f"{left:.0f}-{right:.0f}% across, {top:.0f}-{bottom:.0f}% down every film"


def _describe_qc(reference: QCReference | None, metadata: dict) -> str:
    if reference is None:
        return "no reference: wrong-way-round and non-chest images are not caught"
    ages = (metadata.get("population") or {}).get("age_years")
    population = f"; population aged {ages[0]:g}-{ages[1]:g} years" if ages else ""
    return f"reference of {reference.n_reference} training normals{population}"


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@json_option
def info(model_dir: Path | None, as_json: bool) -> None:
    """Verify a model directory (hashes, format, preprocessing version) and print its metadata;
    without MODEL_DIR, the model `radscan score` uses (RADSCAN_MODEL, else the shipped one).

    \b
    Examples:
      radscan info
      radscan info models/site-2026 --json
    """
    from radscan.model.io import load_model
    from radscan.qc import load_reference

    model_dir = model_dir or _model_in_use()
    _, metadata = load_model(model_dir)
    reference = load_reference(model_dir, metadata)
    if as_json:
        _echo_json(metadata)
        return
    calibration, training = metadata.get("calibration", {}), metadata.get("training", {})
    config = metadata.get("config", {})
    lines = [
        f"name            {metadata.get('name')}  version {metadata.get('version')}",
        f"radscan         {metadata.get('radscan_version')}  preprocessing {metadata.get('preprocess_version')}",
        f"parameters      {metadata['parameters']:,}" if isinstance(metadata.get("parameters"), int)
        else "parameters      ?",
        f"score           {config.get('score_kind')}: {SCORE_KINDS.get(config.get('score_kind'), '?')}",
        f"critics         {config.get('critic_snapshots')} (the last epochs' discriminators, averaged)",
        f"field           {config.get('field', 'film')}: {FIELDS.get(config.get('field', 'film'), '?')}",
        *([f"box             {_describe_box(config['crop'])}"] if config.get("crop") else []),
        f"quality control {_describe_qc(reference, metadata)}",
        f"threshold       {calibration.get('threshold'):.4f} ({calibration.get('method')})",
        f"training        {training.get('n_train')} images, {training.get('epochs_run')} epochs, "
        f"{training.get('minutes')} min on {training.get('device')}"
        + (f"; kept {training['shipped']}" if str(training.get("shipped", "last epoch")) != "last epoch" else ""),
        *_describe_metrics(metadata.get("metrics", {})),
        f"weights sha256  {metadata['weights']['sha256']}",
        "use             research and triage support only, not a diagnosis",
    ]
    click.echo("\n".join(lines))


def _describe_metrics(metrics: dict[str, Any]) -> list[str]:
    """The model's measured figures in words, one line per data set (validation, test), with what a
    reader must know about each; `--json` gives them as stored."""
    lines = []
    for prefix, what in (("val", "validation"), ("test", "test")):
        auc = metrics.get(f"{prefix}_auc")
        if auc is None:
            continue
        interval = metrics.get(f"{prefix}_auc_ci95")
        line = f"{what} AUC {auc:.3f}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
        if f"{prefix}_sensitivity" in metrics:
            line += (f"; at the threshold {metrics[f'{prefix}_sensitivity']:.0%} of abnormal films flagged, "
                     f"{metrics.get(f'{prefix}_specificity', float('nan')):.0%} of normal films not")
        if prefix == "test":
            line += (" (a held-out split read once, after every choice was made; another site's films differ: "
                     "measure on your own with radscan evaluate)")
        else:
            line += " (the data every choice was made on: optimistic)"
        lines.append(line)
    if "calibration_specificity" in metrics:
        lines.append(f"calibration normals below the threshold: {metrics['calibration_specificity']:.1%}")
    if "measured_by" in metrics:
        lines.append(f"measured by {metrics['measured_by']}")
    if not lines:
        return ["metrics         none recorded (train with --val-abnormal, or run radscan evaluate)"]
    return [f"{'metrics' if index == 0 else '':16s}{line}" for index, line in enumerate(lines)]


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, required=True, type=INPUT_PATH)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Image-level worklist CSV (replaced atomically). The study CSV, explanation PNGs, state "
                   "store and lock go beside it.")
@model_option
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@device_option
@click.option("--residuals", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the explanation PNGs (score map and reconstruction difference) "
                   "[default: <out>_residuals/].")
@click.option("--no-residuals", is_flag=True, help="Do not write explanation PNGs (faster: no gradient pass).")
@click.option("--pictures", type=click.Choice(["all", "flagged"]), default="flagged", show_default=True,
              help="Which scored images get an explanation picture: only the flagged ones (the rest are scored "
                   "without the generator and gradient passes: about 2x faster), or all. --no-residuals: none.")
@click.option("--no-html", is_flag=True,
              help="Do not write the web page of the worklist (<out>.html: opens from a file share, no server).")
@click.option("--studies", type=click.Path(dir_okay=False, path_type=Path),
              help="Study-level worklist CSV [default: <out>_studies.csv].")
@study_key_option
@click.option("--phi", type=click.Choice(["keep", "hash", "drop"]), default="keep", show_default=True,
              help="PatientID and AccessionNumber in the outputs: as they are, a keyed HMAC, or removed.")
@click.option("--phi-key", envvar="RADSCAN_PHI_KEY", help="HMAC key for --phi hash (or RADSCAN_PHI_KEY).")
@click.option("--phi-key-file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("~/.config/radscan/phi.key").expanduser(), show_default=True,
              help="Where the HMAC key is kept when no --phi-key is given (created on first use, mode 0600).")
@click.option("--dicom-out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write DICOM results for the PACS into DIR: per scored DICOM image a Structured Report (score, "
                   "threshold, flag, model) and a Secondary Capture of its explanation picture, in the source "
                   "study, marked not for diagnostic use. Needs radscan[pacs] and --phi keep.")
@click.option("--send", "send_to", metavar="HOST:PORT",
              help="Send the DICOM results the PACS has not yet accepted by C-STORE (needs --dicom-out). A failed "
                   "send keeps them in DIR, says so in the rows, exits 3, and is retried by the next run.")
@click.option("--ae-title", default="RADSCAN", show_default=True,
              help="radscan's own AE title when sending (the PACS must know it).")
@click.option("--called-ae", default="ANY-SCP", show_default=True, help="The PACS's AE title.")
@click.option("--scheduler", metavar="ADDRESS|local:N",
              help="Read and score on a Dask cluster: a scheduler address (tcp://HOST:8786) whose workers see the "
                   "inputs and the model at the same paths, or local:N to start N worker processes here. The "
                   "outputs are written here, as without it. Needs radscan[dask].")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write the run's metrics (exit code, last success, files by status, flagged share, results "
                   "not sent) to FILE in the Prometheus text format, for node_exporter's textfile collector; "
                   "written after every run, failed ones too.")
@qc_option
@views_option
@selection_options
@workers_option
@json_option
@click.pass_context
def score(ctx: click.Context, paths: tuple[str, ...], out: Path, model: Path | None, batch_size: int,
          device: str, residuals: Path | None, no_residuals: bool, pictures: str, no_html: bool, studies: Path | None,
          study_key: str, phi: str, phi_key: str | None, phi_key_file: Path, dicom_out: Path | None,
          send_to: str | None, ae_title: str, called_ae: str, scheduler: str | None, metrics: Path | None,
          qc_mode: str, views: str, policy: Policy, workers: int, as_json: bool) -> None:
    """Score every chest radiograph under PATHS and write the triage worklist.

    Writes an image-level CSV (--out, sorted by study score then score, highest first, one row per
    file including those not scored), a study-level CSV and explanation PNGs. Reruns score only new
    or changed files and rescore everything when the model changes; a second run on the same
    outputs exits at once with code 75. Research and triage support only, not diagnosis.

    \b
    Example:
      radscan score /data/incoming --out /data/worklist/report.csv
      radscan score /data/incoming --out report.csv --model models/site-2026 --phi hash --json
      radscan score /data/incoming --out report.csv --dicom-out results/ --send pacs:104 --called-ae PACS
      radscan score /archive/mimic --out report.csv --scheduler tcp://scheduler:8786
    """
    from radscan.batch import ScoreSettings
    from radscan.pacs import Destination
    from radscan.phi import load_phi_key
    from radscan.score import check_dicom_settings
    from radscan.score import score as run_score
    from radscan.worklist import OutputPaths

    if residuals and no_residuals:
        raise click.UsageError("--residuals and --no-residuals exclude each other")
    if phi_key is None and "RADSCAN_PHI_KEY" in os.environ:  # Click reads a set but empty variable as unset
        phi_key = os.environ["RADSCAN_PHI_KEY"]
    if phi == "hash" and phi_key is None:  # the key must not be read as, or created among, the radiographs
        from radscan.ingest import check_outputs_apart

        check_outputs_apart(paths, [phi_key_file])
    outputs = OutputPaths.beside(out, studies, residuals, write_residuals=not no_residuals, write_html=not no_html,
                                 dicom=dicom_out)
    settings = ScoreSettings(model_dir=model, batch_size=batch_size, device=device, workers=workers, phi=phi,
                             policy=policy, progress=not ctx.obj["quiet"], qc=qc_mode,
                             views=parse_list(views), pictures=pictures,
                             send=Destination.parse(send_to, called_ae, ae_title) if send_to else None,
                             scheduler=scheduler, study_key=study_key)
    check_dicom_settings(outputs, settings)  # a refused combination must not create the PHI key file first
    if phi == "hash":
        settings = dataclasses.replace(settings, phi_key=load_phi_key(phi_key, phi_key_file))
    if metrics is not None:
        from radscan.ingest import check_outputs_apart

        check_outputs_apart(paths, [metrics])
    summary = _score_recording_failure(run_score, paths, outputs, settings, metrics)
    results_kept = summary.dicom is not None and (summary.dicom["not_sent"] or summary.dicom["not_made"])
    exit_code = ExitCode.PARTIAL if summary.counts["error"] or results_kept else ExitCode.OK
    if metrics is not None:
        from radscan.metrics import write_metrics

        write_metrics(metrics, exit_code, summary.as_dict())
    if as_json:
        _echo_json(summary.as_dict(), exit_code)
    elif not ctx.obj["quiet"]:
        counts = summary.counts
        click.echo(f"{counted(summary.files, 'file')}: {counts['ok']} scored ({summary.reused} unchanged), "
                   f"{counts['rejected']} rejected by QC, {counts['skipped']} skipped, {counts['error']} error; "
                   f"{summary.flagged_studies} of "
                   f"{summary.studies} studies flagged -> {summary.report}", err=True)
        if results_kept:
            click.echo(f"DICOM results: {summary.dicom['not_sent']} objects not sent, {summary.dicom['not_made']} "
                       "images without results: see dicom_result and reason in the worklist", err=True)
    if exit_code != ExitCode.OK:
        ctx.exit(exit_code)


def _score_recording_failure(run_score: Callable, paths: tuple[str, ...], outputs: Any, settings: Any,
                             metrics: Path | None) -> Any:
    """`run_score`, and when it fails, a record of the failure in the worklist page it leaves as
    it was (radscan.htmlreport.record_failed_run), so that the page says its list is stale, and in
    the metrics file. A run refused because another one holds the lock records nothing: that one
    will write them."""
    from datetime import datetime, timezone

    from radscan.errors import LockHeldError, RadscanError
    from radscan.htmlreport import record_failed_run

    try:
        return run_score(paths, outputs, settings)
    except LockHeldError:
        raise
    except BaseException as exc:
        code, words = _failure(exc)
        if outputs.html is not None:
            record_failed_run(outputs.html, {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                             "exit_code": int(code), "error": words})
        if metrics is not None:
            from radscan.metrics import write_metrics

            with contextlib.suppress(RadscanError):  # the run's own error is the one to report
                write_metrics(metrics, code, None)
        raise


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--normal", multiple=True, required=True, type=INPUT_PATH,
              help="Folder or file of normal images (repeatable).")
@click.option("--abnormal", multiple=True, required=True, type=INPUT_PATH,
              help="Folder or file of abnormal images (repeatable).")
@click.option("--model", "models", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory (repeat to compare models on the same images; default: the shipped model, "
                   "or RADSCAN_MODEL).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the report: evaluation.html, roc.png, histogram.png, per_image.csv.")
@click.option("--roc", type=click.Path(dir_okay=False, path_type=Path), help="Write the ROC figure alone as a PNG.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@device_option
@selection_options
@workers_option
@json_option
@click.pass_context
def evaluate(ctx: click.Context, normal: tuple[str, ...], abnormal: tuple[str, ...], models: tuple[Path, ...],
             out: Path | None, roc: Path | None, batch_size: int, device: str, policy: Policy, workers: int,
             as_json: bool) -> None:
    """Measure models on labelled folders: AUC with a bootstrap 95% interval, average precision,
    sensitivity / specificity / F1 and TP/FP/TN/FN at each model's threshold; with two models, a
    paired bootstrap of their AUC difference. --out writes a report a person can read.

    \b
    Examples:
      radscan evaluate --normal test/normal --abnormal test/pneumonia --out eval/
      radscan evaluate --normal test/normal --abnormal test/pneumonia --model models/a --model models/b --out cmp/
    """
    from radscan.evaluate import evaluate as run_evaluate

    if not models:
        models = (_model_in_use(),)
    result = run_evaluate(normal, abnormal, models, batch_size, device, workers, policy,
                          progress=not ctx.obj["quiet"], out_dir=out, roc_png=roc)
    if as_json:
        _echo_json(result)
        return
    lines = []
    for model_result in result["models"]:
        at, best = model_result["at_model_threshold"], model_result["at_best_accuracy_threshold_on_this_set"]
        low, high = model_result["auc_ci95"]
        lines += [
            f"model {model_result['model_name']}: {model_result['normal']} normal, {model_result['abnormal']} "
            "abnormal images",
            f"AUC {model_result['auc']:.3f} (95% CI {low:.3f}-{high:.3f}), average precision "
            f"{model_result['average_precision']:.3f}",
            f"at the model's threshold {at['threshold']:.4f}: sensitivity {at['sensitivity']:.3f}, specificity "
            f"{at['specificity']:.3f}, F1 {at['f1']:.3f}, accuracy {at['accuracy']:.3f} (TP {at['tp']}, FP "
            f"{at['fp']}, TN {at['tn']}, FN {at['fn']})",
            f"at the best-accuracy threshold on this set (optimistic, as papers report): accuracy "
            f"{best['accuracy']:.3f}, F1 {best['f1']:.3f}",
        ]
    for comparison in result["comparisons"]:
        low, high = comparison["ci95"]
        lines.append(f"AUC of {comparison['second']} minus {comparison['first']}: {comparison['difference']:+.3f} "
                     f"(95% CI {low:+.3f} to {high:+.3f}, paired bootstrap)")
    if "outputs" in result:
        lines.append(f"report: {result['outputs']['evaluation.html']}")
    lines.append(f"({DISCLAIMER_SHORT})")
    click.echo("\n".join(lines))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--normals", multiple=True, required=True, type=INPUT_PATH,
              help="The site's own normal images, not used for training or evaluation (repeatable).")
@click.option("--target-specificity", type=FiniteFloatRange(0.5, 0.999), default=0.95, show_default=True,
              help="Share of these normals that the new threshold keeps below it.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Write the recalibrated model to this new directory (it must not hold a model).")
@click.option("--in-place", is_flag=True, help="Replace MODEL_DIR's calibration instead (it gets a new version).")
@device_option
@selection_options
@workers_option
@json_option
@click.pass_context
def calibrate(ctx: click.Context, model_dir: Path, normals: tuple[str, ...], target_specificity: float,
              out: Path | None, in_place: bool, device: str, policy: Policy, workers: int, as_json: bool) -> None:
    """Re-derive a model's score scale and flag threshold from a site's own normal studies.

    Scores NORMALS with the model; their mean and spread become the score's scale and the
    --target-specificity quantile the threshold. Use it to adapt a model (the shipped one too) to a
    site's scanners and population before relying on its flags.

    \b
    Example:
      radscan calibrate models/kermany-tiny --normals /data/site-normals --out models/site-calibrated
      radscan calibrate models/site-calibrated --normals /data/more-normals --in-place
    """
    from radscan.calibration import recalibrate
    from radscan.model.runtime import resolve_device

    if bool(out) == in_place:
        raise click.UsageError("give --out NEW_DIR (a recalibrated copy) or --in-place (replace MODEL_DIR's "
                               "calibration)")
    if out and (out / "model.json").exists():
        raise click.UsageError(f"{out} already holds a model: radscan never overwrites one; choose another --out")
    result = recalibrate(model_dir, normals, out, target_specificity, policy, workers, resolve_device(device),
                         progress=not ctx.obj["quiet"])
    if as_json:
        _echo_json(result)
    elif not ctx.obj["quiet"]:
        click.echo(f"threshold {result['threshold']:.4f} from {result['n_calibration']} normals -> "
                   f"{result['model']}", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the report (default: the model directory).")
@json_option
def report(model_dir: Path, out: Path | None, as_json: bool) -> None:
    """Redraw a model's training report (training_report.html and its figures) from the files in
    its directory: the training log, the calibration scores and the metadata.

    \b
    Example:
      radscan report models/kermany-tiny
      radscan report models/site-2026 --out /srv/reports/site-2026
    """
    from radscan.trainreport import write_training_report

    page = write_training_report(model_dir, out)
    if as_json:
        _echo_json({"report": str(page)})
    else:
        click.echo(f"training report: {page}", err=True)


def _name_environment_variables() -> None:
    """RADSCAN_<COMMAND>_<OPTION> after the option's name as typed (RADSCAN_SCORE_JSON for --json),
    not Click's default, the Python parameter's name (which would be RADSCAN_SCORE_AS_JSON)."""
    for command_name, command in cli.commands.items():
        for param in command.params:
            long_names = [name for name in param.opts if name.startswith("--")]
            if isinstance(param, click.Option) and param.envvar is None and long_names:
                option = long_names[0][2:].replace("-", "_").upper()
                param.envvar = f"RADSCAN_{command_name.upper()}_{option}"


_name_environment_variables()


def main() -> None:
    """The `radscan` entry point. With --json, a run that fails still prints one JSON object on
    stdout ({"ok": false, "exit_code": ..., "error": ...}), so that a wrapper never keeps an empty
    or stale summary."""
    _reopen_closed_standard_streams()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        code = cli.main(auto_envvar_prefix="RADSCAN", standalone_mode=False)
    except click.ClickException as exc:
        _name_the_source(exc)
        _json_failure(*_failure(exc))
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, _Terminated) as exc:
        # the run unwinds like any failure (temporary files removed, lock released, earlier outputs
        # intact) and says so, so that a wrapper's summary is never empty
        exit_code, message = _failure(exc)
        _json_failure(exit_code, message)
        click.echo(f"Error: {message}", err=True)
        sys.exit(exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        _json_failure(*_failure(exc))
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _name_the_source(exc: click.ClickException) -> None:
    """A bad value that came from a RADSCAN_* variable or the --config file is blamed on it, not
    on the command-line option the user never typed."""
    if not isinstance(exc, click.BadParameter) or exc.ctx is None or exc.param is None or not exc.param.name:
        return
    source = exc.ctx.get_parameter_source(exc.param.name)
    if source == click.core.ParameterSource.ENVIRONMENT and isinstance(exc.param, click.Option):
        names = exc.param.envvar if isinstance(exc.param.envvar, (list, tuple)) else [exc.param.envvar]
        given = [name for name in names if name and name in os.environ]
        exc.param_hint = f"the environment variable {given[0] if given else names[0]}"
    elif source == click.core.ParameterSource.DEFAULT_MAP:
        config = (exc.ctx.obj or {}).get("config")
        exc.param_hint = f"'{exc.param.name}' in the [{exc.ctx.info_name}] table of {config or 'the --config file'}"


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the words of a command that failed with `exc`: one reading for the
    --json summary, stderr, the worklist page and the metrics file."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt, _Terminated)):
        sigterm = isinstance(exc, _Terminated)
        return (ExitCode.TERMINATED if sigterm else ExitCode.INTERRUPTED,
                f"{'stopped by SIGTERM' if sigterm else 'interrupted'}: earlier outputs are intact; run again "
                "to finish")
    return ExitCode.CRASH, f"{type(exc).__name__}: {exc} (a bug in radscan: please report it)"


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM (BaseException: no `except Exception` swallows it)."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated


def _reopen_closed_standard_streams() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`, some schedulers), radscan and its
    decoding workers would fail on every file; the closed stream is pointed at /dev/null instead
    (what it would have received is lost, as its closer intended) and the run goes on."""
    for descriptor, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(descriptor)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != descriptor:
                os.dup2(null, descriptor)  # dup2 makes it inheritable
                os.close(null)
            else:  # os.open gives non-inheritable descriptors: the decoding workers need this one
                os.set_inheritable(descriptor, True)
            mode = "r" if descriptor == 0 else "w"
            setattr(sys, name, open(descriptor, mode, closefd=False))  # noqa: SIM115 (lives as long as the process)


def _json_failure(exit_code: int, message: str) -> None:
    # also when --json's own value was the error (RADSCAN_SCORE_JSON=maybe): the wrapper still gets an object
    asked_by_variable = any(name.startswith("RADSCAN_") and name.endswith("_JSON")
                            and value.strip().lower() not in ("", "0", "false", "f", "no", "n", "off")
                            for name, value in os.environ.items())
    if _json_requested or asked_by_variable or "--json" in sys.argv[1:]:
        click.echo(json.dumps({"ok": False, "exit_code": int(exit_code), "error": message}))
