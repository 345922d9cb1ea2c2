"""Borders that are not even, on validation data only: how far each moves the box of a model that
follows the chest (radscan.preprocess.chest_offset) off where the same film's box lies without it,
and, with --score, how many of the films it flags.

New users' trials found these kinds of border (research log, 2026-12-06): collimation or an unexposed
edge with noise, with a lead marker or a text label in it, two shutter blades of different tones, a
collimator set at a slant, stripes. Each is written over the whole film of each of the model's
calibration normals (held out from training, listed in `training_split.csv`), at the film's own
resolution, 8 bits. A box that follows the chest should stay where the unchanged film's box is: the
table counts the films whose box moved by 2/64 or more, and by 3/64 or more, of the film's width or
height (either way). The shipped model's box starts 12.5-16% in from the film's edges: borders of
10% lie outside it, but those of 15% (and the corners of a slanted one, up to 20% deep at 8
degrees) and 20% reach over the lungs' edges inside it, so even a box that holds can score them
higher (say so, do not blame the matcher). The last column is the share that quality control
rejects (not scored by `radscan score`); the scored shares with --score include them, as
`benchmarks/framing.py`'s do. The official test split is never read.

    python benchmarks/borders.py models/kermany-tiny [OTHER_MODEL_DIR ...] [--score] [--val-abnormal HALF_B]

Without --score only numpy runs (a few seconds per model): the offsets are the film's
`chest_offset` against the model's verified reference film (radscan.model.field.read_reference_film),
on the whole film at the model's size (`to_qc_input`), as `radscan score` places the box.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from painters import Framing, bordered, both, marker, noisy, striped, text, two_tones
from PIL import Image
from splits import DATA, split_paths

from radscan.model.field import read_reference_film
from radscan.model.metadata import read_metadata
from radscan.preprocess import FOLLOW_SIZE, FollowReference, chest_offset, to_qc_input
from radscan.qc import DEFAULT_VIEWS, QualityControl, quality_control
from radscan.records import ImageRecord

BORDERS: dict[str, Framing] = {
    "dark noisy 10% (sd 5)": bordered(0.10, noisy(25, 5)),
    "white noisy 10% with a text label": bordered(0.10, noisy(235, 5), text("AP SUPINE PORTABLE", 20)),
    "dark noisy 10% with a marker": bordered(0.10, noisy(25, 5), marker("l")),
    "dark noisy 20% (sd 5)": bordered(0.20, noisy(25, 5)),
    "dark noisy 20% with a marker": bordered(0.20, noisy(25, 5), marker("l")),
    "dark noisy 20% with two markers": bordered(0.20, noisy(25, 5), both(marker("l"), marker("t"))),
    "white noisy 20% with a text label": bordered(0.20, noisy(235, 5), text("AP SUPINE PORTABLE", 20)),
    "dark 15% at a slant of 4 degrees": bordered(0.15, noisy(20, 3), tilt=4.0),
    "dark 15% at a slant of 8 degrees": bordered(0.15, noisy(20, 3), tilt=8.0),
    "dark 15%, horizontal stripes of 20 levels": bordered(0.15, striped(30, 20, 6, "horizontal")),
    "dark 15%, vertical stripes of 20 levels": bordered(0.15, striped(30, 20, 6, "vertical")),
    "two shutter tones 25 levels apart, 15%": bordered(0.15, two_tones(30, 55, 3)),
}


def offsets(wholes: np.ndarray, reference: FollowReference) -> np.ndarray:
    """(N, 2) int: each (128, 128) uint8 whole film's chest_offset in 1/FOLLOW_SIZE steps (dx, dy)."""
    return np.array([[round(v * FOLLOW_SIZE) for v in chest_offset(whole, reference)] for whole in wholes])


def rejected(wholes: np.ndarray, qc: QualityControl) -> float:
    """The share of (N, 128, 128) uint8 whole films that quality control does not let through."""
    verdicts = qc.check([ImageRecord(path="", root="", kind="png") for _ in wholes], wholes)
    return float(np.mean([verdict.status == "fail" for verdict in verdicts]))


def moves(model_dir: Path, train: Path) -> list[tuple[str, float, float, float, float]]:
    """Rows (border, share of films moved >= 2/64, >= 3/64, mean move in 1/64 steps, share rejected
    by the model's quality control, strict with the default views as `radscan score` judges), the
    unchanged films first. Offsets against the model's verified reference film."""
    metadata = read_metadata(model_dir)
    found = read_reference_film(model_dir, metadata)
    if found is None:
        raise SystemExit(f"{model_dir}: its box does not follow the chest; nothing to measure")
    qc = quality_control(model_dir, metadata, "strict", DEFAULT_VIEWS)
    films = [np.asarray(Image.open(path).convert("L")) for path in split_paths(model_dir, train, "calibration")]
    whole = np.stack([to_qc_input(film) for film in films])
    before = offsets(whole, found[0])
    rows = [("unchanged", 0.0, 0.0, 0.0, rejected(whole, qc))]
    for name, framing in BORDERS.items():
        framed = np.stack([to_qc_input(framing(film)) for film in films])
        step = np.abs(offsets(framed, found[0]) - before).max(axis=1)
        rows.append((name, float((step >= 2).mean()), float((step >= 3).mean()), float(step.mean()),
                     rejected(framed, qc)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--train", type=Path, default=DATA / "train_normal")
    parser.add_argument("--val-abnormal", type=Path, default=DATA / "val_abnormal")
    parser.add_argument("--score", action="store_true", help="also score the films (torch; minutes)")
    args = parser.parse_args()
    for model_dir in args.models:
        rows = moves(model_dir, args.train)
        print(f"\n{model_dir}: calibration normals' boxes moved by a border (against the unchanged film's)")
        print("| border | moved >= 2/64 | moved >= 3/64 | mean move (1/64) | rejected by quality control |")
        print("|---|---|---|---|---|")
        for name, two, three, mean, failed in rows:
            print(f"| {name} | {two:.0%} | {three:.0%} | {mean:.2f} | {failed:.0%} |")
        changed = rows[1:]
        print(f"| **mean over the {len(changed)} borders** | {statistics.mean(r[1] for r in changed):.0%} "
              f"| {statistics.mean(r[2] for r in changed):.0%} | {statistics.mean(r[3] for r in changed):.2f} "
              f"| {statistics.mean(r[4] for r in changed):.0%} |")
        if args.score:  # torch only here
            from framing import measure
            from shift import print_table

            print_table(f"{model_dir}: calibration normals with these borders, scored", "border",
                        measure(model_dir, args.val_abnormal, args.train, BORDERS))


if __name__ == "__main__":
    main()
