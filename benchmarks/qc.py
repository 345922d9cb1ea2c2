"""Input quality control, measured (issue 10): what share of wrong-way-round, blank, foreign and
broken images it stops, what share of real frontal chest films it wrongly fails, and what it costs.

Sets (no test split of Kermany is read; the QC limits were fixed on the model's training normals):
* made from the model's own held-out calibration normals (never trained on): turned 90/180/270
  degrees, mirrored top to bottom, inverted, mirrored left to right (a warning, not a failure);
* blank (5 grey levels), uniform noise and grey ramps;
* the real DICOM files of ../shared/data/dicom that decode, read with every modality and body part
  allowed (so that QC, not the selection policy, has to stop them);
* real frontal chest films: the calibration normals, the 400 validation pneumonias, the 80
  full-resolution Kermany films, and the NIH adult films (train and test folders, reported apart).

    python benchmarks/qc.py [--model models/kermany-tiny]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from splits import split_paths

from radscan.ingest import find_files, iter_ingested, load_images
from radscan.policy import Policy
from radscan.qc import QualityControl, load_reference
from radscan.records import ImageRecord

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def verdicts(qc: QualityControl, images: np.ndarray, records: list[ImageRecord] | None = None) -> list[str]:
    records = records or [ImageRecord(path="", root="", kind="jpeg") for _ in images]
    return [v.status for v in qc.check(records, np.ascontiguousarray(images))]


def share(statuses: list[str], status: str) -> str:
    return f"{sum(s == status for s in statuses)}/{len(statuses)} ({np.mean([s == status for s in statuses]):.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "kermany-tiny")
    args = parser.parse_args()
    metadata = json.loads((args.model / "model.json").read_text())
    qc = QualityControl(reference=load_reference(args.model, metadata))
    cxr = DATA / "cxr"
    train = cxr / "kermany_pediatric_224/train_normal"
    held_out = [str(path) for path in split_paths(args.model, train, "calibration")]
    normals = load_images(held_out, Policy(), 2, False)[0]
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 128)
    radius = np.hypot(*np.mgrid[-64:64, -64:64]) / np.hypot(64, 64)
    made = {
        "turned 90 degrees clockwise": np.rot90(normals, 3, axes=(1, 2)),
        "turned 90 degrees anticlockwise": np.rot90(normals, 1, axes=(1, 2)),
        "upside down": np.rot90(normals, 2, axes=(1, 2)),
        "mirrored top to bottom": normals[:, ::-1],
        "inverted grey levels": 255 - normals,
        "blank (0, 64, 128, 192, 255)": np.stack([np.full((128, 128), v, np.uint8) for v in (0, 64, 128, 192, 255)]),
        "uniform noise": rng.integers(0, 256, (50, 128, 128)).astype(np.uint8),
        "grey ramps (4 directions) and radial gradients (2)": np.stack([
            np.tile(ramp, (128, 1)), np.tile(ramp[:, None], (1, 128)), np.tile(ramp[::-1], (128, 1)),
            np.tile(ramp[::-1, None], (1, 128)), 255 * radius, 255 * (1 - radius)]).astype(np.uint8),
    }
    print(f"QC of {args.model.name}: limits {metadata['qc']['limits']}")
    print("\n| images that must not be scored | failed by QC |\n|---|---|")
    for name, images in made.items():
        print(f"| {name} | {share(verdicts(qc, images), 'fail')} |")
    mirrored = verdicts(qc, normals[:, :, ::-1])
    print(f"| mirrored left to right (a warning only) | {share(mirrored, 'fail')} failed, "
          f"{share(mirrored, 'warn')} warned |")

    chest, foreign, foreign_images = [], [], []
    permissive = Policy(modalities=None, body_parts=None, frames="first")
    manifest = {r["file"]: r for r in csv.DictReader(open(DATA / "dicom" / "manifest.csv", newline=""))}
    for record, image in iter_ingested(find_files([str(DATA / "dicom")]), permissive, 2):
        if image is None:
            continue
        status = verdicts(qc, image[None], [record])[0]
        is_chest = "chest" in manifest.get(record.path, {}).get("category", "").split(";")
        (chest if is_chest else foreign).append((record.path, record.Modality, record.BodyPartExamined, status))
        if not is_chest:
            foreign_images.append(image)
    print(f"| real non-chest DICOM images (all that can be read, any modality) | "
          f"{share([s for *_, s in foreign], 'fail')} |")
    if foreign_images:
        turned = np.concatenate([op(np.rot90(np.stack(foreign_images), k, axes=(1, 2))) for k in range(4)
                                 for op in (lambda x: x, lambda x: x[:, :, ::-1], lambda x: 255 - x,
                                            lambda x: 255 - x[:, :, ::-1])])
        print(f"| the same in all 16 orientations and polarities (a foreign image stored 'the right way') | "
              f"{share(verdicts(qc, turned), 'fail')} |")
    for path, modality, part, status in foreign:
        if status != "fail":
            print(f"|   not stopped: {path} ({modality} {part or 'no BodyPartExamined'}) | {status} |")

    framed, letterboxed = normals.copy(), normals.copy()
    framed[:, :13], framed[:, -13:], framed[:, :, :13], framed[:, :, -13:] = 255, 255, 255, 255
    letterboxed[:, :13], letterboxed[:, -13:] = 0, 0
    real = {
        "Kermany calibration normals (held out)": normals,
        "  the same with a white (unexposed) border of 10%": framed,
        "  the same with black bars of 10% top and bottom": letterboxed,
        "Kermany validation pneumonias": load_images([str(cxr / "kermany_pediatric_224/val_abnormal")], Policy(), 2,
                                                     False)[0],
        "Kermany full resolution (40 N + 40 P)": load_images([str(cxr / "kermany_pediatric_fullres")], Policy(), 2,
                                                             False)[0],
        "NIH adult, train_normal (64 px)": load_images([str(cxr / "nih_cxr14_64px/train_normal")], Policy(), 2,
                                                       False)[0],
        "NIH adult, test folders (64 px)": load_images([str(cxr / "nih_cxr14_64px/test_normal"),
                                                        str(cxr / "nih_cxr14_64px/test_abnormal")], Policy(), 2,
                                                       False)[0],
    }
    print("\n| chest DICOM files of ../shared/data/dicom (manifest category chest) | QC |\n|---|---|")
    for path, modality, part, status in chest:  # two of them must fail: an inverted fixture and a dog
        print(f"| {path} ({modality} {part}) | {status} |")
    print("\n| real frontal chest films | wrongly failed | warned |\n|---|---|---|")
    for name, images in real.items():
        statuses = verdicts(qc, images)
        print(f"| {name} | {share(statuses, 'fail')} | {share(statuses, 'warn')} |")

    batch = np.concatenate([normals] * 6)[:1024]
    started = time.perf_counter()
    for _ in range(3):
        verdicts(qc, batch)
    per_image = (time.perf_counter() - started) / (3 * len(batch))
    print(f"\nQC cost: {per_image * 1e3:.3f} ms per image (batches of {len(batch)}, one core)")


if __name__ == "__main__":
    main()
