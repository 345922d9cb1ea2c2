"""The calibration split of `radscan train`: films of one patient never on both sides, when the
patient is named by the study or, for JPEG/PNG, by a pattern in the file name; nor copies of one
film, whatever their names."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from radscan.errors import SettingError
from radscan.train import copies_together, patient_keys, split_calibration


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


@settings(max_examples=40, deadline=None)
@given(studies=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 3)), min_size=25, max_size=120),
       seed=st.integers(0, 10), fraction=st.floats(0.05, 0.5))
def test_a_patients_dicom_studies_are_never_on_both_sides(studies, seed, fraction):
    """A new user's trial: a site's DICOM normals, several studies per patient and files named by
    UID, were split by study: 8 of 12 calibration films were of a patient whose other study was
    trained on. The Patient ID groups them; a film without one keeps its study."""
    patients = [patient for patient, films in studies for _ in range(films)]
    study_keys = [f"1.2.826.{index}" for index, (_, films) in enumerate(studies) for _ in range(films)]
    ids = [f"MRN{patient:06d}" if patient else "" for patient in patients]  # patient 0: no Patient ID
    keys = patient_keys([f"{key}.dcm" for key in study_keys], study_keys, None, ids)
    assume(len(set(keys)) >= 20)
    held = split_calibration(keys, fraction, seed)
    sides: dict[str, set[bool]] = {}
    for patient, study, side in zip(ids, study_keys, held, strict=True):
        sides.setdefault(patient or study, set()).add(bool(side))
    assert all(len(side) == 1 for side in sides.values())


def test_a_patient_named_by_a_file_name_and_by_a_dicom_header_is_one_patient():
    """A review: a patient's JPEGs named by --patient-pattern and DICOM films carrying the same
    Patient ID got two keys, and 7 of 24 patients had films on both sides."""
    names = ["PAT001_0.jpeg", "1.2.3.dcm", "PAT002_1.jpeg", "1.2.4.dcm"]
    keys = patient_keys(names, ["f0", "s1", "f2", "s3"], r"^(PAT\d+)_", ["", "PAT001", "", "PAT002"])
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]


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


@settings(max_examples=30, deadline=None)
@given(originals=st.lists(st.integers(0, 40), min_size=25, max_size=120), seed=st.integers(0, 10),
       rendering=st.sampled_from(["as stored", "re-encoded", "brighter", "gamma 0.8", "another window"]))
def test_copies_of_one_film_are_never_on_both_sides(originals, seed, rendering):
    """Film i is a copy of film `originals[i]` of 41 distinct films, each file its own study (a flat
    folder of differently named files; a trial found byte-identical twins trained and calibrated on).
    A copy re-encoded (a grey level of noise) or shown otherwise (every other copy brighter, another
    gamma or window: a JPEG export beside the DICOM; a second trial) is a copy too."""
    bases = np.random.default_rng(0).integers(40, 216, (41, 128, 128), dtype=np.uint8)
    films = bases[originals].astype(np.float64)
    changed = films[1::2]
    if rendering == "re-encoded":
        films += np.random.default_rng(seed).integers(-1, 2, films.shape)
    elif rendering == "brighter":
        changed += 6
    elif rendering == "gamma 0.8":
        changed[:] = 255 * (changed / 255) ** 0.8
    elif rendering == "another window":
        changed[:] = (changed - 30) * 1.2
    films = np.clip(films, 0, 255).round().astype(np.uint8)
    keys = copies_together([f"study {index}" for index in range(len(films))], films)
    held = split_calibration(keys, 0.3, seed)
    sides: dict[int, set[bool]] = {}
    for original, side in zip(originals, held, strict=True):
        sides.setdefault(original, set()).add(bool(side))
    if len(set(originals)) >= 20:
        assert all(len(side) == 1 for side in sides.values())
    assert len(set(keys)) == len(set(originals))  # distinct films stay apart


def test_copies_join_the_patient_groups_they_bridge():
    """Two patients whose folders share a film become one group: the copy cannot be on both sides."""
    films = np.random.default_rng(1).integers(0, 256, (4, 128, 128), dtype=np.uint8)
    films[3] = films[0]
    assert copies_together(["p1", "p1", "p2", "p2"], films) == ["p1", "p1", "p1", "p1"]
    assert copies_together(["p1", "p1", "p2", "p2"], films[[0, 1, 2, 2]]) == ["p1", "p1", "p2", "p2"]
