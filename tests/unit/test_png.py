"""radscan's own PNG encoder (radscan.report.encode_png, 3x faster than Pillow's on the explanation
pictures): every image it writes must decode, in Pillow, to exactly its pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from radscan.report import encode_png


@st.composite
def images(draw) -> np.ndarray:
    """Grey or RGB images of 1 to 40 rows and columns: noise, flat areas, rows repeated (as in a
    picture enlarged pixel for pixel) and every byte value next to its neighbours' extremes."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    shape = (height, width) if draw(st.booleans()) else (height, width, 3)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "flat", "repeated", "extremes"]))
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "flat":
        return np.full(shape, draw(st.integers(0, 255)), np.uint8)
    if kind == "repeated":
        return np.repeat(rng.integers(0, 256, (1, *shape[1:]), dtype=np.uint8), height, axis=0)
    return rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), shape)


@settings(max_examples=200, deadline=None)
@given(images())
def test_every_image_decodes_to_its_own_pixels(image):
    decoded = Image.open(io.BytesIO(encode_png(image)))
    assert decoded.mode == ("L" if image.ndim == 2 else "RGB")
    assert np.array_equal(np.asarray(decoded), image)
    assert not decoded.info  # no text chunks: nothing about the film but its pixels


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros(16, np.uint8)])
def test_other_images_are_refused_in_words(bad):
    with pytest.raises(ValueError, match="expected"):
        encode_png(bad)
