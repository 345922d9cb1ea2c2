"""The explanation picture on made-up maps: a flagged film whose map is blank on the picture's scale
says so in words, instead of reading as "nothing there"."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from radscan.pictures import SCORE_MAP_SCALE_MAX, picture_layout, render_explanation, shows_reconstruction

PICTURE_LAYOUT = picture_layout("density")


def _label_box(picture: np.ndarray) -> np.ndarray:
    """Where the map panel's note would be: its top left corner (caption one line high)."""
    top, left = 12 + 20, PICTURE_LAYOUT["panel"] + PICTURE_LAYOUT["margin"]
    return picture[top:top + 40, left:left + 300]


def test_a_map_with_no_region_above_normal_says_so():
    film, zeros = np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.float32)
    blank = render_explanation(film, zeros, None, "caption", "density")
    shown = render_explanation(film, np.full((128, 128), SCORE_MAP_SCALE_MAX / 2, np.float32), None, "caption",
                               "density")
    white = lambda box: int((box == 255).all(axis=-1).sum())  # noqa: E731
    assert white(_label_box(blank)) > 50  # the note's letters
    assert white(_label_box(shown)) == 0  # a map that shows something needs no note


def test_a_caption_shows_accented_greek_and_cyrillic_letters():
    """A helper's trial (issue 21): folder names of Zürich or São Paulo showed as boxes in the picture
    and the DICOM Secondary Capture. A font without a letter draws every missing one as the same box."""
    film, zeros = np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.float32)

    def caption_pixels(text: str) -> np.ndarray:
        return render_explanation(film, zeros, None, text, "density")[:30, :200]

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


@pytest.mark.parametrize("score_kind", ["density", "critic", "seed", "residual"])
@pytest.mark.parametrize("aspect", [0.3, 0.62, 1.0, 1.9, 4.0])
def test_the_layout_the_page_reads_is_the_one_drawn(score_kind, aspect):
    """The worklist page crops a row's thumbnail to the map panel from the picture's size and
    picture_layout(score_kind): the panel must be exactly there, for every kind and film ratio; the
    reconstruction panel only where the score is made of it."""
    film = np.full((128, 128), 128, np.uint8)
    hot = np.full((128, 128), SCORE_MAP_SCALE_MAX, np.float32)
    residual = np.zeros((128, 128), np.float32) if shows_reconstruction(score_kind) else None
    picture = render_explanation(film, hot, residual, "a caption\nof two lines", score_kind, aspect)
    layout = picture_layout(score_kind)
    width = (picture.shape[1] - layout["fixed_width"]) / 2
    assert width == round(layout["panel"] * min(2.0, max(0.5, aspect)))
    top = picture.shape[0] - layout["panel"] - layout["below"]
    panel = picture[top:top + layout["panel"], int(width) + layout["margin"]:int(2 * width) + layout["margin"]]
    assert (panel == panel[0, 0]).all() and panel[0, 0, 0] > 200  # the saturated map fills it, edge to edge
    assert not (picture[top - 1, int(width) + layout["margin"]] == panel[0, 0]).all()  # and nothing above
    with pytest.raises(ValueError, match="reconstruction panel"):
        render_explanation(film, hot, None if residual is not None else hot, "caption", score_kind, aspect)


@pytest.mark.parametrize("width", [420, 900, 1400])  # each wider than the name
def test_a_long_path_wraps_between_folders_and_keeps_the_file_name_whole(width):
    """A new user's trial: a deep path broke inside the file's name, between two lines."""
    from radscan.pictures import _font, _wrap

    name = "patient_film_with_rather_long_name_0001.jpeg"
    path = "/".join(f"department_of_radiology_archive_level_{i:02d}" for i in range(8)) + "/" + name
    lines = _wrap(f"PA · {path} · model kermany-tiny", _font(15), width)
    assert all(_font(15).getlength(line) <= width for line in lines)
    assert any(name in line for line in lines)  # whole, on one line
    assert "".join(lines).replace(" ", "") == f"PA·{path}·modelkermany-tiny"  # nothing lost


@pytest.mark.parametrize("score_kind", ["density", "critic"])
def test_every_map_label_fits_under_the_narrowest_panel(score_kind):
    """The label that says what the map's colours mean must be drawn whole, even under the panel of
    the narrowest film drawn (half as wide as high)."""
    from radscan.pictures import _LABEL_LINES, _MAP_LABELS, _font, _wrap

    layout = picture_layout(score_kind)
    width = layout["panel"] // 2
    room = (2 * width + layout["fixed_width"]) - width - layout["margin"] - 8  # as render_explanation gives it
    assert len(_wrap(_MAP_LABELS[score_kind], _font(13), room)) <= _LABEL_LINES


@given(score=st.floats(0, 1), threshold=st.floats(0.01, 0.99))
def test_a_score_is_cut_and_reads_on_its_side_of_the_threshold(score, threshold):
    """The caption's score (radscan.batch.score_text, the page's scoreText): never rounded up (0.99998
    is not 1.000), and on the side of the threshold its flag says, at the decimals that show it."""
    from radscan.batch import score_text

    text = score_text(score, threshold)
    if text.startswith(">"):  # stored as 1.0 (6 decimals): never read as certainty
        assert text == ">0.999" and round(score, 6) >= 1
        return
    places = len(text) - 2
    assert float(text) <= score + 1e-6 and score - float(text) < 10 ** -places + 1e-6  # from the stored 6 decimals
    if places < 6:
        assert (float(text) >= float(f"{threshold:.{places}f}")) == (score >= threshold)


@given(score=st.floats(0, 0.999), threshold=st.floats(0.01, 0.99))
@example(score=0.8798, threshold=0.8797)
@example(score=0.87969, threshold=0.8797)
def test_a_caption_gives_the_threshold_to_the_decimals_of_its_score(score, threshold):
    """A review: "anomaly score 0.8798 (threshold 0.880): FLAGGED" read as a score under its threshold.
    The caption gives the threshold to as many decimals as the score needed, so that the two read as
    the flag says (where 6 decimals can tell them apart)."""
    from radscan.batch import picture_caption
    from radscan.records import ImageRecord

    record = ImageRecord(path="a.png", root="r", kind="png")
    model = {"model_name": "m", "model_version": "v", "model_sha256": "0" * 64}
    first = picture_caption(record, score, threshold, model).splitlines()[0]
    shown, limit = (float(x) for x in re.match(r"anomaly score ([\d.]+) \(threshold ([\d.]+)\)", first).groups())
    if abs(score - threshold) > 2e-6:
        assert (shown >= limit) == (score >= threshold), first
    assert ("FLAGGED" in first) == (score >= threshold)


def test_a_score_that_is_not_a_number_reads_so():
    from radscan.batch import score_text

    assert score_text(float("nan"), 0.5) == "not a number"


@settings(max_examples=50, deadline=None)
@given(first=st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=6),
       second=st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=6),
       latin=st.text(alphabet="abcXYZ0129 äöüßéçñ-_/", max_size=10))
def test_characters_the_caption_font_lacks_are_drawn_as_code_points_and_ids_stay_apart(first, second, latin):
    """Two patient IDs in Chinese were both drawn as boxes ("□□123") in the picture's caption, and
    read alike (a trial): a character without a glyph is written as its code point, so that what is
    drawn tells different IDs apart; Latin with accents is drawn as it is."""
    from radscan.pictures import _glyphs, drawable  # noqa: PLC2701

    shown = drawable(f"patient {first}{latin}")
    assert all(ord(character) in _glyphs() for character in shown)
    assert shown.endswith(latin) and f"<U+{ord(first[0]):04X}>" in shown
    assert (drawable(first) == drawable(second)) == (first == second)


def test_a_line_of_code_points_wider_than_the_caption_is_broken_between_them_not_inside():
    """A review: a long name of characters without glyphs broke inside "<U+60A3>"."""
    from radscan.pictures import _caption_lines  # noqa: PLC2701

    lines = _caption_lines("患" * 60, 300)
    assert len(lines) > 1 and all(re.fullmatch(r"(<U\+60A3>)+", line) for line in lines), lines
