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
