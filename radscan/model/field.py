"""The field the model sees: the whole film, or the thorax of the site's mean normal film.

Why a thorax field (score field "thorax", docs/model.md "The thorax field"): on validation, the
feature density of the whole film ranked the children's pneumonias by the film's periphery
(collimation, arms, positioning, the detector's edge: regions outside the thorax alone 0.947, inside
0.802), an acquisition signal of the same kind as the critic's sharpness, and one that does not
travel to another site. With the thorax field everything outside the thorax of the training normals'
mean film is set to mid grey before any network sees the film, in training and in scoring alike, so
nothing outside the chest can raise a score and the map has no mass outside the body.

The field is found once per model (from the training normals' mean film, stored with the weights
and sealed with them), not per film: a film framed differently from the site's mean shows a little
more or less of its chest through the same window, which the density's fit on framed copies of every
training normal covers (radscan.model.density.framing_copies). A thorax box may follow each film's
chest (model setting `follow`; radscan.preprocess.chest_offset): it is then moved, not reshaped.

Why a thorax box (field "thorax-box", docs/research-log.md 2026-12-03 "The thorax's bounding box"):
the grey fill of the thorax field still carries each film's global grey statistics into every
region, and at 128 px for the whole film the lungs get few pixels. Cut to the thorax's bounding box
at the film's own resolution, the chest fills the model's input (1.4x the pixels of a 224 px film,
2.4x of a 512 px one), the film's edge, arms and collimation fall away, and on validation the
children's lung fields alone ranked their pneumonias at 0.95 (whole film: 0.86). The density is
then averaged over the lung fields of the box (`lungs_in_box`), so the score and its map rest on
the lungs.

Shapes: mean film (H, W) float grey 0..255; masks (H, W) bool; a box is (left, top, right, bottom)
fractions of the film (radscan.preprocess.Crop).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from radscan.errors import ModelError
from radscan.preprocess import FOLLOW_MATCHER, FOLLOW_SIZE, Crop, FollowReference, crop_pixels
from radscan.report import remove_stale_temporaries, write_bytes

__all__ = ["lung_fields", "thorax_field", "thorax_box", "lungs_in_box", "FOLLOW_FILE", "save_follow", "load_follow",
           "read_reference_film"]

# The reference film of a box that follows the chest (model setting `follow`; radscan.preprocess
# `chest_offset`), beside the weights and verified by the sha256 model.json gives it: it moves every
# box, so it changes results, and it is sealed in the weights (radscan.model.metadata.sealed_extras)
FOLLOW_FILE = "follow.safetensors"

# The lung fields' share of the mean film that is plausible for a frontal chest film at 128 px (the
# Kermany paediatric and NIH adult means: 19% and 16%); outside it, the normals are not frontal chest
# films framed alike and no common field exists.
LUNG_SHARE = (0.05, 0.40)
# Closing joins the two lung fields over the mediastinum (pixels at 128 px); the margin keeps the
# costophrenic angles and the lung edges of films framed a little differently (chosen on validation,
# NIH adults: margins 0 and 4 gave 0.745 and 0.704 with the shipped weights, grey fill;
# docs/research-log.md, 2026-12-03 "The thorax field").
CLOSING_PX, MARGIN_PX = 20, 4
# The lung mask of a thorax-box model (what the density averages and the map is drawn on) leaves out
# the patches a lung field reaches through a narrow neck (at 128 px, under 2 x NECK_PX + 1 pixels): on
# the Kermany mean film the left field ran through one into a patch below the heart, which the map
# drew as a bow-tie (docs/research-log.md, 2026-12-04 night). The box keeps them: it errs large.
NECK_PX = 4
PATCH_SHARE = 0.25  # a patch is smaller than this share of the smaller lung's core (the Kermany one: 7%)


def lung_fields(mean_film: np.ndarray) -> np.ndarray:
    """(H, W) grey 0..255 mean normal film -> (H, W) bool: its two largest regions darker than
    their surroundings (fine-scale minus coarse-scale Gaussian, sigma 2 and 12 px, by more than
    2 grey levels) that do not touch the border. On a frontal chest film these are the lung fields.

    Raises ValueError when the result is not plausible for a frontal chest film (fewer than two
    regions, or a share of the film outside LUNG_SHARE)."""
    film = np.asarray(mean_film, dtype=np.float64)
    fine, coarse = ndimage.gaussian_filter(film, 2), ndimage.gaussian_filter(film, 12)
    labels, count = ndimage.label(fine < coarse - 2)
    border = set(np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
    sizes = sorted((int((labels == i).sum()), i) for i in range(1, count + 1) if i not in border)
    lungs = np.isin(labels, [i for _, i in sizes[-2:]])
    share = float(lungs.mean())
    if len(sizes) < 2 or not LUNG_SHARE[0] <= share <= LUNG_SHARE[1]:
        raise ValueError(f"the mean of the training normals shows no lung fields ({len(sizes)} dark regions away "
                         f"from the edge, covering {share:.0%} of the film where lungs cover "
                         f"{LUNG_SHARE[0]:.0%}-{LUNG_SHARE[1]:.0%}): are they frontal chest films framed alike?")
    return lungs


def _without_necked_patches(fields: np.ndarray) -> np.ndarray:
    """(H, W) bool lung fields -> the same without the small patches that hang on them by a neck
    narrower than 2 x NECK_PX + 1 pixels (and longer than 2 x NECK_PX). An opening of NECK_PX cuts
    such necks; a core it leaves beside the two largest, and under PATCH_SHARE of the smaller of
    them, is such a patch: its pixels
    (within NECK_PX of its core, and not within NECK_PX of a lung's core) are removed, with what no
    longer joins a lung. Everything else (outlines, apices, angles, a lung the opening splits in
    two) is kept as it was."""
    cores, count = ndimage.label(ndimage.binary_opening(fields, iterations=NECK_PX))
    if count < 3:  # no core beside the two lungs': nothing hangs on them
        return fields
    sizes = sorted((int((cores == i).sum()), i) for i in range(1, count + 1))
    lungs = np.isin(cores, [i for _, i in sizes[-2:]])
    patches = np.isin(cores, [i for size, i in sizes[:-2] if size < PATCH_SHARE * sizes[-2][0]])
    if not patches.any():
        return fields
    kept = fields & ~(ndimage.binary_dilation(patches, iterations=NECK_PX)
                      & ~ndimage.binary_dilation(lungs, iterations=NECK_PX))
    parts, _ = ndimage.label(kept)
    return np.isin(parts, np.unique(parts[lungs & kept])) & (parts > 0)


def thorax_field(mean_film: np.ndarray) -> np.ndarray:
    """(H, W) grey 0..255 mean normal film -> (H, W) bool: the lung fields joined over the
    mediastinum (binary closing, CLOSING_PX) and widened by MARGIN_PX. Raises ValueError as
    `lung_fields` does."""
    thorax = ndimage.binary_closing(lung_fields(mean_film), iterations=CLOSING_PX)
    return ndimage.binary_dilation(thorax, iterations=MARGIN_PX)


def thorax_box(mean_film: np.ndarray) -> Crop:
    """(H, W) grey 0..255 mean normal film -> the bounding box of its thorax field (`thorax_field`)
    as fractions (left, top, right, bottom), rounded to 1/1000. Raises ValueError as `lung_fields`."""
    rows, columns = np.nonzero(thorax_field(mean_film))
    height, width = mean_film.shape
    return (round(columns.min() / width, 3), round(rows.min() / height, 3),
            round((columns.max() + 1) / width, 3), round((rows.max() + 1) / height, 3))


def lungs_in_box(mean_film: np.ndarray, box: Crop, size: int) -> np.ndarray:
    """The lung fields of the (H, W) mean normal film (`lung_fields`, without the patches they reach
    through a narrow neck; the box and the thorax field keep them) as seen in the model's input:
    cut to `box` and resized to (size, size) bool (bilinear, half-covered pixels in). They are found on
    the whole film: inside the box the lungs touch its edge, and `lung_fields` counts regions that
    touch the border out. Raises ValueError as `lung_fields`."""
    lungs = Image.fromarray(_without_necked_patches(lung_fields(mean_film)).astype(np.float32))
    cut = lungs.crop(crop_pixels(box, *mean_film.shape)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(cut) >= 0.5


def save_follow(reference: FollowReference, directory: Path) -> dict[str, Any]:
    """Write FOLLOW_FILE atomically and fsynced, naming the matcher it is for (FOLLOW_MATCHER); returns
    the block model.json records for it ({"file", "sha256"}). Raises OutputError (exit 73) when it cannot be written."""
    from safetensors.numpy import save

    data = save({"reference": reference.image}, metadata={"matcher": FOLLOW_MATCHER})
    remove_stale_temporaries(Path(directory), FOLLOW_FILE)  # a killed save's
    write_bytes(Path(directory) / FOLLOW_FILE, data)
    return {"file": FOLLOW_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def load_follow(directory: Path, metadata: dict[str, Any]) -> FollowReference | None:
    """The verified reference film of a model whose box follows the chest (model setting `follow`), or
    None for any other model. Reading films (radscan.policy.for_model) and verifying a model without
    reading any (info, export: a trial found them passing a model whose reference film was missing)
    both call it. Raises ModelError (exit 65) when model.json names none, or the file is missing,
    altered, made for another matcher than FOLLOW_MATCHER or not a (64, 64) finite reference."""
    found = read_reference_film(directory, metadata)
    if found is None:
        return None
    reference, matcher = found
    if matcher != FOLLOW_MATCHER:
        raise ModelError("the model's box follows the chest by an earlier, unreleased way of matching films (a "
                         "border over the film's edges could move its box off the chest), which this radscan "
                         "does not read: retrain the model")
    return reference


def read_reference_film(directory: Path, metadata: dict[str, Any]) -> tuple[FollowReference, str] | None:
    """`load_follow` less its matcher check: the verified (64, 64) float32 reference film and the name
    of the matcher it was made for ("" when it names none), or None for a model with a fixed box. A
    model made with an earlier matcher is refitted from it (benchmarks/add_density.py). Raises
    ModelError as load_follow does for a missing, altered or malformed file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from radscan.model.metadata import header_metadata, read_verified

    if not (metadata.get("config") or {}).get("follow"):
        return None
    block = metadata.get("follow")
    if not isinstance(block, dict):
        raise ModelError("the model's box follows the chest, but model.json names no reference film for it "
                         f"({FOLLOW_FILE}): the file was edited; restore it")
    data = read_verified(directory, block, FOLLOW_FILE, "reference film")
    try:
        image = load(data)["reference"]
    except (KeyError, SafetensorError) as exc:
        raise ModelError(f"cannot read the reference film {Path(directory) / FOLLOW_FILE}: {exc}") from None
    if image.shape != (FOLLOW_SIZE, FOLLOW_SIZE) or image.dtype != np.float32 or not np.isfinite(image).all():
        raise ModelError(f"the reference film {Path(directory) / FOLLOW_FILE} is not a finite "
                         f"{FOLLOW_SIZE}x{FOLLOW_SIZE} float32 image")
    # the file's sha256 is sealed in the weights, so its matcher name is too
    matcher = str(header_metadata(data).get("matcher", ""))
    return FollowReference(image, hashlib.sha256(image.tobytes()).hexdigest()), matcher

