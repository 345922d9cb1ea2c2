"""The same picture stored in different containers and encodings gives the same model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from radscan.ingest import Found, ingest_file
from radscan.policy import Policy


def _source_image(cxr_dir: Path) -> np.ndarray:
    path = sorted((cxr_dir / "kermany_pediatric_fullres" / "normal").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L").resize((640, 512)))


def _dicom(path: Path, pixels: np.ndarray, photometric: str, syntax: str | None = None,
           window: tuple[float, float] | None = None) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", "TEST^PATIENT"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)


def _model_input(path: Path) -> np.ndarray:
    record, image = ingest_file(Found(str(path.parent), path.name), Policy())
    assert record.status == "ok", record.reason
    assert image is not None and image.shape == (128, 128)
    return image


@pytest.fixture(scope="module")
def variants(tmp_path_factory, cxr_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("encodings")
    grey = _source_image(cxr_dir)
    wide = grey.astype(np.uint16) * 257  # 0..255 -> 0..65535, the same picture at 16 bits
    full_window = (32768.0, 65536.0)  # maps 0..65535 onto itself
    made = {
        "grey.png": lambda p: Image.fromarray(grey).save(p),
        "rgb.png": lambda p: Image.fromarray(np.dstack([grey] * 3)).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])).save(p),
        "dcm_mono2": lambda p: _dicom(p, grey, "MONOCHROME2"),
        "dcm_mono1": lambda p: _dicom(p, 255 - grey, "MONOCHROME1"),
        "dcm_rle": lambda p: _dicom(p, grey, "MONOCHROME2", RLELossless),
        "dcm_jpegls": lambda p: _dicom(p, grey, "MONOCHROME2", JPEGLSLossless),
        "dcm_j2k": lambda p: _dicom(p, grey, "MONOCHROME2", JPEG2000Lossless),
        "dcm_16bit_window": lambda p: _dicom(p, wide, "MONOCHROME2", window=full_window),
        "dcm_16bit_mono1_j2k": lambda p: _dicom(p, 65535 - wide, "MONOCHROME1", JPEG2000Lossless,
                                                window=full_window),
    }
    written = {}
    for name, write in made.items():  # DICOM files without extension: kind comes from content
        try:
            write(folder / name)
        except (RuntimeError, NotImplementedError) as exc:  # pydicom finds no encoder: the codecs extra is missing
            written[name] = f"cannot encode without the codecs extra (pip install -e .[codecs]): {exc}"
            continue
        written[name] = folder / name
    return written


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cxr_dir) -> np.ndarray:
    path = tmp_path_factory.mktemp("reference") / "grey.png"
    Image.fromarray(_source_image(cxr_dir)).save(path)
    return _model_input(path)


@pytest.mark.parametrize("name", [
    "grey.png", "rgb.png", "rgba.png", "dcm_mono2", "dcm_mono1", "dcm_rle", "dcm_jpegls", "dcm_j2k",
    "dcm_16bit_window", "dcm_16bit_mono1_j2k",
])
def test_every_encoding_gives_the_same_model_input(variants, reference, name):
    if isinstance(variants[name], str):
        pytest.skip(variants[name])
    assert np.array_equal(_model_input(variants[name]), reference)


def test_jpeg_of_the_same_picture_is_close(tmp_path, cxr_dir, reference):
    path = tmp_path / "lossy.jpg"
    Image.fromarray(_source_image(cxr_dir)).save(path, quality=95)
    assert np.abs(_model_input(path).astype(float) - reference).mean() < 1.0
