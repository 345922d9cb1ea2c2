"""The worklist as one self-contained web page (`report.html` beside `report.csv`).

It opens from a file share with no server and no network: the styles and the script are inline,
the studies travel as a JSON block inside the page, and the explanation pictures are relative
links to the PNGs beside it. The script draws one page of studies at a time (filters, search and
paging run on the embedded list), so 10,000 studies stay fast. Every value that comes from a file
name or a DICOM header is escaped by Jinja2 (`tojson` escapes <, >, & and ') and put on the page
with `textContent`, never as markup.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from radscan.errors import OutputError
from radscan.pictures import picture_layout
from radscan.report import atomic_output

__all__ = ["study_entry", "image_entry", "IMAGES_PER_STUDY", "write_evaluation_html", "write_training_html",
           "write_worklist_html", "render_worklist_html", "record_failed_run", "previous_success"]

log = logging.getLogger(__name__)

PAGE_SIZE = 100  # studies drawn at a time
# images of one study listed on the page (the rest are in the image CSV): a study is a few views, but a
# DICOM study or a folder may hold many
IMAGES_PER_STUDY = 50
# The page's record of the runs (last attempt, last success): a JSON block that a failed run, which
# has no list to draw, rewrites in the page it leaves, so that a stale list says it is stale
_STATUS_OPEN = '<script type="application/json" id="run-status">'


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("radscan", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def page_link(relative_path: str | None) -> str:
    """A path relative to the page as a URL the browser resolves to that file ("" for none): a
    folder or file name with '#', '?', '%' or a space would otherwise end the path or be decoded."""
    return quote(relative_path) if relative_path else ""


def shown_path(path: str, root: str = "") -> str:
    """A file's path as the page shows it: under its input root when `root` is given (a run of several
    roots: "siteA" and "siteB" may both hold p1/x.jpeg, and the page showed them alike, a trial)."""
    return f"{root.rstrip('/')}/{path}" if root else path


def image_entry(row: dict[str, Any], root: str = "") -> dict[str, Any]:
    """One image of a study, as the page lists it under the study: a row of the image CSV
    (REPORT_COLUMNS) -> its path (under `root` when given: shown_path), picture (relative
    link, "" when none), score (None when not scored), z, flag and status, the reason when it was not
    scored, and quality control's warning or failure when it has one (a warned image that is not the
    study's top one must show it too)."""
    score = row.get("score")
    return {"path": shown_path(row["path"], root),
            "picture": page_link(row.get("residual_png")),
            "score": None if score is None else round(float(score), 6), "z": row.get("score_z"),
            "flag": row.get("flag") is True, "status": row["status"],
            "reason": "" if row["status"] == "ok" else row.get("reason", ""),
            "qc": row.get("qc_reason", "") if row.get("qc_status") in ("warn", "fail") else ""}


def study_entry(study: dict[str, Any], qc_reason: str = "", z: float | None = None,
                images: list[dict[str, Any]] | None = None, root: str = "") -> dict[str, Any]:
    """The fields of one row of the study CSV that the page shows, under short names.

    `study` is a row as write_worklist builds it (STUDY_COLUMNS); identifiers are already as the
    PHI mode writes them. `score` is None for a study none of whose images was scored.
    `qc_reason`: the quality-control verdict on the study's top image, if it warned or failed.
    `z`: the top image's score as a z-score (calibration normals' spreads above their mean; the
    score is its sigmoid), which keeps the order where the score saturates near 1. `images`: the
    study's images (image_entry), listed under the study when it has more than one. `root`: the top
    image's input root, shown before its path when the run had several (shown_path)."""
    score = study.get("study_score")
    return {
        "rank": study["study_rank"], "score": None if score is None else round(float(score), 6),
        "flag": bool(study["study_flag"]), "new": bool(study["images_new"]),
        "images": study["images"], "scored": study["images_scored"], "errors": study["images_error"],
        "rejected": study["images_rejected"], "note": study["study_note"],
        "patient": study.get("PatientID", ""), "accession": study.get("AccessionNumber", ""),
        "uid": study.get("StudyInstanceUID", ""), "date": study.get("StudyDate", ""),
        "modality": study.get("Modality", ""), "path": shown_path(study["top_path"], root),
        "picture": page_link(study["top_residual_png"]), "qc": qc_reason, "z": z,
        "members": images if images and len(images) > 1 else [], "section": study.get("study_section", "reading"),
    }


def write_worklist_html(path: Path, studies: Iterable[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the page atomically (exit 73 if it cannot be written).

    `studies`: study_entry dicts in worklist order. `summary`: disclaimer, model_name,
    model_version, model_sha256, score_kind, threshold (0..1), run_id, finished_at,
    radscan_version, report_name, studies_name, studies, flagged_studies, counts (status -> files),
    run_status ({"last_attempt": {at, run_id, ok, problems}, "last_success": {at, ...} or None,
    "listed": {at, run_id}, the run that wrote the list}; times ISO 8601, shown in the reader's
    local time; `record_failed_run` rewrites it after a failed run).
    """
    with atomic_output(path) as handle:
        handle.write(render_worklist_html(studies, summary))


def render_worklist_html(studies: Iterable[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The worklist page as text (see `write_worklist_html` for the arguments)."""
    studies = list(studies)
    # the header counts the studies to read apart from those for IT and those the selection skipped
    sections = Counter(study.get("section", "reading") for study in studies)
    return _environment().get_template("worklist.html.j2").render(
        studies=studies, summary=summary, sections=sections, page_size=PAGE_SIZE,
        layout=picture_layout(str(summary.get("score_kind", ""))))


def write_evaluation_html(path: Path, models: list[dict[str, Any]], comparisons: list[dict[str, Any]],
                          disclaimer: str, rejected: dict[str, Any], failed_but_measured: int,
                          warnings: Sequence[str] = (), unreadable: Sequence[dict[str, str]] = (),
                          majority: dict[str, Any] | None = None) -> None:
    """The evaluation page (`radscan evaluate --out DIR`): metrics, counts, comparisons and the
    figures roc.png and histogram.png beside it. `models`: radscan.evaluate's per-model results;
    `rejected`: its "rejected_by_qc" (the films quality control set aside, each with its reason);
    `failed_but_measured`: how many films quality control failed were measured (--qc warn);
    `warnings`, shown first: what makes the set unfit to measure on (radscan.evaluate.set_warnings) and
    a model whose threshold flags few abnormal images (radscan.evaluate._weak_flag);
    `unreadable`: the files that could not be read (path, label, reason); `majority`: the set's larger
    class and what calling every image that class scores (majority_class, majority_class_accuracy)."""
    page = _environment().get_template("evaluation.html.j2").render(
        models=models, first=models[0], comparisons=comparisons, disclaimer=disclaimer,
        rejected=rejected, failed_but_measured=failed_but_measured, warnings=list(warnings),
        unreadable=list(unreadable), **(majority or {}))
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


def record_failed_run(path: Path, attempt: dict[str, Any]) -> bool:
    """Record in an existing worklist page that a later run failed, so that the page says its list
    is older than the last attempt. `attempt`: at (ISO 8601 UTC), exit_code, error (plain words).
    The page's list and its last success stay as they were; only its run-status block changes,
    atomically. Returns False (nothing written) when there is no page, it is not a regular file,
    or it has no run-status block (a page of radscan before 0.3)."""
    try:
        found = _run_status_block(path)
        if found is None:
            return False
        page, start, end, status = found
        status["last_attempt"] = {**attempt, "ok": False}
        with atomic_output(path) as handle:
            handle.write(page[:start] + _script_json(status) + page[end:])
        return True
    except (OSError, ValueError, OutputError) as exc:  # a page that cannot be changed: the run's error stands
        log.warning("could not mark %s as out of date: %s", path, exc)
        return False


def previous_success(path: Path) -> dict[str, Any] | None:
    """The last success recorded in the worklist page at `path`, if there is one (a run that
    finished with results still undelivered keeps it, as the nightly wrapper's last_success)."""
    try:
        found = _run_status_block(path)
    except (OSError, ValueError):
        return None
    return found[3].get("last_success") if found else None


def _run_status_block(path: Path) -> tuple[str, int, int, dict[str, Any]] | None:
    """(page text, start and end of its run-status JSON, that JSON), or None without one."""
    if not path.is_file() or path.is_symlink():
        return None
    page = path.read_text(encoding="utf-8")
    if _STATUS_OPEN not in page:
        return None
    start = page.index(_STATUS_OPEN) + len(_STATUS_OPEN)
    end = page.index("</script>", start)  # the block's JSON escapes "<": its first end is its own
    return page, start, end, json.loads(page[start:end])


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: as Jinja2's `tojson` writes it (<, >, & and ' escaped)."""
    return (json.dumps(value, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("'", "\\u0027"))
