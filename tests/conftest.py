"""Shared fixtures: the real data sets live in ../shared/data beside the repository (also in CI),
or wherever RADSCAN_TEST_DATA points. Without them, the tests that read them are skipped with a
message that says what they need, and the rest run."""

from __future__ import annotations

import csv
import inspect
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RADSCAN_TEST_DATA", REPO.parent / "shared" / "data"))
DICOM_DIR = DATA / "dicom"
CXR_DIR = DATA / "cxr"

# names whose use in a test or in one of its fixtures means the test reads the shared data
_DATA_NAMES = ("DATA", "CXR_DIR", "DICOM_DIR", "EDGE_DIR", "cxr_dir", "dicom_dir", "dicom_manifest", "_real_batch")
_MISSING = (f"needs the real test data at {DATA}: chest X-rays and DICOM files from public sources (docs/testing.md "
            "says which and where they come from); put them there or set RADSCAN_TEST_DATA")


def _reads_data(item: pytest.Item) -> bool:
    if item.get_closest_marker("data"):
        return True
    sources = [item.function] if hasattr(item, "function") else []
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        sources += [definition.func for definition in definitions]
    for source in sources:
        try:
            text = inspect.getsource(source)
        except (OSError, TypeError):
            continue
        if any(name in text for name in _DATA_NAMES):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=_MISSING)
    for item in items:
        if _reads_data(item):
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
