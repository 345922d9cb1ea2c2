"""Scoring a batch of read films: quality control, then the model; rows and pictures out.

The same functions serve a run on one machine (radscan.score) and a run on a Dask cluster's workers
(radscan.cluster): `prepare_record` (study and identifiers), `judge_and_score` (QC, then the model,
through a `BatchScorer`), and the pictures each batch draws (`PictureJob`, `FilmPicture`,
`write_pictures`). Nothing here writes the worklist.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radscan import __version__
from radscan.errors import OutputError
from radscan.phi import PhiFilter
from radscan.pictures import render_explanation, render_film, shows_reconstruction
from radscan.policy import Policy
from radscan.preprocess import PREPROCESS_VERSION
from radscan.qc import DEFAULT_VIEWS, QualityControl, apply_qc
from radscan.records import ImageRecord, printable, visible_controls
from radscan.report import encode_png, png_name, write_png_bytes
from radscan.state import FileIdentity

if TYPE_CHECKING:
    from radscan.model.engine import Engine
    from radscan.model.metadata import ModelIdentity
    from radscan.pacs import Destination

__all__ = ["ScoreSettings", "BatchScorer", "PictureJob", "FilmPicture", "PictureActions", "ScoredBatch",
           "judge_and_score", "write_pictures", "picture_caption", "score_text", "rejected_caption", "prepare_record",
           "load_model_for_scoring", "STUDY_TOKEN", "crawl_study", "now"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreSettings:
    """How a scoring run reads, judges and scores films: shared by the run (radscan.score) and, for
    what they need of it, a cluster's workers (radscan.cluster)."""

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
    # forget the films of a folder most of whose list is gone (a deliberate clean-up); without it they are kept,
    # off the list, and every night is exit 3 until they are back (a share that mounted in part)
    forget_missing: bool = False

@dataclass(frozen=True)
class PictureJob:
    """An explanation picture to draw (the arguments of render_explanation)."""

    image: np.ndarray
    explanation: np.ndarray
    residual: np.ndarray | None  # the reconstruction panel's map, only where the score is made of it
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


@dataclass(frozen=True)
class RunContext:
    """What scoring a batch needs to know about its run, the same on one machine and on a Dask
    worker (small and picklable: radscan.cluster sends it with each batch)."""

    identity: ModelIdentity
    run_id: str
    phi: PhiFilter  # how identifiers are kept, hashed or dropped (--phi)
    residuals: Path | None  # the pictures folder, or None (--no-residuals)
    link_base: Path  # the folder the worklist's links to pictures are relative to
    pictures: str  # which films get a picture: all, flagged or none (--pictures)
    dicom_pictures: bool  # every DICOM image gets one: its Secondary Capture is made of it (--dicom-out)
    resolved_roots: dict[str, str]  # each root as given -> resolved (on the machine that lists the files)


class BatchScorer:
    """The model side of the pipeline: batches in, rows and explanation pictures out. The model
    arrives from a loading thread (reading and verifying the weights, hidden behind the first
    decodes); the first use waits for it and raises the loader's error, if any. Pure: it
    writes nothing, so that it runs the same on a cluster's workers (radscan.cluster)."""

    def __init__(self, loading: Future, run: RunContext):
        self._loading, self.residuals, self.link_base = loading, run.residuals, run.link_base
        self.pictures = run.pictures
        self.dicom_pictures, self.resolved_roots = run.dicom_pictures, run.resolved_roots
        self.provenance = {**run.identity.provenance(), "preprocess_version": PREPROCESS_VERSION,
                           "radscan_version": __version__, "run_id": run.run_id}

    @functools.cached_property
    def engine(self) -> Engine:
        return self._loading.result()

    @functools.cached_property
    def threshold(self) -> float:
        return float(self.engine.threshold)

    def score(self, records: list[ImageRecord], images: list[np.ndarray]) -> tuple[list[dict[str, Any]],
                                                                                   PictureActions]:
        """Rows of the scored `records` (in order) and what to do to their pictures."""
        threshold = self.threshold  # also makes sure the model loaded before any row is saved
        if not records:
            return [], []
        batch = np.stack(images)
        # only what the score and its pictures show is computed: the generator runs only for a score
        # made of the reconstruction, whose pictures show it (pictures.shows_reconstruction)
        reconstruction = shows_reconstruction(self.engine.score_kind)
        result = self.engine.score(batch, explain=self.pictures == "all",
                                   components=self.pictures == "all" and reconstruction)
        # the score's own z (sigmoid(z) = score): it keeps the order at the top of the list, where the
        # 0..1 score saturates (a z of 7 and one of 12 both print as 1.000)
        scores, raws, zs = result.scores, result.raw, result.z
        maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        explain = range(len(images)) if self.pictures == "all" else (
            np.flatnonzero((scores >= threshold) | self._dicom(records)) if self.pictures == "flagged" else [])
        if self.pictures == "flagged" and len(explain):  # the maps (a gradient, for the critic) of the flagged only
            result = self.engine.score(batch[explain], explain=True, components=reconstruction)
        if len(explain):
            maps = dict(zip((int(i) for i in explain), zip(result.explanation_maps, result.residual_maps,
                                                           strict=True), strict=True))
        scored_at = now()
        rows, pictures = [], []
        for index, (record, image, score, raw, z) in enumerate(zip(records, images, scores, raws, zs, strict=True)):
            flag = bool(score >= threshold)
            if index in maps:
                explanation, residual = maps[index]
                path = self._picture_path(record)
                caption = picture_caption(record, float(score), threshold, self.provenance, float(z))
                pictures.append((path, PictureJob(self._as_seen(image), explanation,
                                                  residual if reconstruction else None, caption,
                                                  self.engine.score_kind, self._aspect(record))))
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
        the verdict, so that a reader can judge the rejection (none with --no-residuals). The film
        is the whole film quality control judged (`record.qc_image`, for a thorax-box model), not
        the box the model would have read: the verdict and its ratios are the whole film's."""
        rows, pictures = [], []
        for record, image in zip(records, images, strict=True):
            if self.residuals is not None:
                path = self._picture_path(record)
                judged, aspect = ((image, self._aspect(record)) if record.qc_image is None
                                  else (record.qc_image, _aspect(record)))
                pictures.append((path, FilmPicture(judged, rejected_caption(record, self.provenance), aspect)))
                record.extra["residual_png"] = os.path.relpath(path, self.link_base)
            rows.append(record.as_row())
        return rows, pictures

    def _as_seen(self, image: np.ndarray) -> np.ndarray:
        """The (128, 128) uint8 film as the model saw it: outside a thorax field's window, mid grey (a
        thorax box was cut when the film was read)."""
        if self.engine.field_mask is None:
            return image
        return np.where(self.engine.field_mask, image, 128).astype(np.uint8)

    def _aspect(self, record: ImageRecord) -> float:
        """The width/height of what the model was given before it was squashed to its square: the
        film, or a thorax-box model's box of it (1 when unknown)."""
        crop = self.engine.crop
        box = (crop[2] - crop[0]) / (crop[3] - crop[1]) if crop else 1.0
        return _aspect(record) * box

    def _picture_path(self, record: ImageRecord) -> Path:
        root = self.resolved_roots.get(record.root) or str(Path(record.root).resolve())
        return self.residuals / png_name(root, record.path)

    def _dicom(self, records: list[ImageRecord]) -> np.ndarray:
        return np.array([self.dicom_pictures and record.kind == "dicom" for record in records], dtype=bool)


def judge_and_score(items: list[tuple[ImageRecord, np.ndarray | None]], qc: QualityControl,
                    scorer: BatchScorer) -> tuple[list[dict[str, Any]], PictureActions]:
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
    # a file that cannot be read (or is skipped) now has no picture: none of an earlier version of it either
    stale = [] if scorer.residuals is None else [(scorer._picture_path(record), None)
                                                 for record, image in items if image is None]
    return rows, pictures + films + stale


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


def picture_caption(record: ImageRecord, score: float, threshold: float, provenance: dict[str, Any],
                    z: float | None = None) -> str:
    """The explanation picture's caption: the result (the 0..1 score as the page shows it,
    `score_text`, and its z, which keeps the order where the score saturates) and the disclaimer;
    the film's identity as the PHI mode left it in `record` (hashed or dropped outside --phi keep),
    its view, date and path, the model; a QC verdict and header values read by a guess
    (`header_notes`) on further lines. Header text is put on one line per field."""
    verdict = "FLAGGED" if score >= threshold else "not flagged"
    text = score_text(score, threshold)
    # the threshold to as many decimals as the score needed, so that the two read as the flag says (a
    # review: "0.8798 (threshold 0.880): FLAGGED")
    places = max(3, len(text.partition(".")[2]))
    shown = text + (f", z {z:+.1f}" if z is not None else "")
    lines = [f"anomaly score {shown} (threshold {threshold:.{places}f}): {verdict}.  For research and triage support "
             "only, not a diagnosis.", _identity_line(record, provenance)]
    if record.qc_status in ("warn", "fail"):
        lines.append(f"quality control {record.qc_status}: {record.qc_reason}")
    if record.header_notes:  # the film was read by a guess: the reader of the picture is told too
        lines.append(f"header read by a guess: {record.header_notes}")
    return _caption(lines)


def score_text(score: float, threshold: float, digits: int = 3) -> str:
    """A 0..1 score as text, as the worklist page shows it (`scoreText` in worklist.html.j2), from the
    score as the lists store it (6 decimals): cut, not rounded, to `digits` decimals (0.99998 reads
    0.999, never 1.000: certainty the model does not have; a score stored as 1.0, from z 14.5 up,
    reads ">0.999"), and given more decimals, up to 6, until it reads on the side of the threshold
    (rounded to as many) that its flag says (the score as it is, before that rounding, against the
    threshold): a film just under a threshold of 0.8797 never reads "0.880". A score that is not a
    number reads "not a number"."""
    if not math.isfinite(score):
        return "not a number"
    flagged = score >= threshold
    score = round(score, 6)
    if score >= 1:
        return ">0.999"
    for places in range(min(digits, 6), 7):
        # rounded to 6 places first, so that 0.29 * 1000 = 289.99999999999997 is cut to 290
        text = f"{math.floor(round(score * 10 ** places, 6)) / 10 ** places:.{places}f}"
        if (float(text) >= float(f"{threshold:.{places}f}")) == flagged:
            break
    return text


def rejected_caption(record: ImageRecord, provenance: dict[str, Any]) -> str:
    """The caption of a rejected film's picture: the verdict and the disclaimer, then its identity
    as the PHI mode left it (as picture_caption), one line per field."""
    return _caption([f"NOT JUDGED by the model: failed quality control ({record.qc_reason}).",
                     "Check the film yourself.  For research and triage support only, not a diagnosis.",
                     _identity_line(record, provenance)])


CAPTION_LINE = 200  # characters of a caption line at most (the picture wraps it)


def _identity_line(record: ImageRecord, provenance: dict[str, Any]) -> str:
    """A caption's identity line, every value escaped (radscan.records.printable: a newline, a tab
    or a terminal's ESC in a file name is written out, not drawn as a space or a box): patient and
    accession as the PHI mode left them, view, date, path, model. A path too long for the line
    keeps its end (the file's name and the folders nearest it): cut at the line's end, a deep path
    named neither the film nor the model (a new user's trial)."""
    def shown(text: str) -> str:
        return " ".join(printable(text).split(" "))  # escaped first: only spaces are left to collapse

    before = [shown(part) for part in (f"patient {record.PatientID}" if record.PatientID else "",
                                       f"accession {record.AccessionNumber}" if record.AccessionNumber else "",
                                       record.ViewPosition, record.StudyDate) if part]
    model = shown(f"model {provenance['model_name']} {provenance['model_version']}")
    path = shown(record.path)
    keep = max(CAPTION_LINE - sum(len(part) + 3 for part in [*before, model]) - 1, 24)  # 3: " · "; 1: "…"
    if len(path) > keep:
        path = "…" + path[-keep:]
    return " · ".join([*before, path, model])


def _caption(lines: list[str]) -> str:
    """Caption lines as drawn: on one line each, any control character written out (the identity
    line's values are escaped already: `_identity_line`), at most CAPTION_LINE characters (a
    longer line, with a long model name or identifier, loses its middle)."""
    return "\n".join(_middle_cut(" ".join(visible_controls(line).split())) for line in lines)


def _middle_cut(line: str) -> str:
    if len(line) <= CAPTION_LINE:
        return line
    head = (CAPTION_LINE - 3) // 3  # a third from the start, the rest from the end
    return f"{line[:head]} … {line[head + 3 - CAPTION_LINE:]}"


def _aspect(record: ImageRecord) -> float:
    """The film's width/height before it was squashed to the model's square (1 when unknown): the
    film read, less its padding where that was cut."""
    rows, columns = record.film_size()
    return columns / rows if rows and columns else 1.0


def load_model_for_scoring(model_dir: Path, device_name: str) -> Engine:
    """Load (and verify) the model's engine: torch on the device, or ONNX Runtime for an exported
    model (radscan.model.engine). Run in a thread: it imports torch or ONNX Runtime."""
    from radscan.model.engine import load_engine

    return load_engine(model_dir, device_name)[0]


def _write_picture(path: Path, picture: PictureJob | FilmPicture | bytes) -> None:
    try:
        write_png_bytes(path, picture if isinstance(picture, bytes) else picture.png())
    except OSError as exc:
        raise OutputError(f"cannot write explanation PNG {path}: {exc.strerror or exc}") from None


ScoredBatch = tuple[list[FileIdentity], list[dict[str, Any]], PictureActions]


STUDY_TOKEN = "#patient-"  # between a folder's study key and the token of a UID-less DICOM file's patient


def crawl_study(study_key: str) -> str:
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


def now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
