"""What is fitted without gradients, at the end of training and by `radscan calibrate`.

The feature density is fitted to the training normals (`fit_density`); the calibration normals,
held out from training, give each score's mean and spread, the mean normal film, the explanation
maps' normal level and the flag threshold (`calibrate`); `finalize` does that for a new model and
measures it, `recalibrate` for a site's own normals on an existing model, which becomes a new
version whose directory tells one story (`_describe_recalibration`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from radscan.errors import ModelError, NoInputError, OutputError, SettingError
from radscan.ingest import check_outputs_apart, load_images
from radscan.model.density import collimation_copies, framing_copies
from radscan.model.io import WEIGHTS_FILE, save_model, sha256_file
from radscan.model.metadata import (
    EARLIER_CALIBRATION,
    METADATA_FILE,
    SPLIT_FILE,
    films_it_knows,
    read_split,
    recalibrated,
)
from radscan.model.runtime import autocast, iter_batches, score_arrays
from radscan.model.simsid import COMPONENTS, SimSID, to_model_tensor
from radscan.policy import Policy, for_model
from radscan.qc import DEFAULT_VIEWS, apply_qc, copy_groups, quality_control
from radscan.recipe import TrainConfig
from radscan.records import one_line
from radscan.report import CsvStream, head_card, swap_folders, sync_files, sync_folder

__all__ = ["fit_density", "calibrate", "finalize", "recalibrate", "in_batches", "MIN_CALIBRATION"]

log = logging.getLogger(__name__)

FRAMING_COPIES = 2  # framings of each training normal in the feature density's fit (validation: 2 and 4 alike)
COLLIMATION_COPIES = 2  # and collimations (radscan.model.density.COLLIMATION)
EXPLANATION_NORMAL_QUANTILE = 0.95
MIN_CALIBRATION = 5


def fit_density(model: SimSID, train_images: np.ndarray, seed: int, device: torch.device,
                batch_size: int = 64) -> None:
    """Fit the model's feature density (if it has one) to the training normals ((N, 128, 128)
    uint8), FRAMING_COPIES framings and COLLIMATION_COPIES collimations of each
    (radscan.model.density), with the live discriminator as it is now. Raises ModelError when its
    features are not finite (a diverged discriminator)."""
    if model.density is None:
        return
    generator = torch.Generator().manual_seed(seed)
    parts = []
    with torch.inference_mode():
        for batch in iter_batches(train_images, batch_size):
            films = to_model_tensor(batch, device)
            films = torch.cat([films, framing_copies(films, FRAMING_COPIES, generator),
                               collimation_copies(films, COLLIMATION_COPIES, generator)])
            # copies framed before the field is applied: the field stays where it is, the chest moves
            parts.append(model.density_features(films).cpu())
    try:
        model.density.fit(torch.cat(parts).to(device))
    except ValueError as exc:
        raise ModelError(f"cannot fit the feature density: {exc} (the discriminator diverged?)") from None


def in_batches(network: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                device: torch.device) -> torch.Tensor:
    """`network` over (N, 128, 128) uint8 model inputs, batch by batch, without autograd; results
    concatenated as float32 on the CPU."""
    with torch.inference_mode():
        return torch.cat([network(to_model_tensor(batch, device)).float().cpu()
                          for batch in iter_batches(images, batch_size)])


def calibrate(model: SimSID, normals: np.ndarray, batch_size: int, device: torch.device,
              target_specificity: float | None, explanation: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Calibrate `model` in place on held-out normal images ((N, 128, 128) uint8):

    1. the mean normal film (the explanation maps' reference);
    2. each critic's negated-logit mean and spread, so the snapshot critics average as z-scores;
    3. mean and spread of every score kind's raw value (each kind's z-score is relative to them);
    4. with `explanation`, per pixel, the 95th percentile of the normals' explanation maps (the
       maps show only what exceeds it);
    5. with a target specificity, the flag threshold: just above that quantile of the normals' 0..1 scores
       (numpy's "higher" method: at least that share of them unflagged).

    Returns the normals' 0..1 scores (N,) and raw components (N, 4). Raises NoInputError for fewer
    than MIN_CALIBRATION distinct normals (a spread and a quantile need more than a handful; copies of
    one film, radscan.qc.copy_groups, are one: 12 copies of one film gave a spread of 0 and z-scores
    of 2e7, a trial)."""
    distinct = len(np.unique(copy_groups(normals)))
    if distinct < MIN_CALIBRATION:
        copies = f" ({len(normals)} films, the others copies of these)" if distinct < len(normals) else ""
        raise NoInputError(f"only {distinct} distinct usable calibration normals{copies}; at least {MIN_CALIBRATION} "
                           "are needed (a few hundred give a threshold that transfers)")
    model.normal_mean.copy_(to_model_tensor(normals.mean(axis=0, dtype=np.float64)[None].astype(np.float32),
                                            model.normal_mean.device)[0, 0])
    with autocast(device):  # the same precision as scoring
        logits = in_batches(model.critic_logits, normals, batch_size, device)
    model.critic_mean.copy_(logits.mean(0))
    model.critic_std.copy_(logits.std(0).clamp_min(1e-6))
    components = score_arrays(model, normals, batch_size, device).components
    computed = [c for c, kind in enumerate(COMPONENTS) if kind != "density" or model.density is not None]
    if not (components[:, computed].isfinite().all() and model.critic_std.isfinite().all()
            and model.critic_mean.isfinite().all()):
        raise ModelError("the model's scores are not finite on the calibration normals: its weights are lost "
                         "(training diverged: start again with a lower --lr); no model was written")
    # a kind the model cannot compute (NaN: the density of a model without one) keeps mean 0, spread 1
    model.calibration_mean.copy_(components.mean(0).nan_to_num(0.0))
    model.calibration_std.copy_(components.std(0).nan_to_num(1.0).clamp_min(1e-6))
    if explanation:
        model.explanation_normal.zero_()
        maps = score_arrays(model, normals, batch_size, device, explain=True).explanation_maps
        model.explanation_normal.copy_(torch.quantile(maps, EXPLANATION_NORMAL_QUANTILE, dim=0))
    scores = torch.sigmoid(model.calibrated(components)[1]).numpy()
    if target_specificity is not None:
        # just above the normals' score at the target quantile (numpy's "higher": the score at rank
        # ceil(target x (n - 1)) counted from 0, so that many + 1 normals stay unflagged): at least the
        # target share, and where target x n is whole one normal more than it needs (180 normals at
        # 0.95: 172, 95.6%, where 171 would do; 40: 39, 97.5%), about 1/n above the target
        kept = np.float32(np.quantile(scores, target_specificity, method="higher"))
        model.threshold.fill_(float(np.nextafter(kept, np.float32(np.inf))))
        _warn_if_unsupported(scores, float(model.threshold), target_specificity)
    return scores, components


def _warn_if_unsupported(scores: np.ndarray, threshold: float, target_specificity: float) -> None:
    for warning in threshold_warnings(scores, threshold, target_specificity):
        log.warning("%s", warning)


def threshold_warnings(scores: np.ndarray, threshold: float, target_specificity: float) -> list[str]:
    """Why a threshold set on these normals' (N,) 0..1 scores may not hold: a threshold at specificity
    s is a quantile of the scores, and with fewer than 5 normals expected above it, it is mostly noise;
    ties can make it flag more normals than intended. Empty when neither applies."""
    warnings = []
    expected_above = len(scores) * (1 - target_specificity)
    if expected_above < 5:
        warnings.append(f"the threshold rests on {len(scores)} calibration normals, so only {expected_above:.1f} are "
                        f"expected above it at specificity {target_specificity:.2f}: it will move a lot with other "
                        f"normals; use at least {int(np.ceil(5 / (1 - target_specificity) - 1e-9))}")
    flagged = float((scores >= threshold).mean())
    if flagged > 2 * (1 - target_specificity):
        warnings.append(f"the threshold flags {100 * flagged:.0f}% of the calibration normals, more than twice the "
                        f"{100 * (1 - target_specificity):.0f}% aimed for")
    return warnings


def finalize(model: SimSID, calibration: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None,
             tcfg: TrainConfig, device: torch.device) -> tuple[dict[str, Any], np.ndarray]:
    """Calibrate the final weights with the threshold at the target specificity on the calibration
    normals; with validation data, its AUC and the sensitivity/specificity at that threshold.
    Returns the metrics and the calibration normals' 0..1 scores."""
    cal_scores = calibrate(model, calibration, 64, device, tcfg.target_specificity)[0]
    metrics: dict[str, Any] = {"calibration_specificity": float((cal_scores < float(model.threshold)).mean())}
    if validation is not None:
        normal, abnormal = validation
        scores = score_arrays(model, np.concatenate([normal, abnormal]), 64, device).scores.numpy()
        labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
        flagged = scores >= float(model.threshold)
        metrics.update(val_auc=float(roc_auc_score(labels, scores)),
                       val_sensitivity=float(flagged[labels == 1].mean()),
                       val_specificity=float(1 - flagged[labels == 0].mean()))
    return metrics, cal_scores


def recalibrate(model_dir: Path, normals: Sequence[str], out_dir: Path | None, target_specificity: float,
                policy: Policy | None = None, workers: int = -1, device: torch.device | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Re-derive a model's score scale and threshold from a site's own normal images (never from
    images it will be evaluated on), writing the model to `out_dir` (default: in place)."""
    from radscan.model.io import load_model

    device = device or torch.device("cpu")
    check_outputs_apart(normals, [out_dir or model_dir])
    out_dir = Path(out_dir or model_dir)
    if out_dir.resolve() != Path(model_dir).resolve():
        check_outputs_apart([model_dir], [out_dir], kind="model")  # MODEL_DIR/sub: a copy of it into itself
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).is_file():
            raise SettingError(f"{out_dir} holds files and is not a model: choose an empty or new --out")
    model, metadata = load_model(model_dir, device)
    # the normals a threshold is set on are the films the model would score: what quality control
    # rejects when scoring (turned, inverted, foreign) is not one of them
    qc = quality_control(Path(model_dir), metadata, "strict", DEFAULT_VIEWS)
    unreadable: list[tuple[str, str]] = []
    images, names, _ = load_images(normals, for_model(policy or Policy(), metadata, Path(model_dir)), workers, progress,
                                   label="calibration normals", unreadable=unreadable,
                                   judge=lambda records, films: apply_qc(qc, records, films))
    images, names, copies = distinct_films(images, names)
    kind = COMPONENTS.index(model.cfg.score_kind)
    before = float(model.calibration_mean[kind]), float(model.calibration_std[kind])
    scores, components = calibrate(model, images, 64, device, target_specificity)
    seen = _warn_if_seen_in_training(Path(model_dir), names, (components[:, kind].numpy() - before[0]) / before[1])
    specificity = float((scores < float(model.threshold)).mean())
    kept = recalibrated(metadata, [str(p) for p in normals], len(images), target_specificity, specificity)
    # written whole in a folder beside the destination, then put in its place in one step: a model
    # recalibrated in place and killed between its weights and its model.json was unusable, its
    # earlier weights gone (a trial)
    def write(folder: Path) -> None:
        save_model(model, folder, kept)
        _record_split(Path(model_dir), folder, names)
        _describe_recalibration(model, folder, names, scores, metadata, seen)

    _write_in_place(Path(model_dir), out_dir.resolve(), write)  # a model reached through a link: where it lies
    # every warning logged on the way, for --json: what an operator reads when stderr goes nowhere
    warnings = [*filter(None, [copies]), *threshold_warnings(scores, float(model.threshold), target_specificity),
                *filter(None, [seen])]
    return {"model": str(out_dir), "n_calibration": len(images), "threshold": float(model.threshold),
            "calibration_specificity": specificity, "warning": "; ".join(warnings),
            "files_unreadable": len(unreadable)}


def _write_in_place(model_dir: Path, target: Path, write: Callable[[Path], None]) -> None:
    """Make `target` a copy of `model_dir` changed by `write` (given the folder to change), as one
    step: built in `.NAME.calibrating` beside `target`, then exchanged with it (radscan.report.
    swap_folders), so that a kill at any moment leaves a whole model at `target`. A folder that is a
    mount point (a container's volume) cannot be exchanged: built in `.calibrating` inside it, then
    each file renamed over its namesake back to back (a mismatched pair only within microseconds).
    What a killed run left beside it is removed first. Raises OutputError (exit 73)."""
    mounted = target.is_dir() and os.path.ismount(target)
    staging = target / ".calibrating" if mounted else target.with_name(f".{target.name}.calibrating")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # a killed run's, never a model: the model is `target`
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(".calibrating", ".*.tmp"))
        write(staging)
        sync_files(staging)  # the copied files too: each must be whole when the folder takes the model's place
        if mounted:
            for path in sorted(staging.iterdir(), key=lambda path: path.name == METADATA_FILE):  # model.json last
                os.replace(path, target / path.name)
            sync_folder(target)
        elif target.is_dir():
            swap_folders(staging, target)  # staging now holds the earlier model
        else:
            os.rename(staging, target)
            sync_folder(target.parent)
    except (OSError, shutil.Error) as exc:
        raise OutputError(f"cannot write the recalibrated model to {target}: "
                          f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def distinct_films(images: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str], str]:
    """(N, 128, 128) uint8 normals and their names -> the first of each set of copies of one film
    (radscan.qc.copy_groups), in their order, and the warning (logged) when any is dropped, else "":
    a copy weighs a film twice in the score's spread and the threshold's quantile."""
    first = np.sort(np.unique(copy_groups(images), return_index=True)[1])
    warning = ""
    if len(first) < len(images):
        warning = (f"{len(images) - len(first)} of the {len(images)} calibration normals are copies of another (the "
                   "same film under another name or format): each film counts once")
        log.warning("%s", warning)
    return images[first], [names[index] for index in first], warning


def _record_split(model_dir: Path, out_dir: Path, names: Sequence[str]) -> None:
    """The recalibrated model's SPLIT_FILE: the films it was trained on as before, its former
    calibration normals as EARLIER_CALIBRATION, and the normals just used (their paths under the
    folders given) as "calibration", so that `radscan evaluate` tells which films set its threshold.
    A model without a readable SPLIT_FILE keeps none (nobody can tell what it was trained on)."""
    rows = read_split(model_dir)
    if rows is None:
        return
    try:
        with CsvStream(out_dir / SPLIT_FILE, ("path", "study_key", "split")) as split_csv:
            for row in rows:
                earlier = row["split"] == "calibration"
                split_csv.write({**row, "split": EARLIER_CALIBRATION if earlier else row["split"]})
            for name in names:
                split_csv.write({"path": name, "study_key": "", "split": "calibration"})
    except OutputError as exc:  # the model is saved: a record that cannot be written costs a warning
        log.warning("could not record the calibration normals (%s): radscan evaluate will not know them", exc)


# Normals whose scores on the model's previous scale sit this many spreads below its own held-out
# normals look like films it was trained on (a model scores its training films lower than any other
# normals): a threshold set on them is too low, and most new films are flagged.
SEEN_IN_TRAINING_Z = -1.0


def _warn_if_seen_in_training(model_dir: Path, names: Sequence[str], z_before: np.ndarray) -> str:
    """A warning (also returned; "" when none) when the calibration normals look like the model's
    training films: their mean z on the previous scale below SEEN_IN_TRAINING_Z, or names that its
    SPLIT_FILE lists as trained on. Counts only: a name may carry a patient's."""
    named = (films_it_knows(model_dir, names) or {}).get("train", 0)
    mean_z = float(np.mean(z_before)) if len(z_before) else 0.0
    if mean_z >= SEEN_IN_TRAINING_Z and named * 2 < len(names):
        return ""
    warning = (f"these {len(names)} normals score {mean_z:+.1f} spreads from the normals the model was calibrated on"
               + (f", and {named} have the names of films it was trained on" if named else "")
               + ": if they include its training films, the threshold is set too low and most new films will be "
                 "flagged; calibrate on normals of the site that the model has not seen")
    log.warning("%s", warning)
    return warning


def _describe_recalibration(model: SimSID, out_dir: Path, names: Sequence[str], scores: np.ndarray,
                            before: dict[str, Any], warning: str = "") -> None:
    """Make the model directory tell one story after `recalibrate`: the calibration scores and the
    training report redrawn with the new normals and threshold, and a model card (README.md), when
    there is one, headed by what changed. The model is saved before: a description that cannot be
    written costs a warning."""
    from radscan.trainreport import CALIBRATION_SCORES_FILE, write_training_report

    threshold = float(model.threshold)
    try:
        with CsvStream(out_dir / CALIBRATION_SCORES_FILE, ("path", "score")) as table:
            for name, score in zip(names, scores, strict=True):
                table.write({"path": name, "score": round(float(score), 9)})  # 9: a tie with the threshold shows
        write_training_report(out_dir)
        old = float(before.get("calibration", {}).get("threshold", float("nan")))
        head_card(out_dir / "README.md",
                  f"> **Recalibrated** on {len(names)} normals of a site "
                  f"({datetime.now(timezone.utc).date().isoformat()}, `radscan calibrate`): threshold "
                  f"**{threshold:.4f}** (was {old:.4f}), weights sha256 `{sha256_file(out_dir / WEIGHTS_FILE)}`, "
                  "version in `model.json`. Everything below describes the model before, version "
                  f"{before.get('version')} (its threshold, weights sha256, flagged shares, sensitivity and "
                  "specificity); AUCs do not depend on the threshold."
                  + (f"\n>\n> **Warning**: {warning}." if warning else ""))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("the recalibrated model was saved, but its report could not be redrawn: %s", exc)
