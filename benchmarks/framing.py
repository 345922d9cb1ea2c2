"""Framing of the whole film, on validation data only: how normal films framed differently (moved,
bordered, padded, shrunk, labelled) move the calibrated score, and what they do to the ranking.

`benchmarks/shift.py` changes films after the model's box is cut, so it cannot see what a framing
change does to where the box is cut: a box that follows the chest (radscan.preprocess.chest_offset)
was found moved off a centred chest by an even border only by a new user's trial. Here each change is
applied to the whole decoded film of each of the model's calibration normals (held out from
training, listed in `training_split.csv`), written as PNG and read back through radscan's own
reading (`load_images`), so the box is placed as `radscan score` places it; quality control is not
applied (a film it would reject, e.g. one mostly border, is scored here). The validation
pneumonias stay as they are. A normal film framed otherwise should not look abnormal: a robust model
keeps the share flagged at the stored threshold near 5% (specificity 0.95) under every change.
The official test split is never read.

    python benchmarks/framing.py models/kermany-tiny [OTHER_MODEL_DIR ...] [--val-abnormal HALF_B]

The changes, rules 10-13 of docs/research-log.md: moves of 10% (black where nothing moved in);
borders written over the film's edges (collimation, an unexposed edge: the film keeps its scale);
strips padded beside the film (the film is then squeezed into the model's square, a change of
scale the box cannot follow); the film shrunk into a border (scale again); a burnt-in label; borders
that are not flat (noise, a lead marker, brightness varying along them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from painters import bordered as painted_border
from painters import noisy
from PIL import Image
from shift import Row, arguments, print_table, reading, scorer, summary
from splits import split_paths

from radscan.ingest import load_images

Framing = Callable[[np.ndarray], np.ndarray]  # (H, W) uint8 whole film -> a film of any size


def moved(fx: float, fy: float) -> Framing:
    """The film's content moved by (fx, fy) of its size, right and down; black where nothing moved in."""
    def move(film: np.ndarray) -> np.ndarray:
        h, w = film.shape
        dx, dy = round(fx * w), round(fy * h)
        out = np.zeros_like(film)
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            film[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return out
    return move


def bordered(depth: float, sides: str, value: int) -> Framing:
    """`sides` (t, b, l, r) written over to `depth` of the film's size with one grey level."""
    def border(film: np.ndarray) -> np.ndarray:
        out = film.copy()
        h, w = film.shape
        dy, dx = round(depth * h), round(depth * w)
        for side in sides:
            out[{"t": np.s_[:dy], "b": np.s_[h - dy:], "l": np.s_[:, :dx], "r": np.s_[:, w - dx:]}[side]] = value
        return out
    return border


def padded(depth: float, side: str) -> Framing:
    """A black strip of `depth` of the film's size added beside it: the film grows."""
    def pad(film: np.ndarray) -> np.ndarray:
        h, w = film.shape
        k = round(depth * (w if side in "lr" else h))
        widths = {"l": ((0, 0), (k, 0)), "r": ((0, 0), (0, k)), "t": ((k, 0), (0, 0)), "b": ((0, k), (0, 0))}[side]
        return np.pad(film, widths)
    return pad


def shrunk(depth: float) -> Framing:
    """The film shrunk into a black border of `depth` of its size on each side."""
    def shrink(film: np.ndarray) -> np.ndarray:
        h, w = film.shape
        inner = Image.fromarray(film).resize((round(w * (1 - 2 * depth)), round(h * (1 - 2 * depth))),
                                             Image.Resampling.BICUBIC)
        out = np.zeros_like(film)
        out[round(h * depth):round(h * depth) + inner.height, round(w * depth):round(w * depth) + inner.width] = \
            np.asarray(inner)
        return out
    return shrink


def rough_border(depth: float, kind: str) -> Framing:
    """A white border of `depth` over every edge that is not flat: with noise (sd 8 grey levels,
    drawn afresh for each film), with a dark lead marker in its top left corner, or with its
    brightness falling from 255 to 170 along the edges (scatter); `benchmarks/painters.py`'s
    `bordered` paints it. A new user's trial: each of these defeated a matcher that left out only
    perfectly flat edge lines (13-15 of 15 normals flagged)."""
    if kind == "noise":
        return painted_border(depth, noisy(255.0, 8.0))
    if kind == "marker":
        return painted_border(depth, noisy(255.0, 0.0), corner_marker)
    return painted_border(depth, fading)


def corner_marker(canvas: np.ndarray, dy: int, dx: int) -> None:
    """A dark lead marker (40) in the top left corner of a border dy, dx deep."""
    canvas[dy // 4:dy * 3 // 4, dx // 4:dx // 4 + max(dx // 3, 2)] = 40


def fading(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """White falling to 170 from the top left corner to the bottom right one (scatter)."""
    return 255.0 - 85 * np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w)) / 2


def labelled(film: np.ndarray) -> np.ndarray:
    """A white label burnt into the top right corner (18% x 23% of the film)."""
    out = film.copy()
    h, w = film.shape
    out[int(.02 * h):int(.2 * h), int(.75 * w):int(.98 * w)] = 255
    return out


FRAMINGS: dict[str, Framing] = {
    "moved 10% left": moved(-0.1, 0), "moved 10% right": moved(0.1, 0),
    "moved 10% up": moved(0, -0.1), "moved 10% down": moved(0, 0.1),
    "white border 10% over the edges": bordered(0.1, "tblr", 255),
    "black border 10% over the edges": bordered(0.1, "tblr", 0),
    "grey border 10% over the edges": bordered(0.1, "tblr", 128),
    "black bars 10% over top and bottom": bordered(0.1, "tb", 0),
    "white strip 20% over the left side": bordered(0.2, "l", 255),
    "black strip 18% padded on the left": padded(0.18, "l"),
    "black strip 18% padded on the right": padded(0.18, "r"),
    "black strip 25% padded on the right": padded(0.25, "r"),
    "black strip 25% padded on top": padded(0.25, "t"),
    "shrunk into a black border of 10%": shrunk(0.1),
    "white label burnt into a corner": labelled,
    "white border 10% with noise (sd 8)": rough_border(0.1, "noise"),
    "white border 10% with a lead marker": rough_border(0.1, "marker"),
    "white border 10% fading along the edges": rough_border(0.1, "gradient"),
}


def measure(model_dir: Path, abnormal_dir: Path, train: Path, framings: dict[str, Framing] = FRAMINGS) -> list[Row]:
    """Rows (framing, normals' mean z, share of normals flagged, AUC against the pneumonias): the
    unchanged films first, then each of `framings` (benchmarks/borders.py passes its own)."""
    scores, threshold = scorer(model_dir)
    policy = reading(model_dir)

    def read(folder: Path) -> np.ndarray:
        return load_images([str(folder)], policy, workers=2, progress=False, quiet=True)[0]

    pneumonia = scores(read(abnormal_dir))
    films = [np.asarray(Image.open(path).convert("L")) for path in split_paths(model_dir, train, "calibration")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, framing) in enumerate({"unchanged": lambda film: film, **framings}.items()):
            folder = Path(scratch) / str(index)
            folder.mkdir()
            for number, film in enumerate(films):
                Image.fromarray(framing(film)).save(folder / f"{number:04d}.png")
            rows.append(summary(name, scores(read(folder)), pneumonia, threshold))
    return rows


def main() -> None:
    args = arguments(__doc__)
    for model_dir in args.models:
        rows = measure(model_dir, args.val_abnormal, args.train)
        print_table(f"{model_dir}: calibration normals framed otherwise (the whole film, before preprocessing)",
                    "framing", rows)
        worst = max(rows[1:], key=lambda r: r[2])
        print(f"most flagged: {worst[0]} ({worst[2]:.0%})")


if __name__ == "__main__":
    main()
