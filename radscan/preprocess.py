"""The last step of preprocessing, and the helpers the readers share: display-correct grey image
-> the model's 128x128 input.

Every path through radscan (scan previews, training, scoring, evaluation) ends in
`to_model_input`, so a model only ever sees images made by this code. The steps before it live in
the readers, which bring any file to a display-correct 8-bit grey image with the helpers below:
`radscan.dicom` (reading and decoding) and `radscan.display` (`display_grey`) for DICOM,
`radscan.raster` (`_to_grey`) for JPEG/PNG.

Notes
-----
Order of the grey pipeline (DICOM PS3.4 grayscale pipeline, then resampling), and where each step is:

1. stored values -> modality LUT (rescale slope/intercept or LUT sequence): radscan.display
   `_modality_values`
2. VOI LUT sequence, else the first window, else a robust percentile window (>8-bit data), else
   the full stored range (8-bit data such as JPEGs): radscan.display `display_grey` with
   `percentile_window` below
3. MONOCHROME1 inverted exactly once, so that air is dark in every output: `window_to_uint8` below
4. quantised to 8 bits at full resolution (the training images were 8-bit JPEGs): `window_to_uint8`;
   JPEG/PNG are 8-bit already (radscan.raster: colour to grey, transparency over white)
5. for a model whose field is the thorax's bounding box (field "thorax-box"), cut to that box,
   given as fractions of the film per model (radscan.model.field.thorax_box), at the film's own
   resolution, so that the chest gets every pixel the file has; for a model whose box follows the
   chest (setting `follow`), the box is first moved to where this film's chest lies (`chest_offset`),
   and, for a model made so (setting `trim_padding`), the film is first cut to its bounds less its
   padding where its chest matches better so (`film_bounds`, called by radscan.ingest)
6. resized to 128x128 with Pillow's antialiased bicubic filter, aspect ratio not kept: the SimSID
   reference and the Kermany 224 px training set both squash the whole film into a square
   (steps 5 and 6: `to_model_input`).

Bump `PREPROCESS_VERSION` whenever any step changes output pixels: model files record it and
refuse input made by another version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

__all__ = [
    "MODEL_SIZE",
    "PREPROCESS_VERSION",
    "PERCENTILE_WINDOW",
    "percentile_window",
    "luma",
    "subsample",
    "window_to_uint8",
    "to_model_input",
    "to_qc_input",
    "crop_pixels",
    "is_box",
    "Crop",
    "colour_notes",
    "FOLLOW_SIZE",
    "FOLLOW_REACH",
    "FOLLOW_WINDOW",
    "FollowReference",
    "follow_reference",
    "chest_offset",
    "film_content",
    "is_border_line",
    "PAD_REACH",
    "padding_bounds",
    "padding_note",
    "PADDING_CUT",
    "film_bounds",
    "chest_match",
]

MODEL_SIZE = 128
PREPROCESS_VERSION = "rs-pre-1"
# Robust window for data that carries none: ignores collimator edges, labels and burnt-in text.
PERCENTILE_WINDOW = (0.5, 99.5)
# A box as fractions of the film's width and height: (left, top, right, bottom), 0 <= left < right <= 1.
Crop = tuple[float, float, float, float]


# mean chroma (max - min of R, G, B) above which an image is coloured, in levels of 255: a grey film
# saved as colour JPEG has 1-2 from compression, a sepia or tinted film 20-40
COLOUR_CHROMA = 8.0
# ... or, in the middle of the film, more than MARK_SHARE of it strongly coloured (chroma above
# MARK_CHROMA): measurement lines or marks drawn in colour across the lungs
MARK_CHROMA = 48.0
MARK_SHARE = 0.005
# mean transparency (1 - alpha) above which it changes what an image shows: alpha 254 everywhere
# changes nothing a reader sees (0.4%), a transparent border of 5% of the film does
TRANSPARENT_SHARE = 0.01


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., >= 3) colour samples (RGB first, any numeric dtype) -> (...) float32 luma in the same
    units: the weights of ITU-R BT.601, as Pillow's "L" conversion uses (colour DICOM and 16-bit
    colour PNG are shown as 8-bit colour files are)."""
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def colour_notes(rgb: np.ndarray | None = None, alpha: np.ndarray | None = None, full: float | None = None) -> str:
    """What a film's grey display stands for beyond its stored values, for quality control's
    warning: "colour" when (H, W, >=3) `rgb` (unsigned; `full` its full range, by default its
    dtype's) is coloured in the middle of the film, where the chest is (its central 60% each way):
    a mean chroma above COLOUR_CHROMA levels of 255 (a tinted film, shown as luma, comes out darker
    or lighter than its grey original) or more than MARK_SHARE of it above MARK_CHROMA (coloured
    lines or marks across the lungs); "transparency" when the mean transparency of (H, W) unsigned
    `alpha` exceeds TRANSPARENT_SHARE (shown over white, washed out); both joined by "; ", or "".
    Two trials: a normal film tinted sepia, or saved with half transparency, passed quality control
    and was flagged; a coloured ruler at the edge warned, lines drawn across the lungs did not."""
    notes = []
    if rgb is not None and rgb.ndim == 3 and rgb.shape[2] >= 3:
        full = full or float(np.iinfo(rgb.dtype).max)
        height, width = rgb.shape[:2]
        # the middle of the film, where the chest is: a coloured ruler or label at its edge does not
        # change what the model reads there; coloured marks drawn across the lungs do
        middle = subsample(rgb[height // 5:height - height // 5, width // 5:width - width // 5, :3])
        chroma = (middle.max(axis=2).astype(np.float32) - middle.min(axis=2)) * (255.0 / full)
        if chroma.mean() > COLOUR_CHROMA or float((chroma > MARK_CHROMA).mean()) > MARK_SHARE:
            notes.append("colour")
    if alpha is not None and 1.0 - float(alpha.mean()) / np.iinfo(alpha.dtype).max > TRANSPARENT_SHARE:
        notes.append("transparency")
    return "; ".join(notes)


def subsample(image: np.ndarray, size: int = 512) -> np.ndarray:
    """A regular grid of about `size` x `size` pixels: enough for robust percentiles, and fast."""
    return image[:: max(1, image.shape[0] // size), :: max(1, image.shape[1] // size)]


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """Low/high window limits from the robust percentiles of `values` (pass a `subsample`)."""
    low, high = np.percentile(values, PERCENTILE_WINDOW)
    return float(low), float(high)


def window_to_uint8(values: np.ndarray, low: float, high: float, invert: bool) -> np.ndarray:
    """Map `values` linearly from [low, high] to 0..255 (clipped), inverted if asked.

    Parameters
    ----------
    values : (H, W) array of any real dtype
    low, high : the values that become black and white (before inversion)
    invert : True for MONOCHROME1 data (high values are displayed dark)
    """
    if values.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        grey = values  # already display values: skip the float round trip
    elif not (high > low and np.isfinite(255.0 / (high - low))):  # one value, or none: above it is white
        grey = np.where(values > low, 255, 0).astype(np.uint8)
    else:
        # float64 data (rescaled values) is shifted before it is narrowed: an intercept of 1e12 or a
        # slope of 1e-30 left no difference between pixels in float32 (a trial: blank films)
        precise = np.float64 if values.dtype == np.float64 else np.float32
        scaled = ((values.astype(precise, copy=False) - precise(low)) * precise(255.0 / (high - low))).astype(
            np.float32, copy=False)
        grey = np.rint(np.clip(scaled, 0.0, 255.0, out=scaled)).astype(np.uint8)
    return 255 - grey if invert else np.ascontiguousarray(grey)


# Registration of the box (a model setting "follow": the box moves with the chest). The whole film
# at FOLLOW_SIZE px is matched to the standardised mean film of the model's training normals by
# Pearson correlation over their overlap, for every whole-pixel move up to FOLLOW_REACH px each way
# (15.6% of the film); the box moves by the best one. Chosen on validation films (docs/research-log.md,
# rules 10-13): a normal film moved 10% sideways scored like the worst pneumonia under a fixed box.
# Only the reference's central window is compared (FOLLOW_WINDOW), with the film's content
# (`film_content`): a border (collimation, an unexposed edge, padding) carries no anatomy. When the
# whole reference was compared, an even white border moved the box off a centred chest (10 of 10
# normals flagged; rule 13), and when edge lines with a standard deviation under 3 were left out of the
# film but the whole reference compared, a lead marker, noise or scatter in the border still did (13-15
# of 15; rule 14).
FOLLOW_SIZE = 64
FOLLOW_REACH = 10
# the name of that matcher, recorded in a model's reference film: a model made with another matcher
# (before rule 16, unreleased) is refused rather than read with this one (radscan.model.field.load_follow)
FOLLOW_MATCHER = "window-ncc-2"
# an edge line of the 128 px film is border, not content, when its grey levels have a standard
# deviation under FLAT_LINE_STD, or when at least FLAT_SHARE of its pixels lie within FLAT_BAND levels
# of its median (a border with noise, a small marker or dots in it); at most FLAT_REACH of the film is
# trimmed from each side. Chosen on training normals and a trial's variants (no labels; rules 13, 15,
# 16): 45% of the 1,201 Kermany training films trim nothing and the mean film loses 2.7% of its
# area (with the standard deviation alone: 66%, 1.2%), while white, grey
# and black borders of 10% and one-sided strips are trimmed whole; with the standard deviation alone,
# a dark noisy border of 20% moved the box of 13 of 15 normals, with the band none.
FLAT_LINE_STD = 3.0
FLAT_BAND = 12.0
FLAT_SHARE = 0.9
FLAT_REACH = 1 / 3
# the reference's side of the match leaves out this many pixels (of FOLLOW_SIZE) at each edge: the
# window is its central 44 x 44 pixels (69% of each side), where the chest lies, and a film's border
# stays outside it unless the film is moved onto it (rule 14: wrong moves on a trial's 43 kinds of
# border 238 -> 5 of 645 films); a rough border deeper than the margin (15.6%) reaches into it
FOLLOW_WINDOW = 10
# a move is considered only where the film's content covers at least this share of the window
MIN_OVERLAP = 0.5


@dataclass(frozen=True, eq=False)
class FollowReference:
    """The film a box that follows the chest is matched to: (FOLLOW_SIZE, FOLLOW_SIZE) float32,
    zero mean and unit variance (`follow_reference`); `sha256` names it in fingerprints and repr."""

    image: np.ndarray
    sha256: str

    def __repr__(self) -> str:
        return f"FollowReference(sha256={self.sha256[:16]})"

    def __reduce__(self) -> tuple:
        return FollowReference, (self.image, self.sha256)  # to a worker without the cached spectra below

    @cached_property
    def spectra(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The conjugated spectra of the central window (ones inside FOLLOW_WINDOW, zeros outside), of
        the reference and of its square within it: the reference's side of every sum `chest_offset`
        takes, the same for every film."""
        window = np.zeros((FOLLOW_SIZE, FOLLOW_SIZE))
        window[FOLLOW_WINDOW:-FOLLOW_WINDOW, FOLLOW_WINDOW:-FOLLOW_WINDOW] = 1.0
        reference = self.image.astype(np.float64) * window
        return tuple(np.conj(_spectrum(a)) for a in (window, reference, reference**2))


def follow_thumbnail(whole: np.ndarray) -> np.ndarray:
    """(128, 128) uint8 whole film (`to_qc_input` or `to_model_input` without a box) -> (64, 64)
    float64, averaged over 2x2 pixels and standardised (zero mean, unit variance: exposure and
    contrast do not move the box)."""
    small = _halved(whole)
    return (small - small.mean()) / max(float(small.std()), 1e-6)


def _halved(whole: np.ndarray) -> np.ndarray:
    """(128, 128) uint8 -> (FOLLOW_SIZE, FOLLOW_SIZE) float64, the mean of each 2x2 block."""
    return whole.astype(np.float64).reshape(FOLLOW_SIZE, 2, FOLLOW_SIZE, 2).mean(axis=(1, 3))


def follow_reference(whole_films: np.ndarray) -> FollowReference:
    """(N, 128, 128) uint8 whole films of a model's training normals -> their standardised mean
    thumbnail, the reference `chest_offset` matches each film to. Raises ValueError for no films."""
    if len(whole_films) == 0:
        raise ValueError("no films to make the reference of")
    mean = np.mean([follow_thumbnail(film) for film in whole_films], axis=0)
    image = ((mean - mean.mean()) / max(float(mean.std()), 1e-6)).astype(np.float32)
    return FollowReference(image, hashlib.sha256(image.tobytes()).hexdigest())


def film_content(whole: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) uint8 film -> (top, bottom, left, right) pixel bounds of its content: the film less the
    border lines at its edges (`is_border_line` across the content's span), trimmed from each side in
    turn until none is left, at most FLAT_REACH of each side."""
    return _trimmed(whole.astype(np.float64), is_border_line, FLAT_REACH)


def _trimmed(image: np.ndarray, is_edge: Callable[[np.ndarray], bool], reach: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of an (H, W) image less the edge lines (1-D slices of
    it) that `is_edge` accepts, taken from each side in turn until none is left, at most `reach` (a
    fraction) of each side."""
    height, width = image.shape
    top, bottom, left, right = 0, height, 0, width
    reach_y, reach_x = int(height * reach), int(width * reach)
    trimmed = True
    while trimmed:  # trimming columns shortens the rows, which may then be edge lines, and so on
        trimmed = False
        while top < reach_y and is_edge(image[top, left:right]):
            top, trimmed = top + 1, True
        while height - bottom < reach_y and is_edge(image[bottom - 1, left:right]):
            bottom, trimmed = bottom - 1, True
        while left < reach_x and is_edge(image[top:bottom, left]):
            left, trimmed = left + 1, True
        while width - right < reach_x and is_edge(image[top:bottom, right - 1]):
            right, trimmed = right - 1, True
    return top, bottom, left, right


def is_border_line(line: np.ndarray) -> bool:
    """Whether a line of grey levels (1-D, 0-255) is border rather than anatomy: nearly even (standard
    deviation under FLAT_LINE_STD) or even but for a few pixels (at least FLAT_SHARE of them within
    FLAT_BAND levels of the line's median: noise, a small marker, dots). Rules 13, 15 and 16 (research
    log). Not border: a solid marker over more than 10% of an even line (about 5-8% of one with noise of
    sd 5-6), text, stripes or two tones FLAT_BAND or more apart."""
    if line.std() < FLAT_LINE_STD:
        return True
    return bool(np.mean(np.abs(line - np.median(line)) <= FLAT_BAND) >= FLAT_SHARE)


def chest_offset(whole: np.ndarray, reference: FollowReference) -> tuple[float, float]:
    """Where the chest of a (128, 128) uint8 whole film lies against the reference: (dx, dy) as
    fractions of the film's width and height (`chest_match`)."""
    dx, dy, _ = chest_match(whole, reference)
    return dx, dy


def chest_match(whole: np.ndarray, reference: FollowReference) -> tuple[float, float, float]:
    """Where the chest of a (128, 128) uint8 whole film lies against the reference, and how well it
    matches there: (dx, dy, r), dx and dy fractions of the film's width and height, multiples of 1/64
    within +-FOLLOW_REACH/64, positive right and down; r the correlation at that move (-1 to 1; -inf
    when the content covers too little of the window at every move: a film of one grey level).
    The move with the highest Pearson correlation between the film's content
    (`film_content`, averaged over 2x2 pixels) and the reference's central window (FOLLOW_WINDOW)
    over their overlap, among the moves where the content covers at least MIN_OVERLAP of the window
    (normalised cross-correlation with masks on both sides,
    Padfield 2012, IEEE TIP 21(5); the sums of every move at once by FFT); the smaller move wins a tie
    (a blank film correlates alike everywhere: its box stays put)."""
    top, bottom, left, right = film_content(whole)
    mask = np.zeros((FOLLOW_SIZE, FOLLOW_SIZE))
    mask[-(-top // 2):bottom // 2, -(-left // 2):right // 2] = 1.0  # the 64 px pixels wholly inside it
    film = _halved(whole)
    inside = mask > 0  # never empty: at most a third of each side is trimmed
    film = (film - film[inside].mean()) / max(float(film[inside].std()), 1e-6) * mask
    window, ref, ref_squared = reference.spectra
    masked, values, squares = _spectrum(mask), _spectrum(film), _spectrum(film**2)
    count = np.maximum(_overlap_sums(masked, window), 1e-9)
    film_sum, ref_sum = _overlap_sums(values, window), _overlap_sums(masked, ref)
    covariance = _overlap_sums(values, ref) - film_sum * ref_sum / count
    film_var = _overlap_sums(squares, window) - film_sum**2 / count
    ref_var = _overlap_sums(masked, ref_squared) - ref_sum**2 / count
    correlation = covariance / np.sqrt(np.clip(film_var * ref_var, 1e-12, None))
    correlation[count < MIN_OVERLAP * (FOLLOW_SIZE - 2 * FOLLOW_WINDOW) ** 2] = -np.inf
    steps = np.arange(-FOLLOW_REACH, FOLLOW_REACH + 1)
    order = np.argsort((steps[:, None] ** 2 + steps[None, :] ** 2).ravel(), kind="stable")
    best = order[np.argmax(np.round(correlation.ravel()[order], 9))]
    dy, dx = np.unravel_index(best, correlation.shape)
    return float(steps[dx]) / FOLLOW_SIZE, float(steps[dy]) / FOLLOW_SIZE, float(correlation.ravel()[best])


# the thumbnails padded to twice their size, so that a move's correlation does not wrap round
_PADDED = 2 * FOLLOW_SIZE
_MOVES = np.ix_(*[np.arange(-FOLLOW_REACH, FOLLOW_REACH + 1) % _PADDED] * 2)


def _spectrum(image: np.ndarray) -> np.ndarray:
    return np.fft.rfft2(image, (_PADDED, _PADDED))


def _overlap_sums(spectrum: np.ndarray, conjugate: np.ndarray) -> np.ndarray:
    """(2 x FOLLOW_REACH + 1) square, [dy, dx]: sum over the overlap of a x b for each move, from a's
    spectrum and b's conjugated spectrum (cross-correlation by FFT)."""
    return np.fft.irfft2(spectrum * conjugate, (_PADDED, _PADDED))[_MOVES]


# Padding: software that letterboxes a film into another shape, or shrinks it into a canvas, adds edge
# lines of one grey level from end to end; no line across a radiograph's anatomy is one level throughout
# (not even collimation under noise). A model that reads without padding (model setting `trim_padding`,
# rule 20 of docs/research-log.md) is given the film less those lines, quality control too: a normal
# padded with a black strip of 18-25% on one side or shrunk into a 10% border was flagged 40-86% of the
# time, as a change of scale that the box, which follows a move, cannot undo. At most PAD_REACH of each
# side is cut: a film of one level throughout is left for quality control to reject.
PAD_REACH = 1 / 3
PADDING_CUT = "padding cut"  # how `padding_note` begins


def padding_bounds(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) uint8 film -> (top, bottom, left, right) pixel bounds of the film less its padding:
    edge lines of more than one pixel whose pixels all have one grey level, cut from each side in
    turn until none is left, at most PAD_REACH of each side (so never empty; a film of one level
    throughout loses a third of each side, and `film_bounds` keeps it whole). (0, H, 0, W) for a
    film without padding."""
    return _trimmed(grey, lambda line: line.size > 1 and bool(line.min() == line.max()), PAD_REACH)


def film_bounds(grey: np.ndarray, reference: FollowReference) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """(H, W) uint8 film -> (top, bottom, left, right) bounds of the film the model reads: the image
    less its padding (`padding_bounds`) where its chest matches the reference better so
    (`chest_match`), else the whole image; with the chosen film's `to_qc_input` ((128, 128) uint8),
    made to compare the two, or None where the image has no padding to weigh. Lines of one grey
    level are padding beside a film (the film squeezed into the image) or a mask over its edges (the
    film at its scale): the chest tells them apart, by the scale at which it matches the training
    normals' mean film."""
    height, width = grey.shape
    bounds = padding_bounds(grey)
    if bounds == (0, height, 0, width):
        return bounds, None
    top, bottom, left, right = bounds
    whole, cut = to_qc_input(grey), to_qc_input(np.ascontiguousarray(grey[top:bottom, left:right]))
    if chest_match(cut, reference)[2] > chest_match(whole, reference)[2]:
        return bounds, cut
    return (0, height, 0, width), whole


def padding_note(bounds: tuple[int, int, int, int], height: int, width: int) -> str:
    """What `padding_bounds` cut, in words for the `converted` column ("padding cut: left 25%"), or ''."""
    top, bottom, left, right = bounds
    cut = {"top": top / height, "bottom": (height - bottom) / height, "left": left / width,
           "right": (width - right) / width}
    said = ", ".join(f"{side} {share:.0%}" if f"{share:.0%}" != "0%" else f"{side} <1%"
                     for side, share in cut.items() if share)
    return f"{PADDING_CUT}: {said}" if said else ""


def is_box(crop: Sequence[float]) -> bool:
    """Whether `crop` is a box: four fractions (left, top, right, bottom), left < right, top < bottom,
    all within [0, 1] (NaN is not)."""
    return len(crop) == 4 and 0 <= crop[0] < crop[2] <= 1 and 0 <= crop[1] < crop[3] <= 1


def crop_pixels(crop: Crop, height: int, width: int) -> tuple[int, int, int, int]:
    """A box in fractions -> (left, top, right, bottom) pixel bounds in an (height, width) image,
    rounded to the nearest pixel and at least one pixel wide and high. A box moved with the chest
    may reach past the film (fractions below 0 or above 1): its bounds stay there, and Pillow's crop
    fills that part black."""
    left, top, right, bottom = (round(f * n) for f, n in zip(crop, (width, height, width, height), strict=True))
    left, top = min(left, width - 1), min(top, height - 1)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def to_model_input(grey: np.ndarray, crop: Crop | None = None, follow: FollowReference | None = None,
                   whole: np.ndarray | None = None) -> np.ndarray:
    """Cut a display-correct 8-bit grey image to `crop` (if given) and resize it to the model's input.

    Parameters
    ----------
    grey : (H, W) uint8, display-correct (air dark, bone bright)
    crop : the model's box as fractions of the film (left, top, right, bottom), or None for the
        whole film; cut at the film's own resolution, before resizing
    follow : for a model whose box follows the chest, its reference: the box is moved by
        `chest_offset` of the film first (what falls outside the film is black)
    whole : the film's `to_qc_input`, when the caller has it (else made here, with `follow` only)

    Returns
    -------
    (128, 128) uint8. The model maps it to [-1, 1] as ``x / 127.5 - 1``.
    """
    if crop is not None and follow is not None:
        dx, dy = chest_offset(to_qc_input(grey) if whole is None else whole, follow)
        crop = (crop[0] + dx, crop[1] + dy, crop[2] + dx, crop[3] + dy)
    return _resized(grey, crop)


# Pillow's reducing_gap for quality control's whole film: a box reduction by an integer factor first,
# then bicubic over at least 3x: 4x faster than the exact resize on a large film (3.1 against 12.5 ms for
# 3000 x 2500 px); films under 768 px (2 x 3 x 128) are resized exactly
QC_REDUCING_GAP = 3.0


def to_qc_input(grey: np.ndarray) -> np.ndarray:
    """The whole film at the model's size, for quality control (radscan.qc) of a model that reads
    a box of it (`to_model_input` with a crop): quality control judges the whole film.

    Resized with Pillow's `reducing_gap` (QC_REDUCING_GAP), not exactly: the run pays for this
    second resize of the full-resolution film on every image. It differs from `to_model_input(grey)`,
    which the QC reference is fitted to, by 2.7 grey levels at a film's most different pixel (mean
    over the 145 real films and DICOM images in ../shared/data; up to 17 at a burnt-in label's sharp
    edge), while quality control's statistics are a 16 px thumbnail's and grey levels': every one
    of those films gets the same verdict and reason either way (tests/test_qc.py).

    Parameters
    ----------
    grey : (H, W) uint8, display-correct

    Returns
    -------
    (128, 128) uint8
    """
    return _resized(grey, None, QC_REDUCING_GAP)


def _resized(grey: np.ndarray, crop: Crop | None, reducing_gap: float | None = None) -> np.ndarray:
    """`grey` cut to `crop` and resized to the model's size (Pillow's antialiased bicubic; with a
    reducing gap, a box reduction first). Raises ValueError for anything but a 2-D uint8 image."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 grey image, got {grey.dtype} {grey.shape}")
    image = Image.fromarray(grey)
    if crop is not None:  # a box moved with the chest can reach past the film: Pillow fills that black
        image = image.crop(crop_pixels(crop, *grey.shape))
    if image.size != (MODEL_SIZE, MODEL_SIZE):
        image = image.resize((MODEL_SIZE, MODEL_SIZE), Image.Resampling.BICUBIC, reducing_gap=reducing_gap)
    return np.asarray(image)

