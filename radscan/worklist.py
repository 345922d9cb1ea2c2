"""The triage worklist: the image and study CSVs, the web page and the README beside them, streamed
from the state store and put in place together (radscan.report.commit_together).

`OutputPaths` says where a run's outputs go (the worklist, the pictures, the state store, the lock,
the DICOM results); the column lists here are the CSVs' reference (docs/scoring.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radscan import __version__
from radscan.batch import now
from radscan.errors import OutputError
from radscan.htmlreport import IMAGES_PER_STUDY, image_entry, previous_success, render_worklist_html, study_entry
from radscan.pictures import shows_reconstruction
from radscan.records import DICOM_FIELDS, RECORD_COLUMNS, Status, printable
from radscan.report import AtomicFile, CsvStream, atomic_output, commit_together
from radscan.state import StateStore

if TYPE_CHECKING:
    from radscan.model.metadata import ModelIdentity

__all__ = ["OutputPaths", "REPORT_COLUMNS", "STUDY_COLUMNS", "DISCLAIMER", "write_worklist", "write_readme"]

log = logging.getLogger(__name__)

DISCLAIMER = ("radscan scores are for research and triage support only: they order a reading list and "
              "are not a diagnosis")
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
                 "top_path", "top_root", "top_residual_png", "StudyInstanceUID", "AccessionNumber", "PatientID",
                 "StudyDate", "Modality", "Manufacturer", "ManufacturerModelName", "StationName", "threshold",
                 "model_name", "model_version")


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
    def every(self) -> list[Path]:
        """Every path the run writes or holds (files, folders, the lock and the store), for the checks
        that no output is an input, inside the model or the spool, or another output."""
        return [path for path in (self.report, self.studies, self.residuals, self.state, self.lock, self.readme,
                                  self.html, self.dicom) if path is not None]

    @property
    def default_residuals(self) -> Path:
        """Where the pictures go unless --residuals names a folder (tidied even under --no-residuals)."""
        return Path(f"{self.report.with_suffix('')}_residuals")

    @property
    def readme(self) -> Path:
        """The note beside the worklist for whoever opens the folder."""
        return Path(f"{self.report.with_suffix('')}_README.txt")


def write_worklist(store: StateStore, outputs: OutputPaths, threshold: float, identity: ModelIdentity,
                   run: tuple[str, dict[str, int]], problems: Sequence[str] = (), delivered: bool = True,
                   qc_mode: str = "strict") -> tuple[int, int]:
    """Stream the image and study CSVs from the store and render the web page of the studies
    (`outputs.html`) to temporary files, then put them in place together (`commit_together`:
    report.csv last, so that a new report.csv always comes with its own study list and page).
    `run` is (run id, file counts by status); `problems` what needs an operator (`_problems`), shown
    on the page; `delivered` whether every DICOM result reached the PACS (else the page keeps its
    last success); `qc_mode` how quality control judged (the page says when films were not set aside).
    Returns (studies, flagged studies)."""
    pending: list[AtomicFile] = []
    try:
        report = CsvStream(outputs.report, REPORT_COLUMNS)
        pending.append(report.file)
        with_root = store.roots_listed() > 1  # the page shows paths under their roots (htmlreport.shown_path)
        members = _write_image_rows(report, store, with_root)
        study_csv = CsvStream(outputs.studies, STUDY_COLUMNS)
        pending.insert(0, study_csv.file)
        entries, studies, flagged = _write_study_rows(study_csv, store, threshold, identity,
                                                      members if outputs.html is not None else None, with_root)
        if outputs.html is not None:
            page = AtomicFile(outputs.html)
            pending.insert(1, page)
            counts = dict(run[1])
            flagged_images = counts.pop("flagged", 0)
            finished = now()
            this_run = {"at": finished, "run_id": run[0], "ok": True, "problems": list(problems)}
            # a success also delivered every DICOM result: a PACS outage keeps the last one (as the
            # nightly wrapper's last_success and the metrics do)
            success = this_run if delivered else previous_success(outputs.html)
            page.handle.write(render_worklist_html(entries, {
                "disclaimer": DISCLAIMER, **identity.provenance(),
                "score_kind": identity.score_kind, "threshold": float(threshold), "qc_mode": qc_mode,
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


def _write_image_rows(report: CsvStream, store: StateStore, with_root: bool) -> dict[str, list[dict[str, Any]]]:
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
                images.append(image_entry(row, row["root"] if with_root else ""))
    return members


def _write_study_rows(study_csv: CsvStream, store: StateStore, threshold: float, identity: ModelIdentity,
                      members: dict[str, list[dict[str, Any]]] | None,
                      with_root: bool) -> tuple[list[dict[str, Any]], int, int]:
    """The study list; returns the page's entries (with `members`, the images of each study:
    _write_image_rows; with `with_root`, paths under their roots), studies, flagged studies."""
    entries, studies, flagged, mixed, shared = [], 0, 0, 0, 0
    for study in store.studies():
        note = _study_note(study)
        top = study.pop("top")
        study.pop("skip_reasons")
        study.pop("error_reasons")
        study.pop("images_duplicated")
        shared += study.pop("images_in_another_study") > 0
        study.pop("images_to_review")
        mixed += study.pop("patients") > 1
        studies += 1
        flagged += study["images_flagged"] > 0
        row = {
            **{key: top.get(key, "") for key in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate",
                                                 "Modality", "Manufacturer", "ManufacturerModelName",
                                                 "StationName")},
            **study, "study_rank": studies, "study_flag": study["images_flagged"] > 0,
            "study_note": note,
            "top_path": top["path"], "top_root": top.get("root", ""), "top_residual_png": top.get("residual_png", ""),
            "threshold": round(threshold, 6), "model_name": identity.name, "model_version": identity.version,
        }
        study_csv.write(row)
        if members is not None:
            qc = top.get("qc_reason", "") if top.get("qc_status") in ("warn", "fail") else ""
            entries.append(study_entry(row, qc_reason=qc, z=top.get("score_z"),
                                       images=members.get(study["study_key"], []),
                                       root=row["top_root"] if with_root else ""))
    if shared:  # counted, never named: UIDs stay out of the log
        log.warning("%d studies hold a DICOM image (one SOPInstanceUID) that another study holds too (a sender's or "
                    "anonymiser's error?): their study_note says so; read each image's row", shared)
    if mixed:  # counted, never named: Patient IDs stay out of the log
        log.warning("%d studies hold films of more than one patient under one Study Instance UID (a sender's or "
                    "anonymiser's error?): their study_note says so; read each image's row", mixed)
    return entries, studies, flagged


def _study_note(study: dict[str, Any]) -> str:
    """What a reader must know about a study besides its score: images that were not judged."""
    notes = []
    if study["patients"] > 1:  # one Study Instance UID sent for two patients: the row names only its top film's
        notes.append(f"films of {study['patients']} patients (Patient IDs differ, or some films have none) under one "
                     "study: the study's identifiers are its top image's; read each image's row")
    if study["images_qc_warned"]:
        notes.append(f"{study['images_qc_warned']} scored image(s) with a quality control warning: read qc_reason "
                     "before the flag")
    if study["images_rejected"]:
        notes.append(f"{study['images_rejected']} image(s) not judged (failed quality control: see qc_reason)"
                     + ("; review them yourself" if study["images_scored"] and not study["images_flagged"]
                        and study["images_to_review"] else ""))
    if study["images_error"]:
        top = study["top"]  # when nothing was read, the top row is an unreadable file: say why
        others = study["error_reasons"] - 1  # and that the others' reasons differ, if they do
        why = (f" ({top['reason']}{f'; {others} other reason(s): see their rows' if others > 0 else ''})"
               if top.get("status") == Status.ERROR and top.get("reason") else "")
        notes.append(f"{study['images_error']} image(s) could not be read{why}")
    if study["images_duplicated"]:  # a copy of a file, or a sender's error: the same image is in the list twice
        notes.append(f"{study['images_duplicated']} file(s) hold a DICOM image that another file of this study "
                     "holds too (the same SOPInstanceUID): a copy, listed more than once (see their rows)")
    if study["images_in_another_study"]:  # one UID under two studies: which study is the image's is unknown
        notes.append(f"{study['images_in_another_study']} file(s) hold a DICOM image that a file of another study "
                     "holds too (the same SOPInstanceUID under another StudyInstanceUID: a sender's or "
                     "anonymiser's error, or two images given one UID; see their rows)")
    if study["images_unread"]:
        notes.append(f"{study['images_unread']} image(s) in a format radscan does not read (TIFF, BMP, GIF, WebP, "
                     "JPEG 2000): export them as DICOM or PNG")
    if study["images_skipped"]:
        reason = "see their rows"
        if study["images_skipped"] == study["images"]:  # the top row is then a skipped image
            others = study["skip_reasons"] - 1
            reason = study["top"]["reason"] + (f"; {others} other reason(s): see their rows" if others else "")
        notes.append(f"{study['images_skipped']} image(s) skipped by the selection policy ({reason})")
    if notes and not study["images_scored"]:
        if study["images_rejected"]:  # a chest film quality control would not judge: a reader can
            notes.append("no image of this study was scored: review it yourself")
        elif study["images_skipped"]:  # by its header not a chest film this list is for (or a kind not scored)
            notes.append("no image of this study was scored: the selection policy skipped it (if it is a chest "
                         "film, see the reason and --modalities, --body-parts, --frames)")
        else:  # nothing could be read: a reader has nothing to look at
            notes.append("no file of this study could be read: for IT first, then for reading once its films open "
                         "(every reason is in the image list)")
    return "; ".join(notes)


def _pictures_note(outputs: OutputPaths, pictures: str, score_kind: str) -> str:
    if outputs.residuals is None:
        return "No pictures were written (--no-residuals)."
    which = "each flagged image" if pictures == "flagged" else "each scored image"
    reconstruction = (",\n  and, smaller, the reconstruction difference |input - reconstruction| the score is made of"
                      if shows_reconstruction(score_kind) else "")
    # where the list links them: beside it, or wherever --residuals put them
    folder = printable(os.path.relpath(outputs.residuals, outputs.report.parent))
    return (f"{folder}/: {which} beside a map of where it raises the anomaly score\n"
            f"  (bright = more than 95% of normal films show there){reconstruction}; each image quality control\n"
            "  rejected, the whole film with the reason.")


def write_readme(outputs: OutputPaths, identity: ModelIdentity, pictures: str) -> None:
    """A short note beside the worklist, for whoever opens the folder."""
    text = f"""About {outputs.report.name} (written by radscan {__version__})

{DISCLAIMER}.

{outputs.report.name}: one row per input file, sorted by study score then image score, highest first.
  score 0..1 (high = anomalous), score_z its z; flag = score >= threshold, compared before both are
  rounded to 6 decimals; status ok/rejected/skipped/error with a reason.
{outputs.studies.name}: one row per study, for the reading worklist: those with a scored or rejected
  image first (study_section reading), then those for IT (unreadable) and those the policy skipped.
{_pictures_note(outputs, pictures, identity.score_kind)}
{outputs.html.name + ": the worklist as a web page (open it in a browser)." if outputs.html else ""}
Model: {identity.name} {identity.version} (sha256 {identity.sha256[:16]}...),
  score {identity.score_kind},
  threshold {identity.threshold:.4f} chosen by {identity.calibrated_by}.
"""
    with atomic_output(outputs.readme) as handle:
        handle.write(text)
