"""The lung mask of a thorax-box model (radscan.model.field): patches that hang on a lung field by a
narrow neck are left out, and nothing else of the fields changes."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from radscan.model.field import NECK_PX, _without_necked_patches


def two_fields(width: int, gap: int) -> np.ndarray:
    """Two lung-like fields (128 x 128): upright ellipses either side of the midline."""
    rows, cols = np.mgrid[:128, :128]
    half = width / 2
    left = ((cols - (64 - gap - half)) / half) ** 2 + ((rows - 64) / 40) ** 2 <= 1
    right = ((cols - (64 + gap + half)) / half) ** 2 + ((rows - 64) / 40) ** 2 <= 1
    return left | right


@settings(max_examples=30, deadline=None)
@given(width=st.integers(2 * NECK_PX + 12, 40), gap=st.integers(4, 10), neck=st.integers(1, 2 * NECK_PX),
       patch=st.integers(2 * NECK_PX + 2, 16), length=st.integers(2 * NECK_PX + 1, 14))
def test_a_patch_behind_a_narrow_neck_is_left_out_and_the_fields_are_kept(width, gap, neck, patch, length):
    fields = two_fields(width, gap)
    row = 64  # the neck leaves the right field at its widest, as the Kermany patch left the left field's base
    right_edge = int(np.nonzero(fields[row])[0].max())
    necked = fields.copy()
    necked[row - neck // 2: row - neck // 2 + neck, right_edge: right_edge + length] = True  # the neck
    start = right_edge + length
    assume(start + patch < 127)  # the patch lies inside the image
    necked[row - patch // 2: row + patch // 2, start: start + patch] = True  # the patch it leads to
    cut = _without_necked_patches(necked)
    assert (cut <= necked).all()  # only ever removes
    assert cut[fields].all()  # both fields whole, outline included
    assert not cut[row - patch // 2: row + patch // 2, start + NECK_PX + 1: start + patch].any()  # the patch: gone
    labels, count = ndimage.label(cut)
    assert count == 2


@settings(max_examples=20, deadline=None)
@given(width=st.integers(2 * NECK_PX + 4, 40), gap=st.integers(2, 12))
def test_fields_without_necks_are_unchanged(width, gap):
    fields = two_fields(width, gap)
    assert np.array_equal(_without_necked_patches(fields), fields)


def test_fields_too_thin_to_open_are_left_as_they_are():
    thin = np.zeros((128, 128), bool)
    thin[20:100, 30:33] = thin[20:100, 90:93] = True
    assert np.array_equal(_without_necked_patches(thin), thin)


def test_a_lung_that_the_opening_splits_in_two_is_kept_whole():
    """A field with a narrow waist is a lung, not a patch: both its halves are far larger than PATCH_SHARE."""
    fields = two_fields(24, 6)
    waist = fields.copy()
    waist[60:66, :64] = False  # cut the left field ...
    waist[60:66, 30:33] = True  # ... and join it again by a narrow waist
    assert np.array_equal(_without_necked_patches(waist), waist)
