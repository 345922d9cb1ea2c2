"""The calibration split of `radscan train`: films of one patient never on both sides, when the
patient is named by the study or, for JPEG/PNG, by a pattern in the file name."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from radscan.errors import SettingError
from radscan.train import patient_keys, split_calibration


@settings(max_examples=40, deadline=None)
@given(films=st.lists(st.integers(0, 60), min_size=25, max_size=300), seed=st.integers(0, 10),
       fraction=st.floats(0.05, 0.5))
def test_no_patient_is_both_trained_and_calibrated_on(films, seed, fraction):
    """Each film's name carries its patient (as Kermany's person12_bacteria_48.jpeg does); the files
    are their own studies (a flat folder): split by the pattern, a patient's films stay together."""
    assume(len(set(films)) > 1)  # one patient in all: refused (test below)
    names = [f"sub/person{patient}_virus_{index}.jpeg" for index, patient in enumerate(films)]
    keys = patient_keys(names, names, r"person\d+")
    held = split_calibration(keys, fraction, seed)
    sides: dict[int, set[bool]] = {}
    for patient, side in zip(films, held, strict=True):
        sides.setdefault(patient, set()).add(bool(side))
    if len(set(films)) >= 20:  # enough patients to split by patient
        assert all(len(side) == 1 for side in sides.values())


def test_the_first_group_names_the_patient_and_unmatched_names_keep_their_study():
    names = ["00001234_000.png", "00001234_001.png", "00009999_000.png", "notes.png"]
    keys = patient_keys(names, ["a", "b", "c", "d"], r"^(\d{8})_")
    assert keys == ["patient 00001234", "patient 00001234", "patient 00009999", "d"]
    assert patient_keys(names, ["a", "b", "c", "d"], None) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("pattern, words", [("person(\\d+", "not a regular expression"),
                                            ("^patient-\\d+", "in none of the 4 file names"),
                                            ("x*", "in none of the 4 file names"),
                                            ("png", "the same patient")])
def test_a_pattern_that_cannot_name_patients_is_refused_in_words(pattern, words):
    with pytest.raises(SettingError, match=words):
        patient_keys(["a.png", "b.png", "c.png", "d.png"], ["a", "b", "c", "d"], pattern)
