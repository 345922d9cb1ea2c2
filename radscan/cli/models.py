"""The commands about models: `radscan train`, `info`, `evaluate`, `calibrate` and `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from radscan.cli.common import (
    DISCLAIMER_SHORT,
    EXIT_CODES_HELP,
    INPUT_PATH,
    PRESET_NAMES,
    RECIPE,
    FiniteFloatRange,
    device_option,
    echo_json,
    json_option,
    model_in_use,
    qc_option,
    read_settings,
    selection_options,
    workers_option,
)
from radscan.errors import ExitCode
from radscan.logs import one_line_text
from radscan.model.config import FIELDS, SCORE_KINDS
from radscan.policy import Policy
from radscan.preprocess import FOLLOW_REACH, FOLLOW_SIZE
from radscan.qc import QCReference
from radscan.recipe import MODEL_SETTINGS, PRESET
from radscan.records import counted
from radscan.stopping import outcome_said


@click.command(epilog=EXIT_CODES_HELP)
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
@click.option("--follow-chest/--fixed-box", "follow", default=MODEL_SETTINGS.get("follow", False), show_default=True,
              help="With --field thorax-box: move the box, film by film, to where that film's chest lies against "
                   "the training normals' mean film (a film framed off-centre is then read like the others), or "
                   "cut it at the same place in every film.")
@click.option("--critic-blur", type=FiniteFloatRange(0, 8), metavar="SIGMA",
              help="Gaussian low-pass (pixels) in front of the discriminator, so that the critic judges "
                   "anatomy and opacity rather than sharpness (overrides the preset; 0 = none).")
@click.option("--critic-snapshots", type=click.IntRange(1), default=MODEL_SETTINGS["critic_snapshots"],
              show_default=True, help="Average the critics of the last K epochs (the critic score).")
@click.option("--epochs", type=click.IntRange(1), default=RECIPE.epochs, show_default=True)
@click.option("--keep", type=click.Choice(["last", "best", "synthetic"]), default=RECIPE.keep, show_default=True,
              help="Which epoch's model is saved: the last; 'best', the highest validation AUC of its score "
                   "(needs --val-abnormal; judge that model on other films); or 'synthetic', without labels, the "
                   "epoch whose density best tells the calibration normals from copies of them given one "
                   "synthetic local defect each (experimental: it kept a good epoch in 5 of 7 seeds; check the "
                   "kept epoch against the training report's curve; see docs/training.md).")
@click.option("--d-schedule", type=click.Choice(["constant", "cosine"]), default=RECIPE.d_schedule,
              show_default=True, help="The discriminator's learning rate: constant, or annealed with the "
                                      "generator's cosine (experimental).")
@click.option("--max-minutes", type=FiniteFloatRange(0, min_open=True),
              help="Time budget: no epoch is begun that would end past it (at least one runs). The model "
                   "is made from the epochs run; to train them all, train again into another --out with "
                   "a larger budget (an interrupted run, not a budget's, continues with --resume; so does "
                   "a budget that stopped before the critic snapshots were filled, which makes no model).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=RECIPE.batch_size, show_default=True)
@click.option("--lr", type=FiniteFloatRange(0), default=RECIPE.lr, show_default=True,
              help="Adam learning rate of both networks.")
@click.option("--cosine-epochs", type=click.IntRange(1), default=RECIPE.cosine_t_max, show_default=True,
              help="Length of the generator's cosine learning-rate decay, in epochs.")
@click.option("--aspect", type=FiniteFloatRange(0), default=RECIPE.aspect, show_default=True,
              help="Augmentation: width/height ratio changed by a factor in [1/(1+A), 1+A] per image.")
@click.option("--gamma", type=FiniteFloatRange(0), default=RECIPE.gamma, show_default=True,
              help="Augmentation: gamma drawn in [1/(1+G), 1+G] per image.")
@click.option("--contrast", type=FiniteFloatRange(0), default=RECIPE.contrast, show_default=True,
              help="Augmentation: contrast factor drawn in [1/(1+C), 1+C] per image.")
@click.option("--blur", type=FiniteFloatRange(0), default=RECIPE.blur, show_default=True,
              help="Augmentation: on half the images a Gaussian blur of sigma drawn in [0, 2B] pixels "
                   "(at 128 px; mean B).")
@click.option("--noise", type=FiniteFloatRange(0), default=RECIPE.noise, show_default=True,
              help="Augmentation: Gaussian noise up to this standard deviation (grey range 0..1).")
@click.option("--synthetic", type=FiniteFloatRange(0), default=RECIPE.synthetic, show_default=True,
              help="Weight of local synthetic defects (haze, brighter or darker region, lost contrast, noise) "
                   "shown to the discriminator as abnormal (0 = off).")
@click.option("--r1", type=FiniteFloatRange(0), default=RECIPE.r1, show_default=True,
              help="R1 penalty on the discriminator's input gradient at real films, so that it cannot key on "
                   "pixel-level detail (0 = off; docs/training.md).")
@click.option("--seed", type=int, default=RECIPE.seed, show_default=True,
              help="Same seed + same data + CPU = same model.")
@click.option("--calibration-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              default=RECIPE.calibration_fraction,
              show_default=True,
              help="Share of the normals held out (never trained on) for calibration.")
@click.option("--patient-pattern", metavar="REGEX",
              help="For JPEG/PNG normals: a regular expression whose match in a file's name (its first group, if "
                   "any) names the patient, so that the calibration split keeps each patient's films on one side "
                   r"(e.g. 'person\d+' or '^(\d{8})_').")
@click.option("--target-specificity", type=FiniteFloatRange(0.5, 0.999), default=RECIPE.target_specificity,
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
          score_kind: str, density_grid: int, field: str, follow: bool, critic_blur: float | None,
          critic_snapshots: int, epochs: int,
          keep: str, d_schedule: str, max_minutes: float | None,
          batch_size: int, lr: float, cosine_epochs: int, aspect: float, gamma: float, contrast: float, blur: float,
          noise: float, synthetic: float, r1: float, seed: int,
          calibration_fraction: float, patient_pattern: str | None, target_specificity: float, resume: bool,
          init_from: Path | None,
          name: str | None, age_range: str | None, device: str, policy: Policy, workers: int,
          as_json: bool) -> None:
    """Train a SimSID model on NORMALS (folders or files of normal studies: DICOM, JPEG, PNG).

    The defaults are the recipe of the shipped model (about 16 minutes for 1,000 films on 2 CPU
    cores; adult films: add --field film, see docs/training.md). A calibration share of the
    normals is held out; it sets the score's scale and the flag threshold. The last epoch's
    weights are shipped (or, with --keep best, the epoch's with the highest validation AUC), with
    the critics of the last --critic-snapshots epochs, and the feature density is fitted to the
    training normals.
    Checkpoints are written every epoch: an interrupted run continues with --resume.

    \b
    Examples:
      radscan train /data/normals --out models/site-2026
      radscan train /data/normals --out models/try --val-abnormal /data/pneumonia-val --max-minutes 30
    """
    from radscan.model.engine import require_torch

    require_torch("radscan train")
    from radscan.model.config import preset as make_preset
    from radscan.model.runtime import resolve_device
    from radscan.train import TrainConfig
    from radscan.train import train as run_train

    overrides = read_settings(settings_file) if settings_file else {}
    for option, key in (("memory", "memory_kind"), ("score_kind", "score_kind"),
                        ("critic_snapshots", "critic_snapshots"), ("density_grid", "density_grid"),
                        ("field", "field")):
        given = ctx.get_parameter_source(option) is not click.core.ParameterSource.DEFAULT
        if ctx.params[option] is not None and (given or key not in overrides):  # a settings file beats a default
            overrides[key] = ctx.params[option]
    if critic_blur is not None:
        overrides["critic_blur_sigma"] = critic_blur
    # the box follows the chest by default, where there is a box: a whole-film model has none to move
    given = ctx.get_parameter_source("follow") is not click.core.ParameterSource.DEFAULT
    if given or "follow" not in overrides:
        overrides["follow"] = follow if given else follow and overrides.get("field") == "thorax-box"
    try:
        model_cfg = make_preset(preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        torch_device = resolve_device(device)
        tcfg = TrainConfig(epochs=epochs, keep=keep, d_schedule=d_schedule, max_minutes=max_minutes,
                           batch_size=batch_size, lr=lr,
                           cosine_t_max=cosine_epochs, aspect=aspect, gamma=gamma, contrast=contrast, blur=blur,
                           noise=noise, synthetic=synthetic, r1=r1, seed=seed,
                           calibration_fraction=calibration_fraction, patient_pattern=patient_pattern,
                           target_specificity=target_specificity)
        ages = _age_range(age_range) if age_range else None
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    result = run_train(normals, out, model_cfg, tcfg, val_normal, val_abnormal, policy, torch_device, workers,
                       resume, progress=not ctx.obj["quiet"], name=name, init_from=init_from, age_range=ages)
    outcome_said()  # the model is written: a stop from now on does not say "interrupted"
    summary = {"model": str(result.model_dir), "epochs_run": result.epochs_run,
               "stopped_by_budget": result.stopped_by_budget, "files_unreadable": result.unreadable, **result.metrics,
               **({"validation_warning": result.validation_warning} if result.validation_warning else {})}
    exit_code = ExitCode.PARTIAL if result.unreadable else ExitCode.OK  # listed in training_inputs.csv
    if as_json:
        echo_json(summary, exit_code)
    elif not ctx.obj["quiet"]:
        click.echo(f"model written to {one_line_text(str(result.model_dir))} ({counted(result.epochs_run, 'epoch')})"
                   + (f"; {counted(result.unreadable, 'file')} could not be read (training_inputs.csv)"
                      if result.unreadable else ""), err=True)
    ctx.exit(exit_code)


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


def _describe_box(crop: list[float], follows: bool) -> str:
    left, top, right, bottom = (100 * float(f) for f in crop)
    if follows:
        return (f"{left:.0f}-{right:.0f}% across, {top:.0f}-{bottom:.0f}% down the training normals' mean film, moved "
                f"with each film's chest (up to {100 * FOLLOW_REACH / FOLLOW_SIZE:.0f}% each way)")
    return f"{left:.0f}-{right:.0f}% across, {top:.0f}-{bottom:.0f}% down every film"


def _describe_qc(reference: QCReference | None, metadata: dict) -> str:
    if reference is None:
        return "no reference: wrong-way-round and non-chest images are not caught"
    ages = (metadata.get("population") or {}).get("age_years")
    population = f"; population aged {ages[0]:g}-{ages[1]:g} years" if ages else ""
    return f"reference of {reference.n_reference} training normals{population}"


@click.command(epilog=EXIT_CODES_HELP)
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
    import importlib.util

    from radscan.model.engine import load_engine, verify_files
    from radscan.model.field import load_follow
    from radscan.model.metadata import is_exported, read_metadata
    from radscan.qc import load_reference

    model_dir = model_dir or model_in_use()
    metadata = read_metadata(model_dir)
    if is_exported(metadata) or importlib.util.find_spec("torch") is not None:
        _, metadata = load_engine(model_dir, "cpu")  # everything loading checks (the calibration copy too)
    else:  # without torch: the weights' sha256 and sealed settings, not loaded
        verify_files(model_dir, metadata)
    load_follow(Path(model_dir), metadata)  # verified, as scoring would
    reference = load_reference(model_dir, metadata)
    if as_json:
        echo_json(metadata)
        return
    calibration, training = metadata.get("calibration", {}), metadata.get("training", {})
    config = metadata.get("config", {})
    lines = [
        f"name            {metadata.get('name')}  version {metadata.get('version')}",
        f"radscan         {metadata.get('radscan_version')}  preprocessing {metadata.get('preprocess_version')}",
        f"parameters      {metadata['parameters']:,}" if isinstance(metadata.get("parameters"), int)
        else "parameters      ?",
        f"score           {config.get('score_kind')}: {SCORE_KINDS.get(config.get('score_kind'), '?')}",
        f"critics         {config.get('critic_snapshots')} (the last epochs' discriminators, averaged"
        + ("" if config.get("score_kind") == "critic" else ": the critic kind's, not this model's score") + ")",
        f"field           {config.get('field', 'film')}: {FIELDS.get(config.get('field', 'film'), '?')}",
        *([f"box             {_describe_box(config['crop'], bool(config.get('follow')))}"]
          if config.get("crop") else []),
        f"quality control {_describe_qc(reference, metadata)}",
        f"threshold       {calibration.get('threshold'):.4f} ({calibration.get('method')})",
        f"training        {training.get('n_train')} images, {training.get('epochs_run')} epochs, "
        f"{training.get('minutes')} min on {training.get('device')}"
        + (f"; kept {training['shipped']}" if str(training.get("shipped", "last epoch")) != "last epoch" else ""),
        *_describe_metrics(metadata.get("metrics", {})),
        f"weights sha256  {metadata['weights']['sha256']}" + (
            f" ({metadata['weights'].get('file')}, ONNX Runtime; exported from the weights "
            f"{metadata.get('exported_from', {}).get('sha256', '?')[:12]}...)" if metadata.get("engine") else ""),
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


@click.command(epilog=EXIT_CODES_HELP)
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
@qc_option
@device_option
@selection_options
@workers_option
@json_option
@click.pass_context
def evaluate(ctx: click.Context, normal: tuple[str, ...], abnormal: tuple[str, ...], models: tuple[Path, ...],
             out: Path | None, roc: Path | None, batch_size: int, qc_mode: str, device: str, policy: Policy,
             workers: int, as_json: bool) -> None:
    """Measure models on labelled folders: AUC with a bootstrap 95% interval, average precision,
    sensitivity / specificity / F1 and TP/FP/TN/FN at each model's threshold; with two models, a
    paired bootstrap of their AUC difference. Quality control judges the films first, as radscan
    score does: the films it rejects (--qc strict) are left out of the measure and counted.
    --out writes a report a person can read.

    \b
    Examples:
      radscan evaluate --normal test/normal --abnormal test/pneumonia --out eval/
      radscan evaluate --normal test/normal --abnormal test/pneumonia --model models/a --model models/b --out cmp/
    """
    from radscan.evaluate import evaluate as run_evaluate

    if not models:
        models = (model_in_use(),)
    result = run_evaluate(normal, abnormal, models, batch_size, device, workers, policy,
                          progress=not ctx.obj["quiet"], out_dir=out, roc_png=roc, qc_mode=qc_mode)
    exit_code = ExitCode.PARTIAL if result["files_unreadable"] else ExitCode.OK
    if as_json:
        echo_json(result, exit_code)
        ctx.exit(exit_code)
    lines = [f"WARNING: {warning}" for warning in result["warnings"]]
    for model_result in result["models"]:
        at, best = model_result["at_model_threshold"], model_result["at_best_accuracy_threshold_on_this_set"]
        low, high = model_result["auc_ci95"]
        lines += [
            f"model {model_result['label']}: {model_result['normal']} normal, {model_result['abnormal']} "
            "abnormal images",
            f"AUC {model_result['auc']:.3f} (95% CI {low:.3f}-{high:.3f}), average precision "
            f"{model_result['average_precision']:.3f}",
            f"at the model's threshold {at['threshold']:.4f}: sensitivity {at['sensitivity']:.3f}, specificity "
            f"{at['specificity']:.3f}, F1 {at['f1']:.3f}, accuracy {at['accuracy']:.3f} (TP {at['tp']}, FP "
            f"{at['fp']}, TN {at['tn']}, FN {at['fn']})",
            f"at the best-accuracy threshold on this set (optimistic, as papers report): accuracy "
            f"{best['accuracy']:.3f}, F1 {best['f1']:.3f} (calling every image {result['majority_class']}: "
            f"{result['majority_class_accuracy']:.3f})",
        ]
    left_out = result["rejected_by_qc"]
    if left_out["normal"] or left_out["abnormal"]:
        lines.append(f"left out by quality control (--qc strict): {left_out['normal']} normal, "
                     f"{left_out['abnormal']} abnormal films (listed with the reason in per_image.csv with --out, "
                     "and in --json; --qc warn measures them)")
    failed = result["failed_qc_but_measured"]
    if failed["normal"] or failed["abnormal"]:
        lines.append(f"measured although quality control failed them (--qc {left_out['qc']}): {failed['normal']} "
                     f"normal, {failed['abnormal']} abnormal films (marked in per_image.csv with --out; --qc strict "
                     "leaves them out, as radscan score does)")
    for comparison in result["comparisons"]:
        low, high = comparison["ci95"]
        lines.append(f"AUC of {comparison['second_name']} minus {comparison['first_name']}: "
                     f"{comparison['difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f}, paired bootstrap)")
    if "outputs" in result:
        lines.append(f"report: {result['outputs']['evaluation.html']}")
    if result["files_unreadable"]:
        lines.append(f"{counted(result['files_unreadable'], 'file')} could not be read and are not measured (exit 3)")
    lines.append(f"({DISCLAIMER_SHORT})")
    click.echo("\n".join(lines))
    ctx.exit(exit_code)


@click.command(epilog=EXIT_CODES_HELP)
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
    --target-specificity quantile the threshold. They replace the normals the model was calibrated on:
    give all of them, not only those added since. Use it to adapt a model (the shipped one too) to a
    site's scanners and population before relying on its flags.

    \b
    Example:
      radscan calibrate models/kermany-tiny --normals /data/site-normals --out models/site-calibrated
      radscan calibrate models/site-calibrated --normals /data/site-normals --normals /data/more-normals --in-place
    """
    from radscan.model.engine import require_torch

    require_torch("radscan calibrate")
    from radscan.calibration import recalibrate
    from radscan.model.runtime import resolve_device

    if bool(out) == in_place:
        raise click.UsageError("give --out NEW_DIR (a recalibrated copy) or --in-place (replace MODEL_DIR's "
                               "calibration)")
    if out and (out / "model.json").exists():
        raise click.UsageError(f"{out} already holds a model: radscan never overwrites one; choose another --out")
    result = recalibrate(model_dir, normals, out, target_specificity, policy, workers, resolve_device(device),
                         progress=not ctx.obj["quiet"])
    exit_code = ExitCode.PARTIAL if result["files_unreadable"] else ExitCode.OK
    if as_json:
        echo_json(result, exit_code)
    elif not ctx.obj["quiet"]:
        unread = result["files_unreadable"]
        click.echo(f"threshold {result['threshold']:.4f} from {result['n_calibration']} normals -> "
                   f"{one_line_text(result['model'])}"
                   + (f"; {counted(unread, 'file')} could not be read" if unread else ""), err=True)
    ctx.exit(exit_code)


@click.command(epilog=EXIT_CODES_HELP)
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
        echo_json({"report": str(page)})
    else:
        click.echo(f"training report: {one_line_text(str(page))}", err=True)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exported model (new or empty).")
@json_option
def export(model_dir: Path, out: Path, as_json: bool) -> None:
    """Export a model for ONNX Runtime: a model directory that `radscan score`, `scan`, `info` and
    `evaluate` use without importing torch (ONNX Runtime: pip install 'radscan[onnx]'), with the
    same scores (within 1e-6) and maps, sealed and verified like the weights. Models whose score is
    the feature density (the default) only; training and `radscan calibrate` need the torch model.

    \b
    Example:
      radscan export models/kermany-tiny --out models/kermany-tiny-onnx
      radscan score /data/incoming --out report.csv --model models/kermany-tiny-onnx
    """
    from radscan.model.engine import require_torch

    require_torch("radscan export")
    from radscan.model.export import export_model

    summary = export_model(model_dir, out)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"exported for ONNX Runtime ({summary['bytes'] / 1e6:.1f} MB) -> "
                   f"{one_line_text(str(summary['model']))}", err=True)
