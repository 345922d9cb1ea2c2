"""`radscan score`: the nightly job. Decode in worker processes, score in batches with the frozen
model, write the triage worklist (image and study CSVs) and explanation PNGs.

Runs are incremental (a state store beside the report remembers every file's result, keyed by
the file's identity and the run's fingerprint), locked (one run per output location) and atomic
(outputs are renamed into place only when complete; results are committed batch by batch, so a
killed run resumes where it stopped).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import hmac
import logging
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dataclass_field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from radscan import __version__
from radscan.dicomresults import ResultWriter, require_highdicom
from radscan.drift import Drift, check_drift
from radscan.errors import ModelError, NoInputError, OutputError, SettingError
from radscan.htmlreport import IMAGES_PER_STUDY, image_entry, previous_success, render_worklist_html, study_entry
from radscan.ingest import (
    Found,
    check_inputs,
    check_outputs_apart,
    distinct_inputs,
    fallback_study_key,
    find_files,
    iter_ingested,
)
from radscan.model.metadata import read_metadata
from radscan.pacs import Delivery, Destination, deliver, forget_results
from radscan.policy import Policy, for_model
from radscan.preprocess import PREPROCESS_VERSION
from radscan.qc import DEFAULT_VIEWS, QualityControl, age_in_years, age_string, apply_qc, quality_control
from radscan.records import DICOM_FIELDS, RECORD_COLUMNS, ImageRecord, Status, printable
from radscan.report import (
    AtomicFile,
    CsvStream,
    atomic_output,
    cannot_write,
    commit_together,
    encode_png,
    png_name,
    prepare_folder,
    refuse_special,
    remove_stale_temporaries,
    render_explanation,
    render_film,
    write_png_bytes,
)
from radscan.state import FileIdentity, StateStore, hold_lock, store_files

if TYPE_CHECKING:
    from radscan.cluster import Cluster
    from radscan.model.simsid import SimSID

__all__ = ["ScoreSettings", "ScoreSummary", "score", "OutputPaths", "REPORT_COLUMNS", "STUDY_COLUMNS",
           "default_model_dir", "PHI_FIELDS", "load_phi_key", "check_dicom_settings"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "kermany-tiny"
DISCLAIMER = ("radscan scores are for research and triage support only: they order a reading list and "
              "are not a diagnosis")
PHI_FIELDS = ("PatientID", "AccessionNumber")
# which scored images get an explanation picture; "flagged" skips the gradient pass of the rest
PICTURE_MODES = ("all", "flagged", "none")
RESULT_COLUMNS = ("rank", "score", "score_z", "score_raw", "threshold", "flag", "new_this_run", "study_score",
                  "study_flag", "residual_png", "dicom_result", "dicom_sr", "dicom_sc")
PROVENANCE_COLUMNS = ("model_name", "model_version", "model_sha256", "preprocess_version", "radscan_version",
                      "scored_at", "run_id")
_QC = tuple(c for c in RECORD_COLUMNS if c not in ("path", "root", "status", "reason", "study_key",
                                                   "preprocess_version", *DICOM_FIELDS))
REPORT_COLUMNS = ("path", "root", "study_key", *DICOM_FIELDS, *RESULT_COLUMNS, *PROVENANCE_COLUMNS,
                  "status", "reason", *_QC)
STUDY_COLUMNS = ("study_rank", "study_section", "study_key", "study_score", "study_flag", "images", "images_scored",
                 "images_flagged", "images_error", "images_rejected", "images_skipped", "images_new", "study_note",
                 "top_path", "top_residual_png", "StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate",
                 "Modality", "Manufacturer", "ManufacturerModelName", "StationName", "threshold", "model_name",
                 "model_version")


def default_model_dir() -> Path:
    """The model shipped in the repository's models/ folder."""
    return Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class OutputPaths:
    report: Path
    studies: Path
    residuals: Path | None
    state: Path
    lock: Path
    html: Path | None = None
    dicom: Path | None = None  # DICOM results for the PACS (radscan.pacs), when asked for

    @classmethod
    def beside(cls, report: Path, studies: Path | None = None, residuals: Path | None = None,
               write_residuals: bool = True, write_html: bool = True, dicom: Path | None = None) -> OutputPaths:
        stem = report.with_suffix("")
        return cls(report=report, studies=studies or Path(f"{stem}_studies.csv"),
                   residuals=(residuals or Path(f"{stem}_residuals")) if write_residuals else None,
                   state=Path(f"{stem}.state.sqlite"), lock=Path(f"{stem}.lock"),
                   html=Path(f"{stem}.html") if write_html else None, dicom=dicom)

    @property
    def files(self) -> list[Path]:
        """The regular files written beside the worklist (not the pictures, the lock or the store)."""
        return [path for path in (self.report, self.studies, self.readme, self.html) if path is not None]

    @property
    def default_residuals(self) -> Path:
        """Where the pictures go unless --residuals names a folder (tidied even under --no-residuals)."""
        return Path(f"{self.report.with_suffix('')}_residuals")

    @property
    def readme(self) -> Path:
        """The note beside the worklist for whoever opens the folder."""
        return Path(f"{self.report.with_suffix('')}_README.txt")


@dataclass(frozen=True)
class ScoreSettings:
    model_dir: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    workers: int = -1
    phi: str = "keep"  # keep | hash | drop
    phi_key: bytes | None = None
    policy: Policy = Policy()
    progress: bool = True
    qc: str = "strict"  # strict | warn | off (radscan.qc)
    views: tuple[str, ...] | None = DEFAULT_VIEWS
    pictures: str = "flagged"  # all | flagged: which scored images get an explanation picture (PICTURE_MODES)
    send: Destination | None = None  # where the DICOM results go (needs OutputPaths.dicom)
    scheduler: str | None = None  # a Dask scheduler address, or local:N (radscan.cluster)
    study_key: str = "auto"  # what a study is for files whose content names none (radscan.ingest.STUDY_KEYS)


@dataclass
class ScoreSummary:
    files: int
    counts: dict[str, int]
    flagged_images: int
    flagged_studies: int
    studies: int
    scored_now: int
    reused: int
    duration_s: float
    images_per_s: float
    report: str
    studies_csv: str
    residuals: str | None
    model: str
    run_id: str
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    dicom: dict[str, Any] | None = None  # radscan.pacs.Delivery, with --dicom-out
    # what an operator must act on, in plain words (also logged as WARNING lines): files that could
    # not be read apart from results that did not reach the PACS; empty after a clean night
    problems: list[str] = dataclass_field(default_factory=list)
    # the flagged share of the films scored anew, against the run history and the calibration (radscan.drift)
    drift: dict[str, Any] | None = None
    started_at: str = ""
    finished_at: str = ""
    disclaimer: str = DISCLAIMER

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhiFilter:
    """keep, drop, or replace identifiers by a keyed HMAC (same patient -> same token every night)."""

    def __init__(self, mode: str, key: bytes | None):
        if mode not in ("keep", "hash", "drop"):
            raise ValueError(f"--phi must be keep, hash or drop, not {mode!r}")
        if mode == "hash" and not key:
            raise ValueError("--phi hash needs a key")
        self.mode, self._key = mode, key

    def apply(self, record: ImageRecord) -> None:
        if self.mode == "keep":
            return
        if record.PatientAge:  # written as whole years, 90 and over as 090Y (HIPAA); unreadable: dropped
            age = age_in_years(record.PatientAge)
            record.PatientAge = "" if age is None else age_string(age)
        for field in PHI_FIELDS:
            value = getattr(record, field)
            if self.mode == "drop" or not value:
                setattr(record, field, "")
            else:
                setattr(record, field, hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:16])

    def token(self, values: Sequence[str]) -> str:
        """A short token standing for `values` (identifiers), as the mode allows: keyed (HMAC) under
        hash, a plain digest under keep (the identifiers are shown anyway), none under drop (nothing
        of them may remain). Stable from run to run with the same key."""
        if self.mode == "drop" or not any(values):
            return ""
        text = "\0".join(values).encode("utf-8", "surrogateescape")
        if self.mode == "hash":
            return hmac.new(self._key, b"study\0" + text, hashlib.sha256).hexdigest()[:12]
        return hashlib.sha256(b"study\0" + text).hexdigest()[:12]

    @property
    def fingerprint(self) -> str:
        """Changes when the mode or key changes (stored rows must then be rebuilt)."""
        key = hashlib.sha256(self._key).hexdigest()[:8] if self._key else ""
        return f"{self.mode}:{key}"


def load_phi_key(explicit: str | None, key_file: Path) -> bytes:
    """The HMAC key: given, or read from `key_file`, which is created (mode 0600) on first use.
    Raises SettingError (exit 2) for an empty key (given or in the file) or a key file that is not
    a regular file (a FIFO would hang the night), OutputError (73) when it cannot be made."""
    if explicit is not None:
        if not explicit.strip():  # an unset variable expanded to "": never fall back to another key silently
            raise SettingError("the PHI key given by --phi-key or RADSCAN_PHI_KEY is empty: give the site's key, or "
                               "leave both unset to use --phi-key-file")
        return explicit.encode()
    if key_file.exists() or key_file.is_symlink():
        if not key_file.is_file():
            raise SettingError(f"the PHI key file {key_file} is not a regular file: point --phi-key-file at a file")
        key = key_file.read_bytes().strip()
        if not key:
            raise SettingError(f"the PHI key file {key_file} is empty: put the site's key in it, or delete it to "
                               "have a new one made (identifiers hashed before will then not match)")
        return key
    try:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise cannot_write(key_file, exc) from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_hex(32).encode() + b"\n")
    log.warning("created a new PHI key in %s: keep it safe; hashed identifiers only link across runs "
                "made with the same key", key_file)
    return key_file.read_bytes().strip()


@dataclass(frozen=True)
class PictureJob:
    """An explanation picture to draw (the arguments of render_explanation)."""

    image: np.ndarray
    explanation: np.ndarray
    residual: np.ndarray
    caption: str
    score_kind: str
    aspect: float

    def png(self) -> bytes:
        return encode_png(render_explanation(self.image, self.explanation, self.residual, self.caption,
                                             self.score_kind, self.aspect))


@dataclass(frozen=True)
class FilmPicture:
    """The picture of a film quality control rejected (the arguments of render_film)."""

    image: np.ndarray
    caption: str
    aspect: float

    def png(self) -> bytes:
        return encode_png(render_film(self.image, self.caption, self.aspect))


# what a batch does to the pictures folder: draw a picture at a path, or remove the stale one (None)
PictureActions = list[tuple[Path, "PictureJob | FilmPicture | bytes | None"]]


class _Scorer:
    """The model side of the pipeline: batches in, rows and explanation pictures out. The model
    arrives from a loading thread (importing torch and loading weights takes 1-2 s, hidden behind
    the first decodes); the first use waits for it and raises the loader's error, if any. Pure: it
    writes nothing, so that it runs the same on a cluster's workers (radscan.cluster)."""

    def __init__(self, loading: Future, metadata: dict[str, Any], residuals: Path | None, link_base: Path,
                 run_id: str, pictures: str, dicom_pictures: bool = False,
                 resolved_roots: dict[str, str] | None = None):
        self._loading, self.residuals, self.link_base, self.pictures = loading, residuals, link_base, pictures
        self.dicom_pictures = dicom_pictures  # every DICOM image gets one: its Secondary Capture is made of it
        self.resolved_roots = resolved_roots or {}  # root as given -> resolved (on the machine that lists files)
        self.provenance = {
            "model_name": metadata.get("name", ""), "model_version": metadata.get("version", ""),
            "model_sha256": metadata["weights"]["sha256"], "preprocess_version": PREPROCESS_VERSION,
            "radscan_version": __version__, "run_id": run_id,
        }

    @functools.cached_property
    def model(self) -> SimSID:
        return self._loading.result()

    @functools.cached_property
    def threshold(self) -> float:
        return float(self.model.threshold)

    def score(self, records: list[ImageRecord], images: list[np.ndarray]) -> tuple[list[dict[str, Any]],
                                                                                   PictureActions]:
        """Rows of the scored `records` (in order) and what to do to their pictures."""
        from radscan.model.runtime import score_arrays

        threshold = self.threshold  # also makes sure the model loaded before any row is saved
        if not records:
            return [], []
        batch = np.stack(images)
        # without pictures, only the score itself is computed (for the critic: no generator pass)
        result = score_arrays(self.model, batch, batch_size=len(images), explain=self.pictures == "all",
                              components=self.pictures == "all")
        scores, raws = result.scores.numpy(), result.raw_scores.numpy()
        # the score's own z (sigmoid(z) = score): it keeps the order at the top of the list, where the
        # 0..1 score saturates (a z of 7 and one of 12 both print as 1.000)
        zs = self.model.calibrated(result.components)[1].numpy() if len(scores) else scores
        maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        explain = range(len(images)) if self.pictures == "all" else (
            np.flatnonzero((scores >= threshold) | self._dicom(records)) if self.pictures == "flagged" else [])
        if self.pictures == "flagged" and len(explain):  # the gradient pass for the flagged images only
            result = score_arrays(self.model, batch[explain], batch_size=len(explain), explain=True)
        if len(explain):
            maps = dict(zip((int(i) for i in explain), zip(result.explanation_maps.numpy(),
                                                           result.residual_maps.numpy(), strict=True), strict=True))
        scored_at = _now()
        rows, pictures = [], []
        for index, (record, image, score, raw, z) in enumerate(zip(records, images, scores, raws, zs, strict=True)):
            flag = bool(score >= threshold)
            if index in maps:
                explanation, residual = maps[index]
                path = self._picture_path(record)
                pictures.append((path, PictureJob(self._as_seen(image), explanation, residual,
                                                  picture_caption(record, float(score), threshold, self.provenance),
                                                  self.model.cfg.score_kind, self._aspect(record))))
                record.extra["residual_png"] = os.path.relpath(path, self.link_base)
            elif self.residuals is not None:  # no picture now: none from an earlier version of the file either
                pictures.append((self._picture_path(record), None))
            record.extra.update(score=round(float(score), 6), score_z=round(float(z), 3),
                                score_raw=round(float(raw), 6), threshold=round(threshold, 6), flag=flag,
                                scored_at=scored_at, **self.provenance)
            rows.append(record.as_row())
        return rows, pictures

    def rejected(self, records: list[ImageRecord], images: list[np.ndarray]) -> tuple[list[dict[str, Any]],
                                                                                    PictureActions]:
        """Rows of `records` quality control rejected (in order) and their pictures: the film with
        the verdict, so that a reader can judge the rejection (none with --no-residuals)."""
        rows, pictures = [], []
        for record, image in zip(records, images, strict=True):
            if self.residuals is not None:
                path = self._picture_path(record)
                pictures.append((path, FilmPicture(image, rejected_caption(record, self.provenance),
                                                   self._aspect(record))))
                record.extra["residual_png"] = os.path.relpath(path, self.link_base)
            rows.append(record.as_row())
        return rows, pictures

    def _as_seen(self, image: np.ndarray) -> np.ndarray:
        """The (128, 128) uint8 film as the model saw it: outside a thorax field's window, mid grey (a
        thorax box was cut when the film was read)."""
        if self.model.cfg.field != "thorax":
            return image
        return np.where(self.model.field_mask.cpu().numpy() > 0, image, 128).astype(np.uint8)

    def _aspect(self, record: ImageRecord) -> float:
        """The width/height of what the model was given before it was squashed to its square: the
        film, or a thorax-box model's box of it (1 when unknown)."""
        crop = self.model.cfg.crop
        box = (crop[2] - crop[0]) / (crop[3] - crop[1]) if crop else 1.0
        return _aspect(record) * box

    def _picture_path(self, record: ImageRecord) -> Path:
        root = self.resolved_roots.get(record.root) or str(Path(record.root).resolve())
        return self.residuals / png_name(root, record.path)

    def _dicom(self, records: list[ImageRecord]) -> np.ndarray:
        return np.array([self.dicom_pictures and record.kind == "dicom" for record in records], dtype=bool)


def judge_and_score(items: list[tuple[ImageRecord, np.ndarray | None]], qc: QualityControl,
                    scorer: _Scorer) -> tuple[list[dict[str, Any]], PictureActions]:
    """Quality control, then the model, for read files: one row per item (in order), and what to
    do to the pictures folder. Unreadable items keep their record's status and reason."""
    readable = [(index, record, image) for index, (record, image) in enumerate(items) if image is not None]
    passed = apply_qc(qc, [record for _, record, _ in readable], [image for _, _, image in readable])
    to_score = [item for item, ok in zip(readable, passed, strict=True) if ok]
    refused = [item for item, ok in zip(readable, passed, strict=True) if not ok]
    scored, pictures = scorer.score([record for _, record, _ in to_score], [image for _, _, image in to_score])
    judged, films = scorer.rejected([record for _, record, _ in refused], [image for _, _, image in refused])
    rows = [record.as_row() for record, _ in items]
    for (index, _, _), row in zip(to_score + refused, scored + judged, strict=True):
        rows[index] = row
    return rows, pictures + films


def write_pictures(pictures: PictureActions, pool: ThreadPoolExecutor) -> None:
    """Draw (a PictureJob or FilmPicture) or store (PNG bytes) each picture atomically, in `pool` (PNG encoding
    releases the GIL), or remove a stale one (None); returns when all are done. A picture that
    cannot be written fails the run loudly (exit 73), not silently."""
    writes = [pool.submit(_write_picture, path, picture) for path, picture in pictures if picture is not None]
    for path, picture in pictures:
        if picture is None:
            path.unlink(missing_ok=True)
    for write in writes:
        write.result()


def picture_caption(record: ImageRecord, score: float, threshold: float, provenance: dict[str, Any]) -> str:
    """The explanation picture's caption: the result and the disclaimer; the film's identity as
    the PHI mode left it in `record` (hashed or dropped outside --phi keep), its view, date and
    path, the model; a QC verdict on a third line. Header text is put on one line per field."""
    verdict = "FLAGGED" if score >= threshold else "not flagged"
    lines = [f"anomaly score {score:.3f} (threshold {threshold:.3f}): {verdict}.  For research and triage support "
             "only, not a diagnosis.", _identity_line(record, provenance)]
    if record.qc_status in ("warn", "fail"):
        lines.append(f"quality control {record.qc_status}: {record.qc_reason}")
    return _caption(lines)


def rejected_caption(record: ImageRecord, provenance: dict[str, Any]) -> str:
    """The caption of a rejected film's picture: the verdict and the disclaimer, then its identity
    as the PHI mode left it (as picture_caption), one line per field."""
    return _caption([f"NOT JUDGED by the model: failed quality control ({record.qc_reason}).",
                     "Check the film yourself.  For research and triage support only, not a diagnosis.",
                     _identity_line(record, provenance)])


def _identity_line(record: ImageRecord, provenance: dict[str, Any]) -> str:
    """A caption's identity line: patient and accession as the PHI mode left them, view, date, path, model."""
    identity = [f"patient {record.PatientID}" if record.PatientID else "",
                f"accession {record.AccessionNumber}" if record.AccessionNumber else "",
                record.ViewPosition, record.StudyDate, record.path]
    return "  ·  ".join(part for part in identity if part) + \
        f"  ·  model {provenance['model_name']} {provenance['model_version']}"


def _caption(lines: list[str]) -> str:
    """Caption lines as drawn: header text shown escaped, on one line each, at most 200 characters."""
    return "\n".join(" ".join(printable(line).split())[:200] for line in lines)


def _aspect(record: ImageRecord) -> float:
    """The film's width/height before it was squashed to the model's square (1 when unknown)."""
    return record.columns / record.rows if record.rows and record.columns else 1.0


def _load_model(model_dir: Path, device_name: str) -> SimSID:
    """Import torch, pick the device and load (and verify) the weights: run in a thread."""
    from radscan.model.io import load_model
    from radscan.model.runtime import resolve_device

    return load_model(model_dir, resolve_device(device_name))[0]


def _write_picture(path: Path, picture: PictureJob | FilmPicture | bytes) -> None:
    try:
        write_png_bytes(path, picture if isinstance(picture, bytes) else picture.png())
    except OSError as exc:
        raise OutputError(f"cannot write explanation PNG {path}: {exc.strerror or exc}") from None


def score(inputs: Sequence[str], outputs: OutputPaths, settings: ScoreSettings) -> ScoreSummary:
    """Score every image under `inputs` and write the worklist; see the module docstring."""
    started = time.monotonic()
    check_inputs(inputs)
    inputs = distinct_inputs(inputs)
    every_output = [outputs.report, outputs.studies, outputs.residuals, outputs.state, outputs.lock, outputs.readme,
                    outputs.html, outputs.dicom]
    check_outputs_apart(inputs, every_output)
    named = [Path(path).resolve() for path in every_output if path is not None]
    if len(set(named)) < len(named):
        raise SettingError("two outputs have the same path (--out, --studies, --residuals or the files beside "
                           "them): give each its own")
    pictures = settings.pictures if outputs.residuals is not None else "none"
    if pictures not in PICTURE_MODES:
        raise SettingError(f"pictures must be one of {', '.join(PICTURE_MODES)}, not {pictures!r}")
    check_dicom_settings(outputs, settings)
    if settings.scheduler is not None:  # a malformed address is a usage error before anything is made
        from radscan.cluster import parse_scheduler

        parse_scheduler(settings.scheduler)
    model_dir = settings.model_dir or default_model_dir()
    check_outputs_apart([model_dir], every_output)
    for path in (*outputs.files, outputs.lock, *store_files(outputs.state)):
        refuse_special(path)  # before anything is created beside them (e.g. --out /dev/null)
    if not model_dir.exists():
        raise ModelError(f"no model at {model_dir}: pass --model DIR (a directory made by radscan train)")
    metadata = read_metadata(model_dir)
    settings = replace(settings, policy=for_model(settings.policy, metadata))  # a model's box is how it reads films
    phi = PhiFilter(settings.phi, settings.phi_key)
    qc = quality_control(model_dir, metadata, settings.qc, settings.views)
    fingerprint = "|".join([metadata["weights"]["sha256"], PREPROCESS_VERSION, repr(settings.policy),
                            phi.fingerprint, pictures + ("+dicom" if outputs.dicom else ""), qc.fingerprint])
    run_id = uuid.uuid4().hex[:12]
    started_at = _now()
    log.info("run %s started: %s -> %s, model %s %s (sha256 %s...)", run_id, ", ".join(inputs), outputs.report,
             metadata.get("name"), metadata.get("version"), metadata["weights"]["sha256"][:12])

    with hold_lock(outputs.lock) as lock, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="radscan-load") as loader:
        _tidy_outputs(outputs)
        loading = loader.submit(_load_model, model_dir, settings.device)
        files = find_files(inputs, exclude=[outputs.report, outputs.studies, outputs.state, outputs.lock,
                                            *(folder for folder in (outputs.residuals, outputs.dicom) if folder)],
                           study_key=settings.study_key)
        if not files:
            raise NoInputError(f"no files found under {', '.join(inputs)}")
        with_files = {Path(found.root) for found in files}
        empty = [str(root) for root in inputs if Path(root).is_dir() and Path(root) not in with_files]
        if empty:  # an unmounted share looks like an empty folder: its studies must not be pruned
            raise NoInputError(f"no files found under {', '.join(empty)} (an unmounted or emptied folder?): nothing "
                               "was changed; remove it from the command line if it is meant to be empty")
        # the folder each file was found under (a file given itself is found under its folder)
        resolved_roots = {root: str(Path(root).resolve()) for root in {found.root for found in files}}
        store = StateStore(outputs.state, fingerprint, run_id)
        try:
            todo = _reuse_stored(files, store, outputs.report.parent, pictures, dicom_pictures=bool(outputs.dicom))
            log.info("%d files: %d unchanged since the last run, %d to read", len(files), len(files) - len(todo),
                     len(todo))
            scorer = _Scorer(loading, metadata, outputs.residuals, outputs.report.parent, run_id, pictures,
                             dicom_pictures=bool(outputs.dicom), resolved_roots=resolved_roots)
            with _cluster(settings, model_dir, metadata, resolved_roots, todo) as cluster:
                if cluster is not None:
                    cluster.prepare(phi, metadata, outputs.residuals, outputs.report.parent, run_id, pictures,
                                    bool(outputs.dicom), resolved_roots)
                _score_new(todo, settings, phi, qc, scorer, store, cluster)
            threshold = scorer.threshold  # the model is verified even when nothing was new
            lock.confirm()  # the shared outputs follow: never beside another run's
            delivery = _deliver(store, outputs, settings, scorer.provenance, metadata)
            counts = store.counts()
            drift = check_drift(*store.scored_now(), store.run_history(),
                                metadata.get("calibration", {}).get("target_specificity"))
            problems = _problems(counts, delivery, outputs, drift)
            lock.confirm()
            studies = write_worklist(store, outputs, threshold, metadata, run=(run_id, dict(counts)),
                                     problems=problems, delivered=delivery is None or delivery.complete)
            _write_readme(outputs, metadata, pictures)
            store.record_run(_now(), drift.scored, drift.flagged)
            _forget(store.prune(), outputs)
            _remove_unlinked_pictures(store, outputs, resolved_roots)
        finally:
            store.close()

    duration = time.monotonic() - started
    for problem in problems:
        log.warning("%s", problem)
    flagged_images = counts.pop("flagged")
    log.info("run %s finished in %.1f s: %d files, %s; %d of %d studies flagged", run_id, duration, len(files),
             ", ".join(f"{count} {status}" for status, count in counts.items()), studies[1], studies[0])
    return ScoreSummary(
        files=len(files), counts=counts, flagged_images=flagged_images, flagged_studies=studies[1],
        studies=studies[0], scored_now=len(todo), reused=len(files) - len(todo), duration_s=round(duration, 3),
        images_per_s=round(len(todo) / duration, 2) if duration else 0.0,
        report=str(outputs.report), studies_csv=str(outputs.studies),
        residuals=str(outputs.residuals) if outputs.residuals else None, model=str(model_dir), run_id=run_id,
        model_name=metadata.get("name", ""), model_version=metadata.get("version", ""),
        model_sha256=metadata["weights"]["sha256"], started_at=started_at, finished_at=_now(),
        dicom=delivery.as_dict() if delivery else None, problems=problems, drift=drift.as_dict(),
    )


def _problems(counts: dict[str, int], delivery: Delivery | None, outputs: OutputPaths, drift: Drift) -> list[str]:
    """What needs an operator after a run that finished, each kind in its own words: files that
    could not be read (the source, or the share) apart from results that did not reach the PACS
    (the network or the PACS), so that monitoring never reads a PACS outage as a good night; and a
    flagged share that moved beyond chance (radscan.drift)."""
    problems = []
    if counts["error"]:
        problems.append(f"{counts['error']} file(s) could not be read: see the status=error rows of "
                        f"{outputs.report.name}")
    if delivery is not None and delivery.not_sent:
        problems.append(f"{delivery.not_sent} DICOM result object(s) not sent to {delivery.destination} "
                        f"({delivery.send_failure or 'see the worklist'}): kept in {delivery.folder} and sent by the "
                        "next run")
    if delivery is not None and delivery.not_made:
        problems.append(f"{delivery.not_made} scored DICOM image(s) have no DICOM results: see their reason in "
                        f"{outputs.report.name}")
    if drift.warning:
        problems.append(drift.warning)
    return problems


@contextlib.contextmanager
def _cluster(settings: ScoreSettings, model_dir: Path, metadata: dict[str, Any], resolved_roots: dict[str, str],
             todo: list[tuple[Found, FileIdentity]]) -> Iterator[Cluster | None]:
    """The Dask cluster of --scheduler (closed at the end), when there is something to read."""
    if settings.scheduler is None or not todo:
        yield None
        return
    from radscan.cluster import Cluster

    samples: dict[str, str] = {}  # a file of each root: a worker that sees the folder but not its files is caught
    for found, _ in todo:
        if found.root not in samples:
            samples[found.root] = str(Path(resolved_roots[found.root]) / found.path)
    cluster = Cluster(settings.scheduler, settings, model_dir, metadata, list(resolved_roots.values()),
                      list(samples.values()))
    try:
        yield cluster
    finally:
        cluster.close()


def check_dicom_settings(outputs: OutputPaths, settings: ScoreSettings) -> None:
    """DICOM results go into the source's study in the PACS: they need the study's real patient
    identity (decided for 0.3: no de-identified results, whose UIDs and dates would still link them
    to the patient) and the explanation pictures their Secondary Captures are made of."""
    if outputs.dicom is None:
        if settings.send is not None:
            raise SettingError("--send sends the DICOM results that --dicom-out keeps: give --dicom-out DIR too")
        return
    require_highdicom()
    if settings.phi != "keep":
        raise SettingError(f"--dicom-out with --phi {settings.phi}: DICOM results join the source's study in the PACS "
                           "and must carry its patient and study as they are; use --phi keep for that run (results "
                           "with hashed or dropped identifiers would not join the study)")
    if outputs.residuals is None:
        raise SettingError("--dicom-out with --no-residuals: each DICOM image's Secondary Capture is its explanation "
                           "picture; leave out --no-residuals")


def _deliver(store: StateStore, outputs: OutputPaths, settings: ScoreSettings, provenance: dict[str, Any],
             metadata: dict[str, Any]) -> Delivery | None:
    """The DICOM results of the scored DICOM images, written and sent (radscan.pacs)."""
    if outputs.dicom is None:
        return None
    writer = ResultWriter(outputs.dicom, provenance, metadata.get("config", {}).get("score_kind", ""))
    return deliver(store, writer, outputs.report.parent, settings.send)


def _tidy_outputs(outputs: OutputPaths) -> None:
    """Under the lock: refuse a pictures folder that is a symbolic link (pictures would land, and
    old ones be deleted, wherever it points), and remove what a killed run left half-written."""
    for folder, option in ((outputs.residuals, "--residuals"), (outputs.dicom, "--dicom-out")):
        if folder is not None:
            prepare_folder(folder, option)
    if outputs.dicom is not None:  # found out now, not after a night of scoring
        try:
            tempfile.TemporaryFile(dir=outputs.dicom).close()
        except OSError as exc:
            raise cannot_write(outputs.dicom, exc) from None
    removed = sum(remove_stale_temporaries(path.parent, glob.escape(path.name)) for path in outputs.files)
    if outputs.residuals is not None and outputs.residuals.is_dir():
        removed += remove_stale_temporaries(outputs.residuals, "*.png")
    if outputs.dicom is not None and outputs.dicom.is_dir():
        removed += remove_stale_temporaries(outputs.dicom, "*.dcm")
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _forget(rows: list[dict[str, Any]], outputs: OutputPaths) -> None:
    """Remove the pictures of files that are no longer among the inputs (their rows are gone from
    the store): the worklist lists what is there now, and nothing of a removed study stays behind.
    Only files inside the pictures folder are removed, whatever a stored row says."""
    if rows:
        log.info("%d files are no longer among the inputs: their rows and pictures are removed", len(rows))
    forget_results(rows, outputs.dicom, outputs.report.parent)
    folder = (outputs.residuals or outputs.default_residuals).resolve()
    for row in rows:
        name = row.get("residual_png")
        if not name:
            continue
        picture = (outputs.report.parent / name).resolve()
        if picture.parent == folder and picture.suffix == ".png":
            picture.unlink(missing_ok=True)


def _remove_unlinked_pictures(store: StateStore, outputs: OutputPaths, resolved_roots: dict[str, str]) -> None:
    """Under --no-residuals, remove from the default pictures folder the picture an earlier run drew
    of each film this run read (with a pictures folder, each batch already removes the picture of a
    film it scores without one: write_pictures). Only the film's own picture name
    (radscan.report.png_name) is removed, so a folder shared with another worklist keeps that list's
    pictures; never a symbolic link or a folder."""
    folder = outputs.default_residuals
    if outputs.residuals is not None or folder.is_symlink() or not folder.is_dir():
        return
    removed = 0
    for row in store.worklist():
        if row.get("residual_png") or row.get("read_by_run") != store.run_id:
            continue
        root = resolved_roots.get(row["root"]) or str(Path(row["root"]).resolve())
        picture = folder / png_name(root, row["path"])
        if picture.is_file() and not picture.is_symlink():
            picture.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d pictures of films that have none now (%s)", removed, folder)


def _identity(found: Found) -> FileIdentity:
    key = f"{Path(found.root).resolve()}\0{found.path}"
    try:
        stat = found.full_path.stat()
        return FileIdentity(key, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return FileIdentity(key, -1, -1)


def _reuse_stored(files: list[Found], store: StateStore, link_base: Path, pictures: str,
                  dicom_pictures: bool = False) -> list[tuple[Found, FileIdentity]]:
    """Mark the rows still valid in the store as seen by this run; return the files left to read,
    with the identity they were looked up by. Files with errors are always retried; a scored (or
    rejected) row whose picture has gone is read again (with `dicom_pictures`, every DICOM image has one),
    and so is a row whose study was named by the crawl and is another now (radscan.ingest.assign_study_keys)."""
    todo, unchanged = [], []
    for found in files:
        identity = _identity(found)
        row = None if found.problem else store.lookup(identity)
        wants_picture = row is not None and pictures != "none" and (row["status"] == Status.REJECTED or (
            row["status"] == Status.OK and (pictures == "all" or (pictures == "flagged" and (
                row.get("flag") is True or (dicom_pictures and row.get("kind") == "dicom"))))))
        usable = row is not None and row["status"] != Status.ERROR and (
            not wants_picture or (link_base / row.get("residual_png", "")).is_file()) and (
            # a study named by the crawl, not the file, moves when --study-key or the folder's size does
            row.get("StudyInstanceUID") or _crawl_study(row.get("study_key", "")) == fallback_study_key(found))
        if usable:
            unchanged.append(identity)
        else:
            todo.append((found, identity))
    store.mark_seen(unchanged)
    return todo


def _score_new(todo: list[tuple[Found, FileIdentity]], settings: ScoreSettings, phi: PhiFilter, qc: QualityControl,
               scorer: _Scorer, store: StateStore, cluster: Cluster | None = None) -> None:
    """Read, judge and score `todo`, here (decoding in worker processes while the model scores
    full batches) or on a Dask cluster; write each batch's pictures, then commit its rows."""
    dicom = Counter()  # DICOM files read this run, and those skipped: a policy that skips all is a mistake
    progress = _ProgressLog(len(todo), quiet=not settings.progress or sys.stderr.isatty())
    batches = cluster.score(todo) if cluster is not None else _score_here(todo, settings, phi, qc, scorer)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="radscan-png") as pool, \
            tqdm(total=len(todo), unit="file", desc="score", disable=None if settings.progress else True) as bar:
        for identities, rows, pictures in batches:
            write_pictures(pictures, pool)
            store.save(zip(identities, rows, strict=True))
            dicom.update(row["status"] for row in rows if row["kind"] == "dicom")
            bar.update(len(rows))
            progress.tick(len(rows))
    if dicom and dicom[Status.SKIPPED] == dicom.total():
        log.warning("none of the %d DICOM files read in this run was used: all were skipped by the selection "
                    "policy (modalities %s, body parts %s); check --modalities and --body-parts",
                    dicom.total(), _listed(settings.policy.modalities), _listed(settings.policy.body_parts))


ScoredBatch = tuple[list[FileIdentity], list[dict[str, Any]], PictureActions]


def _score_here(todo: list[tuple[Found, FileIdentity]], settings: ScoreSettings, phi: PhiFilter,
                qc: QualityControl, scorer: _Scorer) -> Iterator[ScoredBatch]:
    """On this machine: decode in worker processes, and judge and score in batches of
    `settings.batch_size` images (or of 4x as many files that cannot be scored)."""
    pending: list[tuple[FileIdentity, ImageRecord, np.ndarray | None]] = []
    results = iter_ingested([found for found, _ in todo], settings.policy, settings.workers,
                            in_flight=2 * settings.batch_size)
    images = 0
    for (_, identity), (record, image) in zip(todo, results, strict=True):
        prepare_record(record, phi, scorer.provenance["run_id"])
        pending.append((identity, record, image))
        images += image is not None
        if images >= settings.batch_size or len(pending) >= 4 * settings.batch_size:
            yield _judged(pending, qc, scorer)
            pending, images = [], 0
    if pending:
        yield _judged(pending, qc, scorer)


def _judged(pending: list[tuple[FileIdentity, ImageRecord, np.ndarray | None]], qc: QualityControl,
            scorer: _Scorer) -> ScoredBatch:
    rows, pictures = judge_and_score([(record, image) for _, record, image in pending], qc, scorer)
    return [identity for identity, _, _ in pending], rows, pictures


STUDY_TOKEN = "#patient-"  # between a folder's study key and the token of a UID-less DICOM file's patient


def _crawl_study(study_key: str) -> str:
    """The study the crawl named (the folder's), without a UID-less DICOM file's patient token."""
    return study_key.rpartition(STUDY_TOKEN)[0] or study_key


def prepare_record(record: ImageRecord, phi: PhiFilter, run_id: str) -> None:
    """What every read record gets before it is judged: its study, identifiers as the PHI mode
    allows, and the run that read it (for new_this_run).

    A DICOM image without a StudyInstanceUID (ACR-NEMA files, some exports) belongs to its folder's
    study (radscan.ingest.folder_study_key); two patients' such files in one folder are told apart by
    patient, accession and date, as a token the PHI mode allows appended to the folder's key
    (`PhiFilter.token`; under --phi drop nothing of them remains, and the folder is one study)."""
    if record.kind == "dicom" and not record.StudyInstanceUID:
        token = phi.token([record.PatientID, record.AccessionNumber, record.StudyDate])
        if token:
            record.study_key = f"{record.study_key}{STUDY_TOKEN}{token}"
    phi.apply(record)
    record.extra["read_by_run"] = run_id


class _ProgressLog:
    """Where no progress bar is drawn (cron, a log file), a log line every minute or every 1,000
    files, so that a long run shows it is alive and how far it got."""

    def __init__(self, total: int, quiet: bool, every_s: float = 60.0, every_files: int = 1000):
        self.total, self.quiet, self.every_s, self.every_files = total, quiet, every_s, every_files
        self.done, self._last_time, self._last_done = 0, time.monotonic(), 0

    def tick(self, files: int = 1) -> None:
        self.done += files
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last_time >= self.every_s or self.done - self._last_done >= self.every_files:
            log.info("read %d of %d files (%.1f files/s)", self.done, self.total,
                     (self.done - self._last_done) / max(now - self._last_time, 1e-9))
            self._last_time, self._last_done = now, self.done


def _listed(values: tuple[str, ...] | None) -> str:
    return "all" if values is None else ",".join(values)


def write_worklist(store: StateStore, outputs: OutputPaths, threshold: float, metadata: dict[str, Any],
                   run: tuple[str, dict[str, int]], problems: Sequence[str] = (), delivered: bool = True
                   ) -> tuple[int, int]:
    """Stream the image and study CSVs from the store and render the web page of the studies
    (`outputs.html`) to temporary files, then put them in place together (`commit_together`:
    report.csv last, so that a new report.csv always comes with its own study list and page).
    `run` is (run id, file counts by status); `problems` what needs an operator (`_problems`), shown
    on the page; `delivered` whether every DICOM result reached the PACS (else the page keeps its
    last success). Returns (studies, flagged studies)."""
    pending: list[AtomicFile] = []
    try:
        report = CsvStream(outputs.report, REPORT_COLUMNS)
        pending.append(report.file)
        members = _write_image_rows(report, store)
        study_csv = CsvStream(outputs.studies, STUDY_COLUMNS)
        pending.insert(0, study_csv.file)
        entries, studies, flagged = _write_study_rows(study_csv, store, threshold, metadata,
                                                      members if outputs.html is not None else None)
        if outputs.html is not None:
            page = AtomicFile(outputs.html)
            pending.insert(1, page)
            counts = dict(run[1])
            flagged_images = counts.pop("flagged", 0)
            finished = _now()
            this_run = {"at": finished, "run_id": run[0], "ok": True, "problems": list(problems)}
            # a success also delivered every DICOM result: a PACS outage keeps the last one (as the
            # nightly wrapper's last_success and the metrics do)
            success = this_run if delivered else previous_success(outputs.html)
            page.handle.write(render_worklist_html(entries, {
                "disclaimer": DISCLAIMER, "model_name": metadata.get("name", ""),
                "model_version": metadata.get("version", ""), "model_sha256": metadata["weights"]["sha256"],
                "score_kind": metadata.get("config", {}).get("score_kind", ""), "threshold": float(threshold),
                "run_id": run[0], "finished_at": finished, "radscan_version": __version__,
                "run_status": {"last_attempt": this_run, "last_success": success,
                               "listed": {"at": finished, "run_id": run[0]}},
                "report_name": outputs.report.name, "studies": studies,
                "studies_name": os.path.relpath(outputs.studies, outputs.report.parent),
                "flagged_studies": flagged, "counts": {**counts, "flagged images": flagged_images}}))
    except BaseException as exc:
        for file in pending:
            file.abort()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the worklist next to {outputs.report}: {exc.strerror or exc}") from None
        raise
    commit_together(pending)
    return studies, flagged


def _write_image_rows(report: CsvStream, store: StateStore) -> dict[str, list[dict[str, Any]]]:
    """The image list; returns the images each study lists, in the list's order (radscan.htmlreport.image_entry;
    at most IMAGES_PER_STUDY each), for the page."""
    rank = 0
    members: dict[str, list[dict[str, Any]]] = {}
    for row in store.worklist():
        if row["status"] == Status.OK:
            rank += 1
            row["rank"] = rank
        report.write(row)
        if row.pop("listed"):
            images = members.setdefault(row["study_key"], [])
            if len(images) < IMAGES_PER_STUDY:
                images.append(image_entry(row))
    return members


def _write_study_rows(study_csv: CsvStream, store: StateStore, threshold: float, metadata: dict[str, Any],
                      members: dict[str, list[dict[str, Any]]] | None) -> tuple[list[dict[str, Any]], int, int]:
    """The study list; returns the page's entries (with `members`, the images of each study:
    _write_image_rows), studies, flagged studies."""
    entries, studies, flagged = [], 0, 0
    for study in store.studies():
        note = _study_note(study)
        top = study.pop("top")
        study.pop("skip_reasons")
        studies += 1
        flagged += study["images_flagged"] > 0
        row = {
            **{key: top.get(key, "") for key in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate",
                                                 "Modality", "Manufacturer", "ManufacturerModelName",
                                                 "StationName")},
            **study, "study_rank": studies, "study_flag": study["images_flagged"] > 0,
            "study_note": note,
            "top_path": top["path"], "top_residual_png": top.get("residual_png", ""),
            "threshold": round(threshold, 6), "model_name": metadata.get("name", ""),
            "model_version": metadata.get("version", ""),
        }
        study_csv.write(row)
        if members is not None:
            qc = top.get("qc_reason", "") if top.get("qc_status") in ("warn", "fail") else ""
            entries.append(study_entry(row, qc_reason=qc, z=top.get("score_z"),
                                       images=members.get(study["study_key"], [])))
    return entries, studies, flagged


def _study_note(study: dict[str, Any]) -> str:
    """What a reader must know about a study besides its score: images that were not judged."""
    notes = []
    if study["images_qc_warned"]:
        notes.append(f"{study['images_qc_warned']} scored image(s) with a quality control warning: read qc_reason "
                     "before the flag")
    if study["images_rejected"]:
        notes.append(f"{study['images_rejected']} image(s) not judged (failed quality control: see qc_reason)")
    if study["images_error"]:
        notes.append(f"{study['images_error']} image(s) could not be read")
    if study["images_skipped"]:
        reason = "see their rows"
        if study["images_skipped"] == study["images"]:  # the top row is then a skipped image
            others = study["skip_reasons"] - 1
            reason = study["top"]["reason"] + (f"; {others} other reason(s): see their rows" if others else "")
        notes.append(f"{study['images_skipped']} image(s) skipped by the selection policy ({reason})")
    if notes and not study["images_scored"]:
        if study["images_rejected"] or study["images_skipped"]:  # there is a film a reader can look at
            notes.append("no image of this study was scored: review it yourself")
        else:  # nothing could be read: a reader has nothing to look at
            notes.append("no file of this study could be read: for IT (the reasons are in the image list)")
    return "; ".join(notes)


def _pictures_note(outputs: OutputPaths, pictures: str) -> str:
    if outputs.residuals is None:
        return "No pictures were written (--no-residuals)."
    which = "each flagged image" if pictures == "flagged" else "each scored image"
    return (f"{outputs.residuals.name}/: {which} beside a map of where it raises the anomaly score\n"
            "  (bright = more than 95% of normal films show there), and, smaller, the reconstruction difference\n"
            "  |input - reconstruction| (the density and critic scores do not use it).")


def _write_readme(outputs: OutputPaths, metadata: dict[str, Any], pictures: str) -> None:
    """A short note beside the worklist, for whoever opens the folder."""
    text = f"""About {outputs.report.name} (written by radscan {__version__})

{DISCLAIMER}.

{outputs.report.name}: one row per input file, sorted by study score then image score, highest first.
  score 0..1 (high = anomalous); flag = score >= threshold; status ok/skipped/error with a reason.
{outputs.studies.name}: one row per study with a scored or failed image, for the reading worklist.
{_pictures_note(outputs, pictures)}
{outputs.html.name + ": the worklist as a web page (open it in a browser)." if outputs.html else ""}
Model: {metadata.get("name")} {metadata.get("version")} (sha256 {metadata["weights"]["sha256"][:16]}...),
  score {metadata.get("config", {}).get("score_kind")},
  threshold {float(metadata["calibration"]["threshold"]):.4f} chosen by {metadata["calibration"].get("method")}.
"""
    with atomic_output(outputs.readme) as handle:
        handle.write(text)
