"""Drawing the explanation pictures: the film, where the score looks, the reconstruction
difference, fixed colour scales with their units, and the caption (radscan.batch writes them with
radscan.report's atomic PNG writer).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["render_explanation", "render_film", "heat_colours", "picture_layout", "shows_reconstruction",
           "PICTURE_VERSION", "SCORE_MAP_SCALE_MAX", "RESIDUAL_SCALE_MAX", "COLOUR_MAP"]

# Maps are shown on fixed scales, so that colours mean the same in every picture. The score map
# is in z-score units per image area (see SimSID._score_chunk): 0 .. SCORE_MAP_SCALE_MAX; the
# reconstruction difference in model units (the image spans -1..1, so 0.5 is a quarter of it).
# 10 z: on the shipped model's validation pneumonias the map's peak is 12 z at the median (90th
# percentile 38), on calibration normals 1.2 (95th percentile 8), so a flagged film's regions show;
# 30 left flagged films of z 3 to 5 all but uncoloured (issue 21 trial)
SCORE_MAP_SCALE_MAX = 10.0
_FAINT = 0.1  # a map whose peak is under this share of the scale is said to have no region that stands out
RESIDUAL_SCALE_MAX = 0.5
COLOUR_MAP = "inferno"  # perceptually uniform and readable in grey print (matplotlib)
_PANEL = 512  # height of the main panels, pixels
_SMALL = 256
_BAR = 16
_MARGIN = 8
_BESIDE = _BAR + 44  # a colour bar and its labels
_BELOW = 94  # the panels' labels: up to five lines, wrapped to the panel
# Bumped whenever a picture's layout changes: part of a scoring run's fingerprint (radscan.score), so
# that a rerun redraws the pictures of an older layout, which the worklist page would crop wrongly.
# 2: no reconstruction panel where the score is not made of it; labels wrapped under their panels.
PICTURE_VERSION = "2"
# What the map panel's colours are, in words, by score kind: a region's z and the film's z are on the same
# scale, so the reader must be told how the two relate (the film's z is the regions' mean, not their peak)
_MAP_LABELS = {
    "density": "where this film raises the anomaly score: each region's z, coloured where it exceeds what "
               "95% of normal films show there; the film's z (in the caption) is the mean of its regions' z, "
               "so one region can show more",
    "critic": "where this film raises the anomaly score: each place's share of the film's z, coloured where "
              "it exceeds what 95% of normal films show there; the film's z (in the caption) is the map's "
              "mean before that part is removed",
}


def shows_reconstruction(score_kind: str) -> bool:
    """Whether a picture of this score kind has the reconstruction-difference panel: only where the
    score is made of the reconstruction (seed, residual). For the critic and density kinds it said
    "not used by the score" and cost a generator pass per picture (9.5 ms of a 0.3 ms film on a CPU)."""
    return score_kind in ("seed", "residual")


def picture_layout(score_kind: str) -> dict[str, int]:
    """Where the main panel lies in a picture of this score kind, for the worklist page, which shows it
    alone as the row's thumbnail and finds it from the picture's size (worklist.html.j2, `panelBox`):
    an explanation picture is "fixed_width" + 2 x the panel's width wide and its caption + "panel" +
    "below" high, the map panel right of the film's panel (after "margin"); a rejected film's picture
    is its caption + panel high, the film at the left."""
    fixed = _MARGIN + _BESIDE + (2 * _BESIDE + _SMALL if shows_reconstruction(score_kind) else 0)
    return {"panel": _PANEL, "margin": _MARGIN, "below": _BELOW, "fixed_width": fixed}


@functools.lru_cache(maxsize=1)
def _colour_table() -> np.ndarray:
    """(256, 3) uint8 RGB of COLOUR_MAP (matplotlib is imported once, on the first picture)."""
    from matplotlib import colormaps

    return (colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """0..1 -> COLOUR_MAP colours (black-purple-orange-yellow), as (..., 3) uint8."""
    return _colour_table()[(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)]


def _font_file() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib): Latin with every accent, Greek and Cyrillic, so that a
    folder named for Zürich or São Paulo reads in the caption (Pillow's default font has ASCII only);
    a script it lacks (Chinese, Japanese, Korean, Hebrew...) is written as code points (`drawable`).
    Pillow's default when it is missing."""
    try:
        return ImageFont.truetype(str(_font_file()), size)
    except OSError:
        return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=1)
def _glyphs() -> frozenset[int]:
    """The code points the caption font draws (its character map; ASCII when it cannot be read)."""
    try:
        from fontTools.ttLib import TTFont  # matplotlib's own dependency

        return frozenset(TTFont(str(_font_file()), lazy=True).getBestCmap())
    except Exception:  # no font file, or fontTools missing: Pillow's default font, ASCII
        return frozenset(range(32, 127))


# one drawn character: a character, or a code point `drawable` wrote, which a line never splits
_DRAWN_CHARACTER = re.compile(r"<U\+[0-9A-F]{4,6}>|.", re.DOTALL)


def drawable(text: str) -> str:
    """`text` with each character the caption font has no glyph for written as its code point,
    <U+60A3>: two patient IDs in Chinese were both drawn as boxes, "□□123", and read alike (a trial)."""
    glyphs = _glyphs()
    return "".join(character if ord(character) in glyphs else f"<U+{ord(character):04X}>" for character in text)


def _overlay(grey: Image.Image, heat: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """`heat` (128, 128) in 0..1 blended over the grey input (more opaque where hotter), then
    enlarged to `size` (width, height) pixel for pixel (nearest neighbour)."""
    opacity = Image.fromarray((0.75 * 255 * np.clip(heat, 0.0, 1.0)).astype(np.uint8))
    blended = Image.composite(Image.fromarray(heat_colours(heat)), grey, opacity)
    return blended.resize(size, Image.Resampling.NEAREST)


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, height: int, top: str,
                bottom: str) -> None:
    bar = np.repeat(heat_colours(np.linspace(1.0, 0.0, height))[:, None, :], _BAR, axis=1)
    canvas.paste(Image.fromarray(bar), (x, y))
    draw.text((x + _BAR + 4, y), top, fill="white", font=_font(12))
    draw.text((x + _BAR + 4, y + height - 14), bottom, fill="white", font=_font(12))


def render_explanation(image: np.ndarray, score_map: np.ndarray, residual: np.ndarray | None, caption: str,
                       score_kind: str = "critic", aspect: float = 1.0) -> np.ndarray:
    """The picture of one scored film, (H, W, 3) uint8, for a reader:

    - a caption on top (`caption`, one or more lines: score, flag, identity as the PHI mode
      allows, view, date, model; written by the caller);
    - left: the film as the model saw it (`image`, (128, 128) uint8), shown at the film's own
      width/height ratio `aspect` (clamped to 0.5..2; the model input is squashed to a square);
    - middle, the main panel: where the film raises the anomaly score (`score_map`, (128, 128)
      float >= 0, z-score units per image area, fixed scale 0..SCORE_MAP_SCALE_MAX), over the film
      at the same ratio, in a perceptually uniform colour map with its scale;
    - right, small, only where the score is made of it (`shows_reconstruction(score_kind)`): how
      differently the model redrew the film (`residual`, |input - reconstruction|, (128, 128), model
      units, 0..RESIDUAL_SCALE_MAX); None otherwise.

    The layout is `picture_layout(score_kind)`. Overlays are blended at model resolution and enlarged
    pixel for pixel (nearest neighbour): the picture shows the pixels the model saw, and the blocky
    result deflates about 5x smaller and 3x faster than a smoothed one (this runs once per image).
    Raises ValueError when `residual` is given for a kind without that panel, or missing for one with it."""
    if (residual is not None) != shows_reconstruction(score_kind):
        raise ValueError(f"a {score_kind} picture {'has' if shows_reconstruction(score_kind) else 'has no'} "
                         "reconstruction panel: pass the residual map exactly when it has")
    grey = Image.fromarray(image).convert("RGB")
    width = round(_PANEL * _drawn_ratio(aspect))
    layout = picture_layout(score_kind)
    canvas_width = 2 * width + layout["fixed_width"]
    # a long path wraps instead of running off the edge with the model's name
    lines = _caption_lines(caption, canvas_width - 2 * _MARGIN)
    top = 12 + 20 * len(lines)
    canvas = Image.new("RGB", (canvas_width, top + _PANEL + _BELOW), "black")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, 6 + 20 * index), line, fill="white", font=_font(15))
    canvas.paste(grey.resize((width, _PANEL), Image.Resampling.NEAREST), (0, top))
    canvas.paste(_overlay(grey, score_map / SCORE_MAP_SCALE_MAX, (width, _PANEL)), (width + _MARGIN, top))
    _colour_bar(draw, canvas, 2 * width + _MARGIN + 4, top, _PANEL, f"{SCORE_MAP_SCALE_MAX:g} z", "0 z")
    if float(np.max(score_map, initial=0.0)) < _FAINT * SCORE_MAP_SCALE_MAX:  # a blank panel must not read as "nothing"
        _label(draw, "no region stands out above normal films: the score is raised across the lungs",
               width + _MARGIN + 6, top + 6, width - 12)
    if residual is not None:
        _reconstruction_panel(draw, canvas, grey, residual, 2 * width + 2 * _BESIDE + _MARGIN, top, aspect,
                              score_kind)
    _label(draw, "the film as the model saw it", 4, top + _PANEL + 4, width - 8)
    _label(draw, _MAP_LABELS.get(score_kind, _MAP_LABELS["critic"]), width + _MARGIN + 4, top + _PANEL + 4,
           canvas_width - width - _MARGIN - 8)
    return np.asarray(canvas)


def _reconstruction_panel(draw: ImageDraw.ImageDraw, canvas: Image.Image, grey: Image.Image, residual: np.ndarray,
                          x: int, top: int, aspect: float, score_kind: str) -> None:
    """The small panel right of the map: the reconstruction difference, which the score is made of.
    It fits a square of _SMALL at the film's ratio: a tall film's would outgrow the main panels and
    push its note off the picture."""
    ratio = _drawn_ratio(aspect)
    small_width, small_height = round(_SMALL * min(1.0, ratio)), round(_SMALL / max(1.0, ratio))
    draw.text((x, top), "how differently the model redrew it", fill="white", font=_font(12))
    canvas.paste(_overlay(grey, residual / RESIDUAL_SCALE_MAX, (small_width, small_height)), (x, top + 18))
    _colour_bar(draw, canvas, x + small_width + 4, top + 18, small_height, f"{RESIDUAL_SCALE_MAX:g}", "0")
    draw.text((x, top + small_height + 24), f"scale 0 to 0.5: a quarter of black-to-white\nthe {score_kind} score "
              "is made from it", fill="grey", font=_font(12))


_LABEL_LINES = (_BELOW - 8) // 17  # lines of 13 px text (2 px apart) under a panel


def _label(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, width: float) -> None:
    """A panel's label under it, wrapped to `width` pixels, in at most _LABEL_LINES lines (every
    map label fits the narrowest panel's: tests/unit/test_pictures.py)."""
    lines = _wrap(text, _font(13), width)[:_LABEL_LINES]
    draw.text((x, y), "\n".join(lines), fill="white", font=_font(13), spacing=2)


def render_film(image: np.ndarray, caption: str, aspect: float = 1.0) -> np.ndarray:
    """The picture of a film that was read but not judged (quality control rejected it), (H, W, 3)
    uint8: the caption on top and the film as the model would have seen it (`image`, (128, 128)
    uint8) at its own width/height ratio `aspect` (clamped to 0.5..2), enlarged pixel for pixel, so
    that a reader can judge the rejection (a chest the wrong way round, or not a chest at all)."""
    drawn = _drawn_ratio(aspect)
    width = round(_PANEL * drawn)
    if abs(drawn - aspect) > 0.05:  # a film narrower or wider than the picture shows it: said, not hidden
        caption += f"\n(drawn at {_ratio(drawn)}; the film is {_ratio(aspect)}, width to height)"
    # the caption wraps to the film's width, so that the picture is exactly as wide as the film and
    # the page can show the film alone as the row's thumbnail, however wide the film
    lines = _caption_lines(caption, width - 2 * _MARGIN)
    top = 12 + 20 * len(lines)
    canvas = Image.new("RGB", (width, top + _PANEL), "black")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, 6 + 20 * index), line, fill="white", font=_font(15))
    canvas.paste(Image.fromarray(image).convert("RGB").resize((width, _PANEL), Image.Resampling.NEAREST), (0, top))
    return np.asarray(canvas)


def _ratio(aspect: float) -> str:
    """A width/height ratio as a reader says it: 4:1 for a wide film, 1:4 for a tall one (2 figures:
    1:200, not 0.0:1)."""
    return f"{aspect:.2g}:1" if aspect >= 1 else f"1:{1 / aspect:.2g}"


def _drawn_ratio(aspect: float) -> float:
    """The width/height ratio a film is drawn at: its own, within 0.5..2 (a picture stays readable)."""
    return min(2.0, max(0.5, aspect))


def _caption_lines(caption: str, width: float) -> list[str]:
    """The caption's lines, each wrapped to `width` pixels in the caption font."""
    return [part for line in caption.splitlines() or [""] for part in _wrap(line, _font(15), width)]


def _wrap(line: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`line` in lines no wider than `width` pixels: broken at spaces, and inside a word (a path)
    only when the word alone is wider: after a "/" where one fits (a file's name stays whole), else
    between characters."""
    lines, current = [], ""
    for word in drawable(line).split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for part in re.split(r"(?<=/)", word):  # the path's folders, each with its "/"
            if current and font.getlength(current + part) > width:
                lines.append(current)
                current = ""
            for character in re.findall(_DRAWN_CHARACTER, part):  # a name wider than the line on its own
                if current and font.getlength(current + character) > width:
                    lines.append(current)
                    current = ""
                current += character
    return [*lines, current]
