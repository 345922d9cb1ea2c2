"""The worklist as one self-contained web page (`report.html` beside `report.csv`).

It opens from a file share with no server and no network: the styles and the script are inline,
the studies travel as a JSON block inside the page, and the explanation pictures are relative
links to the PNGs beside it. The script draws one page of studies at a time (filters, search and
paging run on the embedded list), so 10,000 studies stay fast. Every value that comes from a file
name or a DICOM header is escaped by Jinja2 (`tojson` escapes <, >, & and ') and put on the page
with `textContent`, never as markup.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2

from radscan.report import atomic_output

__all__ = ["study_entry", "write_evaluation_html", "write_training_html", "write_worklist_html",
           "render_worklist_html"]

PAGE_SIZE = 100  # studies drawn at a time


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("radscan", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def study_entry(study: dict[str, Any], qc_reason: str = "") -> dict[str, Any]:
    """The fields of one row of the study CSV that the page shows, under short names.

    `study` is a row as write_worklist builds it (STUDY_COLUMNS); identifiers are already as the
    PHI mode writes them. `score` is None for a study none of whose images was scored.
    `qc_reason`: the quality-control verdict on the study's top image, if it warned or failed."""
    score = study.get("study_score")
    return {
        "rank": study["study_rank"], "score": None if score is None else round(float(score), 4),
        "flag": bool(study["study_flag"]), "new": bool(study["images_new"]),
        "images": study["images"], "scored": study["images_scored"], "errors": study["images_error"],
        "rejected": study["images_rejected"], "note": study["study_note"],
        "patient": study.get("PatientID", ""), "accession": study.get("AccessionNumber", ""),
        "uid": study.get("StudyInstanceUID", ""), "date": study.get("StudyDate", ""),
        "modality": study.get("Modality", ""), "path": study["top_path"],
        "picture": study["top_residual_png"] or "", "qc": qc_reason,
    }


def write_worklist_html(path: Path, studies: Iterable[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the page atomically (exit 73 if it cannot be written).

    `studies`: study_entry dicts in worklist order. `summary`: disclaimer, model_name,
    model_version, model_sha256, score_kind, threshold (0..1), run_id, finished_at,
    radscan_version, report_name, studies_name, studies, flagged_studies, counts (status -> files).
    """
    with atomic_output(path) as handle:
        handle.write(render_worklist_html(studies, summary))


def render_worklist_html(studies: Iterable[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The worklist page as text (see `write_worklist_html` for the arguments)."""
    return _environment().get_template("worklist.html.j2").render(
        studies=list(studies), summary=summary, page_size=PAGE_SIZE)


def write_evaluation_html(path: Path, models: list[dict[str, Any]], comparisons: list[dict[str, Any]],
                          disclaimer: str) -> None:
    """The evaluation page (`radscan evaluate --out DIR`): metrics, counts, comparisons and the
    figures roc.png and histogram.png beside it. `models`: radscan.evaluate's per-model results."""
    page = _environment().get_template("evaluation.html.j2").render(
        models=models, first=models[0], comparisons=comparisons, disclaimer=disclaimer)
    with atomic_output(path) as handle:
        handle.write(page)


def write_training_html(path: Path, metadata: dict[str, Any], last_epoch: dict[str, Any], figures: dict[str, str],
                        warnings: list[str], epochs: int) -> None:
    """The training report page (radscan.trainreport): `figures` maps curves, fidelity,
    calibration and samples to picture paths relative to the page; `warnings` are shown first."""
    page = _environment().get_template("training.html.j2").render(
        metadata=metadata, config=metadata.get("config", {}), training=metadata.get("training", {}),
        calibration=metadata.get("calibration", {}), last=last_epoch, figures=figures, warnings=warnings,
        epochs=epochs)
    with atomic_output(path) as handle:
        handle.write(page)
