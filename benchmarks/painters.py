"""Painters of uneven borders over a whole film, for the framing benchmarks (`benchmarks/borders.py`,
`benchmarks/framing.py`): a border is a paint (an even tone with noise, stripes, two shutter tones),
marks drawn into it (lead markers, a text label) and a depth, optionally at a slant.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Framing = Callable[[np.ndarray], np.ndarray]  # (H, W) uint8 whole film -> the same, bordered
Paint = Callable[[int, int, np.random.Generator], np.ndarray]  # (h, w, rng) -> (h, w) float grey levels
Marks = Callable[[np.ndarray, int, int], None]  # draws into the painted (h, w) border, given its depth dy, dx


def noisy(tone: float, sd: float) -> Paint:
    """An even tone with Gaussian noise of `sd` grey levels."""
    return lambda h, w, rng: tone + rng.normal(0.0, sd, (h, w))


def striped(tone: float, step: float, period: int, direction: Literal["horizontal", "vertical"]) -> Paint:
    """`tone` with stripes `step` levels brighter, two pixels in every `period`, and noise of sd 2.
    Horizontal stripes run along the top and bottom borders and across the left and right ones
    (each of those borders' columns then holds both tones); vertical ones the other way round."""
    def paint(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        index = np.arange(h if direction == "horizontal" else w) % period < 2
        lines = tone + step * index
        return np.broadcast_to(lines[:, None] if direction == "horizontal" else lines[None, :], (h, w)) \
            + rng.normal(0.0, 2.0, (h, w))
    return paint


def bordered(depth: float, paint: Paint, marks: Marks | None = None, tilt: float = 0.0) -> Framing:
    """Every edge written over to `depth` of the film's size with `paint`, then `marks` drawn into the
    border; with `tilt` (degrees) the border's inner edge is a rectangle turned by that angle about the
    film's centre (a collimator set at a slant). The noise is drawn afresh for each film (seeded by its
    pixels: the same film gets the same border, which --score needs, as it makes each film twice)."""
    def border(film: np.ndarray) -> np.ndarray:
        h, w = film.shape
        dy, dx = round(depth * h), round(depth * w)
        rng = np.random.default_rng(zlib.crc32(film.tobytes()))
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


def marker(where: Literal["l", "t"], tone: float = 235.0) -> Marks:
    """A solid lead marker (tone) in the left ("l") or top ("t") border: 12% of the film's length
    along that edge, from a fifth to four fifths of the border's depth."""
    def draw(canvas: np.ndarray, dy: int, dx: int) -> None:
        h, w = canvas.shape
        if where == "l":
            canvas[round(0.25 * h):round(0.37 * h), dx // 5:dx * 4 // 5] = tone
        else:
            canvas[dy // 5:dy * 4 // 5, round(0.55 * w):round(0.67 * w)] = tone
    return draw


def both(*marks: Marks) -> Marks:
    """Every one of `marks`, drawn in turn."""
    def draw(canvas: np.ndarray, dy: int, dx: int) -> None:
        for mark in marks:
            mark(canvas, dy, dx)
    return draw


def text(words: str, tone: int) -> Marks:
    """A burnt-in text label in the top border, from the left, in a font whose size is half the
    border's depth (its capitals about a third of it); at 20% of a 224 px film, "AP SUPINE
    PORTABLE" runs off the film's right edge."""
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
