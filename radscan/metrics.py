"""Run metrics for monitoring: one file in the Prometheus text exposition format, which
node_exporter's textfile collector reads (point `--metrics` into its directory, e.g.
/var/lib/node_exporter/textfile_collector/radscan.prom).

Written atomically at the end of every `radscan score` run, finished or failed (not one refused by
the lock: that run's holder writes it), so that an alert can fire on the exit code, on the age of the
last success, on results that did not reach the PACS, or on a flagged share that drifts.
Format: https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radscan.errors import OutputError, SettingError
from radscan.report import atomic_output, refuse_special

__all__ = ["write_metrics", "check_metrics_path"]

_LAST_SUCCESS = "radscan_last_success_timestamp_seconds"


def check_metrics_path(path: Path, outputs: Sequence[Path] = ()) -> None:
    """Refuse a metrics file that would be one of the run's `outputs` (SettingError, exit 2: it would
    replace the worklist or the state store) or that could not be written (OutputError, exit 73),
    before the run scores anything: a run that finished must not fail at its very end for its
    metrics, leaving a page that says it succeeded beside an exit code that says it did not. Its
    folder is made when missing."""
    if Path(path).resolve() in {Path(output).resolve() for output in outputs}:
        raise SettingError(f"--metrics {path} is one of the run's own outputs (the worklist, the page, the lock or "
                           "the state store): give the metrics a file of their own")
    refuse_special(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the metrics file {path}: cannot make its folder ({exc.strerror or exc}); "
                          "nothing was scored") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the metrics file {path}: its folder is not writable; nothing was scored")
    if path.exists() and not _replaceable(path):
        raise OutputError(f"cannot replace the metrics file {path} (immutable, or another user's in a shared "
                          "folder); nothing was scored")


def _replaceable(path: Path) -> bool:
    """Whether a file can be replaced by renaming another onto it: not immutable (an open for
    writing fails with EPERM; nothing is written), and in a sticky folder (/tmp) owned by this user
    or in a folder this user owns."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError:
        return False
    folder = path.parent.stat()
    return not folder.st_mode & stat.S_ISVTX or os.geteuid() in (0, path.stat().st_uid, folder.st_uid)


def write_metrics(path: Path, exit_code: int, summary: dict[str, Any] | None = None,
                  now: float | None = None) -> None:
    """Write the metrics of a run that ended with `exit_code` to `path` (atomically; OutputError,
    exit 73, if it cannot be written). `summary` is `radscan score`'s summary (ScoreSummary.as_dict)
    when the run finished, None when it failed.

    A success is a run that wrote its worklist and delivered every DICOM result (exit 0, or exit 3
    for unreadable files only), as the nightly wrapper's `last_success` means: a PACS outage is not
    one, nor a night most of whose listed films were gone from the inputs (a share mounted in part).
    A failed run changes only the exit code and the last attempt, and keeps the rest of the
    previous file (the last finished run's counts, and results still pending), so that an alert on
    pending results does not clear itself when the next night fails."""
    now = time.time() if now is None else now
    blocks = _previous_blocks(path) if summary is None else {}
    blocks["radscan_last_exit_code"] = _metric("radscan_last_exit_code", "Exit code of the last radscan score run.",
                                               exit_code)
    blocks["radscan_last_attempt_timestamp_seconds"] = _metric(
        "radscan_last_attempt_timestamp_seconds", "When the last run ended (Unix time).", now)
    if summary is not None:
        blocks.update(_run_blocks(summary))
        dicom = summary.get("dicom") or {}
        if not (dicom.get("not_sent") or dicom.get("not_made") or summary.get("inputs_missing")):
            blocks[_LAST_SUCCESS] = _metric(_LAST_SUCCESS, "When the last run that wrote its worklist and "
                                            "delivered every DICOM result ended (Unix time).", now)
        elif previous := _previous_blocks(path).get(_LAST_SUCCESS):
            blocks[_LAST_SUCCESS] = previous
    if _LAST_SUCCESS not in blocks:  # none yet: 0, so that an alert on its age fires on a new install too
        blocks[_LAST_SUCCESS] = _metric(_LAST_SUCCESS, "When the last run that wrote its worklist and delivered "
                                        "every DICOM result ended (Unix time; 0: none yet).", 0)
    with atomic_output(path) as handle:
        handle.write("\n".join(line for lines in blocks.values() for line in lines) + "\n")


def _run_blocks(summary: dict[str, Any]) -> dict[str, list[str]]:
    counts = summary["counts"]
    scored = counts.get("ok", 0)
    dicom = summary.get("dicom") or {}
    return {
        "radscan_files": _metric("radscan_files", "Files of the last finished run by status.",
                                 *((count, {"status": status}) for status, count in counts.items())),
        # why the files were read (radscan.score.READ_REASONS): a night that re-read every file under new
        # settings, or retries the same errors night after night, shows here
        "radscan_files_read": _metric("radscan_files_read", "Files of the last finished run read anew, by why "
                                      "(unchanged: reused from the store).",
                                      (summary.get("reused", 0), {"reason": "unchanged"}),
                                      *((count, {"reason": reason})
                                        for reason, count in (summary.get("read_because") or {}).items())),
        "radscan_flagged_images": _metric("radscan_flagged_images", "Images flagged in the last finished run.",
                                          summary["flagged_images"]),
        "radscan_flagged_share": _metric("radscan_flagged_share", "Share of the last finished run's scored images "
                                         "that were flagged.", summary["flagged_images"] / scored if scored else 0.0),
        "radscan_studies": _metric("radscan_studies", "Studies in the worklist, and those flagged.",
                                   (summary["studies"], {"kind": "all"}),
                                   (summary["flagged_studies"], {"kind": "flagged"})),
        "radscan_run_duration_seconds": _metric("radscan_run_duration_seconds", "Duration of the last finished run.",
                                                summary["duration_s"]),
        "radscan_dicom_results_pending": _metric(
            "radscan_dicom_results_pending", "DICOM result objects not sent (refused: of those, the ones the PACS "
            "refuses until its configuration changes), and images without results.",
            (dicom.get("not_sent", 0), {"kind": "not_sent"}), (dicom.get("refused", 0), {"kind": "refused"}),
            (dicom.get("not_made", 0), {"kind": "not_made"})),
        **_drift_blocks(summary.get("drift") or {}),
    }


def _drift_blocks(drift: dict[str, Any]) -> dict[str, list[str]]:
    """The drift check of the last finished run (radscan.drift): the flagged share of its new films,
    the history's share it was held against, and 1 when it moved beyond chance."""
    if not drift:
        return {}
    warning = int(bool(drift["warning"]))
    blocks = {"radscan_drift_warning": _metric("radscan_drift_warning", "1 when the last finished run's flagged "
                                               "share moved beyond chance (radscan.drift).", warning)}
    samples = []
    if drift.get("share") is not None:
        samples.append((drift["share"], {"of": "this_run"}))
    if drift.get("judged"):  # what the check judged: this run's new films pooled with the nights before it
        samples.append((drift["judged_flagged"] / drift["judged"], {"of": "judged"}))
    if drift.get("baseline") is not None:
        samples.append((drift["baseline"], {"of": "history"}))
    if samples:
        blocks["radscan_new_flagged_share"] = _metric(
            "radscan_new_flagged_share", "Flagged share of the films scored anew: in the last finished run "
            "(this_run), in the films the drift check judged (judged: the run pooled with the nights before it "
            "while it has fewer than 20), and in the history it was checked against.", *samples)
    return blocks


def _metric(name: str, text: str, *samples: Any) -> list[str]:
    """HELP and TYPE lines and one line per sample: a value, or (value, labels)."""
    lines = [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
    for sample in samples:
        value, labels = sample if isinstance(sample, tuple) else (sample, {})
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        shown = ",".join(f'{key}="{label}"' for key, label in labels.items())  # radscan's own words only
        lines.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")
    return lines


def _previous_blocks(path: Path) -> dict[str, list[str]]:
    """The previous file's metrics (radscan's own file), each with its HELP, TYPE and sample lines."""
    blocks: dict[str, list[str]] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.split()[2] if line.startswith("#") and len(line.split()) > 2 else line.split("{")[0].split()[0]
            if name.startswith("radscan_"):
                blocks.setdefault(name, []).append(line)
    return blocks
