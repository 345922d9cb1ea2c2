"""Do two versions of radscan write the same outputs? (issue 23: a redesign must not change them)

    python benchmarks/same_outputs.py OLD_COMMIT NEW_COMMIT [--inputs examples/studies] [--work /tmp/same]

Checks out both commits as git worktrees, copies the inputs and the shipped model once to a shared
place (picture and result names are digests of the input's path), runs `radscan score --dicom-out`
with each version on one machine and on a local Dask cluster (`--scheduler local:2`), and compares
the output trees file by file: byte-identical, or identical once what differs by design from run to
run is set aside (run ids, timestamps, DICOM UIDs, dates and times). Exits 1 when anything else
differs, and prints which file.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
RUN_SPECIFIC_COLUMNS = re.compile(r"run_id|_at$|time|date|started|finished|duration", re.I)
IGNORED = (".sqlite", ".lock", "-wal", "-shm", ".log")


def run_specific_removed(text: str) -> str:
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?", "<TIME>", text)
    text = re.sub(r"(run |run_id\W+)[0-9a-f]{12}\b", r"\1<RUN>", text)
    return re.sub(r"\b2\.25\.\d+", "<UID>", text)


def csv_rows(path: Path) -> list[dict[str, str]]:
    return [{key: run_specific_removed(value) for key, value in row.items() if not RUN_SPECIFIC_COLUMNS.search(key)}
            for row in csv.DictReader(io.StringIO(path.read_text()))]


def dicom_elements(path: Path) -> list[tuple[str, object]]:
    """Every element but UIDs, dates and times, sequences flattened."""
    out: list[tuple[str, object]] = []

    def walk(dataset: pydicom.Dataset, prefix: str) -> None:
        for element in dataset:
            if element.VR in ("UI", "DA", "TM", "DT"):
                continue
            if element.VR == "SQ":
                for index, item in enumerate(element.value):
                    walk(item, f"{prefix}{element.keyword}[{index}].")
            else:
                value = element.value if element.keyword == "PixelData" else run_specific_removed(str(element.value))
                out.append((prefix + element.keyword, value))

    walk(pydicom.dcmread(path), "")
    return out


def same_content(old: Path, new: Path) -> bool:
    if old.suffix == ".csv":
        return csv_rows(old) == csv_rows(new)
    if old.suffix == ".dcm":
        return dicom_elements(old) == dicom_elements(new)
    if old.suffix in (".html", ".txt", ".json"):
        return run_specific_removed(old.read_text()) == run_specific_removed(new.read_text())
    return False


def compare(old: Path, new: Path) -> list[str]:
    """What differs between two output trees, beyond what differs by design from run to run."""
    def listing(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.endswith(IGNORED)}

    old_files, new_files = listing(old), listing(new)
    differences = [f"only in one: {name}" for name in sorted(map(str, old_files ^ new_files))]
    for name in sorted(old_files & new_files):
        if (old / name).read_bytes() != (new / name).read_bytes() and not same_content(old / name, new / name):
            differences.append(f"differs: {name}")
    return differences


def score_with(commit: str, work: Path, inputs: Path, model: Path, scheduler: str | None) -> Path:
    tree = work / "trees" / commit
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
    out = work / "out" / commit / ("dask" if scheduler else "one")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "radscan", "score", str(inputs), "--out", str(out / "report.csv"),
               "--dicom-out", str(out / "dicom"), "--model", str(model), "--workers", "2"]
    if scheduler:
        command += ["--scheduler", scheduler]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this commit's radscan, the running venv's packages
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{commit}: radscan score failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--inputs", type=Path, default=REPO / "examples" / "studies")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "kermany-tiny")
    parser.add_argument("--work", type=Path, default=Path("/tmp/radscan-same-outputs"))
    args = parser.parse_args()
    old, new = (subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", c], check=True, capture_output=True,
                               text=True).stdout.strip() for c in (args.old, args.new))
    inputs, model = args.work / "inputs", args.work / "model"
    for source, target in ((args.inputs, inputs), (args.model, model)):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    failed = False
    for scheduler in (None, "local:2"):
        differences = compare(score_with(old, args.work, inputs, model, scheduler),
                              score_with(new, args.work, inputs, model, scheduler))
        where = f"--scheduler {scheduler}" if scheduler else "one machine"
        print(f"{old} -> {new}, {where}: " + ("the same outputs" if not differences else "; ".join(differences)))
        failed |= bool(differences)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
