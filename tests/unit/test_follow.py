"""The box that follows the chest (radscan.preprocess.chest_offset) on made-up films: a film moved by
whole steps is found where it was moved to, whatever its exposure; a border over a film's edges,
flat or not, does not move its box, nor does a deeper one that is even but for noise or dots; a
film with nothing to match keeps its box where it is; a reference film made for another matcher is
refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from radscan.errors import ModelError
from radscan.preprocess import FOLLOW_REACH, FOLLOW_SIZE, chest_offset, film_content, follow_reference, to_model_input


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


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 20), sides=st.sets(st.sampled_from("tblr"), min_size=1), width=st.integers(4, 20),
       value=st.sampled_from([0, 128, 255]) | st.integers(0, 255),
       rough=st.sampled_from(["flat", "noise", "marker", "gradient"]))
def test_a_border_over_the_film_does_not_move_its_box(seed, sides, width, value, rough):
    """A collimation border, an unexposed edge or bars written over a centred film, flat or not: new
    users' trials found an even white border of 10% moving the box off the chest (10 of 10 normals
    flagged) when the border was compared with the reference, and then a lead marker, noise or scatter
    in the border doing so (13-15 of 15) when only perfectly flat edge lines were left out."""
    film = _chest(seed)
    reference = follow_reference(film[None])
    rng = np.random.default_rng(seed)
    border = np.full(film.shape, float(value))
    if rough == "noise":
        border += rng.normal(0, 12, film.shape)
    elif rough == "marker":
        border[rng.integers(0, 128, 40), rng.integers(0, 128, 40)] = 255 - value  # dots and letters
    elif rough == "gradient":
        border += np.linspace(-40, 40, 128)[None, :] + np.linspace(-30, 30, 128)[:, None]
    inside = np.ones(film.shape, bool)
    for side in sides:
        inside[{"t": np.s_[:width], "b": np.s_[-width:], "l": np.s_[:, :width], "r": np.s_[:, -width:]}[side]] = False
    bordered = np.where(inside, film, np.clip(border, 0, 255)).astype(np.uint8)
    if rough == "flat":
        top, bottom, left, right = film_content(bordered)
        assert (top, 128 - bottom, left, 128 - right) == tuple(width if s in sides else 0 for s in "tblr")
    assert chest_offset(bordered, reference) == (0.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 20), sides=st.sets(st.sampled_from("tblr"), min_size=1), width=st.integers(21, 32),
       value=st.integers(0, 255), noise=st.floats(0, 5), dots=st.integers(0, 60))
def test_a_deep_border_with_noise_or_scattered_dots_does_not_move_its_box(seed, sides, width, value, noise, dots):
    """A border deeper than the window's margin (16-25% of the film) reaches into the compared window
    unless the film's content leaves it out: a new user's trial found a dark border of 20% with noise of
    sd 6 moving the box of 13 of 15 normals when only lines with a standard deviation under 3 counted as
    border (rule 16). Noise up to sd 5 and scattered dots in an otherwise even border are trimmed (at
    sd 6, 3 of 384 such films moved; a solid marker or text over a tenth of a line is not trimmed)."""
    film = _chest(seed)
    reference = follow_reference(film[None])
    rng = np.random.default_rng(seed)
    border = np.full(film.shape, float(value)) + rng.normal(0, noise, film.shape)
    border[rng.integers(0, 128, dots), rng.integers(0, 128, dots)] = 255 - value
    inside = np.ones(film.shape, bool)
    for side in sides:
        inside[{"t": np.s_[:width], "b": np.s_[-width:], "l": np.s_[:, :width], "r": np.s_[:, -width:]}[side]] = False
    bordered = np.where(inside, film, np.clip(border, 0, 255)).astype(np.uint8)
    assert chest_offset(bordered, reference) == (0.0, 0.0)


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


def test_a_reference_film_for_another_matcher_is_refused(tmp_path):
    """A model made with an earlier matcher (one that compared the border too) would have its boxes cut
    elsewhere than in training: refused (exit 65), not read with this one. The matcher's name is in the
    reference film, whose sha256 model.json gives and the weights seal."""
    import hashlib

    from safetensors.numpy import save

    from radscan.model.field import FOLLOW_FILE, load_follow, read_reference_film, save_follow

    reference = follow_reference(_chest(2)[None])
    metadata = {"config": {"follow": True}, "follow": save_follow(reference, tmp_path)}
    assert load_follow(tmp_path, metadata).sha256 == reference.sha256
    # as the first matcher's models were written (no name), and the window matcher's before rule 16
    for earlier, name in ((save({"reference": reference.image}), ""),
                          (save({"reference": reference.image}, metadata={"matcher": "window-ncc-1"}), "window-ncc-1")):
        (tmp_path / FOLLOW_FILE).write_bytes(earlier)
        metadata["follow"]["sha256"] = hashlib.sha256(earlier).hexdigest()
        with pytest.raises(ModelError, match="earlier.*retrain"):
            load_follow(tmp_path, metadata)
        # what a refit reads (benchmarks/add_density.py): the same verified film and the matcher it names
        found, matcher = read_reference_film(tmp_path, metadata)
        assert (found.sha256, matcher) == (reference.sha256, name)
