"""DICOM headers that real archives produce, handled by kind (issue 10, item 2).

Two halves: every file of ../shared/data/dicom-edge (README there) goes through radscan's real ingest
path and must give the display the DICOM grayscale pipeline asks for (its `expected/<file>.png`,
mean absolute difference <= 3/255) or an error row in plain words; and for each kind, a small file
built here whose expected display is computed from the standard's own formula or rule (the section
is cited in each test). The synthetic images are 128x128, so the model input is the display itself
(no resampling) and can be compared value by value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from radscan.ingest import find_files, iter_ingested
from radscan.policy import Policy
from tests.support import assert_plain, ingest_one

from .conftest import DATA

EDGE_DIR = DATA / "dicom-edge"
TOLERANCE = 3.0  # grey levels of 255: the bound on the mean absolute difference

# The README's "error row" cases, with words the reason must contain (everything else must display).
EDGE_ERRORS = {
    "rows_mismatch/rows_too_large.dcm": "too little pixel data",  # Rows x Columns need more than is there
    "rows_mismatch/columns_too_small.dcm": "more pixel data than",  # would be shown sheared
}
EDGE_FILES = sorted(p.relative_to(EDGE_DIR).as_posix() for p in EDGE_DIR.glob("*/*.dcm"))


# --- the dicom-edge collection, through the real ingest path ------------------------------------

def test_every_edge_file_is_covered():
    assert len(EDGE_FILES) == 15
    for name in EDGE_FILES:
        assert name in EDGE_ERRORS or (EDGE_DIR / Path(name).parent / "expected" / f"{Path(name).name}.png").exists()


@pytest.fixture(scope="module")
def edge_rows():
    """Every file under dicom-edge as `radscan scan/score` reads it: found by walking the folder,
    sniffed by content, read by the DICOM reader, preprocessed to the 128x128 model input."""
    files = [f for f in find_files([EDGE_DIR]) if f.path.endswith(".dcm")]
    return {record.path: (record, image) for record, image in iter_ingested(files, Policy(), workers=1)}


@pytest.mark.parametrize("name", EDGE_FILES)
def test_edge_file_displays_as_the_standard_asks_or_errors_plainly(edge_rows, name):
    record, image = edge_rows[name]
    if name in EDGE_ERRORS:
        assert record.status == "error" and image is None, (name, record.status)
        assert EDGE_ERRORS[name] in record.reason, record.reason
        assert_plain(record.reason)
        return
    assert record.status == "ok", (name, record.reason)
    expected = np.asarray(Image.open(EDGE_DIR / Path(name).parent / "expected" / f"{Path(name).name}.png").convert("L"))
    difference = np.abs(image.astype(float) - expected.astype(float)).mean()
    assert difference <= TOLERANCE, (name, record.voi_source, round(difference, 2))


def test_edge_fallbacks_are_recorded(edge_rows):
    sources = {name: record.voi_source for name, (record, _) in edge_rows.items()}
    assert sources["ww_zero/ww0.dcm"] == "percentile"  # no usable window: the automatic one
    assert sources["ww_zero/ww0_then_valid.dcm"] == "window"  # the second, valid pair
    assert sources["bits8_in_16/bits8_in16.dcm"] == "full-range"
    assert sources["negative_rescale_slope/slope_neg_window.dcm"] == "window"


# --- one small file per kind, expected values from the standard ----------------------------------


# --- colour data whose codec fixes the component order (issue 22, item 4) ------------------------

_JPEG_FAMILY_COLOUR = ("pydicom/examples_ybr_color.dcm", "pylibjpeg-data/JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
                       "pydicom-data/HTJ2KLossless_08_RGB.dcm")


@pytest.mark.parametrize("name", _JPEG_FAMILY_COLOUR)
@pytest.mark.parametrize("planar", [1, 2, 65535, None])
def test_a_stray_planar_configuration_does_not_scramble_jpeg_colour(tmp_path, name, planar):
    """JPEG, JPEG-LS and JPEG 2000 decoders return the colour components interleaved whatever
    Planar Configuration says (PS3.5 8.2.1); a header with 1 (or another value, or none) must give
    the same display as the file's own 0, not an image read as three planes."""
    import pydicom

    source = DATA / "dicom" / name
    policy = Policy(modalities=None, frames="first")
    expected = ingest_one(source, policy)[1]
    assert expected is not None
    ds = pydicom.dcmread(source)
    if planar is None:
        del ds.PlanarConfiguration
    else:
        ds.PlanarConfiguration = planar
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    record, image = ingest_one(changed, policy)
    assert record.status == "ok", record.reason
    assert np.array_equal(image, expected)


def _native_colour(tmp_path: Path, name: str, pixels: np.ndarray, **header) -> Path:
    """A native (uncompressed) Secondary Capture of `pixels` ((H, W, 3), or (H, W) with a palette)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_native_colour_without_planar_configuration_or_in_12_bits_displays_as_the_grey_film(tmp_path):
    """A trial: RGB without Planar Configuration (Type 1C, absent) was an error row "does not fit the
    header", and 12-bit RGB in 16-bit words showed nearly black and was rejected as blank; a palette
    image without its palette blamed the Modality LUT or window."""
    grey = np.asarray(Image.open(sorted((DATA / "cxr/kermany_pediatric_224/train_normal").iterdir())[0])
                      .convert("L").resize((128, 128)))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    policy = Policy(modalities=None)
    expected = ingest_one(_native_colour(tmp_path, "rgb.dcm", rgb), policy)[1]
    assert np.abs(expected.astype(int) - grey).mean() <= TOLERANCE
    for name, pixels, header in (("no_planar.dcm", rgb, {"PlanarConfiguration": None}),
                                 ("planar_7.dcm", rgb, {"PlanarConfiguration": 7}),
                                 ("rgb12.dcm", rgb.astype(np.uint16) * 16, {"BitsStored": 12, "HighBit": 11})):
        record, image = ingest_one(_native_colour(tmp_path, name, pixels, **header), policy)
        assert record.status == "ok", (name, record.reason)
        assert np.abs(image.astype(int) - expected).mean() <= TOLERANCE, name
    record, image = ingest_one(_native_colour(tmp_path, "palette.dcm", grey), policy)
    assert image is None and record.status == "error" and "palette" in record.reason, record.reason
    assert_plain(record.reason)


@settings(max_examples=12, deadline=None)
@given(bits=st.integers(6, 16), tint=st.sampled_from([0, 40]))
def test_ybr_full_colour_wider_than_8_bits_displays_as_the_grey_film(tmp_path_factory, bits, tint):
    """A trial: YBR_FULL colour in 16-bit words was an error row ("the pixel data does not fit the
    header"): pydicom converts YBR to RGB for 8-bit samples only. Any width from 6 to 16 bits in 16-bit
    words (8 or fewer too: chroma centred on 2**(BitsStored - 1), a review) shows the film as its 8-bit
    RGB twin does, and a tinted one (chroma off centre) is noted as colour."""
    tmp_path = tmp_path_factory.mktemp("ybr")
    grey = np.asarray(Image.open(sorted((DATA / "cxr/kermany_pediatric_224/train_normal").iterdir())[0])
                      .convert("L").resize((96, 96)))
    policy = Policy(modalities=None)
    expected = ingest_one(_native_colour(tmp_path, "rgb.dcm", np.repeat(grey[..., None], 3, axis=2)), policy)[1]
    top, half = 2**bits - 1, 2 ** (bits - 1)
    y = np.rint(grey.astype(np.float64) * top / 255)
    chroma = np.full_like(y, half + tint * (top + 1) / 256)  # a blue-red tint when tint > 0
    ybr = np.stack([y, chroma, chroma], axis=-1).astype(np.uint16)
    record, image = ingest_one(_native_colour(tmp_path, f"ybr{bits}.dcm", ybr, PhotometricInterpretation="YBR_FULL",
                                              BitsStored=bits, HighBit=bits - 1), policy)
    assert record.status == "ok", record.reason
    assert ("colour" in record.converted) == (tint > 0), record.converted
    if not tint:
        assert np.abs(image.astype(int) - expected).mean() <= TOLERANCE


# --- reasons that name the header value that is wrong (issue 22, item 10) ------------------------




# --- a radiograph cut short anywhere after the part naming its SOP Class: an error, not a skip ---

_CUT_SOURCES = ("fo-dicom/CR-MONO1-10-chest", "highdicom/dx_image.dcm", "pylibjpeg-data/966_fixed.dcm",
                "nih-cxr14-udacity/test1_no_finding.dcm")


@pytest.mark.parametrize("source", _CUT_SOURCES)
@settings(max_examples=15, deadline=None)
@given(fraction=st.floats(0.0, 1.0))
def test_a_radiograph_cut_short_is_an_error_row_wherever_the_cut(source, fraction, tmp_path_factory):
    """A transfer that stopped inside the header loses Modality and the rest with it: the row must say
    the file is incomplete (status error, exit 3), not that the policy skipped a film without Modality."""
    import pydicom

    whole = (DATA / "dicom" / source).read_bytes()
    if whole[128:132] == b"DICM":  # cut anywhere after the file meta (which names the SOP class)
        start = 132 + 12 + int.from_bytes(whole[140:144], "little")  # (0002,0000) UL: the group's length
    else:  # no file meta: anywhere after the SOP Class UID
        start = _end_of(pydicom.dcmread(DATA / "dicom" / source, stop_before_pixels=True, force=True), "SOPClassUID")
    end = whole.rfind(b"\xe0\x7f\x10\x00") + 16  # just into the pixel data: the header, all of it
    cut = start + int(fraction * (end - start))
    folder = tmp_path_factory.mktemp("cut")
    (folder / "film.dcm").write_bytes(whole[:cut])
    record, image = ingest_one(folder / "film.dcm")
    assert image is None and record.status == "error", (cut, record.reason)
    assert "truncated" in record.reason or "incomplete" in record.reason
    assert_plain(record.reason)


def _end_of(ds, keyword: str) -> int:
    """Byte offset in the file just after the element `keyword` (its value included), from the raw
    element pydicom keeps until the value is first used."""
    raw = ds.get_item(keyword)
    return raw.value_tell + raw.length
