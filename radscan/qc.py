"""Input quality control between preprocessing and the model: never score a film the model cannot judge.

Every usable image gets a verdict before it reaches the model:

* ``pass``: scored as usual;
* ``warn``: scored, with a reason that says why its score may not mean what it usually means
  (a patient outside the age range the model was trained on, a film that may be mirrored);
* ``fail``: not scored (status ``rejected``): a lateral or other non-frontal view, a blank or
  burnt-out image, a film that is upside down, turned, inverted, or not a chest radiograph.

Header checks use the DICOM attributes (ViewPosition, ImageType, PatientAge); JPEG and PNG files
carry none and are judged on the pixels alone. The image checks need no labels: they compare the
film with the training normals, which the model directory carries as a *QC reference*
(``qc.safetensors``): the mean and the leading principal components ("eigen-chests", Turk and
Pentland 1991) of the training normals at 16x16 (the central 12x12 of it), each image
standardised to zero mean and unit variance. A film's *distance* is its mean squared residual
outside that subspace (distance from feature space). An upright frontal chest is closer to the
subspace than any turned, mirrored or inverted copy of itself; a dental panoramic, a hand or a
photograph is far from it whichever way it is turned. Every limit is calibrated on the training
normals when the model is trained (`fit_reference`) and recorded in the reference (docs/quality-control.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radscan.errors import ModelError
from radscan.policy import names_the_chest
from radscan.preprocess import MODEL_SIZE, PADDING_CUT, film_content
from radscan.records import NO_FILM_DATE, VIEW_REJECTIONS, ImageRecord, Status, counted, visible_controls
from radscan.report import remove_stale_temporaries, write_bytes

__all__ = ["QC_FILE", "QC_MODES", "DEFAULT_VIEWS", "QCLimits", "QCReference", "QualityControl", "Verdict",
           "fit_reference", "save_reference", "load_reference", "features", "age_in_years",
           "quality_control",
           "apply_qc"]

log = logging.getLogger(__name__)

QC_FILE = "qc.safetensors"
QC_MODES = ("strict", "warn", "off")
DEFAULT_VIEWS = ("PA", "AP")
# The warnings quality control gives a film it lets through, each recognisable by its opening words
# (the DICOM results code them: radscan.dicomresults).
WARN_MIRRORED = "may be mirrored left to right"
WARN_AGE = "patient age"
WARN_COLOUR = "a colour image"
WARN_TRANSPARENT = "partly transparent"
# a film below the model's input side (radscan.preprocess.MODEL_SIZE) is enlarged, and carries less detail
# than any film the model learnt from (the shipped model flags every 64 px normal: a new user's trial)
WARN_SMALL = "smaller than the model's input"
# a chest off the training films' centre: the model reads every film where their chests lie (its box, its
# regions), and a normal film moved 10% sideways, or widened by a black strip on one side, scored like the
# worst pneumonia (z 7-11, a reader's trial; the density's framed copies cover moves up to 5%)
WARN_OFF_CENTRE = "the chest is off-centre"
# a model without a QC reference (trained on fewer than 50 usable normals): the image checks do not run,
# and a film they would have stopped read "pass" (a trial: inverted films scored 0.999 and listed first)
WARN_UNCHECKED = "not checked for orientation or for being a chest film"
UNCHECKED = (f"{WARN_UNCHECKED}: the model has no quality control reference (trained on fewer than 50 usable "
             "normals, or before radscan 0.2), so a film turned round, inverted or of another body part is scored "
             "as a chest film")
# the smallest side of a film worth judging: radscan reads films of 64 px (NIH's small copies) and up;
# a 2x2 or 16x16 image is an icon, a test pattern or a damaged file
MIN_SIDE = 32
# the longest side of a chest film over its shortest: detector formats run from 1:1 to 35 x 43 cm
# (1.23) and film screens to 1.5; three times longer than wide is a spine, long-leg or panoramic image,
# a strip or a damaged file, never a chest (squashed to the square model input it would look like one)
MAX_ASPECT = 3.0
# A film's texture spreads its pixels over many grey levels: in its 4 most common levels lie at most 28%
# of a Kermany film's, 46% of an NIH adult's (black borders) and of a DICOM chest with 45% padding
# (../shared/data); an image of a few flat tones (two-tone, quadrants, pure black and white) lies
# almost wholly in them
FLAT_TONES = 4
# Bumped whenever a rule changes what a film is judged (part of the fingerprint: a rerun judges every file
# again). 2: flat tone (was: the larger of pure black and pure white). 3: a film under MODEL_SIZE warns.
# 4: a failed film scored anyway (--qc warn) carries the warnings too; colour and transparency warn.
# 5: the age check reads the birth and study dates too, and an unreadable PatientAge warns.
# 6: a chest off the training films' centre warns. 7: the contrast is the film's content's, its border
# left out (a washed-out film inside a black border passed as contrasty: a trial). 8: a birth date after
# the film's date warns that the age cannot be read (such films passed as of unknown age: a trial).
QC_RULES = 8
FEATURE_SIDE = 16  # the film at 16x16: its layout, not its texture (robust to sharpness and noise)
# only the central 12x12 of it is compared: a collimation border or letterbox of up to 12.5% of the
# width (white or black) then does not make a chest look like something else
BORDER = 2
CENTRE = FEATURE_SIDE - 2 * BORDER
# principal components kept; chosen on validation chest films and non-chest images (docs/quality-control.md)
COMPONENTS = 25
MIN_REFERENCE = 50  # training normals a QC reference needs (its limits are cross-validated on them)
# share of a site's normals, least like their median film, that the screening for films the wrong
# way round does not fit its subspace on (`wrong_way_round`): a few bad films among them cannot hide
ATYPICAL_SHARE = 0.2
# standardised 12x12 thumbnails closer than this (root mean square, in standard deviations) are
# copies of one film (`_copy_groups`)
COPY_RMS = 0.12
FOLDS = 10  # cross-validation folds for the held-out distances the limits are calibrated on
# a normal a site trains on is set aside as unlike the others (`unlike_the_others`) beyond this many
# times the normals' median held-out distance: the tightest non-chest limit a reference can have
# (3 x its floor of 3 x the median, `_tail`). Real normals reach 7.3x (Kermany, 1,200 films) and
# 8.1x (NIH adults, 400); a noise image 20-32x, a CT slice 10-15x among 60-120 normals.
UNLIKE_FACTOR = 9.0
# a turned copy must fit at least this many times better than a film as it is before the film is
# failed as turned (or warned as mirrored); chosen on validation films (docs/quality-control.md)
MIN_CLARITY = 1.5
# ... and at most this many times: a few dozen normals put their 1st percentile near their clearest
# film, and turned films of another acquisition then passed (issue 22); chosen on validation films
MAX_CLARITY = 1.75
# Moves of the whole film, in pixels of the 128 px input (x, y), that may bring an off-centre chest to where
# the training normals' chests lie; a film warns when its best moved copy is closer to the eigen-chest
# subspace than OFF_CENTRE_MARGIN times the film as it is. Chosen on validation films (docs/quality-control.md):
# with the shipped model 0 of 180 calibration normals and 3 of 400 validation pneumonias warn, and 83% of
# those normals moved 10% sideways, 68% widened by an 18% black strip (NIH adults, their model: 1 of 61,
# 4 of 320, 39-48%, 33%)
_RECENTRING = tuple((dx, 0) for dx in (-16, -12, -8, 8, 12, 16)) + tuple((0, dy) for dy in (-12, -8, 8, 12))
OFF_CENTRE_MARGIN = 0.4
_LATERAL = {"LL", "RL", "LAT", "LATERAL"}
_DECUBITUS = {"LLD", "RLD"}
# ViewPosition defined terms for radiographs (PS3.3 C.8.11.7) and common variants: --views is checked
# against them, so that a typo does not silently reject every film
KNOWN_VIEWS = {"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LAT", "LATERAL"}


@dataclass(frozen=True)
class QCLimits:
    """The QC limits of a model, calibrated on its training normals (see `fit_reference`).

    Attributes
    ----------
    min_contrast : grey levels (0..255) between the 1st and 99th percentile of the 128x128 input's content
        below which a film is blank or washed out (half the lowest of the training normals)
    max_extreme : share of pixels in the image's FLAT_TONES most common grey levels above which it
        is flat tone, not a radiograph: burnt out, blank, mostly border (pure black or white, or one
        grey) or a drawing of a few tones (twice the 99.5th percentile of the training normals, at
        least 0.5). References fitted before QC_RULES 2 hold the same limit of the larger of the
        pure black and pure white shares, read as the flat-tone limit (on the shared real films the
        largest shares are 0.46 and 0.45, and the shipped model's limit is the 0.5 floor)
    max_plane_share : share of a film's 12x12 layout (variance) that a tilted plane explains, above
        which it is a grey ramp with no anatomy (a tenth of the smallest unexplained share among
        the training normals is left)
    max_distance : distance from the eigen-chest subspace above which an image is not a frontal
        chest radiograph: 3x the 99th percentile of the training normals' held-out distances (at
        least 9x their median; `_tail`)
    orientation_margin : a film fails when a turned, flipped or inverted copy of it is closer to the
        subspace than this fraction of its own distance: 1 / `_clarity` of the training normals'
        held-out (copy / as is) ratios
    mirror_margin : the same for a left-right mirror, which changes a chest less (the heart and
        aortic knob); only a warning, because a mirrored film is still a chest film

    The distance and orientation limits come from distances of each training normal to a subspace
    fitted without it (`_held_out_distances`), so that they hold for films the model has not seen.
    """

    min_contrast: float
    max_extreme: float
    max_plane_share: float
    max_distance: float
    orientation_margin: float
    mirror_margin: float


@dataclass(frozen=True)
class QCReference:
    """The eigen-chest subspace of a model's training normals and the limits calibrated on them.

    mean : (144,) float32, the mean standardised thumbnail (central 12x12 of 16x16) of the training
        normals, flattened
    basis : (COMPONENTS, 144) float32, orthonormal rows (leading principal components)
    """

    mean: np.ndarray
    basis: np.ndarray
    limits: QCLimits
    n_reference: int

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        """(N, 144) standardised features -> (N,) mean squared residual outside the subspace."""
        centred = vectors - self.mean
        residual = centred - (centred @ self.basis.T) @ self.basis
        return np.mean(residual**2, axis=1)


@dataclass(frozen=True)
class Verdict:
    status: str  # pass / warn / fail, or "" when not checked (--qc off)
    reason: str = ""


def features(images: np.ndarray) -> np.ndarray:
    """(N, 128, 128) uint8 model inputs -> (N, 144) float64: each film averaged down to 16x16, its
    central 12x12 kept, standardised (zero mean, unit variance) so that exposure and contrast do
    not matter."""
    return _standardised(_thumbnails(images))


def _thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, S, S) -> (N, 12, 12): the central 12x12 of the 16x16 block means (S a multiple of 16)."""
    images = np.asarray(images)
    n, side = images.shape[0], images.shape[-1]
    step = side // FEATURE_SIDE
    sums = images.reshape(n, FEATURE_SIDE, step, FEATURE_SIDE, step).sum(axis=(2, 4), dtype=np.uint32)
    return sums[:, BORDER:FEATURE_SIDE - BORDER, BORDER:FEATURE_SIDE - BORDER] / float(step * step)


def _standardised(thumbnails: np.ndarray) -> np.ndarray:
    flat = thumbnails.reshape(thumbnails.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(flat.std(axis=1, keepdims=True), 1e-6)


# Ways a film arrives wrong, as the transform that brings it back upright, with what to call it.
# np.rot90 turns anticlockwise: a film that fits once turned anticlockwise was turned clockwise.
_UPRIGHTING: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "rot90": (lambda x: np.rot90(x, 1, axes=(1, 2)), "turned 90 degrees clockwise"),
    "rot270": (lambda x: np.rot90(x, 3, axes=(1, 2)), "turned 90 degrees anticlockwise"),
    "rot180": (lambda x: np.rot90(x, 2, axes=(1, 2)), "upside down (turned 180 degrees)"),
    "flipud": (lambda x: x[:, ::-1, :], "mirrored top to bottom"),
    "transpose": (lambda x: x.transpose(0, 2, 1), "turned 90 degrees and mirrored"),
    "antitranspose": (lambda x: np.rot90(x, 1, axes=(1, 2))[:, ::-1, :], "turned 90 degrees and mirrored"),
}
_MIRROR = lambda x: x[:, :, ::-1]  # noqa: E731


def _orientation_distances(reference: QCReference, small: np.ndarray) -> dict[str, np.ndarray]:
    """Distance of each film as it is ("upright"), mirrored left-right, and after every uprighting
    transform, with and without inverted grey levels (a standardised film inverts by negation).
    Turning and mirroring commute with the block means and the central crop, so they act on the
    (N, 12, 12) thumbnails."""
    out: dict[str, np.ndarray] = {}
    for name, transform in {"upright": lambda x: x, "mirror": _MIRROR,
                            **{k: t for k, (t, _) in _UPRIGHTING.items()}}.items():
        vectors = _standardised(np.ascontiguousarray(transform(small)))
        out[name] = reference.distance(vectors)
        out["inverted" if name == "upright" else f"inverted {name}"] = reference.distance(-vectors)
    return out


def _moved(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(N, S, S) films moved dx pixels right and dy down, black where nothing moved in."""
    out = np.zeros_like(images)
    side = images.shape[-1]
    out[:, max(dy, 0):side + min(dy, 0), max(dx, 0):side + min(dx, 0)] = \
        images[:, max(-dy, 0):side + min(-dy, 0), max(-dx, 0):side + min(-dx, 0)]
    return out


def _off_centre(reference: QCReference, images: np.ndarray, upright: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 128, 128) uint8 films and their (N,) distances as they are -> (N,) the distance of each
    film's best moved copy (_RECENTRING) over its own, and (N, 2) that move (x, y) in pixels."""
    moved = np.stack([reference.distance(_standardised(_thumbnails(_moved(images, dx, dy))))
                      for dx, dy in _RECENTRING], axis=1)
    best = moved.argmin(axis=1)
    return moved[np.arange(len(images)), best] / np.maximum(upright, 1e-12), np.array(_RECENTRING)[best]


def _plane_share(small: np.ndarray) -> np.ndarray:
    """(N, 12, 12) thumbnails -> (N,) share of the variance of each that a plane a + b x + c y
    explains: 1 for a linear grey ramp, a few percent for a chest film."""
    rows, cols = np.mgrid[0:CENTRE, 0:CENTRE]
    design = np.stack([np.ones(rows.size), cols.ravel(), rows.ravel()], axis=1)
    flat = small.reshape(len(small), -1)
    fitted = design @ np.linalg.lstsq(design, flat.T, rcond=None)[0]
    total = ((flat - flat.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return 1 - ((flat - fitted.T) ** 2).sum(axis=1) / np.maximum(total, 1e-9)


def _grey_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 128, 128) uint8 -> (p1..p99 range in grey levels of each film's content, share of pixels in
    the FLAT_TONES most common grey levels of the whole film), from 256-bin histograms of every second
    pixel in each direction (a sort of every pixel would cost more than the rest of QC)."""
    n = images.shape[0]
    flat = images[:, ::2, ::2].reshape(n, -1)
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    histograms = np.bincount((flat + offsets).ravel(), minlength=256 * n).reshape(n, 256)
    # any few tones, not only black and white: images half black, half white, or of two or four greys,
    # passed as chests when the share counted pixels at 0 or 255 (new users' trials)
    extreme = np.sort(histograms, axis=1)[:, -FLAT_TONES:].sum(axis=1) / flat.shape[1]
    return np.array([_content_contrast(image) for image in images], dtype=np.float64), extreme


def _content_contrast(image: np.ndarray) -> int:
    """Grey levels between the 1st and 99th percentile of a (128, 128) uint8 film's content (its even
    border lines left out: radscan.preprocess.film_content), every second pixel each way. A black
    border of 10% around a washed-out film counted as contrast (a trial: 0 of 15 such films rejected
    against 9 of 15 without the border); left out, it does not (14 of 15). Unchanged for a film with
    no border (45% of the Kermany training normals); 0 of 1,530 real films of four sets newly fall
    under the shipped limit, and the training normals' lowest contrast moves from 151 to 150."""
    top, bottom, left, right = film_content(image)
    values = image[top:bottom, left:right][::2, ::2]
    cumulative = np.cumsum(np.bincount(values.ravel(), minlength=256)) / values.size
    # the first grey level with >= 1% of pixels at or below it, and with >= 99%
    return int((cumulative < 0.99).sum() - (cumulative < 0.01).sum())


def _subspace(vectors: np.ndarray) -> QCReference:
    """The eigen-chest subspace of (N, 144) standardised features, with placeholder limits."""
    mean = vectors.mean(axis=0)
    _, _, components = np.linalg.svd(vectors - mean, full_matrices=False)
    return QCReference(mean.astype(np.float32), components[:COMPONENTS].astype(np.float32),
                       QCLimits(0, 1, 1, np.inf, 0, 0), len(vectors))


def _held_out_distances(small: np.ndarray, fit_on: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(N, 12, 12) thumbnails of the training normals -> `_orientation_distances` of each film to
    a subspace fitted without it (FOLDS-fold cross-validation, copies of a film in one fold), and
    with `fit_on` ((N,) bool) on those films only.

    Why held out: a subspace fitted on N films fits those same films better than any film it has
    not seen, the more so the fewer they are (with 60 normals the in-sample distances are a fifth
    of a new normal's), and limits taken from them then reject unseen chests, diseased ones first
    (issue 22: 33 of 40 pneumonias rejected for a model trained on 60 normals)."""
    vectors = _standardised(small)
    fold = _folds(small)
    fit_on = np.ones(len(small), dtype=bool) if fit_on is None else fit_on
    out: dict[str, np.ndarray] = {}
    for k in range(FOLDS):
        held = fold == k
        for name, values in _orientation_distances(_subspace(vectors[~held & fit_on]), small[held]).items():
            out.setdefault(name, np.empty(len(small)))[held] = values
    return out


def _folds(small: np.ndarray) -> np.ndarray:
    """(N,) fold of each film: copies of one film (`_copy_groups`) share a fold. Why: a copy in the
    other folds fits like the film itself, and 30 films each copied twice made the held-out
    distances in-sample ones again (8% of unseen chests failed)."""
    return _copy_groups(small) % FOLDS


def _copy_groups(small: np.ndarray) -> np.ndarray:
    """(N, 12, 12) thumbnails -> (N,) group of each film, numbered in order of first appearance:
    films whose standardised thumbnails (brightness and contrast taken away) differ by less than
    COPY_RMS standard deviations (root mean square) share a group, and so, transitively, do their
    copies: one film under two names, re-encoded, or shown with another window, gamma or brightness.

    Why that distance: saved again as JPEG at quality 20-75 a film moves by at most 0.03, shown with
    gamma 0.8 or 1.25 by at most 0.09, with another window (clipped) 0.16 at most and 0.01 mostly,
    while the two closest distinct films of Kermany's 1,201 normals differ by 0.23 and of NIH's 400
    adults by 0.19 (two films of one patient). A film cropped by 2% differs like another film (up
    to 0.33): it is not found."""
    vectors = _standardised(small).astype(np.float64)
    squares = (vectors**2).sum(axis=1)
    parent = np.arange(len(small))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = index = parent[parent[index]]
        return index

    limit = COPY_RMS**2 * vectors.shape[1]
    for start in range(0, len(small), 1024):  # (1024, N) distances at a time: 10,000 films in 80 MB
        block = squares[start:start + 1024, None] + squares[None, :] - 2 * vectors[start:start + 1024] @ vectors.T
        for row, column in zip(*np.nonzero(block < limit), strict=True):
            low, high = sorted((root(start + int(row)), root(int(column))))
            parent[high] = low
    first: dict[int, int] = {}
    return np.array([first.setdefault(root(index), len(first)) for index in range(len(small))], dtype=np.int64)


def copy_groups(images: np.ndarray) -> np.ndarray:
    """(N, 128, 128) uint8 inputs -> (N,) int64 group of each: copies of one film (the same film
    under several names, as DICOM and JPEG, or re-encoded) share one, numbered in order of first
    appearance. radscan train keeps a group on one side of its calibration split."""
    return _copy_groups(_thumbnails(images)) if len(images) else np.zeros(0, dtype=np.int64)


def wrong_way_round(images: np.ndarray) -> list[str]:
    """(N, 128, 128) uint8 normals a site trains on -> per film "" or why it is set aside: it fits
    the eigen-chest subspace of the other typical normals (held out, as for the reference's limits)
    at least MAX_CLARITY times better turned or inverted than as it is, the tightest margin quality
    control applies when scoring. Typical: the 1 - ATYPICAL_SHARE of films most like the median
    film as they are (correlation of the standardised thumbnails), so that a few films the same
    wrong way cannot teach the subspace their way. Fewer than MIN_REFERENCE films: none is set aside
    (no reference is fitted either).

    Why: one inverted and one turned film among 60 normals put the 1st percentile of the normals'
    ratios at 0.001, the orientation margin with it, and every turned film then passed; one
    inverted film made the non-chest limit 4x wider; with every film in the subspace, four inverted
    films among 64 made each other look upright (two trials). Measured (`docs/quality-control.md`)
    on 24 draws of 50-99 real normals each with 0-6 turned, inverted, flipped or upside-down films:
    Kermany children 0 of 56 bad films missed, no upright film set aside; NIH adults 4 of 70 missed,
    7 of about 1,800 upright films set aside (unusual films: the reason says to check them); of the
    shared sets whole, none of Kermany's 1,201 and two of NIH's 400 (one really upside down)."""
    if len(images) < MIN_REFERENCE:
        return [""] * len(images)
    small = _thumbnails(images)
    typical = _typical(_standardised(small))
    found, _ = _best_turn(_held_out_distances(small, fit_on=typical))
    reasons = [""] * len(images)
    if found.any():
        # said from the typical normals alone, without the films found: a subspace that held another
        # wrong film matched a film turned 90 degrees as "inverted and turned"
        _, turns = _best_turn(_orientation_distances(_subspace(_standardised(small[typical & ~found])), small[found]))
        for index, name in zip(np.flatnonzero(found), turns, strict=True):
            reasons[index] = (f"wrong way round among the normals: it matches them only if taken to be "
                              f"{_describe(name)} (if it is upright, it is unlike the other normals: check it)")
    return reasons


def unlike_the_others(images: np.ndarray) -> list[str]:
    """(N, 128, 128) uint8 normals a site trains on (upright: after `wrong_way_round`) -> per film
    "" or why it is set aside: its distance from the eigen-chest subspace of the typical normals
    (held out, as for the reference's limits) is more than UNLIKE_FACTOR times the median, beyond
    the tightest non-chest limit a reference can set. Fewer than MIN_REFERENCE films: none.

    Why: one noise image among 60 normals was trained on as a normal and widened the reference's
    non-chest limit 3.6x (its 99th percentile is about the largest of 60 films): an extremity film
    and a CT slice then passed quality control (a trial). The median does not move with a few such
    films; no real normal of the shared sets is set aside."""
    if len(images) < MIN_REFERENCE:
        return [""] * len(images)
    small = _thumbnails(images)
    typical = _typical(_standardised(small))
    distances = _held_out_distances(small, fit_on=typical)["upright"]
    times = distances / max(float(np.median(distances)), 1e-12)  # the median `_tail`'s floor is made of
    return [f"unlike the other normals ({ratio:.0f}x their median distance from the eigen-chest): not a chest "
            "film, or a very unusual one (check it); not trained on" if ratio > UNLIKE_FACTOR else ""
            for ratio in times]


def _typical(vectors: np.ndarray) -> np.ndarray:
    """(N, 144) standardised thumbnails -> (N,) bool: the films whose correlation with the median
    film is above its ATYPICAL_SHARE quantile. A film the wrong way round correlates little or
    negatively with the median of mostly upright films."""
    median = np.median(vectors, axis=0)
    median = (median - median.mean()) / max(float(median.std()), 1e-9)
    likeness = (vectors * median).mean(axis=1)
    return likeness >= np.quantile(likeness, ATYPICAL_SHARE)


def _best_turn(distances: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """`_orientation_distances` -> (N,) whether a turned or inverted copy fits MAX_CLARITY times
    better than the film as it is, and (N,) the copy that fits best."""
    closest, names = _closest_turn(distances)
    return closest * MAX_CLARITY < distances["upright"], names


def _closest_turn(distances: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """`_orientation_distances` -> (N,) distance of each film's closest turned or inverted copy
    (mirrored left to right is not a turn: a warning, not a failure), and (N,) which copy that is."""
    names = [name for name in distances if name not in ("upright", "mirror")]
    stacked = np.stack([distances[name] for name in names])
    return stacked.min(axis=0), [names[index] for index in stacked.argmin(axis=0)]


def fit_reference(train: np.ndarray) -> QCReference:
    """Fit the eigen-chest subspace and every QC limit on (N, 128, 128) uint8 training normals
    (N >= MIN_REFERENCE). Raises ValueError for fewer.

    The subspace is fitted on all N films; the distance and orientation limits come from
    held-out distances (`_held_out_distances`), so that they describe films the subspace has not
    seen, whatever N is (docs/quality-control.md gives the curve against N)."""
    if len(train) < MIN_REFERENCE:
        raise ValueError(f"the QC reference needs at least {MIN_REFERENCE} training normals, got {len(train)}")
    small = _thumbnails(train)
    reference = _subspace(_standardised(small))
    held_out = _held_out_distances(small)
    upright = held_out["upright"]
    wrong = _closest_turn(held_out)[0]
    contrast, extreme = _grey_statistics(train)
    limits = QCLimits(
        min_contrast=float(contrast.min() / 2),
        max_extreme=float(max(0.5, 2 * np.percentile(extreme, 99.5))),
        max_plane_share=float(1 - (1 - _plane_share(small).max()) / 10),
        max_distance=3 * _tail(upright),
        orientation_margin=1 / min(_clarity(wrong / upright), MAX_CLARITY),
        mirror_margin=1 / _clarity(held_out["mirror"] / upright),
    )
    return QCReference(reference.mean, reference.basis, limits, len(train))


def _tail(distances: np.ndarray) -> float:
    """The 99th percentile of the training normals' held-out distances, or 3x their median when
    that is higher. Why the floor: the 99th percentile of 60 films is their second largest value,
    and one draw of 60 Kermany normals put it at 1.8x the median (3.1x for 1,000 films; NIH adults
    4x): its limit then failed 3% of unseen pneumonias. The median is stable from 50 films on."""
    return float(max(np.percentile(distances, 99), 3 * np.median(distances)))


def _clarity(ratios: np.ndarray) -> float:
    """How many times better a turned (or mirrored) copy must fit than a film as it is before the
    film is failed as turned (or warned as mirrored), from the training normals' held-out
    (copy / as is) distance ratios: a turned normal has the reciprocal ratio, so a clarity c fails
    the turned normals whose ratio exceeds c and the upright films whose ratio is below 1 / c.

    With p the ratios' 1st percentile, c = max(min(p, MAX_CLARITY), 1 / p, MIN_CLARITY): p when the
    normals are distinct (p > 1: a turned normal is still caught down to the 1st percentile, and an
    upright diseased film, less distinct than a normal, gets a wide margin), but no more than
    MAX_CLARITY, which fails no more validation chests and stops turned films less distinct than
    the training normals (another acquisition); 1 / p when they are not
    (p < 1, as for adults: 2% of NIH "no finding" adults fit some turned copy at least as well at
    12x12, and one of them really is upside down), so that no more than 1% of upright normals fail.
    The smallest ratio (0.2) would fail every film once one normal is stored the wrong way round.
    The orientation margin is bounded by MAX_CLARITY whatever p is (`fit_reference`): a few films
    the wrong way round among the normals (which radscan train sets aside: `wrong_way_round`) put p
    near 0.001, and 1 / p made the margin so wide that no turned film failed."""
    p = float(np.percentile(ratios, 1))
    return max(min(p, MAX_CLARITY), 1 / p, MIN_CLARITY)


def save_reference(reference: QCReference, directory: Path) -> dict[str, Any]:
    """Write ``qc.safetensors`` (tensors, with the limits sealed in its header) atomically and fsynced
    (radscan.report.write_bytes); returns the block that model.json records (file, sha256, limits) so
    that loading can verify it. Raises OutputError (exit 73) when it cannot be written (a full disk)."""
    from safetensors.numpy import save

    sealed = json.dumps({"limits": asdict(reference.limits), "n_reference": reference.n_reference}, sort_keys=True)
    data = save({"mean": reference.mean, "basis": reference.basis}, metadata={"radscan-qc": sealed})
    remove_stale_temporaries(Path(directory), QC_FILE)  # a killed save's
    write_bytes(Path(directory) / QC_FILE, data)
    return {"file": QC_FILE, "sha256": hashlib.sha256(data).hexdigest(), "n_reference": reference.n_reference,
            "limits": asdict(reference.limits)}


def load_reference(directory: Path, metadata: dict[str, Any]) -> QCReference | None:
    """The verified QC reference of a model directory, or None for a model made without one.
    Raises ModelError (exit 65) when the file is missing, altered, or disagrees with model.json."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from radscan.model.metadata import read_verified, sealed_settings

    block = metadata.get("qc")
    if block is None:
        return None
    path = Path(directory) / QC_FILE
    data = read_verified(directory, block, QC_FILE, "QC reference")
    try:
        tensors = load(data)
        sealed = sealed_settings(data, "radscan-qc")
        limits = QCLimits(**sealed["limits"])
        reference = QCReference(tensors["mean"], tensors["basis"], limits, int(sealed["n_reference"]))
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ModelError(f"cannot read the QC reference {path}: {exc}") from None
    if block.get("limits") != asdict(limits):
        raise ModelError("the QC limits in model.json differ from those sealed in qc.safetensors: the metadata "
                         "was edited; retrain or restore it")
    if reference.mean.shape != (CENTRE**2,) or reference.basis.shape[1:] != (CENTRE**2,):
        raise ModelError(f"the QC reference {path} has unexpected shapes")
    return reference


_AGE = re.compile(r"^\s*(\d{1,4})\s*([DWMY]|DAYS?|WEEKS?|MONTHS?|YEARS?)?\s*$", re.IGNORECASE)
_AGE_UNITS = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}


def age_in_years(text: str) -> float | None:
    """Patient Age -> years, or None if unreadable. The standard form is the Age String (PS3.5 6.2,
    VR AS: nnnD, nnnW, nnnM or nnnY); archives also hold "45", "45Y", "60 Y" or "45 years", read
    the same way (a bare number is years)."""
    match = _AGE.match(text or "")
    if not match:
        return None
    unit = (match.group(2) or "Y")[0].upper()
    return int(match.group(1)) / _AGE_UNITS[unit]


@dataclass
class QualityControl:
    """Verdicts for usable images (the record after preprocessing and its 128x128 input).

    mode : strict (failed images are not scored), warn (they are scored and keep qc_status fail)
        or off (no verdicts)
    views : allowed ViewPosition values (an absent or empty tag is accepted)
    reference : the model's QC reference, or None (image checks other than contrast are then off)
    age_range : (min, max) patient age in years of the training population, or None
    box_follows : the model's box follows the chest (radscan.preprocess.chest_offset): an off-centre
        chest is read where it lies, so it is not warned (WARN_OFF_CENTRE is for a box fixed in the film)
    say_unchecked : without a reference, warn on every film that its image was not checked (UNCHECKED):
        a scoring model's; training's own reference-free judging of its normals leaves it off
    """

    mode: str = "strict"
    views: tuple[str, ...] | None = DEFAULT_VIEWS
    reference: QCReference | None = None
    age_range: tuple[float, float] | None = None
    box_follows: bool = False
    say_unchecked: bool = False
    limits: QCLimits = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in QC_MODES:
            raise ValueError(f"QC mode must be one of {QC_MODES}, not {self.mode!r}")
        # without a reference, only the grey-level checks run, with limits that fail nothing real
        self.limits = self.reference.limits if self.reference else QCLimits(60.0, 0.5, 0.95, np.inf, 0.0, 0.0)

    @property
    def fingerprint(self) -> str:
        """What changes verdicts, for the run fingerprint (a changed setting re-judges every file)."""
        reference = "none" if self.reference is None else hashlib.sha256(
            self.reference.basis.tobytes() + json.dumps(asdict(self.limits)).encode()).hexdigest()[:16]
        return (f"qc={self.mode};rules={QC_RULES};views={self.views};ages={self.age_range};ref={reference}"
                + (";box follows" if self.box_follows else "") + (";unchecked said" if self.unchecked else ""))

    @property
    def unchecked(self) -> bool:
        """Whether every film's verdict says that its image was not checked (UNCHECKED)."""
        return self.say_unchecked and self.reference is None and self.mode != "off"

    def check(self, records: list[ImageRecord], images: np.ndarray) -> list[Verdict]:
        """Verdicts for a batch: (N,) records and (N, 128, 128) uint8 inputs."""
        if self.mode == "off" or len(records) == 0:
            return [Verdict("") for _ in records]  # not checked
        contrast, extreme = _grey_statistics(images)
        small = _thumbnails(images)
        plane = _plane_share(small)
        distances = _orientation_distances(self.reference, small) if self.reference else None
        closest = _closest_turn(distances) if distances else None
        recentring = (_off_centre(self.reference, images, distances["upright"])
                      if distances and not self.box_follows else None)
        verdicts = []
        for index, record in enumerate(records):
            problems = self._header_problems(record) or self._image_problems(index, contrast, extreme, plane[index],
                                                                             distances, closest)
            warnings = self._warnings(record, index, distances, recentring)
            if problems:
                problems[-1] += _body_part_said(record)
                # --qc warn scores it anyway: what makes its score not comparable is then said too; colour
                # or transparency may be why it failed (a false-colour film read as "inverted"): always said
                said = warnings if self.mode == "warn" else [w for w in warnings
                                                             if w.startswith((WARN_COLOUR, WARN_TRANSPARENT))]
                verdicts.append(Verdict("fail", "; ".join(problems + said)))
                continue
            verdicts.append(Verdict("warn", "; ".join(warnings)) if warnings else Verdict("pass"))
        return verdicts

    def _header_problems(self, record: ImageRecord) -> list[str]:
        problems = []
        rows, columns = record.film_size()  # a film padded into its image is judged without the padding
        if rows and columns:
            size = _size_said(record)
            short, long = sorted((rows, columns))
            if short < MIN_SIDE:
                # judged by its layout, a few pixels blown up to 128 px can look like a film turned round
                return [f"only {counted(short, 'pixel')} on its short side ({size}): too small "
                        f"to be a radiograph (at least {MIN_SIDE} pixels a side)"]
            if long > MAX_ASPECT * short:
                return [f"{size} pixels, its long side {long / short:.2f} times its short "
                        f"side: not the shape of a chest film (at most {MAX_ASPECT:g} to 1)"]
        view = record.ViewPosition.strip().upper()
        if view and self.views is not None and view not in self.views:
            lateral, decubitus, other, _ = VIEW_REJECTIONS
            kind = lateral if view in _LATERAL else decubitus if view in _DECUBITUS else other
            problems.append(f"{kind} (ViewPosition {view}); only {', '.join(self.views)} films are judged (--views)")
        image_type = {value.strip().upper() for value in record.ImageType.split("\\")}
        if image_type & {"LOCALIZER", "SCOUT"}:
            problems.append(f"{VIEW_REJECTIONS[3]} (ImageType), not a radiograph to judge")
        return problems

    def _image_problems(self, index: int, contrast: np.ndarray, extreme: np.ndarray, plane: float,
                        distances: dict[str, np.ndarray] | None,
                        closest: tuple[np.ndarray, list[str]] | None) -> list[str]:
        limits = self.limits
        if contrast[index] < limits.min_contrast:
            usual = ("training films have at least" if self.reference is not None else "chest films have about")
            return [f"nearly blank at the 128 px the model sees: only {contrast[index]:.0f} grey levels of contrast "
                    f"({usual} {2 * limits.min_contrast:.0f}); check the window or the file"]
        if extreme[index] > limits.max_extreme:
            return [f"{extreme[index]:.0%} of the image is flat tone (in its {FLAT_TONES} most common grey levels), "
                    "not a radiograph's texture: burnt out, blank, mostly border, or a drawing"]
        if plane > limits.max_plane_share:
            return [f"a smooth grey ramp with no anatomy ({plane:.0%} of its layout is a plane)"]
        if distances is None or closest is None:
            return []
        upright = distances["upright"][index]
        best, name = closest[0][index], closest[1][index]  # the closest turned or inverted copy
        if min(upright, best) > limits.max_distance:
            return ["does not look like a chest radiograph, whichever way it is turned (another body part, "
                    "a lateral view, a photograph, a damaged image, or a chest far smaller in its film "
                    "than the training normals'?)"]
        if best < limits.orientation_margin * upright:
            # a trial: an upright AP film of a sick adult, one lung white, failed as turned 90 degrees
            return [f"wrong way round, or not a chest film framed as the training normals are: it matches an "
                    f"upright frontal chest film only if it is taken to be {_describe(name)} (an upright film "
                    "with a lung made white by disease can look so: read the film)"]
        if upright > limits.max_distance:
            # trials: a small child drawn on 60% of a large dark film is stopped here (12 of 15), on
            # 50% of a grey one by the check above (15 of 15)
            return ["does not look like a frontal chest radiograph framed as the training normals are (its "
                    "layout is unlike every training film's: a chest much smaller or larger in its film, "
                    "another view, or not a chest)"]
        return []

    def _warnings(self, record: ImageRecord, index: int, distances: dict[str, np.ndarray] | None,
                  recentring: tuple[np.ndarray, np.ndarray] | None) -> list[str]:
        warnings = [UNCHECKED] if self.unchecked else []
        mirrored = distances is not None and \
            distances["mirror"][index] < self.limits.mirror_margin * distances["upright"][index]
        if mirrored:
            warnings.append(f"{WARN_MIRRORED} (heart on the right?): check the side marker")
        if recentring is not None and recentring[0][index] < OFF_CENTRE_MARGIN:
            dx, dy = recentring[1][index]  # the move that fits: the chest lies the other way
            where = (f"{abs(dx) / MODEL_SIZE:.0%} {'right' if dx < 0 else 'left'}" if dx else
                     f"{abs(dy) / MODEL_SIZE:.0%} {'low' if dy < 0 else 'high'}")
            warnings.append(f"{WARN_OFF_CENTRE} (about {where} of where the training films' chests lie, or the film "
                            "has a border on one side): the model reads every film where those chests lie, so its "
                            "score is not comparable, do not read a flag as a finding")
        rows, columns = record.film_size()
        if rows and columns and min(rows, columns) < MODEL_SIZE:
            warnings.append(f"{WARN_SMALL} ({_size_said(record)} pixels, the model reads {MODEL_SIZE}): "
                            "enlarged, with less detail than the films it learnt from; its score is not comparable, "
                            "do not read a flag as a finding")
        if "colour" in record.converted:
            warnings.append(f"{WARN_COLOUR}, shown as grey (a tinted or coloured film comes out darker or lighter "
                            "than a radiograph): its score is not comparable, do not read a flag as a finding")
        if "transparency" in record.converted:
            warnings.append(f"{WARN_TRANSPARENT}, shown over white as a viewer shows it (washed out where "
                            "translucent): its score is not comparable, do not read a flag as a finding")
        if self.age_range is not None:
            warnings.extend(self._population_warnings(record))
        return warnings

    def _population_warnings(self, record: ImageRecord) -> list[str]:
        """The age check against the model's training population: PatientAge, the age at the study,
        when it can be read; else the age the birth and study dates give (radscan.dicom.age_by_dates:
        PatientAge is Type 3 and often absent). PatientAge comes first because de-identification
        shifts or replaces dates (real files here: 52 years by PatientAge, 56 by shifted dates). An
        unreadable PatientAge with no dates to count is said too, and so are dates that put the birth
        after the film."""
        assert self.age_range is not None
        low, high = self.age_range
        said = age_in_years(record.PatientAge) if record.PatientAge else None
        age, source = (said, "") if said is not None else (record.age_by_dates, " (from its birth and study dates)")
        population = f"the model's training population ({low:g}-{high:g} years)"
        if age == NO_FILM_DATE:
            return [f"{WARN_AGE} cannot be read (a birth date, but no usable date of the film: StudyDate, "
                    f"SeriesDate, AcquisitionDate and ContentDate absent or not dates): whether the patient is in "
                    f"{population} is not known"]
        if age is not None and age < 0:  # only the dates can say so: PatientAge holds no sign
            return [f"{WARN_AGE} cannot be read (its birth date is after the film's date: a wrong or mixed-up "
                    f"header?): whether the patient is in {population} is not known"]
        # a child of "5 years" is 5.0 up to 5.99: the range's upper end covers that whole year
        if age is not None and not low <= age < high + 1:
            shown = f"{age:.1f}" if age < 2 and not source else f"{age:.0f}"  # dates give whole years
            return [f"{WARN_AGE} {shown} years{source} is outside {population}: its score is not comparable, do "
                    "not read a flag as a finding"]
        if record.PatientAge and age is None:
            return [f"{WARN_AGE} cannot be read (PatientAge '{visible_controls(record.PatientAge[:16])}', and no "
                    f"birth date): whether the patient is in {population} is not known"]
        return []


def _size_said(record: ImageRecord) -> str:
    """The film's size as read, "WxH", with "less its padding" where padding was cut."""
    rows, columns = record.film_size()
    return f"{columns}x{rows}" + (" less its padding" if PADDING_CUT in record.converted else "")


def _body_part_said(record: ImageRecord) -> str:
    """" (its header says BodyPartExamined HIP)" when the header names a body part that is not the
    chest (allowed through by --body-parts all): the reason then says what the film is, not only how
    it fails to look like a chest (a hip read as "wrong way round": a trial). Shown escaped, cut to the
    16 characters the value may have (a CS)."""
    part = record.BodyPartExamined.strip()
    if not part or names_the_chest(part):  # a multi-valued one too: CHEST\\HIP
        return ""
    return f" (its header says BodyPartExamined {visible_controls(part[:16])})"  # as the header holds it


def _describe(transform: str) -> str:
    inverted = transform.startswith("inverted")
    base = transform.removeprefix("inverted").strip()
    parts = ["inverted (bones dark, air bright)"] if inverted else []
    if base == "mirror":
        parts.append("mirrored left to right")
    elif base:
        parts.append(_UPRIGHTING[base][1])
    return " and ".join(parts)


def quality_control(model_dir: Path, metadata: dict[str, Any], mode: str,
                    views: tuple[str, ...] | None) -> QualityControl:
    """The QC step for a model: its verified QC reference and training population (ModelError, exit
    65, if the reference does not check out). A model made without a reference gets the header and
    contrast checks only, with a warning."""
    from radscan.model.metadata import check_sealed_extras, is_exported, read_sealed

    reference = None
    if mode != "off":
        if not is_exported(metadata):  # an export's graphs are checked as its engine loads, before any score
            check_sealed_extras(read_sealed(model_dir), metadata)
        reference = load_reference(model_dir, metadata)
        if reference is None:
            log.warning("model %s has no QC reference (qc.safetensors): wrong-way-round and non-chest images are not "
                        "caught. A model gets one when it is trained on at least 50 usable normals (those quality "
                        "control keeps) by radscan 0.2 or later: train it on more normals", model_dir)
    ages = (metadata.get("population") or {}).get("age_years")
    follows = bool((metadata.get("config") or {}).get("follow"))
    return QualityControl(mode, views, reference, tuple(ages) if ages else None, box_follows=follows,
                          say_unchecked=True)


def apply_qc(qc: QualityControl, records: list[ImageRecord], images: list[np.ndarray]) -> list[bool]:
    """Record each verdict on its record; under --qc strict a failed image becomes status `rejected`
    with the QC reason and is not scored (under --qc warn it is scored, and keeps qc_status fail).
    Returns, per image, whether it goes on to the model. A record's `qc_image` (the whole film of a
    thorax-box model's input) is judged instead of its image, and kept only on a rejected film's
    record (its picture shows what was judged)."""
    judged = [image if record.qc_image is None else record.qc_image
              for record, image in zip(records, images, strict=True)]
    verdicts = qc.check(records, np.stack(judged)) if records else []
    rejecting = qc.mode == "strict"
    for record, verdict in zip(records, verdicts, strict=True):
        record.qc_status, record.qc_reason = verdict.status, verdict.reason
        if rejecting and verdict.status == "fail":
            reject(record, verdict.reason)
        else:  # only a rejected film's picture shows it; training and evaluation hold every record
            record.qc_image = None
    return [not (rejecting and verdict.status == "fail") for verdict in verdicts]


def reject(record: ImageRecord, reason: str) -> None:
    """Mark a film quality control failed and set aside (status `rejected`, not scored)."""
    record.qc_status, record.qc_reason = "fail", reason
    record.status, record.reason = Status.REJECTED, f"not judged: {reason}"
