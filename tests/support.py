"""Helpers shared by several test files (this is not a test file): what a plain reason is, reading one
file or a CSV, a real Orthanc on loopback, a tiny calibrated model on real films. Tests import from
here, never from one another."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest

from radscan.ingest import Found, ingest_file
from radscan.policy import Policy

from .conftest import CXR_DIR, free_port

if TYPE_CHECKING:  # torch only where a model is built: these helpers also serve torch-free tests
    import torch

    from radscan.model.simsid import SimSID

IN_CI = bool(os.environ.get("CI"))

# What Python, pydicom or Pillow say to programmers, never to a PACS admin.
_INTERNAL = re.compile(r"Traceback|\w+(Error|Exception)\b|NoneType|object has no attribute|invalid literal|"
                       r"<[^>]*>|\bdtype\b|\bndarray\b|'\w+' object|\(0x[0-9a-f]+\)")


def assert_plain(reason: str) -> None:
    """A reason is one line of plain words: no exception names, reprs or tracebacks."""
    assert reason and "\n" not in reason, reason
    assert not _INTERNAL.search(reason), reason


def ingest_one(path: Path, policy: Policy | None = None):
    """`ingest_file` on one file, as the crawl would find it: (record, model input or None)."""
    return ingest_file(Found(str(path.parent), path.name), policy or Policy())


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV written by radscan, as dictionaries of strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def remove_chain(root: Path, name: str, depth: int, leaf: str) -> None:
    """Remove root/name/name/.../leaf without recursion or long paths (shutil.rmtree, and so
    pytest's clean-up of old temporary folders, recurses once per level)."""
    descriptor = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        inner = os.open(name, os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    os.unlink(leaf, dir_fd=descriptor)
    for _ in range(depth):
        parent = os.open("..", os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        os.rmdir(name, dir_fd=parent)
        descriptor = parent
    os.close(descriptor)


BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def needs(program: str, package: str) -> str:
    """The path of `program`, or a skip that says how to install it (a failure in CI, which installs it)."""
    found = shutil.which(program)
    if found is None:
        message = f"needs {program} (Debian package {package}: apt-get install {package}; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


class Orthanc:
    """A real Orthanc on loopback ports, with its own storage, for one test module."""

    AET = "ORTHANC"

    def __init__(self, folder: Path, modalities: dict[str, list] | None = None):
        self.folder, self.dicom_port, self.http_port = folder, free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "radscan-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "DicomAet": self.AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "DicomCheckCalledAet": True, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "Plugins": [],
            "DicomModalities": {"tests": ["RADSCANTEST", "127.0.0.1", 11112], **(modalities or {})},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([needs("Orthanc", "orthanc"), str(folder / "orthanc.json")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.rest("/system")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")

    def rest(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: bytes) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())

    def instances(self) -> int:
        return len(self.rest("/instances"))

    def find_images(self, study_uid: str) -> list[tuple[str, str, str]]:
        """(SOPClassUID, SOPInstanceUID, SeriesDescription) of the study's instances, by C-FIND."""
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

        ae = AE(ae_title="RADSCANTEST")
        ae.add_requested_context(Find)
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=self.AET)
        assert assoc.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = query.SOPClassUID = query.SeriesDescription = ""
        found = [(str(i.SOPClassUID), str(i.SOPInstanceUID), str(i.get("SeriesDescription", "")))
                 for status, i in assoc.send_c_find(query, Find) if i is not None]
        assoc.release()
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def real_batch(count: int) -> torch.Tensor:
    """The first `count` test normals of the paediatric set as a model batch, (count, 1, 128, 128) float."""
    from PIL import Image

    from radscan.model.simsid import to_model_tensor
    from radscan.preprocess import to_model_input

    files = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:count]
    return to_model_tensor(np.stack([to_model_input(np.asarray(Image.open(f).convert("L"))) for f in files]))


def calibrated_tiny(**overrides) -> SimSID:
    """A tiny model with moved BN statistics and a small calibration spread, as after training."""
    import torch

    from radscan.model.config import preset
    from radscan.model.simsid import SimSID

    torch.manual_seed(0)
    model = SimSID(preset("tiny", **overrides))
    model.train()
    model.generate(real_batch(16))  # move BN running statistics away from their initial values
    model.eval()
    if model.density is not None:  # a density fitted to real films, as after training
        from radscan.calibration import fit_density

        fit_density(model, (real_batch(24).squeeze(1).numpy() * 127.5 + 127.5).round().astype(np.uint8), 0,
                    torch.device("cpu"))
    model.calibration_std.fill_(1e-3)  # a small spread, as after training, magnifies any difference
    return model


def fsync_spy(synced: list[str], fail: str | None = None, before_rename: list[str] | None = None):
    """An os.fsync that appends the name each synced file has or will take (a temporary ".NAME.xxx.tmp"
    counts as NAME) to `synced`, and to `before_rename` too when it was synced under its temporary
    name; for the name `fail` it raises a full disk as the kernel reports it (ENOSPC). Linux only
    (/proc/self/fd)."""
    import errno

    real = os.fsync

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        temporary = re.fullmatch(r"\.(.+?)\.[^.]+\.tmp", name)
        name = temporary.group(1) if temporary else name
        synced.append(name)
        if temporary and before_rename is not None:
            before_rename.append(name)
        if name == fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)
    return fsync

