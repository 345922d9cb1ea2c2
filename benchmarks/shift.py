"""Robustness to the acquisition, on validation data only: how far held-out changes of how a normal
film was acquired or processed move the calibrated score, and what they do to the ranking.

Each change is applied to the model's own calibration normals (held out from training, listed in
`training_split.csv`) after preprocessing; the 400 validation pneumonias of
kermany_pediatric_224/val_abnormal stay as they are. A normal film from another detector, another
resizing or another processing chain should not look abnormal, so a robust score keeps, under every
change, the normals' mean z near 0, the share flagged at the stored threshold near the target
(5% at specificity 0.95) and the AUC against the pneumonias near the unchanged one. Several of the
changes (resolution, sharpening, zoom, rotation, JPEG, the field's height and the diaphragm's
level) are not in the training augmentation; the official test split is never read. `--train`
and `--val-abnormal` measure a model of another population (e.g. one trained on nih_adult_512).

    python benchmarks/shift.py models/kermany-tiny [OTHER_MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import io
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from sklearn.metrics import roc_auc_score
from splits import DATA, split_paths

from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.metadata import read_metadata
from radscan.model.runtime import score_arrays
from radscan.policy import Policy, for_model

Change = Callable[[np.ndarray], np.ndarray]  # (N, 128, 128) uint8 -> same


def each_image(change: Callable[[Image.Image], Image.Image]) -> Change:
    return lambda images: np.stack([np.asarray(change(Image.fromarray(image)).convert("L")) for image in images])


def jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def recompress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))
    return recompress


def zoom(factor: float) -> Callable[[Image.Image], Image.Image]:
    """> 1: a tighter field of view (centre crop); < 1: a wider one (black border)."""
    def rescale(image: Image.Image) -> Image.Image:
        side = image.width
        scaled = image.resize((round(side * factor),) * 2, Image.BILINEAR)
        offset = abs(scaled.width - side) // 2
        if factor >= 1:
            return scaled.crop((offset, offset, offset + side, offset + side))
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(scaled, (offset, offset))
        return canvas
    return rescale


def vertical(factor: float, anchor: str = "centre") -> Callable[[Image.Image], Image.Image]:
    """The field's height changed, the width kept: > 1 a shorter field (the film stretched, rows
    cropped), < 1 a taller one (black rows added). `anchor` "top" keeps the apices where they are
    and moves the diaphragm down (deeper inspiration, or a field that reaches lower)."""
    def restretch(image: Image.Image) -> Image.Image:
        side = image.height
        scaled = image.resize((image.width, round(side * factor)), Image.BILINEAR)
        offset = 0 if anchor == "top" else abs(scaled.height - side) // 2
        if factor >= 1:
            return scaled.crop((0, offset, image.width, offset + side))
        canvas = Image.new("L", image.size, 0)
        canvas.paste(scaled, (0, offset))
        return canvas
    return restretch


def collimated(margin: float) -> Change:
    """Each side masked over a depth drawn in [0, margin) of the size, in black, white or a grey,
    one fill per film (seeded): an electronic shutter, unexposed film, a processing mask."""
    def mask(images: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(7)
        out = images.copy()
        side = images.shape[1]
        for film in out:
            top, bottom, left, right = (rng.uniform(0, margin, 4) * side).astype(int)
            fill = rng.choice([0, 255, int(rng.integers(0, 256))])
            film[:top] = fill
            film[side - bottom:] = fill
            film[:, :left] = fill
            film[:, side - right:] = fill
        return out
    return mask


def gamma(power: float) -> Change:
    return lambda images: np.round(255 * (images / 255.0) ** power).astype(np.uint8)


def noise(sd: float) -> Change:
    rng = np.random.default_rng(0)
    return lambda images: np.clip(images + rng.normal(0, sd, images.shape), 0, 255).astype(np.uint8)


CHANGES: dict[str, Change] = {
    "half resolution (down 2x, up again)": each_image(
        lambda im: im.resize((im.width // 2,) * 2, Image.BILINEAR).resize(im.size, Image.BILINEAR)),
    "softer (Gaussian blur 1.5 px)": each_image(lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
    "sharper (unsharp mask 2 px, 100%)": each_image(lambda im: im.filter(ImageFilter.UnsharpMask(2, 100, 0))),
    "JPEG quality 20": each_image(jpeg(20)),
    "histogram equalised": each_image(ImageOps.equalize),
    "gamma 0.6 (brighter)": gamma(0.6),
    "gamma 1.6 (darker)": gamma(1.6),
    "noise sd 8 grey levels": noise(8),
    "field of view 15% tighter": each_image(zoom(1.15)),
    "field of view 15% wider": each_image(zoom(0.87)),
    "rotated 5 degrees": each_image(lambda im: im.rotate(5, resample=Image.BILINEAR)),
    # framing (issue 20): the field's height, and the diaphragm's level
    "field 10% taller": each_image(vertical(0.9)),
    "field 10% shorter": each_image(vertical(1.1)),
    "diaphragm 8% lower (apices kept)": each_image(vertical(1.08, anchor="top")),
    "collimated (up to 15% a side masked)": collimated(0.15),
}


def split_films(model_dir: Path, train: Path, split: str) -> np.ndarray:
    """(N, 128, 128) uint8: the model's training normals of one split of its training_split.csv
    ("train" or "calibration"), found under `train` and read as the model reads films."""
    paths = [str(path) for path in split_paths(model_dir, train, split)]
    return load_images(paths, reading(model_dir), workers=2, progress=False)[0]


def calibration_normals(model_dir: Path, train: Path) -> np.ndarray:
    return split_films(model_dir, train, "calibration")


def reading(model_dir: Path) -> Policy:
    """How the model reads films (a thorax-box model: cut to its box)."""
    return for_model(Policy(), read_metadata(model_dir), model_dir)


Row = tuple[str, float, float, float]  # (change, normals' mean z, share of normals flagged, AUC)


def scorer(model_dir: Path) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """The model's score of (N, 128, 128) uint8 inputs, (N,) float64 in (0, 1), and its threshold."""
    model, _ = load_model(model_dir)
    model.eval()

    def scores(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return score_arrays(model, images, components=False).scores.double().numpy()
    return scores, float(model.threshold)


def summary(name: str, normals: np.ndarray, pneumonia: np.ndarray, threshold: float) -> Row:
    """A row from the changed normals' scores and the pneumonias' (both (N,) in (0, 1))."""
    p = np.clip(normals, 1e-12, 1 - 1e-12)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(pneumonia))]
    return (name, float(np.log(p / (1 - p)).mean()), float((normals >= threshold).mean()),
            float(roc_auc_score(labels, np.r_[normals, pneumonia])))


def measure(model_dir: Path, abnormal_dir: Path, train: Path) -> list[Row]:
    """Rows for the normals unchanged, then under each change."""
    scores, threshold = scorer(model_dir)
    abnormal = load_images([str(abnormal_dir)], reading(model_dir), workers=2, progress=False)[0]
    normals, pneumonia = calibration_normals(model_dir, train), scores(abnormal)
    return [summary(name, scores(change(normals)), pneumonia, threshold)
            for name, change in {"unchanged": lambda images: images, **CHANGES}.items()]


def arguments(doc: str) -> argparse.Namespace:
    """The command line both robustness benchmarks take: models, --train, --val-abnormal."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--train", type=Path, default=DATA / "train_normal")
    parser.add_argument("--val-abnormal", type=Path, default=DATA / "val_abnormal")
    return parser.parse_args()


def print_table(title: str, kind: str, rows: list[Row]) -> None:
    """A markdown table of `measure`'s rows (the first unchanged), with the mean over the changes."""
    print(f"\n{title}")
    print(f"| {kind} | normals' mean z | normals flagged | AUC |")
    print("|---|---|---|---|")
    for name, z, flagged, auc in rows:
        print(f"| {name} | {z:+.2f} | {flagged:.0%} | {auc:.3f} |")
    changed = rows[1:]
    print(f"| **mean over the {len(changed)} {kind}s** | {statistics.mean(r[1] for r in changed):+.2f} "
          f"| {statistics.mean(r[2] for r in changed):.0%} | {statistics.mean(r[3] for r in changed):.3f} |")


def main() -> None:
    args = arguments(__doc__)
    for model_dir in args.models:
        rows = measure(model_dir, args.val_abnormal, args.train)
        print_table(f"{model_dir}: calibration normals changed, validation pneumonias as they are", "change", rows)
        worst = min(rows[1:], key=lambda r: r[3])
        print(f"worst: {worst[0]} (AUC {worst[3]:.3f}, {worst[2]:.0%} flagged)")


if __name__ == "__main__":
    main()
