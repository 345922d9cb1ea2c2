"""End-to-end `radscan score` throughput against the decode floor, model-only throughput, and the
scoring process's peak memory for 1,000 vs 10,000 inputs.

1. Mixed set (the ingest benchmark's: 80 full-resolution Kermany JPEGs + 10 large compressed DICOM
   radiographs, --copies and --large-copies times): the bare decode floor (pydicom/Pillow decode +
   resize over the same worker count) and `radscan score` with pictures for every scored image,
   for the flagged ones (the default), without pictures, and without pictures or QC, in fresh
   processes, median of --repeats. Each is run on the small and the large set, and the ratio to the
   floor is taken on the difference, the cost of each extra image: what a night of thousands of
   files pays, without the fixed costs (importing torch, loading the model) that dominate a small
   set. QC's cost is the last two rows (goal: at most 10% of the throughput).
2. Model only: images/s of `model.score` at batch 64 on random inputs: with the explanation maps and
   every score kind, the configured score and its map (what a film with a picture pays: for the
   density, no generator pass), and the configured score alone (what a film without a picture pays:
   for the density, one discriminator pass).
3. Memory: peak resident memory (VmHWM) of the `radscan score` process on 1,000 and on 10,000
   inputs (hard links to the 224 px Kermany images; no residual PNGs, to spare the disk).

    python benchmarks/score.py --model models/kermany-tiny [--copies 2] [--large-copies 6] [--repeats 3] [--skip-memory]
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
from ingest import DATA, build_set, place_copy, timed  # noqa: E402  (the same mixed set and floor as benchmarks/ingest.py)


def model_only(model_dir: str, device: str, explain: bool, components: bool = True) -> float:
    import numpy as np
    import torch

    from radscan.model.io import load_model
    from radscan.model.runtime import resolve_device
    from radscan.model.simsid import to_model_tensor

    model, _ = load_model(Path(model_dir), resolve_device(device))
    batch = to_model_tensor(np.random.default_rng(0).integers(0, 256, (64, 128, 128), dtype=np.uint8),
                            next(model.parameters()).device)
    model.score(batch, explain=explain, components=components)
    started, rounds = time.perf_counter(), 4
    for _ in range(rounds):
        model.score(batch, explain=explain, components=components)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 64 * rounds / (time.perf_counter() - started)


def _flagged_share(tmp_path: Path, args: argparse.Namespace) -> float:
    """The share of scored images the model flagged in the last small --pictures all run."""
    import csv

    reports = sorted(tmp_path.glob("small-*-1/report.csv"))  # variant 1: --pictures all
    with open(reports[0], newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["status"] == "ok"]
    return sum(row["flag"] == "true" for row in rows) / max(1, len(rows))


def _check_every_file_listed(report: Path, expected: int) -> None:
    """A run is timed only if its report has a row for every file of the set (the copies are read
    like any file, not recognised as one film)."""
    import csv

    with open(report, newline="") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    if rows != expected:
        raise SystemExit(f"{report} lists {rows} files of {expected}: the timing would not be of the whole set")


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
        place_copy(sources[index % len(sources)], folder / f"s{index // 100:04d}" / f"{index:06d}.jpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--copies", type=int, default=2, help="copies of the mixed set in the small run")
    parser.add_argument("--large-copies", type=int, default=6, help="copies of the mixed set in the large run")
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
        if not args.skip_speed:
            variants = {"decode floor": None, "score, --pictures all": ["--pictures", "all"],
                        "score, --pictures flagged (default)": ["--pictures", "flagged"],
                        "score, --no-residuals": ["--no-residuals"],
                        "score, --no-residuals --qc off": ["--no-residuals", "--qc", "off"]}
            sizes = {"small": args.copies, "large": args.large_copies}
            medians: dict[tuple[str, str], float] = {}
            counts = {}
            for size, copies in sizes.items():
                folder = tmp_path / f"set-{size}"
                counts[size] = len(build_set(folder, copies))
                floor_cmd = [sys.executable, ingest_script, "--floor-only", str(folder), "--workers", str(args.workers)]
                timed(floor_cmd)  # warm caches
                for name, extra in variants.items():
                    times = []
                    for repeat in range(args.repeats):  # fresh outputs every time: everything is scored
                        out = tmp_path / f"{size}-{repeat}-{len(medians)}" / "report.csv"
                        times.append(timed(floor_cmd if extra is None else [
                            sys.executable, "-m", "radscan", "-q", "score", str(folder), "--out", str(out),
                            "--model", args.model, "--modalities", "all", "--body-parts", "all", "--workers",
                            str(args.workers), "--device", args.device, *extra]))
                        if extra is not None:
                            _check_every_file_listed(out, counts[size])
                    medians[size, name] = statistics.median(times)
            flagged = _flagged_share(tmp_path, args)
            extra_images = counts["large"] - counts["small"]
            floor_rate = extra_images / (medians["large", "decode floor"] - medians["small", "decode floor"])
            print(f"mixed set (full-resolution JPEGs and large DICOMs, {flagged:.0%} of them flagged by the model): "
                  f"{counts['small']} and {counts['large']} files, median of {args.repeats}")
            print("| command | seconds, small set | seconds, large set | images/s per extra image | x floor |")
            print("|---|---|---|---|---|")
            for name in variants:
                marginal = medians["large", name] - medians["small", name]
                print(f"| {name} | {medians['small', name]:.2f} | {medians['large', name]:.2f} | "
                      f"{extra_images / marginal:.1f} | {floor_rate * marginal / extra_images:.2f} |")
            print("x floor: the cost of each extra image against the decode floor's (fixed costs such as importing "
                  "torch and loading the model cancel out); goal <= 1.30 with the default pictures")
            for explain, components, what in ((True, True, "with maps and every score kind"),
                                              (True, False, "the score and its map: a film with a picture"),
                                              (False, False, "the configured score alone: a film without a picture")):
                rate = model_only(args.model, args.device, explain, components)
                print(f"model only, batch 64   : {rate:7.1f} images/s, {1000 / rate:5.1f} ms per film ({what})")

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
