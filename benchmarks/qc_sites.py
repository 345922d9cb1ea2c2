"""Quality control against a site's training size (issue 22): a QC reference fitted on N normals
of one site, then what share of that site's unseen chest films (normal and pneumonia) it wrongly
fails, and what share of films that must not be scored it still stops.

Two sites, validation data only: Kermany children (train_normal; pneumonias of val_abnormal and
the full-resolution sample) and NIH adults (nih_adult_512: train_normal; val_abnormal). For each
N, DRAWS random sets of N normals; the rest of that site's normals are the unseen normals.
"Turned" are those unseen normals turned 90 degrees either way, upside down, mirrored top to
bottom and inverted; "foreign" the non-chest DICOM images of ../shared/data/dicom in all 16
orientations and polarities. Figures: mean over the draws (worst draw).

    python benchmarks/qc_sites.py [--draws 5]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from radscan.ingest import find_files, iter_ingested, load_images
from radscan.policy import Policy
from radscan.qc import QualityControl, fit_reference
from radscan.records import ImageRecord

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = (50, 60, 80, 120, 200, 400, 1000)


def read(*folders: str) -> np.ndarray:
    return load_images([str(DATA / "cxr" / f) for f in folders], Policy(), 2, False)[0]


def foreign_images() -> np.ndarray:
    manifest = {r["file"]: r for r in csv.DictReader(open(DATA / "dicom" / "manifest.csv", newline=""))}
    permissive = Policy(modalities=None, body_parts=None, frames="first")
    images = [image for record, image in iter_ingested(find_files([str(DATA / "dicom")]), permissive, 2)
              if image is not None and "chest" not in manifest.get(record.path, {}).get("category", "")]
    stack = np.stack(images)
    return np.concatenate([op(np.rot90(stack, k, axes=(1, 2))) for k in range(4)
                           for op in (lambda x: x, lambda x: x[:, :, ::-1], lambda x: 255 - x,
                                      lambda x: 255 - x[:, :, ::-1])])


def failed(qc: QualityControl, images: np.ndarray) -> float:
    records = [ImageRecord(path="", root="", kind="jpeg") for _ in images]
    return float(np.mean([v.status == "fail" for v in qc.check(records, np.ascontiguousarray(images))]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    sites = {"children (Kermany)": (read("kermany_pediatric_224/train_normal"),
                                    read("kermany_pediatric_224/val_abnormal", "kermany_pediatric_fullres/abnormal")),
             "adults (NIH)": (read("nih_adult_512/train_normal"), read("nih_adult_512/val_abnormal"))}
    foreign = foreign_images()
    print("| site | N normals | unseen normals failed | pneumonias failed | the other site's films failed | "
          "turned films failed | foreign images failed |\n|---|---|---|---|---|---|---|")
    for site, (normal, pneumonia) in sites.items():
        other = np.concatenate([films for name, pair in sites.items() if name != site for films in pair])
        for n in SIZES:
            if n > len(normal) - 100:
                continue
            rows = []
            for draw in range(args.draws):
                order = np.random.default_rng(draw).permutation(len(normal))
                qc = QualityControl(reference=fit_reference(normal[order[:n]]))
                unseen = normal[order[n:]]
                turned = np.concatenate([np.rot90(unseen, 1, axes=(1, 2)), np.rot90(unseen, 3, axes=(1, 2)),
                                         np.rot90(unseen, 2, axes=(1, 2)), unseen[:, ::-1], 255 - unseen])
                rows.append([failed(qc, s) for s in (unseen, pneumonia, other, turned, foreign)])
            table = np.array(rows)
            cells = [f"{m:.1%} ({w:.1%})" for m, w in zip(table.mean(0), table.max(0), strict=True)]
            cells[3:] = [f"{m:.1%} ({w:.1%})" for m, w in zip(table.mean(0)[3:], table.min(0)[3:], strict=True)]
            print(f"| {site} | {n} | " + " | ".join(cells) + " |", flush=True)
    print("\nfailed: mean over the draws (worst draw: highest for chest films, lowest for the others)")


if __name__ == "__main__":
    main()
