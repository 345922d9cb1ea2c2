"""End-to-end `radscan score` throughput against the decode floor, model-only throughput, and the
scoring process's peak memory for 1,000 vs 10,000 inputs.

1. Mixed set (the ingest benchmark's: 80 full-resolution Kermany JPEGs + 10 large compressed DICOM
   radiographs, --copies times): `radscan score` with residual PNGs against the bare decode floor
   (pydicom/Pillow decode + resize over the same worker count), fresh processes, median of --repeats.
   `--pictures flagged` (pictures, and the gradient pass, for flagged images only) and the same run
   without residual PNGs show what the pictures cost, and without PNGs and with
   `--qc off` what the quality control costs (goal: at most 10% of the throughput).
2. Model only: images/s of `model.score` at batch 64 on random inputs, with the explanation maps
   (a backward pass through the critics, what a run with PNGs pays) and without (--no-residuals).
3. Memory: peak resident memory (VmHWM) of the `radscan score` process on 1,000 and on 10,000
   inputs (symlinks to the 224 px Kermany images; no residual PNGs, to spare the disk).

    python benchmarks/score.py --model models/kermany-tiny [--copies 2] [--repeats 3] [--skip-memory]
                                [--skip-speed] [--counts 1000 10000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ingest import DATA, build_set, timed  # noqa: E402  (the same mixed set and floor as benchmarks/ingest.py)


def model_only(model_dir: str, device: str, explain: bool) -> float:
    import numpy as np
    import torch

    from radscan.model.io import load_model
    from radscan.model.runtime import resolve_device
    from radscan.model.simsid import to_model_tensor

    model, _ = load_model(Path(model_dir), resolve_device(device))
    batch = to_model_tensor(np.random.default_rng(0).integers(0, 256, (64, 128, 128), dtype=np.uint8),
                            next(model.parameters()).device)
    model.score(batch, explain=explain)
    started, rounds = time.perf_counter(), 4
    for _ in range(rounds):
        model.score(batch, explain=explain)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 64 * rounds / (time.perf_counter() - started)


def peak_memory_mb(command: list[str]) -> float:
    """Run `command`, polling the VmHWM (peak resident set) of its main process."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.1)
    if process.returncode not in (0, 3):
        raise subprocess.CalledProcessError(process.returncode, command)
    return peak / 1024


def link_many(folder: Path, count: int) -> None:
    sources = sorted((DATA / "cxr/kermany_pediatric_224").glob("*/*.jpeg"))
    for index in range(count):
        target = folder / f"s{index // 100:04d}" / f"{index:06d}.jpeg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(sources[index % len(sources)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000, 10_000],
                        help="input counts of the memory runs")
    args = parser.parse_args()
    ingest_script = str(Path(__file__).parent / "ingest.py")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = build_set(tmp_path / "set", args.copies)
        floor_cmd = [sys.executable, ingest_script, "--floor-only", str(tmp_path / "set"), "--workers",
                     str(args.workers)]
        floors, scores, flagged_only, bares, unchecked = [], [], [], [], []
        if not args.skip_speed:
            timed(floor_cmd)  # warm caches
            def score_cmd(out: Path, *extra: str) -> list[str]:
                return [sys.executable, "-m", "radscan", "-q", "score", str(tmp_path / "set"), "--out", str(out),
                        "--model", args.model, "--modalities", "all", "--body-parts", "all", "--workers",
                        str(args.workers), "--device", args.device, *extra]

            for repeat in range(args.repeats):
                run = tmp_path / f"run{repeat}"  # fresh outputs: everything is scored
                floors.append(timed(floor_cmd))
                scores.append(timed(score_cmd(run / "report.csv")))
                flagged_only.append(timed(score_cmd(run / "flagged.csv", "--pictures", "flagged")))
                bares.append(timed(score_cmd(run / "bare.csv", "--no-residuals")))
                unchecked.append(timed(score_cmd(run / "noqc.csv", "--no-residuals", "--qc", "off")))
            floor, score, flagged, bare, no_qc = (statistics.median(t)
                                                  for t in (floors, scores, flagged_only, bares, unchecked))
            print(f"mixed set: {len(files)} files, median of {args.repeats}")
            print(f"decode floor           : {floor:7.2f} s  {len(files) / floor:7.1f} images/s")
            print(f"radscan score (+PNGs)  : {score:7.2f} s  {len(files) / score:7.1f} images/s")
            print(f"score / floor          : {score / floor:7.2f} x   (goal <= 1.30)")
            print(f"score --pictures flagged: {flagged:6.2f} s  {len(files) / flagged:7.1f} images/s  "
                  f"({flagged / floor:.2f} x the floor; pictures for the flagged images only)")
            print(f"score --no-residuals   : {bare:7.2f} s  {len(files) / bare:7.1f} images/s  "
                  f"({bare / floor:.2f} x the floor)")
            print(f"  ... and --qc off     : {no_qc:7.2f} s  {len(files) / no_qc:7.1f} images/s  "
                  f"(QC costs {1 - no_qc / bare:.1%} of the throughput; goal <= 10%)")
            for explain in (True, False):
                rate = model_only(args.model, args.device, explain)
                print(f"model only, batch 64   : {rate:7.1f} images/s ({'with' if explain else 'without'} maps)")

        if not args.skip_memory:
            for count in args.counts:
                folder = tmp_path / f"many{count}"
                link_many(folder, count)
                command = [sys.executable, "-m", "radscan", "-q", "score", str(folder), "--out",
                           str(tmp_path / f"mem{count}" / "report.csv"), "--model", args.model, "--no-residuals",
                           "--workers", str(args.workers), "--device", args.device]
                started = time.perf_counter()
                peak = peak_memory_mb(command)
                print(f"peak memory, {count:>6} inputs: {peak:7.0f} MB  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
