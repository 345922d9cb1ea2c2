"""The explanation picture on made-up maps: a flagged film whose map is blank on the picture's scale
says so in words, instead of reading as "nothing there"."""

from __future__ import annotations

import numpy as np

from radscan.pictures import PICTURE_LAYOUT, SCORE_MAP_SCALE_MAX, render_explanation


def _label_box(picture: np.ndarray) -> np.ndarray:
    """Where the map panel's note would be: its top left corner (caption one line high)."""
    top, left = 12 + 20, PICTURE_LAYOUT["panel"] + PICTURE_LAYOUT["margin"]
    return picture[top:top + 40, left:left + 300]


def test_a_map_with_no_region_above_normal_says_so():
    film, zeros = np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.float32)
    blank = render_explanation(film, zeros, zeros, "caption", "density")
    shown = render_explanation(film, np.full((128, 128), SCORE_MAP_SCALE_MAX / 2, np.float32), zeros, "caption",
                               "density")
    white = lambda box: int((box == 255).all(axis=-1).sum())  # noqa: E731
    assert white(_label_box(blank)) > 50  # the note's letters
    assert white(_label_box(shown)) == 0  # a map that shows something needs no note


def test_a_caption_shows_accented_greek_and_cyrillic_letters():
    """A helper's trial (issue 21): folder names of Zürich or São Paulo showed as boxes in the picture
    and the DICOM Secondary Capture. A font without a letter draws every missing one as the same box."""
    film, zeros = np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.float32)

    def caption_pixels(text: str) -> np.ndarray:
        return render_explanation(film, zeros, zeros, text, "density")[:30, :200]

    letters = ["ü", "é", "ñ", "ã", "λ", "ж"]
    drawn = {letter: caption_pixels(f"a{letter}b").tobytes() for letter in letters}
    assert len(set(drawn.values())) == len(letters)  # each letter its own glyph


def test_a_rejected_films_picture_is_as_wide_as_the_film_whatever_its_caption():
    """The page shows a rejected film's picture below its caption as the row's thumbnail, taking the
    picture's width for the film's: a caption wider than the film cut a landscape film in half."""
    from radscan.pictures import render_film

    film = np.zeros((128, 128), np.uint8)
    caption = "NOT JUDGED: " + "a long reason " * 20 + "\n" + "folder/" * 40 + "IM1.dcm"
    for aspect in (0.5, 1.0, 1.9, 3.0):
        picture = render_film(film, caption, aspect)
        assert picture.shape[1] == round(PICTURE_LAYOUT["panel"] * min(2.0, max(0.5, aspect)))
