"""Borders that are not even, on validation data only: how far each moves the box of a model that
follows the chest (radscan.preprocess.chest_offset) off where the same film's box lies without it,
and, with --score, how many of the films it flags.

New users' trials found these kinds of border (research log, 2026-12-06): collimation or an unexposed
edge with noise, with a lead marker or a text label in it, two shutter blades of different tones, a
collimator set at a slant, stripes. Each is written over the whole film of each of the model's
calibration normals (held out from training, listed in `training_split.csv`), at the film's own
resolution, 8 bits. A box that follows the chest should stay where the unchanged film's box is: the
table counts the films whose box moved by 2/64 or more, and by 3/64 or more, of the film's width or
height (either way). Borders of 10% lie outside the model's box (which starts 13-16% in from the
film's edges); borders of 20% cover the lungs' edges inside it, so even a box that holds can score
them higher (say so, do not blame the matcher). The last column is the share that quality control
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from splits import DATA, split_paths

from radscan.model.field import read_reference_film
from radscan.model.metadata import read_metadata
from radscan.preprocess import FOLLOW_SIZE, chest_offset, to_qc_input
from radscan.qc import DEFAULT_VIEWS, quality_control
from radscan.records import ImageRecord

Framing = Callable[[np.ndarray], np.ndarray]  # (H, W) uint8 whole film -> the same, bordered
Paint = Callable[[int, int, np.random.Generator], np.ndarray]  # (h, w, rng) -> (h, w) float grey levels


def noisy(tone: float, sd: float) -> Paint:
    """An even tone with Gaussian noise of `sd` grey levels."""
    return lambda h, w, rng: tone + rng.normal(0.0, sd, (h, w))


def striped(tone: float, step: float, period: int, across: str) -> Paint:
    """`tone` with stripes `step` levels brighter, two pixels in every `period`, and noise of sd 2:
    along the rows ("rows": each row one tone) or the columns."""
    def paint(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        index = np.arange(h if across == "rows" else w) % period < 2
        lines = tone + step * index
        return np.broadcast_to(lines[:, None] if across == "rows" else lines[None, :], (h, w)) \
            + rng.normal(0.0, 2.0, (h, w))
    return paint


def bordered(depth: float, paint: Paint, marks: Callable[[np.ndarray, int, int], None] | None = None,
             tilt: float = 0.0) -> Framing:
    """Every edge written over to `depth` of the film's size with `paint`, then `marks` drawn into the
    border (it gets the painted (h, w) array and the border's depth in pixels, dy and dx); with `tilt`
    (degrees) the border's inner edge is a rectangle turned by that angle about the film's centre
    (a collimator set at a slant)."""
    def border(film: np.ndarray) -> np.ndarray:
        h, w = film.shape
        dy, dx = round(depth * h), round(depth * w)
        rng = np.random.default_rng(h * 7919 + w)
        canvas = np.clip(paint(h, w, rng), 0, 255)
        if marks is not None:
            marks(canvas, dy, dx)
        y, x = np.mgrid[:h, :w].astype(np.float64)
        y, x = y - (h - 1) / 2, x - (w - 1) / 2
        turn = np.deg2rad(tilt)
        u, v = x * np.cos(turn) + y * np.sin(turn), -x * np.sin(turn) + y * np.cos(turn)
        inside = (np.abs(u) <= w / 2 - dx) & (np.abs(v) <= h / 2 - dy)
        return np.where(inside, film, canvas).round().astype(np.uint8)
    return border


def marker(where: str, tone: float = 235.0) -> Callable[[np.ndarray, int, int], None]:
    """A solid lead marker (tone) in the left ("l") or top ("t") border: 12% of the film's length
    along that edge, from a fifth to four fifths of the border's depth."""
    def draw(canvas: np.ndarray, dy: int, dx: int) -> None:
        h, w = canvas.shape
        if where == "l":
            canvas[round(0.25 * h):round(0.37 * h), dx // 5:dx * 4 // 5] = tone
        else:
            canvas[dy // 5:dy * 4 // 5, round(0.55 * w):round(0.67 * w)] = tone
    return draw


def text(words: str, tone: int) -> Callable[[np.ndarray, int, int], None]:
    """A burnt-in text label in the top border, as tall as half the border, from the left."""
    def draw(canvas: np.ndarray, dy: int, dx: int) -> None:
        image = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
        font = ImageFont.load_default(size=max(dy // 2, 6))
        ImageDraw.Draw(image).text((dx, dy // 4), words, fill=tone, font=font)
        canvas[:] = np.asarray(image)
    return draw


def two_tones(low: float, high: float, sd: float) -> Paint:
    """Shutter blades of two tones: the film's upper half `low`, its lower half `high` (each edge
    line of the left and right borders holds both)."""
    def paint(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        return np.where(np.arange(h)[:, None] < h // 2, low, high) + rng.normal(0.0, sd, (h, w))
    return paint


BORDERS: dict[str, Framing] = {
    "dark noisy 10% (sd 5)": bordered(0.10, noisy(25, 5)),
    "white noisy 10% with a text label": bordered(0.10, noisy(235, 5), text("AP SUPINE PORTABLE", 20)),
    "dark noisy 10% with a marker": bordered(0.10, noisy(25, 5), marker("l")),
    "dark noisy 20% (sd 5)": bordered(0.20, noisy(25, 5)),
    "dark noisy 20% with a marker": bordered(0.20, noisy(25, 5), marker("l")),
    "dark noisy 20% with two markers": bordered(
        0.20, noisy(25, 5), lambda canvas, dy, dx: (marker("l")(canvas, dy, dx), marker("t")(canvas, dy, dx))),
    "white noisy 20% with a text label": bordered(0.20, noisy(235, 5), text("AP SUPINE PORTABLE", 20)),
    "dark 15% at a slant of 4 degrees": bordered(0.15, noisy(20, 3), tilt=4.0),
    "dark 15% at a slant of 8 degrees": bordered(0.15, noisy(20, 3), tilt=8.0),
    "dark 15%, stripes of 20 levels along the edges": bordered(0.15, striped(30, 20, 6, "rows")),
    "dark 15%, stripes of 20 levels across the edges": bordered(0.15, striped(30, 20, 6, "columns")),
    "two shutter tones 25 levels apart, 15%": bordered(0.15, two_tones(30, 55, 3)),
}


def offsets(wholes: np.ndarray, model_dir: Path) -> np.ndarray:
    """(N, 2) int: each (128, 128) uint8 whole film's chest_offset in 1/FOLLOW_SIZE steps (dx, dy)."""
    found = read_reference_film(model_dir, read_metadata(model_dir))
    if found is None:
        raise SystemExit(f"{model_dir}: its box does not follow the chest; nothing to measure")
    return np.array([[round(v * FOLLOW_SIZE) for v in chest_offset(whole, found[0])] for whole in wholes])


def rejected(wholes: np.ndarray, model_dir: Path) -> float:
    """The share of (N, 128, 128) uint8 whole films that the model's quality control (strict, the
    default views) does not let through to be scored, as `radscan score` judges them."""
    qc = quality_control(model_dir, read_metadata(model_dir), "strict", DEFAULT_VIEWS)
    verdicts = qc.check([ImageRecord(path="", root="", kind="png") for _ in wholes], wholes)
    return float(np.mean([verdict.status == "fail" for verdict in verdicts]))


def moves(model_dir: Path, train: Path) -> list[tuple[str, float, float, float, float]]:
    """Rows (border, share of films moved >= 2/64, >= 3/64, mean move in 1/64 steps, share rejected
    by quality control), the unchanged films first."""
    films = [np.asarray(Image.open(path).convert("L")) for path in split_paths(model_dir, train, "calibration")]
    whole = np.stack([to_qc_input(film) for film in films])
    before = offsets(whole, model_dir)
    rows = [("unchanged", 0.0, 0.0, 0.0, rejected(whole, model_dir))]
    for name, framing in BORDERS.items():
        bordered = np.stack([to_qc_input(framing(film)) for film in films])
        step = np.abs(offsets(bordered, model_dir) - before).max(axis=1)
        rows.append((name, float((step >= 2).mean()), float((step >= 3).mean()), float(step.mean()),
                     rejected(bordered, model_dir)))
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
