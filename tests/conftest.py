"""Shared fixtures: the real data sets live in ../shared/data beside the repository (also in CI)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DICOM_DIR = DATA / "dicom"
CXR_DIR = DATA / "cxr"


if not DATA.is_dir():
    raise RuntimeError(f"the real test data is expected at {DATA} (../shared/data beside the repository)")


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
