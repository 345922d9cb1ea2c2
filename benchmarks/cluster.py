"""`radscan score --scheduler`: throughput on 1 vs 2 Dask workers against the decode floor, the
cost of one image split into its parts, and what that projects for a 377,000-image archive.

1. Throughput (the mixed set of benchmarks/ingest.py: full-resolution Kermany JPEGs and large
   compressed DICOM radiographs; --copies and --large-copies times, cost per extra image, median
   of --repeats, fresh outputs): the decode floor over all cores, `radscan score` on this machine,
   and `radscan score --scheduler local:1` and `local:2` (default pictures: flagged images only).
2. The cost of one image, each part timed alone in this process on one core: decode (JPEG and
   DICOM apart), QC + model (with the gradient pass for the flagged share), drawing and encoding a
   picture (for the flagged share), the transfer of a batch's results from a worker to the driver
   (a LocalCluster round trip of real rows and PNG bytes), and the driver's own work per image
   (writing the PNG, committing the row, its share of the worklist).
3. The projection: a worker-side cost per image (decode + model + pictures) against the driver's
   (transfer + writes), and the wall time of 377,000 images on N single-core workers, with the
   part that stops scaling first.

    python benchmarks/cluster.py --model models/kermany-tiny [--copies 1] [--large-copies 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ingest import DATA, build_set, timed  # noqa: E402  (the same mixed set and floor as benchmarks/ingest.py)

ARCHIVE = 377_000  # MIMIC-CXR's DICOM images


def throughput(args: argparse.Namespace, tmp_path: Path) -> dict[str, float]:
    """Seconds per extra image of each way to run, by the small/large difference."""
    ingest_script = str(Path(__file__).parent / "ingest.py")
    variants = {"decode floor (all cores)": None, "score, this machine": [],
                "score --scheduler local:1": ["--scheduler", "local:1"],
                "score --scheduler local:2": ["--scheduler", "local:2"]}
    counts, medians = {}, {}
    for size, copies in (("small", args.copies), ("large", args.large_copies)):
        folder = tmp_path / f"set-{size}"
        counts[size] = len(build_set(folder, copies))
        floor = [sys.executable, ingest_script, "--floor-only", str(folder), "--workers", "-1"]
        timed(floor)  # warm the page cache
        for name, extra in variants.items():
            times = []
            for repeat in range(args.repeats):
                out = tmp_path / f"{size}-{repeat}-{len(medians)}" / "report.csv"
                times.append(timed(floor if extra is None else [
                    sys.executable, "-m", "radscan", "-q", "score", str(folder), "--out", str(out), "--model",
                    args.model, "--modalities", "all", "--body-parts", "all", "--device", "cpu", *extra]))
            medians[size, name] = statistics.median(times)
    extra_images = counts["large"] - counts["small"]
    print(f"1. throughput: mixed set of {counts['small']} and {counts['large']} files, median of {args.repeats}, "
          f"{os.cpu_count()} cores")
    print("| run | s, small set | s, large set | images/s per extra image | x floor |")
    print("|---|---|---|---|---|")
    per_image = {}
    for name in variants:
        per_image[name] = (medians["large", name] - medians["small", name]) / extra_images
        print(f"| {name} | {medians['small', name]:.2f} | {medians['large', name]:.2f} | {1 / per_image[name]:.1f} | "
              f"{per_image[name] / per_image['decode floor (all cores)']:.2f} |")
    two, one = per_image["score --scheduler local:2"], per_image["score --scheduler local:1"]
    print(f"local:2 against local:1: {one / two:.2f}x the images/s")
    return per_image


def _each(function, items, rounds: int = 1) -> float:
    """Seconds per item of `function` over `items` (best of `rounds`)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return best


def parts(args: argparse.Namespace, tmp_path: Path) -> dict[str, float]:
    """Seconds per image of each part, on one core of this machine."""
    import numpy as np
    import torch

    from radscan.ingest import Found, ingest_file
    from radscan.model.io import load_model
    from radscan.model.metadata import read_metadata
    from radscan.pictures import render_explanation, shows_reconstruction
    from radscan.policy import Policy
    from radscan.qc import apply_qc, quality_control
    from radscan.records import Status
    from radscan.report import encode_png
    from radscan.state import FileIdentity, StateStore

    torch.set_num_threads(1)
    policy = Policy(modalities=None, body_parts=None)
    folder = tmp_path / "parts"
    files = build_set(folder, 1)
    jpegs = [Found(str(folder), str(f.relative_to(folder))) for f in files if f.suffix == ".jpeg"]
    dicoms = [Found(str(folder), str(f.relative_to(folder))) for f in files if f.suffix != ".jpeg"]
    decoded = [ingest_file(found, policy) for found in jpegs + dicoms]
    usable = [(record, image) for record, image in decoded if image is not None and record.status == Status.OK]
    cost = {"decode, full-resolution JPEG": _each(lambda f: ingest_file(f, policy), jpegs),
            "decode, large compressed DICOM": _each(lambda f: ingest_file(f, policy), dicoms)}

    model_dir = Path(args.model)
    model = load_model(model_dir, "cpu")[0]
    metadata = read_metadata(model_dir)
    qc = quality_control(model_dir, metadata, "strict", ("PA", "AP"))
    records, images = [r for r, _ in usable], np.stack([i for _, i in usable])
    batch = torch.from_numpy(images)
    started = time.perf_counter()
    apply_qc(qc, records, list(images))
    cost["quality control"] = (time.perf_counter() - started) / len(records)
    from radscan.model.runtime import score_arrays

    started = time.perf_counter()
    result = score_arrays(model, images, batch_size=len(images), explain=False, components=False)
    cost["model, score only"] = (time.perf_counter() - started) / len(records)
    started = time.perf_counter()
    kind = model.cfg.score_kind  # a picture computes and draws what it shows for this kind (radscan.batch)
    explained = score_arrays(model, images, batch_size=len(images), explain=True,
                             components=shows_reconstruction(kind))
    gradient = (time.perf_counter() - started) / len(records)
    flagged = float((result.scores.numpy() >= float(model.threshold)).mean())
    cost["model, the maps of pictures (per picture)"] = gradient
    maps = explained.explanation_maps.numpy(), explained.residual_maps.numpy()
    pngs = []
    started = time.perf_counter()
    for index in range(len(records)):
        residual = maps[1][index] if shows_reconstruction(kind) else None
        pngs.append(encode_png(render_explanation(images[index], maps[0][index], residual, "caption\nline", kind,
                                                  1.25)))
    cost["drawing and encoding a picture (per picture)"] = (time.perf_counter() - started) / len(records)
    rows = [record.as_row() for record in records]
    cost["transfer worker -> driver (rows + PNGs of the flagged share)"] = _transfer(rows, pngs, flagged)
    cost["driver: write the PNG, commit the row, worklist share"] = _driver(tmp_path, rows, pngs, flagged,
                                                                           StateStore, FileIdentity)
    del batch
    print(f"\n2. the cost of one image, one core (flagged share {flagged:.0%}: pictures and the gradient pass "
          "for those)")
    print("| part | ms per image |")
    print("|---|---|")
    for name, seconds in cost.items():
        print(f"| {name} | {1000 * seconds:.1f} |")
    cost["flagged share"] = flagged
    return cost


def _transfer(rows: list[dict], pngs: list[bytes], flagged: float) -> float:
    """Seconds per image to bring a batch of 64 images' results from a worker process to the driver."""
    from distributed import Client, LocalCluster

    count = 64
    result = ([rows[i % len(rows)] for i in range(count)],
              [(Path(f"x{i}.png"), pngs[i % len(pngs)]) for i in range(int(round(flagged * count)))])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        remote = client.scatter(result, broadcast=True)
        client.submit(_echo, remote, pure=False).result()  # warm up
        rounds = 20
        started = time.perf_counter()
        for _ in range(rounds):
            client.submit(_echo, remote, pure=False).result()
        return (time.perf_counter() - started) / (rounds * count)


def _echo(value):
    return value


def _driver(tmp_path: Path, rows: list[dict], pngs: list[bytes], flagged: float, store_class, identity_class) -> float:
    """Seconds per image of the driver's writes for 2,000 images (PNGs for the flagged share)."""
    from concurrent.futures import ThreadPoolExecutor

    from radscan.batch import write_pictures
    from radscan.model.metadata import ModelIdentity
    from radscan.worklist import OutputPaths, write_worklist

    count = 2000
    outputs = OutputPaths.beside(tmp_path / "driver" / "report.csv")
    outputs.residuals.mkdir(parents=True)
    store = store_class(outputs.state, "bench", "run")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, count, 64):
            batch = []
            pictures = []
            for index in range(start, min(start + 64, count)):
                row = dict(rows[index % len(rows)], path=f"f{index:06d}.jpeg", study_key=f"s{index}")
                batch.append((identity_class(f"root\0f{index:06d}", 1, 1), row))
                if index % 100 < flagged * 100:
                    pictures.append((outputs.residuals / f"p{index:06d}.png", pngs[index % len(pngs)]))
            write_pictures(pictures, pool)
            store.save(batch)
    store.mark_seen([])
    write_worklist(store, OutputPaths.beside(outputs.report, write_html=False), 0.5,
                   ModelIdentity("bench", "", "x", "density", 0.5, 0.95, ""), run=("run", {}))
    seconds = (time.perf_counter() - started) / count
    store.close()
    return seconds


def project(cost: dict[str, float]) -> None:
    flagged = cost["flagged share"]
    worker = (cost["decode, large compressed DICOM"] + cost["quality control"] + cost["model, score only"]
              + flagged * (cost["model, the maps of pictures (per picture)"]
                           + cost["drawing and encoding a picture (per picture)"]))
    driver = (cost["transfer worker -> driver (rows + PNGs of the flagged share)"]
              + cost["driver: write the PNG, commit the row, worklist share"])
    ceiling = 1 / driver
    print(f"\n3. projection for {ARCHIVE:,} images like the large compressed DICOMs (MIMIC-CXR is mostly JPEG 2000):")
    print(f"worker cost {1000 * worker:.0f} ms per image per core; driver cost {1000 * driver:.1f} ms per image "
          f"(ceiling {ceiling:.0f} images/s whatever the number of workers)")
    print("| single-core workers | images/s | wall time |")
    print("|---|---|---|")
    for workers in (1, 2, 8, 32, 128, 512):
        rate = min(workers / worker, ceiling)
        hours = ARCHIVE / rate / 3600
        print(f"| {workers} | {rate:.0f} | {hours:.1f} h{' (driver-bound)' if rate == ceiling else ''} |")
    print(f"the driver stops scaling first at about {ceiling * worker:.0f} single-core workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--large-copies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    assert DATA.is_dir(), f"needs the shared data at {DATA}"
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            throughput(args, Path(tmp))
        project(parts(args, Path(tmp)))


if __name__ == "__main__":
    main()
