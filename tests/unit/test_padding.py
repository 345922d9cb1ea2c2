"""A film read less its padding (radscan.preprocess.padding_bounds, rule 20): a film letterboxed into
another shape or shrunk into a canvas, on any sides, at any grey level, reaches quality control and
the model as the film itself; a film without padding, and a model made before rule 20, read it as
before; what was cut is said in the `converted` column."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from radscan.policy import Policy, for_model
from radscan.preprocess import PAD_REACH, film_bounds, follow_reference, padding_bounds, padding_note, to_qc_input
from tests.support import ingest_one


def _film(seed: int, height: int = 150, width: int = 120) -> np.ndarray:
    """(height, width) uint8: a made-up film with detail in every line (no line of one level)."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 3) * 300 + 120
    return np.clip(smooth + rng.normal(0, 4, (height, width)), 1, 254).astype(np.uint8)


def _padded(film: np.ndarray, top: int, bottom: int, left: int, right: int, level: int) -> np.ndarray:
    height, width = film.shape
    canvas = np.full((height + top + bottom, width + left + right), level, np.uint8)
    canvas[top:top + height, left:left + width] = film
    return canvas


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 50), sides=st.tuples(*[st.integers(0, 40)] * 4), level=st.integers(0, 255))
def test_padding_on_any_sides_at_any_level_is_cut_to_the_film(seed, sides, level):
    film = _film(seed)
    padded = _padded(film, *sides, level)
    top, bottom, left, right = padding_bounds(padded)
    np.testing.assert_array_equal(padded[top:bottom, left:right], film)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 50))
def test_a_film_without_padding_is_left_whole(seed):
    film = _film(seed)
    assert padding_bounds(film) == (0, film.shape[0], 0, film.shape[1])
    assert padding_note(padding_bounds(film), *film.shape) == ""


def test_a_film_of_one_level_throughout_is_cut_at_most_a_third_of_each_side():
    top, bottom, left, right = padding_bounds(np.full((90, 60), 7, np.uint8))
    assert (top, 90 - bottom, left, 60 - right) == (int(90 * PAD_REACH),) * 2 + (int(60 * PAD_REACH),) * 2
    assert bottom > top and right > left


def test_a_noisy_or_marked_border_is_not_padding():
    """Collimation, a lead marker or a grey level that varies is part of the film: only lines of one
    level are padding (quality control and the box's matcher judge the rest)."""
    film = _film(3)
    noisy = _padded(film, 10, 10, 10, 10, 200)
    noisy[:10] = np.random.default_rng(0).integers(195, 206, (10, noisy.shape[1]))
    assert padding_bounds(noisy)[0] == 0
    marked = _padded(film, 0, 0, 20, 0, 0)
    marked[70:74, 5:8] = 255  # an "R" of a few pixels in the strip
    assert padding_bounds(marked)[2] == 5


def _chest(seed: int) -> np.ndarray:
    """(160, 128) uint8: a made-up chest whose layout every seed shares (a bright body, two dark lung
    fields, a bright mediastinum and a diaphragm), each seed moved by a pixel or two and textured."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:160, 0:128] / np.array([159.0, 127.0])[:, None, None] - 0.5
    y, x = y + rng.uniform(-0.01, 0.01), x + rng.uniform(-0.01, 0.01)
    body = 150 * (np.abs(x) < 0.42) * (np.abs(y) < 0.46) + 40
    lungs = sum(np.exp(-(((x - side) / 0.14) ** 2 + ((y + 0.02) / 0.28) ** 2) ** 2) for side in (-0.2, 0.2))
    film = body - 110 * lungs + 60 * (y > 0.3) * (np.abs(x) < 0.42)
    film = film + ndimage.gaussian_filter(rng.normal(0, 1, (160, 128)), 2) * 60
    return np.clip(film + rng.normal(0, 2, (160, 128)), 1, 254).astype(np.uint8)


def _reference():
    """The mean of other chests than those tested: the choice is made against a population's mean."""
    return follow_reference(np.stack([to_qc_input(_chest(seed)) for seed in range(20, 28)]))


@pytest.mark.parametrize(("sides", "said"), [((0, 0, 40, 0), "padding cut: left 24%"),
                                             ((0, 0, 0, 32), "padding cut: right 20%"),
                                             ((40, 0, 0, 0), "padding cut: top 20%"),
                                             ((16, 16, 13, 13), "padding cut: top 8%, bottom 8%, left 8%, right 8%")])
def test_padding_beside_a_film_is_cut_and_said_and_the_film_read_as_itself(tmp_path, sides, said):
    film = _chest(5)
    reading = Policy(trim_padding=True, crop=(0.1, 0.1, 0.9, 0.9), follow=_reference())
    Image.fromarray(film).save(tmp_path / "film.png")
    Image.fromarray(_padded(film, *sides, 0)).save(tmp_path / "padded.png")
    record, image = ingest_one(tmp_path / "padded.png", reading)
    original, expected = ingest_one(tmp_path / "film.png", reading)
    assert record.status == "ok" and record.converted == said
    assert original.converted == ""
    np.testing.assert_array_equal(image, expected)
    whole, image = ingest_one(tmp_path / "padded.png", replace(reading, trim_padding=False))  # an older model
    assert whole.converted == "" and not np.array_equal(image, expected)


@pytest.mark.parametrize("level", [0, 128, 255])
@pytest.mark.parametrize("sides", ["tblr", "tb", "l"])
def test_a_mask_of_one_level_over_a_films_edges_is_not_cut(tmp_path, level, sides):
    """A mask written over the film (electronic shuttering, collimation shown flat) leaves the chest at
    its scale: cutting it would enlarge the chest, and the chest's match says so."""
    film = _chest(7)
    reading = Policy(trim_padding=True, crop=(0.1, 0.1, 0.9, 0.9), follow=_reference())
    masked = film.copy()
    for side in sides:
        masked[{"t": np.s_[:16], "b": np.s_[-16:], "l": np.s_[:, :13], "r": np.s_[:, -13:]}[side]] = level
    Image.fromarray(masked).save(tmp_path / "masked.png")
    record, _ = ingest_one(tmp_path / "masked.png", reading)
    assert record.status == "ok" and record.converted == "", record.converted


def test_the_model_says_whether_it_reads_films_less_their_padding(tmp_path):
    assert for_model(Policy(), {"config": {"trim_padding": True}}, tmp_path).trim_padding
    assert not for_model(Policy(trim_padding=True), {"config": {}}, tmp_path).trim_padding  # an older model
    assert not for_model(Policy(), {"config": {"trim_padding": "yes"}}, tmp_path).trim_padding


def test_a_film_of_one_level_is_kept_whole_and_one_pixel_lines_are_no_padding():
    constant = np.full((90, 60), 7, np.uint8)
    assert film_bounds(constant, _reference())[0] == (0, 90, 0, 60)  # nothing to match either way: kept as it is
    strip = np.random.default_rng(1).integers(0, 256, (1, 300), dtype=np.uint8)  # every column one pixel long
    assert padding_bounds(strip) == (0, 1, 0, 300)


def test_the_note_never_says_zero_percent():
    assert padding_note((0, 200, 1, 200), 200, 200) == "padding cut: left <1%"
    assert padding_note((0, 200, 0, 198), 200, 200) == "padding cut: right 1%"


@pytest.mark.parametrize(("settings", "error"), [({"trim_padding": "yes"}, "true or false"),
                                                 ({"trim_padding": 1}, "true or false"),
                                                 ({"trim_padding": True, "follow": False}, "follows the chest")])
def test_trim_padding_is_a_boolean_of_a_box_that_follows_the_chest(settings, error):
    from radscan.model.config import preset

    with pytest.raises(ValueError, match=error):
        preset("tiny", **{"field": "thorax-box", "follow": True, **settings})
    assert preset("tiny", field="thorax-box", follow=True, trim_padding=True).trim_padding is True


def test_the_reading_of_older_models_keeps_its_repr():
    """The state store's keys hold repr(Policy): a field it showed would read every film again."""
    assert "trim_padding" not in repr(Policy()) and "trim_padding" not in repr(Policy(trim_padding=True))


def test_quality_control_judges_the_size_and_shape_of_the_film_less_its_padding(tmp_path):
    """A film letterboxed into a tall image is a chest film's shape once its padding is cut; a film
    too small to judge, padded into a canvas of a judged size, is still too small. Quality control
    reads the film, not the image."""
    from radscan.qc import DEFAULT_VIEWS, QualityControl, apply_qc

    reading = Policy(trim_padding=True, crop=(0.1, 0.1, 0.9, 0.9), follow=_reference())
    Image.fromarray(_padded(_chest(5), 115, 115, 0, 0, 0)).save(tmp_path / "tall.png")  # 390 x 128: over 3 to 1
    qc = QualityControl("strict", DEFAULT_VIEWS, None, None)
    for policy, shape, verdict in ((reading, (160, 128), "pass"),
                                   (replace(reading, trim_padding=False), (390, 128), "fail")):
        record, image = ingest_one(tmp_path / "tall.png", policy)
        assert record.film_size() == shape and (record.rows, record.columns) == (390, 128)
        apply_qc(qc, [record], [image])
        assert record.qc_status == verdict, record.qc_reason
    assert "not the shape of a chest film" in record.qc_reason
    tiny = np.asarray(Image.fromarray(_chest(5)).resize((24, 30), Image.Resampling.LANCZOS))
    Image.fromarray(_padded(tiny, 8, 8, 7, 7, 0)).save(tmp_path / "tiny.png")  # 46 x 38: a judged size
    record, image = ingest_one(tmp_path / "tiny.png", reading)
    assert record.film_size() == (30, 24) and record.converted.startswith("padding cut"), record.converted
    apply_qc(qc, [record], [image])
    assert "only 24 pixels on its short side (24x30 less its padding)" in record.qc_reason


def test_the_film_read_is_turned_by_its_exif_orientation(tmp_path):
    """A JPEG stored 300 wide and 150 high, shown turned (EXIF orientation 6): the film read, and the
    aspect its picture is drawn at, are 150 wide and 300 high; the header columns keep the stored size."""
    from radscan.batch import _aspect

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_film(2, 150, 300)).save(tmp_path / "turned.jpg", exif=exif)
    record, _ = ingest_one(tmp_path / "turned.jpg")
    assert (record.rows, record.columns) == (150, 300) and record.film_size() == (300, 150)
    assert _aspect(record) == 0.5
