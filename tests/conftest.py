"""Shared fixtures: the real data sets live in ../shared/data beside the repository (also in CI),
or wherever RADSCAN_TEST_DATA points. tests/unit needs none of them and runs in seconds; every
other test is end to end on the real data (marker `data`) and is skipped with a message that says
what it needs where the data are missing."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RADSCAN_TEST_DATA", REPO.parent / "shared" / "data"))
DICOM_DIR = DATA / "dicom"
CXR_DIR = DATA / "cxr"
PATIENT_ID = "TEST^SECRET-4711"  # written into a test study; must never reach a log, name or cache

_MISSING = (f"needs the real test data at {DATA}: chest X-rays and DICOM files from public sources (docs/testing.md "
            "says which and where they come from); put them there or set RADSCAN_TEST_DATA")
UNIT = Path(__file__).parent / "unit"  # tests of pure functions on inputs made in the test: no shared data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test outside tests/unit is end to end and reads the shared data (marker `data`):
    without the data those are skipped with a message that says what they need."""
    for item in items:
        if UNIT not in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.data)
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=_MISSING)
    for item in items:
        if item.get_closest_marker("data"):
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (for the servers the tests start)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def dicom_manifest() -> list[dict[str, str]]:
    with open(DICOM_DIR / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return DICOM_DIR


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    return CXR_DIR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SimSID trained for one epoch on 48 real normals: enough to exercise scoring."""
    import shutil

    from radscan.model.config import preset
    from radscan.train import TrainConfig, train

    normals = tmp_path_factory.mktemp("model_normals")
    for path in sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[48:96]:
        shutil.copy(path, normals / path.name)
    out = tmp_path_factory.mktemp("models") / "tiny"
    train([str(normals)], out, preset("tiny"), TrainConfig(epochs=1, batch_size=8), workers=1, progress=False)
    return out


@pytest.fixture()
def studies(tmp_path) -> Path:
    """DICOM studies (one with two images, one with an identifier to protect), JPEG studies, an SR."""
    import pydicom

    root = tmp_path / "incoming"
    (root / "cr1").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "fo-dicom/CR-MONO1-10-chest", root / "cr1" / "IM1")
    shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", root / "cr1" / "IM2")  # another study UID
    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    ds.PatientID = PATIENT_ID
    (root / "nih").mkdir()
    ds.save_as(root / "nih" / "a.dcm")
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
    ds.save_as(root / "nih" / "b.dcm")
    shutil.copy(DICOM_DIR / "pydicom/test-SR.dcm", root / "nih" / "sr.dcm")
    for label, folder in (("normal", "test_normal"), ("pneumonia", "test_abnormal")):
        for index, jpeg in enumerate(sorted((CXR_DIR / "kermany_pediatric_224" / folder).iterdir())[:3]):
            (root / f"{label}{index}").mkdir()
            shutil.copy(jpeg, root / f"{label}{index}" / jpeg.name)
    return root
