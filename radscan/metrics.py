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
import time
from pathlib import Path
from typing import Any

from radscan.report import atomic_output

__all__ = ["write_metrics"]

_LAST_SUCCESS = "radscan_last_success_timestamp_seconds"


def write_metrics(path: Path, exit_code: int, summary: dict[str, Any] | None = None,
                  now: float | None = None) -> None:
    """Write the metrics of a run that ended with `exit_code` to `path` (atomically; OutputError,
    exit 73, if it cannot be written). `summary` is `radscan score`'s summary (ScoreSummary.as_dict)
    when the run finished, None when it failed; a failed run keeps the previous file's last success.
    A run that finished (exit 0 or 3) is a success: its worklist is complete for what could be read."""
    now = time.time() if now is None else now
    last_success = now if summary is not None else _previous_last_success(path)
    lines = _metric("radscan_last_exit_code", "Exit code of the last radscan score run.", exit_code)
    lines += _metric("radscan_last_attempt_timestamp_seconds", "When the last run ended (Unix time).", now)
    if last_success is not None:
        lines += _metric(_LAST_SUCCESS, "When the last run that wrote a worklist ended (Unix time).", last_success)
    if summary is not None:
        counts = summary["counts"]
        lines += _metric("radscan_files", "Files of the last run by status.",
                         *((count, {"status": status}) for status, count in counts.items()))
        scored = counts.get("ok", 0)
        lines += _metric("radscan_flagged_images", "Images flagged in the last run.", summary["flagged_images"])
        lines += _metric("radscan_flagged_share", "Share of the last run's scored images that were flagged.",
                         summary["flagged_images"] / scored if scored else 0.0)
        lines += _metric("radscan_studies", "Studies in the worklist, and those flagged.",
                         (summary["studies"], {"kind": "all"}), (summary["flagged_studies"], {"kind": "flagged"}))
        lines += _metric("radscan_run_duration_seconds", "Duration of the last run.", summary["duration_s"])
        dicom = summary.get("dicom") or {}
        lines += _metric("radscan_dicom_results_pending", "DICOM result objects not sent, and images without results.",
                         (dicom.get("not_sent", 0), {"kind": "not_sent"}),
                         (dicom.get("not_made", 0), {"kind": "not_made"}))
    with atomic_output(path) as handle:
        handle.write("\n".join(lines) + "\n")


def _metric(name: str, text: str, *samples: Any) -> list[str]:
    """HELP and TYPE lines and one line per sample: a value, or (value, labels)."""
    lines = [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
    for sample in samples:
        value, labels = sample if isinstance(sample, tuple) else (sample, {})
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        shown = ",".join(f'{key}="{label}"' for key, label in labels.items())  # radscan's own words only
        lines.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")
    return lines


def _previous_last_success(path: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith(_LAST_SUCCESS + " "):
                return float(line.split()[1])
    return None
