"""`radscan scan`: an inventory of what radscan would use, and the exact model inputs as PNGs."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from radscan.errors import NoInputError
from radscan.ingest import check_inputs, check_outputs_apart, find_files, iter_ingested
from radscan.policy import Policy
from radscan.preprocess import PREPROCESS_VERSION
from radscan.qc import QualityControl, apply_qc
from radscan.records import RECORD_COLUMNS, Status
from radscan.report import CsvStream, png_name, prepare_folder, refuse_special, write_png

__all__ = ["ScanSummary", "scan", "INVENTORY_COLUMNS"]

log = logging.getLogger(__name__)

INVENTORY_COLUMNS = (*RECORD_COLUMNS, "preview_png")


@dataclass
class ScanSummary:
    files: int
    counts: dict[str, int]
    inventory: str
    previews: str | None
    duration_s: float
    preprocess_version: str = PREPROCESS_VERSION
    top_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def scan(
    inputs: Sequence[str],
    out: Path,
    previews: Path | None = None,
    policy: Policy | None = None,
    workers: int = -1,
    progress: bool = True,
    qc: QualityControl | None = None,
    study_key: str = "auto",
) -> ScanSummary:
    """Read every file under `inputs` and write one inventory row per file to `out`.

    With `previews`, each usable image's 128x128 model input is written there as an 8-bit PNG
    named by a hash of its path (no patient identifiers), and the row links to it. With `qc`,
    each usable image gets the verdict `radscan score` would give it (status `rejected` when it
    fails). `study_key` decides the study of files whose content names none (radscan.ingest.assign_study_keys).
    """
    started = time.monotonic()
    policy = policy or Policy()
    check_inputs(inputs)
    check_outputs_apart(inputs, [out, previews])
    refuse_special(out)
    if previews is not None:
        prepare_folder(previews, "--previews")
    files = find_files(inputs, exclude=[p for p in (out, previews) if p is not None], study_key=study_key)
    if not files:
        raise NoInputError(f"no files found under {', '.join(inputs)}")
    log.info("found %d files under %d input path(s)", len(files), len(inputs))

    counts: Counter[str] = Counter({Status.OK: 0, Status.SKIPPED: 0, Status.ERROR: 0, Status.REJECTED: 0})
    reasons: Counter[str] = Counter()
    results = iter_ingested(files, policy, workers)
    with CsvStream(out, INVENTORY_COLUMNS) as inventory:
        for record, image in tqdm(results, total=len(files), unit="file", desc="scan",
                                  disable=None if progress else True):
            if image is not None and qc is not None:
                apply_qc(qc, [record], [image])
            if image is not None and previews is not None:
                preview = previews / png_name(str(Path(record.root).resolve()), record.path)
                write_png(preview, image)
                record.extra["preview_png"] = os.path.relpath(preview, Path(out).parent)
            inventory.write(record.as_row())
            counts[record.status] += 1
            if record.status != Status.OK:
                reason = record.qc_reason if record.status == Status.REJECTED else record.reason
                reasons[reason.split(":")[0].split(" (")[0]] += 1

    summary = ScanSummary(
        files=len(files),
        counts=dict(counts),
        inventory=str(out),
        previews=str(previews) if previews is not None else None,
        duration_s=round(time.monotonic() - started, 3),
        top_reasons=dict(reasons.most_common(10)),
    )
    log.info("scanned %d files in %.1f s: %s", summary.files, summary.duration_s, summary.counts)
    return summary
