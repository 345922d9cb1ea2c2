"""Ingest throughput: `radscan scan --previews` against the bare decode floor, in the same run.

The mixed set is the 80 full-resolution Kermany JPEGs plus the large compressed DICOM radiographs
(JPEG 2000, JPEG-LS, JPEG lossless, RLE; 1760-3062 px), repeated --copies times through hard links
(copies where the filesystem has none): radscan lists a file reached through symbolic links once, so
symbolic links would measure one copy against a floor that decodes them all.

The floor is what no ingest can beat: bare pydicom / Pillow decode of the same files plus the same
128x128 Pillow resize, over the same number of worker processes (joblib), started as a fresh
process like the CLI so both pay the same start-up. Both are timed --repeats times, interleaved;
the medians are compared.

    python benchmarks/ingest.py [--copies 3] [--repeats 3] [--workers -1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DICOMS = [
    "pydicom-data/RG1_J2KI.dcm",  # CR chest, JPEG 2000 lossy
    "pylibjpeg-data/RG1_JLSN.dcm",  # CR chest, JPEG-LS near-lossless
    "pylibjpeg-data/966_fixed.dcm",  # DX chest, JPEG 2000 lossless
    "fo-dicom/CR-ModalitySequenceLUT.dcm",  # CR, JPEG lossless SV1
    "pylibjpeg-data/RG2_JPLL.dcm",  # CR, JPEG lossless SV1
    "pylibjpeg-data/RG2_JLSL.dcm",  # CR, JPEG-LS lossless
    "pydicom-data/RG3_J2KR.dcm",  # CR, JPEG 2000 lossless
    "nema-wg04/RG3_RLE.dcm",  # CR, RLE
    "fo-dicom/GH133.dcm",  # MG 3062x2394, JPEG lossless
    "pylibjpeg-data/NM_Kakadu44_SOTmarkerincons.dcm",  # CR 2500x2048, JPEG 2000
]


def build_set(folder: Path, copies: int) -> list[Path]:
    sources = sorted((DATA / "cxr/kermany_pediatric_fullres").glob("*/*.jpeg"))
    sources += [DATA / "dicom" / name for name in DICOMS]
    files = []
    for copy in range(copies):
        for index, source in enumerate(sources):
            link = folder / f"c{copy}" / f"{index:03d}_{source.name}"
            place_copy(source, link)
            files.append(link)
    return files


def place_copy(source: Path, target: Path) -> None:
    """`target` as another name of `source`: a hard link (each is a file radscan lists and reads), or
    a copy where the filesystem cannot link. Never a symbolic link: radscan lists a file reached
    through symbolic links once (radscan.ingest.find_files), so the copies would not be read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def floor_worker(path: str) -> int:
    """Bare decode + the same resize: no header rules, no LUTs, no outputs."""
    import numpy as np
    from PIL import Image

    with open(path, "rb") as handle:
        is_dicom = handle.read(132)[128:132] == b"DICM"
    if is_dicom:
        import pydicom

        pixels = pydicom.dcmread(path).pixel_array
        image = Image.fromarray(pixels.astype(np.float32))
    else:
        image = Image.open(path).convert("L")
    return np.asarray(image.resize((128, 128), Image.Resampling.BICUBIC)).size


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--floor-only", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:
        from joblib import Parallel, delayed

        files = sorted(str(p) for p in Path(args.floor_only).rglob("*") if p.is_file())
        results = Parallel(n_jobs=args.workers, return_as="generator", pre_dispatch="4*n_jobs",
                           batch_size=4)(delayed(floor_worker)(f) for f in files)
        assert sum(1 for _ in results) == len(files)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = build_set(tmp_path / "set", args.copies)
        jpegs = sum(1 for f in files if f.suffix == ".jpeg")
        floor_cmd = [sys.executable, __file__, "--floor-only", str(tmp_path / "set"),
                     "--workers", str(args.workers)]
        scan_cmd = [sys.executable, "-m", "radscan", "-q", "scan", str(tmp_path / "set"),
                    "--out", str(tmp_path / "inv.csv"), "--previews", str(tmp_path / "previews"),
                    "--modalities", "all", "--body-parts", "all", "--workers", str(args.workers)]
        timed(floor_cmd)  # warm the page cache and the imports once
        floors, scans = [], []
        for _ in range(args.repeats):
            floors.append(timed(floor_cmd))
            scans.append(timed(scan_cmd))
        previews = len(list((tmp_path / "previews").glob("*.png")))

    floor, scan = statistics.median(floors), statistics.median(scans)
    cores = os.cpu_count() if args.workers == -1 else args.workers
    print(f"mixed set: {len(files)} files ({jpegs} full-res JPEG, {len(files) - jpegs} compressed DICOM), "
          f"{cores} worker processes, median of {args.repeats}")
    print(f"decode floor      : {floor:7.2f} s  {len(files) / floor:7.1f} images/s")
    print(f"radscan scan      : {scan:7.2f} s  {len(files) / scan:7.1f} images/s  ({previews} previews)")
    print(f"scan / floor      : {scan / floor:7.2f} x   (goal <= 1.20)")


if __name__ == "__main__":
    main()
