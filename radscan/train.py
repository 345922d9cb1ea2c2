"""`radscan train`: fit SimSID on a site's normal studies, calibrate it, save a model directory.

Training follows the reference recipe (shared/design/SIMSID.md part B): random shift/scale
augmentation; the discriminator steps every batch and the generator every second batch on the
same forward pass; Adam (betas 0.5/0.999), weight decay and a cosine schedule on the generator.
radscan adds, each measured on validation (docs/research-log.md "Ablation"): variation of the acquisition
(gamma, contrast, blur, noise) so the critic judges anatomy rather than exposure, and snapshot
critics: the discriminators of the last K epochs travel with the model and their z-scored
verdicts are averaged, so the score does not hang on one epoch of the adversarial game.

The saved weights are those of the last epoch, or of the epoch a `--keep` rule chose
(radscan.epochs.KEEP_RULES: by validation AUC, which needs labelled films, or by a label-free
measure of the feature density). A calibration split of the normals is never trained on: it gives
each score's mean and spread, the mean normal film and the flag threshold (radscan.calibration).
Labelled validation images, when given, are only measured, epoch by epoch, into the training log.

Where each part lives: the augmentation in radscan.augment, what an epoch is measured by in
radscan.epochs, the density fit and the calibration in radscan.calibration, the optimisers,
schedules, step and checkpoint in radscan.trainer (`Trainer`); this module reads the films, runs
the epochs, and saves the model directory, in the phases `_train` names.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from radscan.augment import augment, local_anomalies, vary_acquisition
from radscan.calibration import MIN_CALIBRATION, finalize, fit_density
from radscan.epochs import KEEP_RULES, better_epoch, evaluate_epoch
from radscan.errors import ModelError, NoInputError, SettingError
from radscan.ingest import check_inputs, check_outputs_apart, load_images
from radscan.model.config import SimSIDConfig
from radscan.model.field import lungs_in_box, save_follow, thorax_box, thorax_field
from radscan.model.io import METADATA_FILE, save_model
from radscan.model.metadata import CHECKPOINT_FILE, SPLIT_FILE, new_version
from radscan.model.simsid import SimSID, to_model_tensor
from radscan.policy import Policy
from radscan.preprocess import MODEL_SIZE, FollowReference, follow_reference, padding_bounds
from radscan.qc import (
    DEFAULT_VIEWS,
    MIN_REFERENCE,
    QualityControl,
    apply_qc,
    copy_groups,
    fit_reference,
    reject,
    save_reference,
    unlike_the_others,
    wrong_way_round,
)
from radscan.recipe import TrainConfig
from radscan.records import ImageRecord, counted
from radscan.report import CsvStream, atomic_output, cannot_write
from radscan.stopping import raise_if_stop_asked
from radscan.trainer import Trainer, load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "train", "TrainingResult"]

log = logging.getLogger(__name__)

TRAIN_LOCK = "train.lock"  # held while a run trains into the folder; removed when it ends
LOG_FILE = "train_log.jsonl"
INPUTS_FILE = "training_inputs.csv"  # every file found among the normals, with its status


@dataclass
class TrainingResult:
    model_dir: Path
    epochs_run: int
    metrics: dict[str, Any] = field(default_factory=dict)
    stopped_by_budget: bool = False
    unreadable: int = 0  # files among the normals and validation films that could not be read (exit 3)
    validation_warning: str = ""  # validation films that are copies of the normals (_validation_copies)


def patient_keys(names: Sequence[str], studies: Sequence[str], pattern: str | None,
                 patients: Sequence[str] = ()) -> list[str]:
    """The keys the calibration split groups by: each film's patient, by its DICOM Patient ID
    (`patients`, "" for none), else its study (`studies`); with `pattern` (a regular expression)
    the patient its file name names (the first group of the first match, else the match) comes
    first, for films whose name it matches. Raises SettingError for a pattern that is not a
    regular expression or that matches no file name.

    Why the Patient ID: a site's DICOM normals hold several studies of one patient, and split by
    study 8 of 12 calibration films were of a patient whose other study was trained on (a trial):
    the threshold is then set on films the model nearly knows."""
    # one key for a patient however named: a JPEG named by the pattern and a DICOM by its header
    by_header = [f"patient {patient}" if patient else study
                 for study, patient in zip(studies, patients or [""] * len(studies), strict=True)]
    if not pattern:
        return by_header
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise SettingError(f"--patient-pattern '{pattern}' is not a regular expression: {exc}") from None
    keys, named, matched = [], set(), 0
    for name, study in zip(names, by_header, strict=True):
        found = compiled.search(Path(name).name)
        patient = (found.group(1) if compiled.groups else found.group(0)) if found else None
        if patient:  # an empty match (a pattern such as 'x*') names no one
            named.add(patient)
            matched += 1
        keys.append(f"patient {patient}" if patient else study)
    if not matched:
        raise SettingError(f"--patient-pattern '{pattern}' names a patient in none of the {len(names)} file names "
                           f"(e.g. {Path(names[0]).name!r})")
    if len(named) == 1 and matched > 1:
        raise SettingError(f"--patient-pattern '{pattern}' names the same patient ({named.pop()!r}) in all "
                           f"{matched} file names it matches: it must capture what differs between patients")
    if matched < len(names):
        log.warning("--patient-pattern names a patient in %d of %d file names: the others are held out by their "
                    "DICOM Patient ID, else as their study is (a JPEG/PNG film alone: film by film)", matched,
                    len(names))
    return keys


def copies_together(keys: list[str], images: np.ndarray) -> list[str]:
    """Each film's split key (`patient_keys`), with the keys of films that are copies of one another
    (radscan.qc.copy_groups: one film under two names, as DICOM and JPEG, re-encoded) merged, so that
    the calibration split keeps every copy on one side: a copy trained on makes its twin among the
    calibration normals look more normal, and the threshold optimistic (a trial: identical files on
    both sides). (N,) keys and (N, 128, 128) uint8 films -> (N,) keys; unchanged without copies."""
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = key = parent[parent[key]]
        return key

    first: dict[int, int] = {}  # group -> its first film
    copies = 0
    for index, group in enumerate(copy_groups(images).tolist()):
        original = first.setdefault(group, index)
        copies += original != index
        low, high = sorted((root(keys[index]), root(keys[original])))
        parent[high] = low
    if copies:  # a WARNING, as calibrate and evaluate give: the site may have exported its normals twice
        log.warning("%d of %d normals are copies of another (the same film under another name or format): each kept "
                    "on its side of the calibration split, and counted once for quality control's reference",
                    copies, len(keys))
    return [root(key) for key in keys]


def split_calibration(studies: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the calibration images. Whole studies go to one side when there are enough
    of them (no study in both); a flat folder of images (one "study") is split by image."""
    rng = np.random.default_rng(seed)
    groups = sorted(set(studies))
    if len(groups) >= 20:
        chosen = set(rng.permutation(groups)[: max(1, round(fraction * len(groups)))])
        return np.array([s in chosen for s in studies])
    if 1 < len(groups) < len(studies):  # grouped, but too few groups to hold whole ones out
        log.warning("the normals come from only %d patients or studies (fewer than 20): the calibration normals "
                    "are held out film by film, so some patients' films are trained on and calibrated on, which "
                    "makes the threshold optimistic; give normals of more patients", len(groups))
    mask = np.zeros(len(studies), dtype=bool)
    mask[rng.permutation(len(studies))[: max(1, round(fraction * len(studies)))]] = True
    return mask


def set_thorax_field(model: SimSID, train_images: np.ndarray) -> None:
    """Set the model's thorax field from the mean of the training normals ((N, 128, 128) uint8;
    radscan.model.field). Raises SettingError when the mean shows no lung fields (not frontal chest
    films framed alike: train with --field film)."""
    try:
        field = thorax_field(train_images.mean(axis=0, dtype=np.float64))
    except ValueError as exc:
        raise SettingError(f"cannot find the thorax field: {exc}; or train with --field film") from None
    model.field_mask.copy_(torch.from_numpy(field.astype(np.float32)))
    log.info("thorax field: %.0f%% of the film (the rest is mid grey to the model)", 100 * field.mean())


# The films trained and calibrated on pass the checks that need no reference (a lateral or other view
# by its header, too small, nearly blank, burnt out): a blank film among a site's normals would
# otherwise be learnt as normal and widen the QC reference fitted to them until blank films pass.
_NORMALS_QC = QualityControl("strict", DEFAULT_VIEWS, None, None)


def _checked(records: list[ImageRecord], films: list[np.ndarray]) -> list[bool]:
    """`load_images`' judge for training films: reference-free quality control, then the films the
    wrong way round among the others (`radscan.qc.wrong_way_round`: they would be learnt as normal
    and widen the reference's margins until no turned film fails), then the films unlike the others
    (`radscan.qc.unlike_the_others`: a noise image or a CT slice would widen the non-chest limit).
    Rejected films are listed in training_inputs.csv with the reason, and counted in a WARNING line."""
    judged = [film if record.qc_image is None else record.qc_image for record, film in zip(records, films, strict=True)]
    keep = apply_qc(_NORMALS_QC, records, films)
    for screen in (wrong_way_round, unlike_the_others):  # then, among the upright, films not like a chest
        kept = [index for index, kept in enumerate(keep) if kept]
        if kept:
            for index, reason in zip(kept, screen(np.stack([judged[index] for index in kept])), strict=True):
                if reason:
                    reject(records[index], reason)
                    keep[index] = False
    return keep


# A mean of this many chests shows their layout at the reference's 64 px (radscan.preprocess.follow_reference)
MIN_PLAIN_FILMS = 10


def padding_reference(whole_films: np.ndarray) -> FollowReference:
    """(N, 128, 128) uint8 whole films, as read uncut -> the reference their chests decide what is
    padding by in `find_thorax_box`'s second pass (radscan.preprocess.film_bounds): the mean of the
    films with no edge line of one grey level (at least MIN_PLAIN_FILMS of them), else of all, said
    in a WARNING. The mean of all shows the padding of the padded ones: with half of 48 normals
    letterboxed by a quarter, it had 2 of the 24 cut and showed no lung fields to find the box by;
    the plain films' mean had all 24 cut and gave the unpadded normals' box (tests/test_train.py)."""
    whole = (0, MODEL_SIZE, 0, MODEL_SIZE)
    plain = np.array([padding_bounds(film) == whole for film in whole_films], bool)
    if plain.sum() >= MIN_PLAIN_FILMS:
        return follow_reference(whole_films[plain])
    log.warning("only %s of the normals have no edge line of one grey level (padding or a mask): the chest decides "
                "what is padding against the mean of all of them, padding included, so padding common to most "
                "normals is read as part of the film (trim_padding)", counted(int(plain.sum()), "film"))
    return follow_reference(whole_films)


def find_thorax_box(normals: Sequence[str], model_cfg: SimSIDConfig, policy: Policy, workers: int,
                    progress: bool, inventory: Path | None = None) -> tuple[SimSIDConfig, Policy, np.ndarray,
                                                                          np.ndarray]:
    """A first pass over the normals, as whole films: the thorax box of their mean film
    (radscan.model.field.thorax_box) set in the model settings and the reading policy, and the lung
    fields as the box shows them ((128, 128) bool, the model's `lung_mask`), and the whole films
    ((N, 128, 128) uint8: quality control's reference is fitted to them, as it judges whole films).
    With `trim_padding`, a second pass reads each film less the padding its chest chose
    (`padding_reference` of the first pass), and those films give all three. Every normal serves, the
    calibration ones too: the box is part of the preprocessing, found without labels. Raises
    SettingError when the mean shows no lung fields."""
    # `inventory`: the list of every file with its status, written by each pass, so that it is there when
    # no normal passes (the pass that cuts the box writes it last). Each pass reads every normal: a film the
    # first pass rejects uncut (letterboxed past 3 to 1) is judged less its padding by the next
    films = load_images(normals, replace(policy, crop=None, follow=None), workers, progress, inventory,
                        label="normals (whole films)", judge=_checked, quiet=True)[0]  # the next pass says it
    if model_cfg.trim_padding:  # a setting of a box that follows the chest (SimSIDConfig checks it)
        # the chest decides what is padding (radscan.preprocess.film_bounds) against the plain films' mean; the
        # box and both references are those of the films less that padding. (Scoring decides against the follow
        # reference fitted on these films, nearly the same mean: one of 48 normals in a test is cut otherwise.)
        films = load_images(normals, replace(policy, crop=None, follow=padding_reference(films)), workers, progress,
                            inventory, label="normals (whole films, less padding)", judge=_checked, quiet=True)[0]
    mean = films.mean(axis=0, dtype=np.float64)
    try:
        box = thorax_box(mean)
        lungs = lungs_in_box(mean, box, model_cfg.image_size)
    except ValueError as exc:
        raise SettingError(f"cannot find the thorax box: {exc}; or train with --field film") from None
    log.info("thorax box: %.0f-%.0f%% across, %.0f-%.0f%% down the film; lung fields %.0f%% of it%s",
             100 * box[0], 100 * box[2], 100 * box[1], 100 * box[3], 100 * lungs.mean(),
             "; it follows each film's chest" if model_cfg.follow else "")
    # the box stands where the mean film's thorax is; a box that follows the chest is moved, film by
    # film, to where that film's chest lies against the same normals' mean (radscan.preprocess.chest_offset)
    follow = follow_reference(films) if model_cfg.follow else None
    return replace(model_cfg, crop=box), replace(policy, crop=box, follow=follow), lungs, films


def _stop_if_diverged(losses: dict[str, float], epoch: int, batch: int, tcfg: TrainConfig) -> None:
    """A loss that is not finite means the weights are lost (too high a learning rate, or a
    checkpoint whose weights are NaN): stop before anything is saved. Raises ModelError."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise ModelError(f"training diverged in epoch {epoch + 1}, batch {batch + 1}: the "
                         f"{', '.join(f'{name} loss is {value}' for name, value in bad.items())}; no model was "
                         f"written. Start again with a lower --lr (this run: {tcfg.lr:g}) in a new --out")


def train(
    normals: Sequence[str],
    out_dir: Path,
    model_cfg: SimSIDConfig,
    tcfg: TrainConfig | None = None,
    val_normal: Sequence[str] = (),
    val_abnormal: Sequence[str] = (),
    policy: Policy | None = None,
    device: torch.device | None = None,
    workers: int = -1,
    resume: bool = False,
    progress: bool = True,
    name: str | None = None,
    init_from: Path | None = None,
    age_range: tuple[float, float] | None = None,
) -> TrainingResult:
    """Train for `tcfg.epochs` epochs, calibrate the last epoch's model and save it at `out_dir`.

    Validation (labelled abnormal images, with `val_normal` or else the calibration normals as
    the normal class) is measured every epoch into the training log and on the final model into
    its metadata; it never changes the model. `init_from` starts from the weights of an existing
    model directory of the same architecture (to continue training, e.g., the shipped one).

    Raises SettingError (exit 2) for an unfinished run without `resume`, or fewer epochs than critic
    snapshots; NoInputError when there are too few normals for one batch; LockHeldError (exit 75)
    while another run trains into the same `out_dir` (two runs would interleave checkpoints)."""
    from radscan.state import hold_lock

    out_dir = Path(out_dir)
    fresh = not out_dir.exists()
    lock = out_dir / TRAIN_LOCK
    try:
        with hold_lock(lock):
            try:
                return _train(normals, out_dir, model_cfg, tcfg, val_normal, val_abnormal, policy, device, workers,
                              resume, progress, name, init_from, age_range)
            except BaseException:
                _remove_unfinished(out_dir)
                raise
            finally:
                lock.unlink(missing_ok=True)
    finally:
        if fresh:  # a refused or failed first run leaves no folder behind (a folder with files stays)
            with contextlib.suppress(OSError):
                out_dir.rmdir()


def _remove_unfinished(out_dir: Path) -> None:
    """A run that stops before its first checkpoint (refused: too few normals, no lung fields; or
    interrupted) leaves no inventory or split behind: they describe a model that does not exist.
    Called only while holding the run's lock; a checkpoint (to --resume) or a model keeps them."""
    if not (out_dir / CHECKPOINT_FILE).exists() and not (out_dir / METADATA_FILE).exists():
        for name in (INPUTS_FILE, SPLIT_FILE):
            (out_dir / name).unlink(missing_ok=True)


def _train(normals: Sequence[str], out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig | None,
           val_normal: Sequence[str], val_abnormal: Sequence[str], policy: Policy | None,
           device: torch.device | None, workers: int, resume: bool, progress: bool, name: str | None,
           init_from: Path | None, age_range: tuple[float, float] | None) -> TrainingResult:
    started = time.monotonic()
    tcfg, policy, device = tcfg or TrainConfig(), policy or Policy(), device or torch.device("cpu")
    _refuse_settings(out_dir, model_cfg, tcfg, resume, val_normal, val_abnormal, init_from)
    # before the normals are read (thousands of films, minutes): a mistyped validation path is said now
    check_inputs(val_normal, "--val-normal")
    check_inputs(val_abnormal, "--val-abnormal")
    # a model written among the normals would be read back as training images next time
    check_outputs_apart([*normals, *val_normal, *val_abnormal], [out_dir])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(out_dir, exc) from None
    data = _read_films(normals, out_dir, model_cfg, tcfg, policy, val_normal, val_abnormal, workers, progress)
    log.info("training on %d images, calibrating on %d, device %s", len(data.train_images), len(data.calibration),
             device)
    trainer = Trainer(data.model_cfg, tcfg, device)
    run = _start(trainer, data, out_dir, tcfg, device, resume, init_from)
    _run_epochs(trainer, data, run, out_dir, tcfg, device, progress, started)
    if run.epochs < data.model_cfg.critic_snapshots and init_from is None:
        raise SettingError(f"stopped after {counted(run.epochs, 'epoch')}, fewer than the "
                           f"{data.model_cfg.critic_snapshots} critic snapshots: raise --max-minutes and rerun with "
                           "--resume")
    if run.stopped_by_budget:  # a model is made, and its checkpoint goes: there is nothing left to resume
        log.warning("the model is made from %d of the %d epochs (model.json: stopped_by_budget); to train them all, "
                    "train again into another --out with a larger --max-minutes", run.epochs, tcfg.epochs)
    model = _kept_model(trainer, data, run, tcfg, device)
    metrics, calibration_scores = finalize(model, data.calibration, data.validation, tcfg, device)
    metadata = {
        "name": name or out_dir.name,
        "version": new_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "calibration": {"method": f"calibration normals at specificity {tcfg.target_specificity}",
                        "n_calibration": int(len(data.calibration)), "target_specificity": tcfg.target_specificity},
        "training": {
            "inputs": [str(p) for p in normals],
            "n_images": int(len(data.images)), "n_train": int(len(data.train_images)),
            "validation": {"normal": [str(p) for p in val_normal] or ["the calibration normals"],
                           "abnormal": [str(p) for p in val_abnormal],
                           **({"warning": data.validation_warning} if data.validation_warning else {})}
            if data.validation else None,
            "epochs_run": run.epochs,
            "shipped": (f"epoch {run.best['epoch']}: "
                        f"{KEEP_RULES[tcfg.keep].says.format(kind=model.cfg.score_kind)} ({run.best['auc']:.3f})"
                        if run.best else "last epoch"),
            "stopped_by_budget": run.stopped_by_budget, "minutes": round((time.monotonic() - started) / 60, 2),
            "device": str(device), "train_config": asdict(tcfg),
            "init_from": str(init_from) if init_from else None,
            # the normals' files that were not trained on, by status: a run with some lost said so only in
            # training_inputs.csv and one log line (a trial)
            "inputs_not_used": _not_used(out_dir / INPUTS_FILE),
        },
        "metrics": metrics,
    }
    if age_range:
        metadata["population"] = {"age_years": list(age_range)}
    # the QC step's reference: what an upright frontal film of this site looks like. Every normal
    # serves (the calibration ones too: its limits are cross-validated), so a site with 50 normals
    # gets one, where the training split alone would fall short of 50
    whole = data.images if data.whole_films is None else data.whole_films  # whatever part the model reads
    distinct = len(np.unique(copy_groups(whole)))  # copies of one film are one (60 files of 40 films passed as 60)
    if distinct >= MIN_REFERENCE:
        metadata["qc"] = save_reference(fit_reference(whole), out_dir)
    else:
        copies = f" in {len(whole)} files (the others copies of these)" if distinct < len(whole) else ""
        log.warning("only %d distinct usable normal images%s, of those quality control kept: no QC reference (needs "
                    "%d); wrong-way-round and non-chest images will not be caught when this model scores: give more "
                    "normals", distinct, copies, MIN_REFERENCE)
    if data.follow is not None:  # before the weights, which seal its sha256 (radscan.model.metadata.sealed_extras)
        metadata["follow"] = save_follow(data.follow, out_dir)
    save_model(model, out_dir, metadata)
    _write_report(model, out_dir, [name for name, held in zip(data.names, data.is_calibration, strict=True) if held],
                  data.calibration, calibration_scores)
    # last: until the checkpoint goes the folder is an unfinished run, and a run
    # killed while writing its report can be finished with --resume (it said "already a model", a trial)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return TrainingResult(out_dir, run.epochs, metrics, run.stopped_by_budget, len(data.unreadable),
                          data.validation_warning)


def _refuse_settings(out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig, resume: bool,
                     val_normal: Sequence[str], val_abnormal: Sequence[str], init_from: Path | None) -> None:
    """Raise SettingError (exit 2) for a run that cannot start: a finished model or an unfinished run
    in `out_dir` (without --resume), or settings that do not fit together."""
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if (out_dir / METADATA_FILE).exists() and not checkpoint_path.exists():
        raise SettingError(f"{out_dir} already holds a trained model: choose another --out (radscan never "
                           "overwrites a model)")
    # a folder of something else (an evaluation's outputs, a site's files): the model's files were
    # mixed in among them (a trial); a run's own (its inputs list, log, checkpoint) are not in the way
    present = {path.name for path in out_dir.iterdir()} - {TRAIN_LOCK} if out_dir.is_dir() else set()
    if present and not present & {INPUTS_FILE, LOG_FILE, SPLIT_FILE, CHECKPOINT_FILE, METADATA_FILE}:
        raise SettingError(f"{out_dir} holds other files and no training run: choose a new or empty --out")
    if checkpoint_path.exists() and not resume:
        raise SettingError(f"{out_dir} holds an unfinished training run: add --resume to continue it, "
                           "or choose another --out")
    if resume and not checkpoint_path.exists():  # a mistyped --out after a crash would train again unsaid
        log.warning("--resume: %s holds no checkpoint of an interrupted run: a new run starts there", out_dir)
    if tcfg.keep != "last" and tcfg.keep not in KEEP_RULES:
        raise SettingError(f"keep must be one of last, {', '.join(KEEP_RULES)}, not {tcfg.keep!r}")
    if tcfg.keep == "best" and not val_abnormal:
        raise SettingError("--keep best chooses the epoch by validation AUC: it needs --val-abnormal")
    if tcfg.keep == "synthetic" and model_cfg.score_kind != "density":
        raise SettingError(f"--keep {tcfg.keep} chooses the epoch by the feature density: it needs the density "
                           f"score kind, not {model_cfg.score_kind!r}")
    if val_normal and not val_abnormal:
        raise SettingError("--val-normal needs --val-abnormal (without --val-normal, the calibration normals "
                           "are the validation normals)")
    if tcfg.epochs < model_cfg.critic_snapshots and init_from is None:  # init_from brings trained snapshots
        raise SettingError(f"{counted(tcfg.epochs, 'epoch')} cannot fill {model_cfg.critic_snapshots} critic "
                           "snapshots: train longer (--epochs) or keep fewer (--critic-snapshots)")


@dataclass
class _Films:
    """What a run trains, calibrates and validates on, read as the model will read films."""

    images: np.ndarray  # (N, 128, 128) uint8: every usable normal
    names: list[str]  # their paths relative to the inputs
    is_calibration: np.ndarray  # (N,) bool: held out to calibrate (split by study)
    validation: tuple[np.ndarray, np.ndarray] | None  # (normal, abnormal) films, with --val-abnormal
    model_cfg: SimSIDConfig  # the settings asked for, with a thorax box's crop once found
    lungs: np.ndarray | None  # a thorax-box model's lung fields as its box shows them, (128, 128) bool
    whole_films: np.ndarray | None = None  # a thorax-box model's normals as whole films, for quality control
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): training and validation
    validation_warning: str = ""  # validation films that are copies of the normals (_validation_copies)
    follow: FollowReference | None = None  # the reference film of a box that follows the chest

    @property
    def train_images(self) -> np.ndarray:
        return self.images[~self.is_calibration]

    @property
    def calibration(self) -> np.ndarray:
        return self.images[self.is_calibration]


def _read_films(normals: Sequence[str], out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig, policy: Policy,
                val_normal: Sequence[str], val_abnormal: Sequence[str], workers: int, progress: bool) -> _Films:
    """Read the normals (listed in INPUTS_FILE), split them by study into training and calibration
    (SPLIT_FILE), and read the validation films. Raises NoInputError when either side of the split
    is too small, SettingError when a thorax field's normals show no lung fields."""
    lungs = whole_films = None
    # the films below are read as the model will read them (with `trim_padding`, less the padding their chest
    # chose against the follow reference, as scoring reads them)
    policy = replace(policy, trim_padding=model_cfg.trim_padding)
    if model_cfg.field == "thorax-box":  # every film below, validation films too, is read cut to the box
        model_cfg, policy, lungs, whole_films = find_thorax_box(normals, model_cfg, policy, workers, progress,
                                                                out_dir / INPUTS_FILE)
    unreadable: list[tuple[str, str]] = []
    patients: list[str] = []  # kept in memory only: the split file records a digest of each key
    images, names, studies = load_images(normals, policy, workers, progress, out_dir / INPUTS_FILE, label="normals",
                                         judge=_checked, unreadable=unreadable, patients=patients)
    keys = patient_keys(names, studies, tcfg.patient_pattern, patients)
    if not tcfg.patient_pattern and len(set(keys)) > 0.9 * len(keys):
        log.warning("the calibration normals are held out film by film (the films name no study or patient that "
                    "groups them): if a patient has several films, some may be trained on and others calibrated on, "
                    "which makes the threshold optimistic; name patients with --patient-pattern REGEX")
    keys = copies_together(keys, images)
    is_calibration = split_calibration(keys, tcfg.calibration_fraction, tcfg.seed)
    # keys are Patient IDs, UIDs or absolute folders: a model directory is shared, so it records only
    # a digest of each, enough to see which images went to one side together, salted by this run
    # (a Patient ID has few enough values that its plain digest could be reversed by trying them all)
    salt = os.urandom(16)
    with CsvStream(out_dir / SPLIT_FILE, ("path", "study_key", "split")) as split_csv:
        for path, study, held_out in zip(names, keys, is_calibration, strict=True):
            split_csv.write({"path": path, "study_key": hashlib.sha256(salt + study.encode("utf-8", "surrogateescape"))
                             .hexdigest()[:16], "split": "calibration" if held_out else "train"})
    films = _Films(images, names, is_calibration, None, model_cfg, lungs, whole_films, unreadable,
                   follow=policy.follow)
    # both limits said at once: a user who mends one should not meet the other on the next try (a trial)
    short = [f"{len(films.train_images)} training images after the calibration split (at least one batch of "
             f"{tcfg.batch_size} is needed: --batch-size)"] if len(films.train_images) < tcfg.batch_size else []
    if len(films.calibration) < MIN_CALIBRATION:  # refused now, not after the epochs (calibrate needs them)
        short.append(f"{len(films.calibration)} calibration normals after the split (--calibration-fraction "
                     f"{tcfg.calibration_fraction:g} of {len(images)}; at least {MIN_CALIBRATION} are needed)")
    if short:
        raise NoInputError(f"only {' and only '.join(short)}: give more normals")
    if val_abnormal:
        validation_normals = (load_images(val_normal, policy, workers, progress, label="validation normals",
                                          judge=_checked, unreadable=unreadable)[0] if val_normal
                              else films.calibration)
        films.validation = (validation_normals, load_images(val_abnormal, policy, workers, progress,
                                                            label="validation abnormals", unreadable=unreadable)[0])
        films.validation_warning = _validation_copies(films, bool(val_normal))
    return films


def _validation_copies(films: _Films, own_normals: bool) -> str:
    """A warning (logged, kept in model.json and the --json summary) when validation films are
    copies of the normals (radscan.qc.copy_groups: the same file, re-encoded, DICOM and JPEG), else
    "": the normals' folder given as --val-abnormal made a validation AUC of 0.18 that model.json kept
    without a word (a trial), and --keep best would choose the shipped epoch by it; given as
    --val-normal, the validation normals were films the model was trained on (a review)."""
    normal, abnormal = films.validation or (np.empty((0, 128, 128), np.uint8),) * 2
    groups = copy_groups(np.concatenate([films.images, abnormal, normal]))
    known, trained = groups[:len(films.images)], groups[:len(films.images)][~films.is_calibration]
    said = []
    shared = int(np.isin(groups[len(films.images):len(films.images) + len(abnormal)], known).sum())
    if shared > len(abnormal) / 2:
        said.append(f"{shared} of the {len(abnormal)} validation abnormal films are copies of the normals trained "
                    "or calibrated on (the normals' folder given as --val-abnormal?): the validation AUC measures "
                    "nothing")
    elif shared:  # a few: an abnormal film filed among the normals too (a trial), not a wrong folder
        said.append(f"{shared} of the {len(abnormal)} validation abnormal films are also among the normals trained "
                    "or calibrated on (an abnormal film filed among the normals, or one film in both folders?): "
                    "check them; the validation AUC counts them as both")
    seen = int(np.isin(groups[len(films.images) + len(abnormal):], trained).sum()) if own_normals else 0
    if seen:
        said.append(f"{seen} of the {len(normal)} validation normal films are copies of films trained on (the "
                    "normals' folder given as --val-normal?): the validation AUC is optimistic")
    for warning in said:
        log.warning("%s", warning)
    return "; ".join(said)


@dataclass
class _Run:
    """Where a run stands: epochs completed, and what the epochs leave for the end."""

    epochs: int = 0
    stopped_by_budget: bool = False
    density_fitted: bool = False  # evaluate_epoch fits it to each epoch's weights
    best: dict[str, Any] | None = None  # with a --keep rule: the weights, epoch and measure of the best epoch so far


def _start(trainer: Trainer, films: _Films, out_dir: Path, tcfg: TrainConfig, device: torch.device, resume: bool,
           init_from: Path | None) -> _Run:
    """The weights to start from: a checkpoint to resume (it holds the model's field), an existing
    model's (--init-from), or new ones with the field found from the normals. Raises ModelError for a
    checkpoint that is not this run's, SettingError for an --init-from of another architecture."""
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, device)
        # first, so that a setting that changes shapes (--memory, --density-grid) is named too
        _refuse_another_run(checkpoint.get("run"), _run_identity(films, tcfg), checkpoint_path)
        try:
            epochs = trainer.restore(checkpoint)
        except (RuntimeError, ValueError, KeyError) as exc:  # tensors of another preset or settings
            log.debug("checkpoint does not fit: %s", exc)  # torch's own words, cut anywhere, are for -vv
            raise ModelError(f"the training checkpoint {checkpoint_path} is of another model (other settings: "
                             "preset, field, memory, critic snapshots or density grid): resume with the settings it "
                             "was started with, or choose another --out") from None
        if not 0 <= epochs <= tcfg.epochs:  # edited, or from a run with more epochs: it is not this run
            raise ModelError(f"the training checkpoint {checkpoint_path} says {epochs} epochs were run, outside "
                             f"0..{tcfg.epochs} (--epochs): resume with the --epochs it was started with, or delete it")
        log.info("resumed after epoch %d", epochs)
        return _Run(epochs=epochs, best=checkpoint.get("best") if checkpoint.get("keep", "best") == tcfg.keep
                    and tcfg.keep != "last" else None)
    if init_from is not None:
        from radscan.model.io import load_model

        start, start_metadata = load_model(init_from)
        # the thorax box is found again on these normals (a box that moved is not another architecture:
        # a trial was refused for it alone); any other setting must be the start model's
        differ = [f"{key} {getattr(start.cfg, key)!r}, asked {getattr(films.model_cfg, key)!r}"
                  for key in (f.name for f in fields(SimSIDConfig)) if key != "crop"
                  and getattr(start.cfg, key) != getattr(films.model_cfg, key)]
        if differ:
            raise SettingError(f"{init_from} has another architecture than the one asked for ({'; '.join(differ)}): "
                               "use its preset and settings (see radscan info)")
        trainer.model.load_state_dict(start.state_dict())
        if films.lungs is not None:  # the lung fields as this run's box shows them
            trainer.model.lung_mask.copy_(torch.from_numpy(films.lungs.astype(np.float32)))
        log.info("starting from the weights of %s (%s)", init_from, start_metadata["weights"]["sha256"][:12])
        return _Run()
    if films.model_cfg.field == "thorax":
        set_thorax_field(trainer.model, films.train_images)
    if films.lungs is not None:
        trainer.model.lung_mask.copy_(torch.from_numpy(films.lungs.astype(np.float32)))
    return _Run()


def _trim_log(path: Path, epochs: int) -> None:
    """Keep the training log's lines of the first `epochs` epochs, those the checkpoint holds: an
    epoch logged and not checkpointed (a run killed or out of disk between the two) is trained
    again, and its line was in the log twice (a trial)."""
    try:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise cannot_write(path, exc) from None

    def epoch_of(line: str) -> int:
        try:
            return int(json.loads(line).get("epoch", 0))
        except (ValueError, TypeError, AttributeError):
            return epochs + 1  # not a line of this log: dropped
    kept = [line for line in lines if line.endswith("\n") and epoch_of(line) <= epochs]
    if kept != lines:
        try:
            with atomic_output(path) as handle:
                handle.writelines(kept)
        except OSError as exc:
            raise cannot_write(path, exc) from None


def _run_identity(films: _Films, tcfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint must be resumed with for the model an uninterrupted run makes: the training
    and model settings (all but --epochs and --max-minutes, which a resumed run may raise) as JSON, and a
    sha256 of the normals with their side of the split (names, pixels, training or calibration)."""
    settings = {key: value for key, value in asdict(tcfg).items() if key not in ("epochs", "max_minutes")}
    # and the model's settings (a critic blur or score kind changes no tensor's shape: a checkpoint
    # loads, and was finished under settings its first epochs never had, a review); the thorax box
    # is found from the normals, which the films' digest covers
    settings |= {f"model {key}": value for key, value in asdict(films.model_cfg).items() if key != "crop"}
    digest = hashlib.sha256()
    for name, held_out in zip(films.names, films.is_calibration, strict=True):
        digest.update(f"{name}\0{'calibration' if held_out else 'training'}\0".encode("utf-8", "surrogateescape"))
    digest.update(np.ascontiguousarray(films.images).tobytes())
    return {"settings": json.dumps(settings, sort_keys=True, default=str), "films": digest.hexdigest()}


def _refuse_another_run(began: dict[str, str] | None, now: dict[str, str], checkpoint: Path) -> None:
    """SettingError (exit 2) when --resume is given other settings or other normals than the run
    its checkpoint began: the films would be split again, some trained on becoming calibration
    normals (a threshold set on films the model knows), and model.json would name settings the
    first epochs did not use (a trial). A checkpoint of radscan 0.2 (no record) is taken as it is."""
    if not began:
        return
    if began.get("settings") != now["settings"]:
        before, after = json.loads(began["settings"]), json.loads(now["settings"])
        changed = ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(after)
                            if before.get(key) != after.get(key))
        raise SettingError(f"the training checkpoint {checkpoint} began with other settings ({changed}): resume "
                           "with the settings it began with, or choose another --out")
    if began.get("films") != now["films"]:
        raise SettingError(f"the normals differ from those the training checkpoint {checkpoint} began with (films "
                           "added, removed or changed, or split otherwise): films it trained on would become "
                           "calibration normals; resume with the same normals, or choose another --out")


def _run_epochs(trainer: Trainer, films: _Films, run: _Run, out_dir: Path, tcfg: TrainConfig, device: torch.device,
                progress: bool, started: float) -> None:
    """Train from `run.epochs` to `tcfg.epochs` (or until the time budget), evaluating each epoch into
    the training log and writing a checkpoint after it; updates `run`.

    The budget is kept at epoch boundaries: an epoch that the last one's length says would end past
    it is not begun (at least one epoch runs). An epoch cut within would be counted whole by the
    checkpoint, and `--resume` would then give another model than an uninterrupted run (a trial)."""
    budget_s = tcfg.max_minutes * 60 if tcfg.max_minutes else math.inf
    first, last_epoch_s = run.epochs, 0.0
    identity = _run_identity(films, tcfg)
    train_images = films.train_images
    tensor_images = torch.from_numpy(train_images)
    batches_per_epoch = len(train_images) // tcfg.batch_size  # drop the ragged last batch
    _trim_log(out_dir / LOG_FILE, run.epochs)
    with open(out_dir / LOG_FILE, "a", encoding="utf-8") as training_log:
        for epoch in range(run.epochs, tcfg.epochs):
            if epoch > first and time.monotonic() - started + last_epoch_s > budget_s:
                run.stopped_by_budget = True
                log.warning("time budget of %g minutes: stopped after epoch %d of %d (the next would end past it)",
                            tcfg.max_minutes, epoch, tcfg.epochs)
                break
            trainer.take_snapshot()
            generator = torch.Generator().manual_seed(tcfg.seed * 100_003 + epoch)
            torch.manual_seed(tcfg.seed * 100_003 + epoch)
            order = torch.randperm(len(train_images), generator=generator)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch + 1}/{tcfg.epochs}", unit="batch",
                       leave=False, disable=None if progress else True)
            epoch_started = time.monotonic()
            for index in bar:
                rows = order[index * tcfg.batch_size:(index + 1) * tcfg.batch_size]
                batch = augment(to_model_tensor(tensor_images[rows], device), generator, tcfg)
                batch = trainer.model.restrict(vary_acquisition(batch, generator, tcfg))
                anomalies = trainer.model.restrict(local_anomalies(batch, generator)) if tcfg.synthetic else None
                losses = trainer.step(batch, generator_step=index % tcfg.g_every == tcfg.g_every - 1,
                                      anomalies=anomalies)
                _stop_if_diverged(losses, epoch, index, tcfg)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                bar.set_postfix({k: f"{sums[k] / counts[k]:.4f}" for k in ("d", "student") if k in sums})
            bar.close()
            trainer.step_schedules()
            metrics = evaluate_epoch(trainer.model, train_images, films.calibration, films.validation, 64, device,
                                     tcfg.seed)
            run.epochs, run.density_fitted = epoch + 1, True
            record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - epoch_started, 2),
                      "lr": trainer.opt_g.param_groups[0]["lr"],
                      **{f"loss_{k}": sums[k] / counts[k] for k in sums}, **metrics}
            try:
                training_log.write(json.dumps(record) + "\n")
                training_log.flush()
            except OSError as exc:  # a full disk: exit 73, the last checkpoint kept for --resume
                raise cannot_write(out_dir / LOG_FILE, exc) from None
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if tcfg.keep != "last":
                run.best = better_epoch(run.best, trainer.model, epoch + 1, metrics, KEEP_RULES[tcfg.keep])
            save_checkpoint({**trainer.state(epoch + 1), "run": identity,
                              **({"best": run.best, "keep": tcfg.keep} if run.best else {})},
                             out_dir / CHECKPOINT_FILE)
            raise_if_stop_asked()  # a Ctrl-C that a library swallowed stops here, the epoch saved for --resume
            last_epoch_s = time.monotonic() - epoch_started  # its training, evaluation and checkpoint


def _kept_model(trainer: Trainer, films: _Films, run: _Run, tcfg: TrainConfig, device: torch.device) -> SimSID:
    """The model to save, in eval mode: the last epoch's, or with --keep best the best epoch's, its
    feature density fitted."""
    model = trainer.model.eval()
    if run.best is not None:  # its density was fitted and its calibration set when it was evaluated
        model.load_state_dict(run.best["model"])
        log.info("keeping epoch %d of %d: %s (%.3f)", run.best["epoch"], run.epochs,
                 KEEP_RULES[tcfg.keep].says.format(kind=model.cfg.score_kind), run.best["auc"])
    elif not run.density_fitted:  # resumed after the last epoch: nothing was fitted in this process
        fit_density(model, films.train_images, tcfg.seed, device)
    return model


def _not_used(inventory: Path) -> dict[str, int]:
    """The files of the normals' inventory (INPUTS_FILE) that were not trained on, counted by status
    ("error": could not be read, "rejected": by quality control, "skipped": not a film to use); {}
    when every file was used or there is no inventory."""
    try:
        with open(inventory, newline="", encoding="utf-8") as handle:
            counts = Counter(row["status"] for row in csv.DictReader(handle) if row["status"] != "ok")
    except (OSError, KeyError, csv.Error):
        return {}
    return dict(sorted(counts.items()))


def _write_report(model: SimSID, out_dir: Path, names: Sequence[str], calibration: np.ndarray,
                  scores: np.ndarray) -> None:
    """The training report beside the model (radscan.trainreport). The model is saved before: a
    report that cannot be drawn costs a warning, not the trained model."""
    from radscan.trainreport import CALIBRATION_SCORES_FILE, SAMPLES_FILE, draw_samples, write_training_report

    with CsvStream(out_dir / CALIBRATION_SCORES_FILE, ("path", "score")) as table:
        for name, score in zip(names, scores, strict=True):
            table.write({"path": name, "score": round(float(score), 9)})  # 9: a tie with the threshold shows
    try:
        draw_samples(model, calibration[:4], out_dir / SAMPLES_FILE)
        log.info("training report: %s", write_training_report(out_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("the training report could not be drawn (%s): the model is saved; run radscan report %s",
                    exc, out_dir)


