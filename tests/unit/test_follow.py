"""The box that follows the chest (radscan.preprocess.chest_offset) on made-up films: a film moved by
whole steps is found where it was moved to, whatever its exposure; a film with nothing to match keeps
its box where it is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from radscan.preprocess import FOLLOW_REACH, FOLLOW_SIZE, chest_offset, follow_reference, to_model_input


def _chest(seed: int) -> np.ndarray:
    """(128, 128) uint8: a smooth made-up film, bright in the middle and dark at its edges, with detail."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:128, 0:128] / 127.0 - 0.5
    body = np.exp(-(x**2 + y**2) / 0.08) * 150
    detail = ndimage.gaussian_filter(rng.normal(0, 1, (128, 128)), 4) * 400
    return np.clip(body + detail + 40, 0, 255).astype(np.uint8)


def _moved(film: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`film` moved right by dx and down by dy pixels, black where nothing moved in."""
    out = np.zeros_like(film)
    h, w = film.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = film[max(-dy, 0):h + min(-dy, 0),
                                                                      max(-dx, 0):w + min(-dx, 0)]
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 20), dx=st.integers(-8, 8), dy=st.integers(-8, 8), gain=st.floats(0.6, 1.0))
def test_a_moved_film_is_found_where_it_was_moved(seed, dx, dy, gain):
    film = _chest(seed)
    reference = follow_reference(film[None])
    moved = (_moved(film, 2 * dx, 2 * dy) * gain).astype(np.uint8)  # 2 px at 128 = one step of 1/64
    assert chest_offset(moved, reference) == (dx / FOLLOW_SIZE, dy / FOLLOW_SIZE)


def test_the_reach_is_bounded_and_a_blank_film_stays_put():
    film = _chest(0)
    reference = follow_reference(film[None])
    far = chest_offset(_moved(film, 40, 0), reference)[0]  # 31% of the film: beyond the reach
    assert far <= FOLLOW_REACH / FOLLOW_SIZE
    for blank in (np.zeros((128, 128), np.uint8), np.full((128, 128), 200, np.uint8)):
        assert chest_offset(blank, reference) == (0.0, 0.0)


def test_a_box_moved_past_the_film_is_black_there():
    film = np.full((200, 100), 180, np.uint8)
    reference = follow_reference(_chest(1)[None])
    cut = to_model_input(film, (0.8, 0.1, 1.0, 0.9), None)  # fixed: inside the film
    assert cut.min() > 100
    from radscan.preprocess import crop_pixels

    assert crop_pixels((0.9, 0.1, 1.1, 0.9), 200, 100) == (90, 20, 110, 180)
    moved = to_model_input(film, (0.9, 0.1, 1.1, 0.9))
    assert moved[:, :40].min() > 100 and moved[:, -40:].max() == 0
    assert reference.sha256 and repr(reference).startswith("FollowReference(sha256=")
