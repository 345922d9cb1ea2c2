"""A compressed frame's own header (radscan.codestream) against the DICOM header, before decoding."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from radscan.codestream import stream_header
from radscan.policy import Policy
from tests.support import assert_plain, ingest_one


def _encoded(width: int, height: int, mode: str, kind: str) -> bytes:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "JPEG2000", irreversible=False, no_jp2=kind == "j2k")
    return buffer.getvalue()


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), mode=st.sampled_from(["L", "RGB"]),
       kind=st.sampled_from(["jpeg", "j2k", "jp2"]))
def test_the_header_a_codestream_declares_is_read_as_pillow_wrote_it(width, height, mode, kind):
    header = stream_header(_encoded(width, height, mode, kind))
    assert header is not None
    assert (header.width, header.height, header.components, header.precision) == (width, height, len(mode), 8)


def test_what_is_no_known_codestream_has_no_header():
    assert stream_header(b"") is None and stream_header(b"\x00" * 64) is None
    assert stream_header(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before any frame header
    assert stream_header(_encoded(20, 10, "L", "jpeg")[:20]) is None  # cut before its frame header


def _dicom(path: Path, frame: bytes, rows: int, columns: int, samples: int = 1, syntax=JPEGBaseline8Bit,
           bits: int = 8) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "YBR_FULL_422"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.tuples(st.integers(40, 200), st.integers(40, 200)), said=st.tuples(st.integers(40, 200),
       st.integers(40, 200)), kind=st.sampled_from(["jpeg", "j2k"]))
def test_a_codestream_of_another_size_than_its_header_is_an_error_that_says_so(tmp_path, size, said, kind):
    """A vendor's export whose compressed image is not the size its Rows and Columns say failed as
    "damaged or a variant the installed decoders do not support", sending IT after decoders; it is
    an error that names both sizes, and a stream that agrees is read."""
    syntax = JPEGBaseline8Bit if kind == "jpeg" else JPEG2000Lossless
    frame = _encoded(*size, "L", kind)
    record, image = ingest_one(_dicom(tmp_path / "f.dcm", frame, rows=said[1], columns=said[0], syntax=syntax))
    if said == size:
        assert record.status in ("ok", "rejected"), record.reason  # read (quality control judges noise)
    else:
        assert record.status == "error" and image is None
        assert f"{size[0]}x{size[1]}" in record.reason and f"{said[0]}x{said[1]}" in record.reason, record.reason
        assert_plain(record.reason)


def test_colour_in_a_grey_header_and_grey_in_a_colour_header_are_named(tmp_path):
    record, _ = ingest_one(_dicom(tmp_path / "a.dcm", _encoded(64, 64, "RGB", "jpeg"), 64, 64, samples=1))
    assert record.status == "error" and "3 component(s)" in record.reason and "says 1" in record.reason
    record, _ = ingest_one(_dicom(tmp_path / "b.dcm", _encoded(64, 64, "L", "jpeg"), 64, 64, samples=3))
    assert record.status == "error" and "1 component(s)" in record.reason and "says 3" in record.reason


@pytest.mark.parametrize("kind", ["jpeg", "j2k"])
def test_a_codestream_declaring_more_pixels_than_the_limit_is_refused_before_decoding(tmp_path, kind):
    """A 7.8 KB file whose codestream declared 20000 x 20000 took 2.3 GB before its decoder gave up:
    the declared size is checked against --max-pixels first, whatever the header's Rows and Columns."""
    frame = bytearray(_encoded(64, 64, "L", kind))
    if kind == "jpeg":
        at = frame.index(b"\xff\xc0") + 5  # SOF0: length, P, then Y and X
        frame[at:at + 4] = (20000).to_bytes(2, "big") * 2
    else:
        at = frame.index(b"\xff\x51") + 6  # SIZ: Lsiz, Rsiz, then Xsiz and Ysiz
        frame[at:at + 8] = (20000).to_bytes(4, "big") * 2
    syntax = JPEGBaseline8Bit if kind == "jpeg" else JPEG2000Lossless
    record, image = ingest_one(_dicom(tmp_path / "bomb.dcm", bytes(frame), 64, 64, syntax=syntax))
    assert record.status == "error" and image is None and "20000x20000" in record.reason, record.reason
    assert "decompression bomb" in record.reason


def test_an_8_bit_stream_under_a_12_bit_header_is_said_when_it_cannot_be_decoded(tmp_path):
    record, _ = ingest_one(_dicom(tmp_path / "f.dcm", _encoded(64, 64, "L", "jpeg"), 64, 64, bits=12))
    if record.status == "error":  # a decoder that reads it anyway is as good
        assert "8-bit samples" in record.reason and "Bits Stored says 12" in record.reason, record.reason


def test_a_deflated_data_set_that_inflates_beyond_the_pixel_limit_is_not_read(tmp_path):
    """pydicom inflates a deflated data set whole before reading it: a 2 MB file of 2 GB of zeros held
    4 GB and was scored. It is inflated in chunks and counted first; one within the limit is read."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows = ds.Columns = 128
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.tile(np.linspace(0, 4095, 128).astype(np.uint16), (128, 1)).tobytes()
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    record, image = ingest_one(tmp_path / "deflated.dcm")
    assert record.status == "ok" and image is not None, record.reason
    record, image = ingest_one(tmp_path / "deflated.dcm", Policy(max_pixels=1000))  # 6,000 bytes at most
    assert record.status == "error" and image is None and "inflates to more than" in record.reason, record.reason
    del ds.file_meta.TransferSyntaxUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)  # not deflated: the pixel limit is the header's
    assert ingest_one(tmp_path / "plain.dcm", Policy(max_pixels=20000))[0].status == "ok"


def _deflated(path: Path, rows: int, columns: int, preamble: bool = True) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.random.default_rng(0).integers(0, 4096, (rows, columns), dtype=np.uint16)
    ds.PixelData = ramp.tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:  # a file written without its preamble and marker (PS3.10 7.1 lets readers meet them)
        path.write_bytes(path.read_bytes()[132:])
    return path


def test_a_deflated_film_of_more_than_a_chunk_is_read_and_a_damaged_stream_is_no_radscan_bug(tmp_path):
    """A review: a real 1024 x 1024 deflated film (over 1 MiB inflated, a pad byte after the stream)
    spun forever in the inflate count; a damaged stream escaped as "a radscan bug". The first is read,
    the second is an error that says the file is damaged; without a preamble the limit holds too."""
    path = _deflated(tmp_path / "big.dcm", 800, 800)
    assert ingest_one(path)[0].status in ("ok", "rejected")  # read (quality control judges noise)
    from radscan.dicom import _meta_end  # noqa: PLC2701 (where the deflated stream starts)

    data = bytearray(path.read_bytes())
    start = _meta_end(bytes(data[:4096]))
    data[start + 5:start + 40] = b"\xff" * 35  # the stream's first block header broken (a review's file)
    (tmp_path / "damaged.dcm").write_bytes(bytes(data))
    record, _ = ingest_one(tmp_path / "damaged.dcm")
    assert record.status == "error" and "radscan bug" not in record.reason, record.reason
    bare = _deflated(tmp_path / "bare.dcm", 128, 128, preamble=False)
    assert ingest_one(bare)[0].status in ("ok", "rejected")
    record, _ = ingest_one(bare, Policy(max_pixels=1000))
    assert record.status == "error" and "inflates to more than" in record.reason, record.reason
