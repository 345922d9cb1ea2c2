"""DICOM headers of every kind real archives produce, each in a small file built here whose expected
display follows from the standard's formula or rule (the section is cited in each test); the
shared dicom-edge files are read by tests/test_dicom_edge.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from radscan.preprocess import percentile_window
from tests.support import assert_plain, ingest_one


def _write(path: Path, stored: np.ndarray, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
           pixel_bytes: bytes | None = None, rows: int | None = None, columns: int | None = None,
           **elements) -> Path:
    """A DX chest file with exactly the header given: `stored` (H, W) uint8/uint16/int16 is written
    as native little-endian pixel data unless `pixel_bytes` replaces it; keywords in `elements`
    (e.g. WindowCenter=[40, 50]) are set as they are, however odd."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", "EDGE^TEST"
    ds.Rows = stored.shape[0] if rows is None else rows
    ds.Columns = stored.shape[1] if columns is None else columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes() if pixel_bytes is None else pixel_bytes
    with warnings.catch_warnings():  # odd values are the point of these files
        warnings.simplefilter("ignore")
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return path


def _display(path: Path) -> np.ndarray:
    record, image = ingest_one(path)
    assert record.status == "ok", record.reason
    assert image is not None and image.shape == (128, 128)
    return image.astype(float)


def _ramp(low: int, high: int, dtype=np.uint16) -> np.ndarray:
    """(128, 128): every row runs from `low` to `high`."""
    return np.tile(np.linspace(low, high, 128).round().astype(dtype), (128, 1))


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2
    -> 255; else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255."""
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, np.where(x > center - 0.5 + (width - 1) / 2, 255.0, y))


def _sigmoid_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 (SIGMOID) onto 0..255: 255 / (1 + exp(-4 (x - c) / w))."""
    return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def test_8bit_data_in_16bit_words_uses_bits_stored_range(tmp_path):
    """PS3.3 C.7.6.3.1.1 / PS3.5 8.1.1: with Bits Allocated 16 and Bits Stored 8 the stored values
    are 0..255; the unused high bits carry nothing. Without a window the full stored range is
    shown (radscan's rule for 8-bit data), so value v displays as v, whatever the container;
    MONOCHROME1 (C.7.6.3.1.2) shows 255 - v."""
    ramp = _ramp(0, 255, np.uint16)
    assert np.abs(_display(_write(tmp_path / "a.dcm", ramp, bits_stored=8)) - ramp).max() <= 0.5
    mono1 = _display(_write(tmp_path / "b.dcm", ramp, bits_stored=8, photometric="MONOCHROME1"))
    assert np.abs(mono1 - (255 - ramp)).max() <= 0.5
    control = _display(_write(tmp_path / "c.dcm", ramp.astype(np.uint8)))
    assert np.array_equal(control, _display(tmp_path / "a.dcm"))


def test_negative_rescale_slope_window_is_applied_to_rescaled_values(tmp_path):
    """PS3.3 C.11.1: output = stored * slope + intercept, here 1000 - 2 * stored, so the rescaled
    values fall as stored values rise. C.11.2.1.2.1: the window acts on those rescaled values and
    its output rises with them: values below the window are the minimum output (black), values
    above it the maximum (white), whatever the sign of the slope."""
    stored = _ramp(0, 500)
    rescaled = 1000.0 - 2.0 * stored
    center, width = 500.0, 801.0
    shown = _display(_write(tmp_path / "w.dcm", stored, bits_stored=12, RescaleSlope="-2", RescaleIntercept="1000",
                            WindowCenter=center, WindowWidth=width))
    assert np.abs(shown - _linear_window(rescaled, center, width)).max() <= 1.0
    assert shown[:, 0].mean() > shown[:, -1].mean()  # stored 0 = rescaled 1000: bright


def test_unusable_rescale_values_mean_identity(tmp_path):
    """PS3.3 C.11.1: the rescale is a straight line; a slope of 0 (every pixel one value) or an
    empty slope cannot be one. The next valid choice is the identity, so the display equals that
    of the same pixels without the elements."""
    stored = _ramp(100, 3000)
    plain = _display(_write(tmp_path / "plain.dcm", stored, bits_stored=12))
    assert np.array_equal(_display(_write(tmp_path / "zero.dcm", stored, bits_stored=12, RescaleSlope="0",
                                          RescaleIntercept="0")), plain)
    assert np.array_equal(_display(_write(tmp_path / "empty.dcm", stored, bits_stored=12, RescaleSlope="",
                                          RescaleIntercept="")), plain)


def test_window_width_below_one_is_skipped_for_the_next_pair(tmp_path):
    """PS3.3 C.11.2.1.2.1: for LINEAR, Window Width shall be >= 1. An unusable pair is skipped:
    the next valid pair is used, and without one the automatic window; never an error."""
    stored = _ramp(0, 1023)
    shown = _display(_write(tmp_path / "two.dcm", stored, bits_stored=10, WindowCenter=[400, 400],
                            WindowWidth=[0, 500]))
    assert np.abs(shown - _linear_window(stored.astype(float), 400, 500)).max() <= 1.0
    record, image = ingest_one(_write(tmp_path / "zero.dcm", stored, bits_stored=10, WindowCenter=400, WindowWidth=0))
    assert (record.status, record.voi_source) == ("ok", "percentile"), record.reason
    low, high = percentile_window(stored)
    assert np.abs(image - np.clip((stored - low) / (high - low) * 255, 0, 255)).max() <= 1.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slope=st.sampled_from([0.001, 0.0025, 0.01, 0.1, 0.5]), width_steps=st.integers(1, 4095),
       middle=st.floats(0.2, 0.8))
def test_a_window_after_a_fractional_slope_shows_as_its_slope_one_twin(tmp_path, slope, width_steps, middle):
    """Issue 22 item 7: LINEAR's minimum width and half-step are one stored value. After Rescale
    Slope s the rescaled values step by s, so a window of width w there is w / s stored values:
    a file displays exactly as its twin stored with slope 1 and the window scaled by 1 / s, whether
    w is below 1 (it was skipped as invalid) or above (it was a tenth as wide at w = 1.1)."""
    stored = _ramp(0, 4095)
    center_steps = round(middle * 4095)
    shown = _display(_write(tmp_path / "s.dcm", stored, bits_stored=12, RescaleSlope=repr(slope),
                            RescaleIntercept="0", WindowCenter=repr(center_steps * slope),
                            WindowWidth=repr(width_steps * slope)))
    twin = _display(_write(tmp_path / "t.dcm", stored, bits_stored=12, WindowCenter=center_steps,
                           WindowWidth=width_steps))
    assert np.abs(shown - twin).max() <= 1


def test_a_window_narrower_than_one_stored_step_is_still_skipped(tmp_path):
    """Below one stored value (here 0.5 with slope 1) the window is a threshold, not a window."""
    stored = _ramp(0, 1023)
    record, _ = ingest_one(_write(tmp_path / "half.dcm", stored, bits_stored=10, WindowCenter=400, WindowWidth=0.5))
    assert (record.status, record.voi_source) == ("ok", "percentile"), record.reason


def test_window_outside_the_data_is_skipped(tmp_path):
    """PS3.3 C.11.2.1.2.1: every value below the window shows as the minimum output. A window
    above every pixel of the image would show a black frame: the next choice is used instead."""
    stored = _ramp(100, 900)
    record, _ = ingest_one(_write(tmp_path / "a.dcm", stored, bits_stored=12, WindowCenter=3000, WindowWidth=200))
    assert (record.status, record.voi_source) == ("ok", "percentile")


@pytest.mark.parametrize("function", ["", "linear", " LINEAR "])
def test_empty_or_lower_case_voi_lut_function_is_linear(tmp_path, function):
    """PS3.3 C.11.2.1.3: VOI LUT Function absent means LINEAR; an empty value is read as absent,
    and its defined terms are read without regard to case or padding."""
    stored = _ramp(0, 1023)
    shown = _display(_write(tmp_path / "f.dcm", stored, bits_stored=10, WindowCenter=512, WindowWidth=600,
                            VOILUTFunction=function))
    assert np.abs(shown - _linear_window(stored.astype(float), 512, 600)).max() <= 1.0


def test_lower_case_sigmoid_follows_the_sigmoid_formula(tmp_path):
    """PS3.3 C.11.2.1.3.1: y = (ymax - ymin) / (1 + exp(-4 (x - c) / w)) + ymin."""
    stored = _ramp(0, 1023)
    shown = _display(_write(tmp_path / "s.dcm", stored, bits_stored=10, WindowCenter=512, WindowWidth=300,
                            VOILUTFunction="sigmoid"))
    assert np.abs(shown - _sigmoid_window(stored.astype(float), 512, 300)).max() <= 1.0


def test_multi_valued_voi_lut_function_pairs_with_the_window_used(tmp_path):
    """PS3.3 C.11.2.1.2 / C.11.2.1.3: Window Center/Width hold alternative pairs; when the VOI LUT
    Function has a value per pair, the one at the position of the pair used applies: the first
    pair is unusable (width 0), so the second pair with its LINEAR function is used."""
    stored = _ramp(0, 1023)
    shown = _display(_write(tmp_path / "m.dcm", stored, bits_stored=10, WindowCenter=[512, 300],
                            WindowWidth=[0, 400], VOILUTFunction=["SIGMOID", "LINEAR"]))
    assert np.abs(shown - _linear_window(stored.astype(float), 300, 400)).max() <= 1.0
    first = _display(_write(tmp_path / "f.dcm", stored, bits_stored=10, WindowCenter=512, WindowWidth=300,
                            VOILUTFunction=["SIGMOID", "LINEAR"]))
    assert np.abs(first - _sigmoid_window(stored.astype(float), 512, 300)).max() <= 1.0


def test_unusable_voi_lut_sequence_falls_back_to_the_window(tmp_path):
    """PS3.3 C.11.2.1.1: a VOI LUT has as many LUT Data entries as its LUT Descriptor announces.
    An item with fewer cannot be applied; the window is the next choice."""
    stored = _ramp(0, 1023)
    item = Dataset()
    item.add_new(0x00283002, "US", [1024, 0, 16])  # LUT Descriptor: 1024 entries of 16 bits
    item.add_new(0x00283006, "US", list(range(10)))  # LUT Data: 10 entries
    shown = _display(_write(tmp_path / "l.dcm", stored, bits_stored=10, VOILUTSequence=Sequence([item]),
                            WindowCenter=512, WindowWidth=600))
    assert np.abs(shown - _linear_window(stored.astype(float), 512, 600)).max() <= 1.0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.integers(9, 16), depth=st.sampled_from([8, 12, 16]), vr=st.sampled_from(["US", "OW"]))
def test_a_voi_lut_of_8_bit_entries_over_many_values_maps_every_value(tmp_path, bits, depth, vr):
    """PS3.3 C.11.2.1.1: an 8-bit entry LUT may have any number of entries. pydicom held the indices
    in the entries' type, so values above 255 wrapped round and a 12-bit film showed as noise (a
    trial). A linear LUT over all the stored values shows the film as the linear window does."""
    top = 2**bits - 1
    stored = _ramp(0, top)
    lut = np.linspace(0, 2**depth - 1, top + 1).round().astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [(top + 1) % 2**16, 0, depth])
    item.add_new(0x00283006, vr, lut.tobytes() if vr == "OW" else lut.tolist())
    shown = _display(_write(tmp_path / "l.dcm", stored, bits_stored=bits, VOILUTSequence=Sequence([item])))
    assert np.abs(shown - stored * 255.0 / top).max() <= 2.0


@pytest.mark.parametrize("first, entries", [(0, 256), (60000, 4096), (4000, 96)],
                         ids=["256 entries over 12 bits", "first mapped beyond the data", "only the top"])
def test_a_voi_lut_that_would_show_a_blank_film_falls_back_to_the_next_choice(tmp_path, first, entries):
    """A LUT that sends nine in ten of a film's values to its first or last entry shows it blank (a
    trial: rejected as flat tone, the header never named): the window, else the automatic one."""
    stored = _ramp(0, 4095)
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 16])
    item.add_new(0x00283006, "US", list(range(entries)))
    shown = _display(_write(tmp_path / "l.dcm", stored, bits_stored=12, VOILUTSequence=Sequence([item]),
                            WindowCenter=2048, WindowWidth=4096))
    assert np.abs(shown - _linear_window(stored.astype(float), 2048, 4096)).max() <= 1.0


def _padded(value: int) -> np.ndarray:
    """(128, 128) uint16: a ramp 1500..2500 inside a 24-pixel frame of `value`."""
    stored = np.full((128, 128), value, dtype=np.uint16)
    stored[24:104, 24:104] = _ramp(1500, 2500)[:80, :80]
    return stored


@pytest.mark.parametrize("padding", [0, 4095])
def test_pixel_padding_takes_no_part_in_the_window_and_is_black(tmp_path, padding):
    """PS3.3 C.7.5.1.1.2: pixels with the Pixel Padding Value are not part of the image (the value
    is compared with the stored values, before the Modality LUT). They take no part in the
    automatic window, which is therefore that of the image alone, and are shown black."""
    stored = _padded(padding)
    inside = stored[24:104, 24:104]
    shown = _display(_write(tmp_path / "p.dcm", stored, bits_stored=12, PixelPaddingValue=padding))
    low, high = percentile_window(inside)
    assert np.abs(shown[24:104, 24:104] - np.clip((inside - low) / (high - low) * 255, 0, 255)).max() <= 1.0
    assert shown[:24].max() == 0 and shown[:, :24].max() == 0


def test_pixel_padding_range_limit_covers_a_range(tmp_path):
    """PS3.3 C.7.5.1.1.2: with Pixel Padding Range Limit, every stored value between it and the
    Pixel Padding Value (inclusive) is padding."""
    stored = _padded(0)
    stored[:12] = 7  # a second padding value inside the range 0..10
    shown = _display(_write(tmp_path / "r.dcm", stored, bits_stored=12, PixelPaddingValue=0,
                            PixelPaddingRangeLimit=10))
    reference = _display(_write(tmp_path / "v.dcm", _padded(0), bits_stored=12, PixelPaddingValue=0))
    assert np.array_equal(shown, reference)


def test_untagged_black_frame_is_treated_as_padding(tmp_path):
    """PS3.3 C.7.5.1.1.2 describes padding a non-rectangular image into its rectangle; an archive
    that drops the Pixel Padding Value leaves the frame. A frame of the black-end value along the
    whole edge is excluded from the automatic window, so the display matches the tagged file."""
    tagged = _display(_write(tmp_path / "t.dcm", _padded(0), bits_stored=12, PixelPaddingValue=0))
    assert np.array_equal(_display(_write(tmp_path / "u.dcm", _padded(0), bits_stored=12)), tagged)


def test_one_or_two_pad_bytes_are_tolerated(tmp_path):
    """PS3.5 7.1.1 / 8.1.1: a value has even length, so 8-bit pixel data of odd size ends in one
    pad byte (written here by pydicom); one extra 16-bit word is tolerated as well."""
    odd = np.tile(np.arange(127, dtype=np.uint8), (127, 1))  # 127 x 127 = 16,129 bytes + 1 pad byte
    record, _ = ingest_one(_write(tmp_path / "odd.dcm", odd))
    assert record.status == "ok", record.reason
    ramp = _ramp(0, 1023)
    two = _display(_write(tmp_path / "two.dcm", ramp, bits_stored=10, pixel_bytes=ramp.tobytes() + b"\0\0",
                          WindowCenter=512, WindowWidth=1024))
    assert np.abs(two - _linear_window(ramp.astype(float), 512, 1024)).max() <= 1.0


def test_more_pixel_data_than_rows_x_columns_is_an_error_not_a_sheared_image(tmp_path):
    """PS3.5 8.1.1 / PS3.3 C.7.6.3: native pixel data holds Rows x Columns x Bits Allocated bits.
    Ten bytes more than that (plus padding) means Rows or Columns are wrong: reading the first
    part would shear the image, so it is an error that names the mismatch."""
    ramp = _ramp(0, 1023)
    record, image = ingest_one(_write(tmp_path / "wide.dcm", ramp, bits_stored=10, columns=123))
    assert (record.status, image) == ("error", None)
    assert "more pixel data than" in record.reason and "128 x 123" in record.reason, record.reason
    assert_plain(record.reason)
    record, image = ingest_one(_write(tmp_path / "tall.dcm", ramp, bits_stored=10, rows=130))
    assert (record.status, image) == ("error", None)
    assert "too little pixel data" in record.reason, record.reason
    assert_plain(record.reason)


def test_missing_or_odd_image_pixel_values_fall_back_or_error_plainly(tmp_path):
    """PS3.3 C.7.6.3: Bits Stored may not exceed Bits Allocated (next valid choice: the container),
    Photometric Interpretation is a defined term (read without regard to case); without Rows
    there is no image to lay out."""
    ramp = _ramp(0, 255, np.uint8)
    record, image = ingest_one(_write(tmp_path / "bits.dcm", ramp, bits_stored=12))
    assert record.status == "ok" and np.abs(image.astype(float) - ramp).max() <= 0.5, record.reason
    record, image = ingest_one(_write(tmp_path / "case.dcm", ramp, photometric="monochrome1"))
    assert record.status == "ok" and record.inverted and np.abs(image.astype(float) - (255 - ramp)).max() <= 0.5
    record, image = ingest_one(_write(tmp_path / "rows.dcm", ramp, rows=0))
    assert (record.status, image) == ("error", None) and "Rows" in record.reason
    assert_plain(record.reason)


def test_reasons_of_damaged_files_carry_no_python_messages(tmp_path):
    """A reason is for a PACS admin: the decoder's or Python's own message goes to the log."""
    good = _write(tmp_path / "good.dcm", _ramp(0, 1023), bits_stored=10)
    data = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:600])
    (tmp_path / "bad.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 100)
    for name in ("cut.dcm", "bad.jpeg", "bad.png"):
        record, image = ingest_one(tmp_path / name)
        assert record.status == "error" and image is None, (name, record.status)
        assert_plain(record.reason)


@pytest.mark.parametrize("allocated", [12, 13, 14])
def test_bits_allocated_that_is_not_whole_bytes_is_read_as_the_words_it_is_stored_in(tmp_path, allocated):
    """A 12-bit image in 16-bit words labelled Bits Allocated 12: read as 16 (the data says so),
    where 0.2 blamed Rows/Columns with arithmetic of 1.5 bytes per pixel."""
    stored = _ramp(0, 4095)
    path = _write(tmp_path / "b.dcm", stored, bits_stored=12, BitsAllocated=allocated)
    record, image = ingest_one(path)
    assert record.status == "ok", record.reason
    assert np.array_equal(image, ingest_one(_write(tmp_path / "ok.dcm", stored, bits_stored=12))[1])
    packed = _write(tmp_path / "packed.dcm", stored, bits_stored=12, BitsAllocated=allocated,
                    pixel_bytes=b"\0" * (128 * 128 * allocated // 8 + 1 & ~1))
    record, image = ingest_one(packed)
    assert image is None and f"Bits Allocated {allocated} is not valid" in record.reason
    assert "Rows" not in record.reason
    assert_plain(record.reason)


def test_rgb_bytes_labelled_ybr_full_422_blame_the_photometric_interpretation(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = _write(tmp_path / "ybr.dcm", rgb[..., 0], photometric="YBR_FULL_422", pixel_bytes=rgb.tobytes(),
                  SamplesPerPixel=3, PlanarConfiguration=0)
    record, image = ingest_one(path)
    assert image is None and "Photometric Interpretation in the header is wrong" in record.reason
    assert "Rows/Columns" not in record.reason
    assert_plain(record.reason)


@pytest.mark.parametrize("entry_bits", [8, 16])
@pytest.mark.parametrize("stored_dtype", [np.uint8, np.uint16])
def test_palette_colour_shows_its_lut_entries_over_their_own_range(tmp_path, entry_bits, stored_dtype):
    """PS3.3 C.7.6.3.1.5: the third LUT Descriptor value is the bits per entry (8 or 16). A grey ramp
    through an identity palette must display as the ramp, whatever the entries' depth (pydicom returns
    both in 16-bit words; 8-bit entries read over a 16-bit range showed the film nearly black)."""
    top = 2**entry_bits - 1
    stored = _ramp(0, 255, stored_dtype)
    lut = np.round(np.arange(256) * top / 255).astype("<u2").tobytes()
    descriptor = [256, 0, entry_bits]
    path = _write(tmp_path / "palette.dcm", stored, photometric="PALETTE COLOR",
                  RedPaletteColorLookupTableDescriptor=descriptor, GreenPaletteColorLookupTableDescriptor=descriptor,
                  BluePaletteColorLookupTableDescriptor=descriptor, RedPaletteColorLookupTableData=lut,
                  GreenPaletteColorLookupTableData=lut, BluePaletteColorLookupTableData=lut)
    assert np.abs(_display(path) - stored.astype(float)).mean() <= 1.0


@settings(max_examples=60, deadline=None)
@given(exponent=st.floats(-30.0, 6.0), intercept=st.floats(-1e12, 1e12) | st.sampled_from([1e12, -1e12]),
       signed=st.booleans())
def test_any_rescale_shows_the_film_its_stored_values_show(exponent, intercept, signed):
    """A trial: Rescale Intercept 1e12 or Slope 1e-30 showed a blank film (float32 kept no difference
    between pixels). A linear rescale does not change what the automatic window shows (PS3.3 C.11.1)."""
    from radscan.preprocess import percentile_window, subsample, window_to_uint8

    stored = np.random.default_rng(0).integers(0, 4096, (64, 80)).astype(np.int64)
    slope = (-1 if signed else 1) * 10.0**exponent
    # what float64 itself can tell apart (pydicom rescales in it): one stored step above its rounding
    assume(np.spacing(abs(intercept) + 4096 * abs(slope)) < abs(slope) / 1000)
    rescaled = stored * slope + intercept
    shown = window_to_uint8(rescaled, *percentile_window(subsample(rescaled)), invert=False)
    expected = window_to_uint8(stored.astype(np.float64), *percentile_window(subsample(stored)), invert=False)
    if signed:  # a negative slope reverses the grey scale
        expected = window_to_uint8(-stored.astype(np.float64), *percentile_window(subsample(-stored)), invert=False)
    assert np.abs(shown.astype(int) - expected).max() <= 1


@given(born=st.dates(min_value=__import__("datetime").date(1880, 1, 1)),
       days=st.integers(-400, 50_000))
@example(born=__import__("datetime").date(1900, 1, 1), days=45_000)  # the placeholder
@example(born=__import__("datetime").date(2020, 2, 29), days=365)  # 28 February 2021: not yet 1
@example(born=__import__("datetime").date(2020, 2, 29), days=366)  # 1 March 2021: 1
def test_the_age_from_birth_and_study_dates_counts_birthdays(born, days):
    """Whole years as birthdays count them (a 29 February birth turns a year older on 1 March of a
    common year), negative for a birth after the film (an impossible header, which quality control
    says); DA values in either form the standard allows."""
    import datetime

    from radscan.dicom import age_by_dates

    try:
        on = born + datetime.timedelta(days=days)
    except OverflowError:
        return
    expected = float(on.year - born.year - ((on.month, on.day) < (born.month, born.day)))
    assert (expected < 0) == (on < born)
    if born.year < 1901:  # de-identification's placeholder (19000101), not a birth
        expected = None
    assert age_by_dates(born.strftime("%Y%m%d"), on.strftime("%Y%m%d")) == expected
    assert age_by_dates(born.strftime("%Y.%m.%d"), on.strftime("%Y%m%d")) == expected
    for junk in ("", "19601399", "ABCD", "00000000"):
        assert age_by_dates(junk, on.strftime("%Y%m%d")) is None and age_by_dates(born.strftime("%Y%m%d"), junk) is None


@pytest.mark.parametrize("header, warned", [
    ({"PatientBirthDate": "19600115", "StudyDate": "20240310"},
     "patient age 64 years (from its birth and study dates) is outside"),
    ({"PatientBirthDate": "19600115", "AcquisitionDate": "20240310"}, "patient age 64 years (from its birth"),
    ({"PatientAge": "ABCD", "PatientBirthDate": "19600115", "StudyDate": "20240310"}, "patient age 64 years (from"),
    ({"PatientAge": "ABCD"}, "patient age cannot be read (PatientAge 'ABCD', and no birth date)"),
    ({"PatientAge": "062Y", "PatientBirthDate": "20210301", "StudyDate": "20240310"}, "patient age 62 years is"),
    ({"PatientAge": "ABCD", "PatientBirthDate": "20210301", "StudyDate": "20240310"}, None),  # the dates say 3
    # PatientAge first: de-identification shifts and replaces dates (real files: 010Y born 19000101)
    ({"PatientAge": "003Y", "PatientBirthDate": "19600115", "StudyDate": "20240310"}, None),
    ({"PatientAge": "010Y", "PatientBirthDate": "19000101", "StudyDate": "20231101"}, "patient age 10 years is"),
    ({"PatientBirthDate": "19000101", "StudyDate": "20231101"}, None),  # a placeholder, not a birth
    # no date of the film: the age cannot be counted, and is said so (a trial: a 74-year-old passed as unknown)
    ({"PatientBirthDate": "19600115"}, "patient age cannot be read (a birth date, but no usable date of the film"),
    # a trial: births after the film (the next day, a later year, 2099) passed as of unknown age
    ({"PatientBirthDate": "20231231", "StudyDate": "20230101"}, "patient age cannot be read (its birth date is after"),
    ({"PatientBirthDate": "20240311", "StudyDate": "20240310"}, "patient age cannot be read (its birth date is after"),
    ({"PatientBirthDate": "20990101", "AcquisitionDate": "20240310"}, "its birth date is after the film's date"),
    ({"PatientAge": "-05Y", "PatientBirthDate": "20990101", "StudyDate": "20240310"}, "its birth date is after"),
    ({"PatientAge": "003Y", "PatientBirthDate": "20990101", "StudyDate": "20240310"}, None),  # PatientAge first
    ({}, None),
])
def test_the_population_check_reads_the_birth_date_where_the_age_is_absent_or_wrong(tmp_path, header, warned):
    """A trial: a 64-year-old's film with no PatientAge (Type 3, often absent) but a birth date passed
    a children's model's quality control, as did an unreadable PatientAge; each is said now, PatientAge
    first where it can be read, a placeholder birth date never. The birth date is read and not kept."""
    from radscan.qc import QualityControl

    texture = np.random.default_rng(0).integers(0, 4000, (128, 128), dtype=np.uint16)  # no smooth ramp
    record, image = ingest_one(_write(tmp_path / "f.dcm", texture, **header))
    assert record.status == "ok" and image is not None, record.reason
    verdict = QualityControl(age_range=(1, 5)).check([record], image[None])[0]
    if warned is None:
        assert "patient age" not in verdict.reason, verdict
    else:
        assert verdict.status == "warn" and warned in verdict.reason, verdict
    birth = header.get("PatientBirthDate", "")
    kept = str(record.as_row())  # random UIDs may hold any four digits: the whole date, in either form
    assert not birth or (birth not in kept and f"{birth[:4]}-{birth[4:6]}-{birth[6:]}" not in kept)


def _write_float(path: Path, values: np.ndarray) -> Path:
    """A DX chest file whose pixels are Float (float32) or Double Float (float64) Pixel Data."""
    record_path = _write(path, np.zeros(values.shape, np.uint16))
    import pydicom

    ds = pydicom.dcmread(record_path)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 8 * values.dtype.itemsize
    keyword = "FloatPixelData" if values.dtype == np.float32 else "DoubleFloatPixelData"
    setattr(ds, keyword, values.astype(values.dtype.newbyteorder("<")).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from([np.float32, np.float64]), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       start=st.integers(0, 127), rows=st.integers(0, 60), column=st.integers(0, 127))
@example(dtype=np.float32, bad=np.nan, start=0, rows=50, column=0)  # the trial's film: 50 rows of NaN
def test_float_pixel_data_with_nan_or_infinities_is_an_error_that_names_them(tmp_path, dtype, bad, start, rows, column):
    """A trial: a float film with rows of NaN and infinities was rejected as "nearly blank ... check the
    window", a reason that sent the reader to the wrong place. Any NaN or infinity, a row or a
    single pixel, now makes the row an error that names them; the same film without them reads."""
    texture = np.random.default_rng(start).random((128, 128)).astype(dtype)
    clean = ingest_one(_write_float(tmp_path / f"clean-{start}.dcm", texture))[0]
    assert clean.status == "ok" and clean.header_notes == ""
    damaged = texture.copy()
    damaged[start:start + rows] = bad
    damaged[start, column] = bad  # at least one
    record, image = ingest_one(_write_float(tmp_path / f"bad-{start}-{rows}.dcm", damaged))
    count = int((~np.isfinite(damaged)).sum())
    assert record.status == "error" and image is None
    assert f"{count:,} of its 16,384 pixel values" in record.reason and "NaN or infinite" in record.reason
    assert_plain(record.reason)


def _lut_item(entries: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", data)  # LUT Data
    return item


_USABLE_LUT = _lut_item(4096, list(range(0, 65536, 16)))  # a linear 12-bit VOI LUT


@pytest.mark.parametrize("stored, header, said", [
    (_ramp(0, 4095), {"photometric": "FOOBAR"}, "Photometric Interpretation 'FOOBAR' read as MONOCHROME2"),
    (_ramp(0, 4095), {"photometric": ""}, "Photometric Interpretation empty read as MONOCHROME2"),
    (_ramp(0, 255, np.uint8), {"bits_stored": 16}, "Bits Stored '16' read as 8"),
    (_ramp(0, 4095), {"PixelRepresentation": 7}, "Pixel Representation '7' read as 0 (unsigned)"),
    (_ramp(0, 4095), {"BitsAllocated": 12}, "Bits Allocated 12 read as 16 (the pixel data's length)"),
    (_ramp(0, 4095), {"NumberOfFrames": "0"}, "Number of Frames '0' read as 1"),
    (_ramp(0, 4095), {"RescaleSlope": "0"}, "Rescale Slope '0' read as 1"),
    (_ramp(0, 4095), {"RescaleIntercept": "NaN"}, "Rescale Intercept 'NaN' read as 0"),
    (_ramp(0, 4095), {"RescaleSlope": "", "RescaleIntercept": ""}, ""),  # empty: nothing to use, nothing guessed
    (_ramp(0, 4095), {"WindowCenter": "400", "WindowWidth": "0"},
     "Window Center/Width '400'/'0' unusable: automatic window"),
    (_ramp(0, 4095), {"VOILUTSequence": Sequence([_lut_item(4096, list(range(10)))]), "WindowCenter": 2048,
                      "WindowWidth": 4096}, "VOI LUT Sequence unusable: window used"),
    (_ramp(0, 4095), {"VOILUTSequence": Sequence([])}, "VOI LUT Sequence unusable: automatic window"),
    (_ramp(0, 4095), {"ModalityLUTSequence": Sequence([_lut_item(4096, list(range(10)))])},
     "Modality LUT Sequence unusable: rescale used"),
    (_ramp(0, 4095), {"WindowCenter": 2048, "WindowWidth": 4096, "VOILUTFunction": "CURVY"},
     "VOI LUT Function 'CURVY' read as LINEAR"),
    # what is used, or says nothing, gets no note
    (_ramp(0, 4095), {"VOILUTSequence": Sequence([_USABLE_LUT]), "WindowCenter": 400, "WindowWidth": 0}, ""),
    (_ramp(0, 4095), {"WindowCenter": [400, 2048], "WindowWidth": [0, 4096]}, ""),  # the second pair is used
    (_ramp(0, 4095), {"WindowCenter": "", "WindowWidth": ""}, ""),  # an anonymiser's empty window
    (_ramp(0, 4095), {"ModalityLUTSequence": Sequence([_USABLE_LUT]), "RescaleSlope": "0"}, ""),  # the LUT is used
    (_ramp(0, 4095), {"photometric": "monochrome2 "}, ""),  # a defined term in another case
], ids=["unknown photometric", "empty photometric", "bits stored > allocated", "pixel representation",
        "bits allocated 12", "no frames", "rescale slope 0", "rescale intercept", "empty rescale", "window width 0",
        "short VOI LUT", "empty VOI LUT", "short modality LUT", "unknown VOI LUT function", "usable VOI LUT",
        "second window usable", "empty window", "usable modality LUT", "lower-case photometric"])
def test_every_header_value_read_by_a_guess_is_said_in_header_notes(tmp_path, stored, header, said):
    """A trial: a Photometric Interpretation of FOOBAR, Bits Stored 16 over 8-bit words and five kinds
    of damaged VOI LUT were read by a guess or a fallback, scored, and passed quality control with no
    word of it (only `voi_source` hinted). Each such value is now said, exactly, in the row's
    `header_notes` with what was done instead; a value that is used, or an empty one, says nothing."""
    bits = header.pop("bits_stored", 12 if stored.dtype == np.uint16 else None)
    record, image = ingest_one(_write(tmp_path / "f.dcm", stored, bits_stored=bits, **header))
    assert record.status == "ok" and image is not None, record.reason
    assert record.header_notes == said
    assert record.as_row()["header_notes"] == said


def test_a_float_film_says_nothing_of_the_bits_and_sign_it_has_no_use_for(tmp_path):
    """Float and Double Float Pixel Data define no Bits Stored nor Pixel Representation (PS3.3
    C.7.6.24): a valid float film gets no note."""
    texture = np.random.default_rng(0).random((128, 128))
    for dtype in (np.float32, np.float64):
        record, image = ingest_one(_write_float(tmp_path / f"{np.dtype(dtype).name}.dcm", texture.astype(dtype)))
        assert record.status == "ok" and image is not None, record.reason
        assert record.header_notes == ""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(min_codepoint=1, max_codepoint=127, exclude_characters="\\"), min_size=1,
                    max_size=24))
def test_a_hostile_photometric_interpretation_is_said_escaped_and_cut(tmp_path, text):
    """Whatever the header holds where a defined term should be (markup, controls, a newline, a
    long string), the note quotes it on one line: cut to 16 characters, then its controls written
    out (radscan.dicomheader.header_quoted)."""
    from radscan.dicom import _KNOWN_PHOTOMETRIC
    from radscan.dicomheader import header_text
    from radscan.records import visible_controls

    path = _write(tmp_path / "f.dcm", _ramp(0, 4095), bits_stored=12, photometric=text)
    import pydicom

    assume(header_text(pydicom.dcmread(path, stop_before_pixels=True), "PhotometricInterpretation").upper()
           not in _KNOWN_PHOTOMETRIC)
    record, image = ingest_one(path)
    assert record.status == "ok", record.reason
    raw = " ".join(text.split()).strip("\x00 ")
    quoted = f"'{visible_controls(raw[:16])}'" if raw else "empty"
    assert record.header_notes == f"Photometric Interpretation {quoted} read as MONOCHROME2"
    assert not any(ord(c) < 32 or ord(c) == 127 for c in record.header_notes), repr(record.header_notes)


@pytest.mark.parametrize("records", [0, 1, 3])
def test_an_image_carrying_a_stray_directory_record_sequence_is_read_not_skipped(tmp_path, records):
    """Only the Media Storage Directory class, or a record sequence with no pixels, is a DICOMDIR
    (PS3.10 7.2): a chest film that also carries the sequence (a bad export) is still read."""
    sequence = Sequence([Dataset() for _ in range(records)])
    record, image = ingest_one(_write(tmp_path / "film.dcm", _ramp(0, 4095), DirectoryRecordSequence=sequence))
    assert record.status == "ok", record.reason
    assert image is not None and image.shape == (128, 128)


def test_a_record_sequence_without_pixels_is_still_a_dicomdir(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.3.4", generate_uid()  # no class a reader knows
    ds.DirectoryRecordSequence = Sequence([Dataset()])
    ds.save_as(tmp_path / "INDEX", enforce_file_format=True)
    record, image = ingest_one(tmp_path / "INDEX")
    assert record.status == "skipped" and record.reason.startswith("DICOMDIR"), record.reason
    assert image is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(marker=st.binary(min_size=4, max_size=4).filter(lambda marker: marker != b"DICM"),
       preamble=st.sampled_from([bytes(128), b"II*\x00\x08\x00\x00\x00" + bytes(120),
                                 b"MM\x00*\x00\x00\x00\x08" + bytes(120), b"PK\x03\x04" + bytes(124),
                                 bytes(range(128))]),
       name=st.sampled_from(["IM00001", "film.dcm", "1.2.840.10008.5.1.4"]))
def test_a_dicom_file_with_a_damaged_marker_is_an_error_that_says_so(tmp_path, marker, preamble, name):
    """A PACS export whose "DICM" marker was damaged (a byte flipped in storage or transfer) was
    skipped as "not a DICOM, JPEG or PNG file": a film lost on a night that read as good. It is an
    error that names the damage, whatever the file's name or preamble (PS3.10 7.5 lets a TIFF or
    other header sit there)."""
    from radscan.ingest import DAMAGED_MARKER

    path = _write(tmp_path / "good.dcm", _ramp(0, 4095))
    data = bytearray(path.read_bytes())
    data[:128], data[128:132] = preamble, marker
    (tmp_path / name).write_bytes(bytes(data))
    record, image = ingest_one(tmp_path / name)
    assert image is None and record.status == "error" and record.reason == DAMAGED_MARKER, record
    assert record.kind == "dicom"
    for element in (b"\x08\x00\x05\x00CS", b"\x02\x00\x00\x00ul", b"\x02\x00\x10\x00UI"):
        data[132:138] = element  # not a File Meta Information's first element: not called a DICOM file
        (tmp_path / name).write_bytes(bytes(data))
        assert ingest_one(tmp_path / name)[0].reason != DAMAGED_MARKER, element


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True) | st.integers(0, 400),
       name=st.sampled_from(["IM00002", "film.dcm", "1.2.826.0.1.3680043.2.1125.1234", "IM0001.002"]))
@example(cut=0, name="IM00002")
@example(cut=131, name="IM00002")
@example(cut=140, name="1.2.826.0.1.3680043.2.1125.1234")
def test_a_film_cut_short_anywhere_is_an_error_never_a_skip(tmp_path, cut, name):
    """A PACS transfer that stopped leaves a file cut at any byte, often under a name without an
    extension (IM00002, a SOP Instance UID). Cut at 0 bytes, inside the preamble or the marker, or
    inside a first element, it was skipped ("empty file", "not a DICOM ... file", "no pixel data: not
    an image") and left its study as if complete, exit 0. Wherever it is cut, it is an error, and a
    run says so."""
    data = _write(tmp_path / "whole.dcm", _ramp(0, 4095)).read_bytes()
    length = int(cut * len(data)) if isinstance(cut, float) else cut
    (tmp_path / name).write_bytes(data[:length])
    record, image = ingest_one(tmp_path / name)
    assert image is None and record.status == "error", (length, record.status, record.reason)
    assert_plain(record.reason)


@pytest.mark.parametrize("name", [".IM00002", "notes.txt", "IM00002.part", "IM00002.lock", "Thumbs.db", "DONE",
                                  "_SUCCESS", "LOCK", "README", "COMPLETE"])
def test_an_empty_file_named_like_no_film_stays_a_skip(tmp_path, name):
    """An empty marker, lock or partial-download file beside the films is not a lost film: skipped,
    so that it does not make every night an error night (a transfer still under way is read when it
    is complete)."""
    (tmp_path / name).write_bytes(b"")
    record, image = ingest_one(tmp_path / name)
    assert image is None and record.status == "skipped" and record.reason.startswith("empty file"), record


_OTHER_WORDS = st.sampled_from(["PA", "AP", "PORT", "LAT", "2", "VIEW", "ERECT", "SUPINE", "LEFT"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chest=st.sampled_from(["CHEST", "THORAX", "TORAX", "THORACIC", "POUMON", "POUMONS", "PULMAO", "LUNGS",
                              "BRUSTKORB", "TORACE", "PECHO", "CXR"]),
       before=st.lists(_OTHER_WORDS, max_size=2), after=st.lists(_OTHER_WORDS, max_size=2),
       joiner=st.sampled_from([" ", "_", "-", "\\"]), case=st.sampled_from([str.upper, str.lower, str.title]))
def test_a_chest_named_in_other_words_is_read_with_the_default_body_parts(tmp_path, chest, before, after, joiner,
                                                                          case):
    """Sites write the chest as CHEST PA, PORT_CHEST, TORAX, POUMON: with the default --body-parts each
    was skipped as "not a chest", a chest film lost with exit 0 (a trial: five of six). Any value one
    of whose words names the chest is read; quality control judges the film."""
    body_part = case(joiner.join([*before, chest, *after]))[:16]
    words = body_part.upper().replace("\\", " ").replace("_", " ").replace("-", " ").split()
    assume(chest in words)  # the chest word survives the CS's 16 characters whole
    record, image = ingest_one(_write(tmp_path / "film.dcm", _ramp(0, 4095), BodyPartExamined=body_part))
    assert record.status == "ok" and image is not None, (body_part, record.reason)


@pytest.mark.parametrize("body_part", ["HAND", "KNEE", "PELVIS", "SKULL", "ABDOMEN", "TORSO", "HIP", "THORACIC SPINE",
                                       "THORAC. SPINE", "THORACOLUMBAR", "BRUSTWIRBELSAEULE", "COLUNA TORACICA",
                                       "BRUSTBEIN", "T-SPINE", "CERVICOTHORACIC"])
def test_other_body_parts_are_still_skipped_and_a_list_without_the_chest_is_exact(tmp_path, body_part):
    """The thoracic spine and the sternum, in any of the chest words' languages, are not the chest (a
    review found them read as chests); a list the user gave that holds a chest value takes the chest's
    other words too, one that holds none is matched exactly."""
    from radscan.policy import Policy

    path = _write(tmp_path / "film.dcm", _ramp(0, 4095), BodyPartExamined=body_part)
    record, _ = ingest_one(path)
    assert record.status == "skipped" and "is not a chest" in record.reason, record.reason
    chest_pa = _write(tmp_path / "pa.dcm", _ramp(0, 4095), BodyPartExamined="CHEST PA")
    assert ingest_one(chest_pa, Policy(body_parts=("THORAX", "RIBS")))[0].status == "ok"
    assert ingest_one(chest_pa, Policy(body_parts=("RIBS",)))[0].status == "skipped"


def test_chest_films_skipped_for_their_modality_are_said_with_the_values_counted():
    """Chest films that the site's equipment labels DR (not a DICOM modality) or nothing were skipped
    with exit 0 and no word: a run's problem names the values, escaped, and what to add."""
    from radscan.policy import Policy
    from radscan.score import chest_films_skipped

    def row(modality, body_part, reason=None):
        return {"kind": "dicom", "Modality": modality, "BodyPartExamined": body_part,
                "reason": reason or (f"Modality {modality} is not scored (allowed: CR, DX; see --modalities)"
                                     if modality else "no Modality: not scored (allowed: CR, DX)")}

    said = chest_films_skipped([row("DR", "CHEST"), row("DR", "TORAX"), row("", "CHEST PA"), row("CT", "HEAD"),
                                row("CR", "HAND", "BodyPartExamined HAND is not a chest"),
                                row("X\x1b[2J", "LUNG"), row("CT", "CHEST"), row("MR", "THORAX")], Policy())
    assert said.startswith("4 DICOM images of the chest") and "DR (2)" in said and "none (1)" in said, said
    assert "\x1b" not in said and "CT" not in said and "--modalities CR,DX,VALUE" in said
    assert chest_films_skipped([row("CT", "HEAD"), row("MR", "")], Policy()) == ""


@pytest.mark.parametrize("syntax", [b"MRN12345678.DOE.JOHN", b"1.2.840.DOE^JOHN.1.2", b"1.2.840.10008.1.2.1-"])
def test_a_transfer_syntax_that_is_no_uid_is_not_shown(tmp_path, syntax):
    """A Transfer Syntax UID holding an identifier reached the reason, the CSV, the page and the
    state store under --phi hash (a trial): a value that is not a UID is described, never shown."""
    path = _write(tmp_path / "f.dcm", _ramp(0, 4095))
    data = path.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1  # the file meta's, 20 bytes: replaced in place
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", syntax))
    record, _ = ingest_one(path)
    shown = " ".join([record.reason, record.transfer_syntax, record.header_notes])
    assert syntax.decode() not in shown and "DOE" not in shown and "MRN" not in shown, shown
    assert record.transfer_syntax == "a value that is not a UID"


@pytest.mark.parametrize("study_date", ["2024-13-45", "", "20241345", "garbage", "00000000"])
def test_a_birth_date_without_a_usable_date_of_the_film_is_an_age_that_cannot_be_read(tmp_path, study_date):
    """A 74-year-old's film whose StudyDate is 2024-13-45 (or absent) passed a children's model's
    population check with no word (a trial): with a real birth date and no usable date of the film,
    quality control says the age cannot be read; a usable AcquisitionDate gives the age."""
    from radscan.qc import QualityControl

    qc = QualityControl(age_range=(1.0, 5.0))
    said = qc._population_warnings  # noqa: SLF001 (the age check alone: a ramp fails the image checks)
    path = _write(tmp_path / "f.dcm", _ramp(0, 4095), PatientBirthDate="19500101", StudyDate=study_date)
    [reason] = said(ingest_one(path)[0])
    assert "age cannot be read (a birth date, but no usable date" in reason, reason
    path = _write(tmp_path / "g.dcm", _ramp(0, 4095), PatientBirthDate="19500101", StudyDate=study_date,
                  AcquisitionDate="20240301")
    assert "74 years" in said(ingest_one(path)[0])[0]
    assert said(ingest_one(_write(tmp_path / "h.dcm", _ramp(0, 4095), StudyDate=study_date))[0]) == []


def test_a_dicom_object_with_later_elements_and_no_sop_class_stays_a_skip(tmp_path):
    """A modality worklist file (dcmtk's .wl) or a saved query has no SOP Class UID and no pixel data,
    but elements after where the SOP class would stand: not a film cut short (a review found it made
    an error night every night), a skip as before."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "WORK^LIST", "WL1", "A1"
    ds.ScheduledProcedureStepSequence = Sequence([Dataset()])
    ds.preamble = bytes(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(tmp_path / "wklist1.wl", enforce_file_format=False)
    assert (tmp_path / "wklist1.wl").read_bytes()[128:132] == b"DICM"
    record, _ = ingest_one(tmp_path / "wklist1.wl")
    assert record.status == "skipped" and record.reason.startswith("no pixel data: not an image"), record.reason
