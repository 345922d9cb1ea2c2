"""DICOM files -> header fields, selection decision, display-correct 8-bit grey image.

The grey pipeline follows the DICOM grayscale display pipeline (PS3.4 N.2.1.1) with pydicom's own
functions: modality LUT -> VOI LUT or window -> MONOCHROME1 inversion. See `radscan.preprocess`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from radscan.policy import Policy
from radscan.preprocess import percentile_window, subsample, window_to_uint8
from radscan.records import DICOM_FIELDS, ImageRecord, one_line

__all__ = ["read_dicom", "skip_reason"]

# Invalid values in real-world headers are common; read them as they are instead of warning on each.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)

# Elements larger than this are read only when used: pixel data of skipped files is never loaded.
_DEFER_SIZE = "64 KB"
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_dicom(path: Path, record: ImageRecord, policy: Policy) -> np.ndarray | None:
    """Read one DICOM file: fill `record`, decide whether it is used, decode it if so.

    Returns a (H, W) uint8 display image, or ``None`` when the file is skipped or unreadable
    (then ``record.status`` and ``record.reason`` say why). pydicom's warnings about malformed
    values are silenced: what matters about a file ends up in its reason.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(path, record, policy)


def _read_dicom(path: Path, record: ImageRecord, policy: Policy) -> np.ndarray | None:
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
        truncated = len(ds) == 0  # pydicom gives up the whole data set when the pixel data is cut short
        if truncated:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)  # keep what the header says
    except Exception as exc:  # pydicom raises many types on malformed headers
        record.fail(f"cannot parse the DICOM header: {one_line(exc)}")
        return None

    _fill_header_fields(ds, record)
    reason = skip_reason(ds, policy)
    if reason:
        record.skip(reason)
        return None
    if truncated:
        record.fail("the file ends inside its pixel data (truncated or incomplete transfer?)")
        return None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        record.fail("an image object without pixel data: truncated or incomplete file?")
        return None

    frames = record.frames or 1
    if record.rows and record.columns and record.rows * record.columns > policy.max_pixels:
        record.fail(
            f"image of {record.columns}x{record.rows} pixels exceeds the limit of "
            f"{policy.max_pixels:,} (corrupt header or decompression bomb)"
        )
        return None
    try:
        _ensure_transfer_syntax(ds)
    except ValueError as exc:
        record.fail(str(exc))
        return None

    index = {"skip": 0, "first": 0, "middle": frames // 2}[policy.frames]
    record.frame_used = index
    try:
        stored = pixel_array(ds, index=index) if frames > 1 else ds.pixel_array
    except Exception as exc:
        record.fail(_decode_failure(ds, exc))
        return None
    try:
        return _display_grey(stored, ds, record)
    except Exception as exc:
        record.fail(f"cannot apply the display pipeline (LUT/window values?): {one_line(exc)}")
        return None


def skip_reason(ds: Dataset, policy: Policy) -> str:
    """Why this dataset is not scored, or '' when it should be. Header only: pixels are not read."""
    sop_class = UID(_text(_meta(ds), "MediaStorageSOPClassUID") or _text(ds, "SOPClassUID"))
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "DICOMDIR: a media index, not an image (its images are scanned as files)"
    has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    is_image_class = "Image Storage" in sop_class.name
    if not has_pixels and not is_image_class:
        return f"no pixel data: not an image ({sop_class.name if sop_class else 'unknown SOP class'})"
    modality = _text(ds, "Modality").upper()
    if policy.modalities is not None and modality not in policy.modalities:
        shown = f"Modality {modality} is not scored" if modality else "no Modality: not scored"
        return f"{shown} (allowed: {', '.join(policy.modalities)}; see --modalities)"
    body_part = _text(ds, "BodyPartExamined").upper()
    if policy.body_parts is not None and body_part and body_part not in policy.body_parts:
        return (
            f"BodyPartExamined {body_part} is not a chest "
            f"(allowed: {', '.join(policy.body_parts)}; see --body-parts)"
        )
    if not policy.for_processing and _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        return "FOR PROCESSING image (raw detector data, not for display; see --for-processing)"
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1 and policy.frames == "skip":
        return f"multi-frame object ({frames} frames; see --frames first|middle)"
    return ""


def _fill_header_fields(ds: Dataset, record: ImageRecord) -> None:
    for keyword in DICOM_FIELDS:
        setattr(record, keyword, _text(ds, keyword))
    record.study_key = record.StudyInstanceUID or record.study_key
    record.transfer_syntax = _text(_meta(ds), "TransferSyntaxUID")
    record.photometric = _text(ds, "PhotometricInterpretation").upper()
    record.bits_stored = _int(ds, "BitsStored")
    record.rows = _int(ds, "Rows")
    record.columns = _int(ds, "Columns")
    record.frames = _int(ds, "NumberOfFrames") or (1 if any(t in ds for t in _PIXEL_TAGS) else None)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without a File Meta header (ACR-NEMA style, e.g. CR-MONO1-10-chest) lack a Transfer
    Syntax UID; pydicom needs one to decode. Native encodings can be inferred from how the dataset
    was parsed; compressed (encapsulated) pixel data cannot."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    if _is_encapsulated(ds):
        raise ValueError("compressed pixel data but no Transfer Syntax UID in the file meta: cannot decode")
    implicit, little = ds.original_encoding
    if little is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _is_encapsulated(ds: Dataset) -> bool:
    """Whether the pixel data has undefined length (compressed fragments), without loading it."""
    element = ds.get_item(_PIXEL_DATA)  # a RawDataElement while deferred, else a DataElement
    if element is None:
        return False
    undefined = getattr(element, "is_undefined_length", None)
    return bool(undefined) if undefined is not None else element.length == _UNDEFINED_LENGTH


def _display_grey(stored: np.ndarray, ds: Dataset, record: ImageRecord) -> np.ndarray:
    """Stored values -> (H, W) uint8 as a radiologist's display would show them."""
    photometric = record.photometric
    if stored.ndim == 3 or photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        # pydicom has already converted YBR to RGB; luma weights of ITU-R BT.601, as Pillow's "L"
        luma = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        record.voi_source = "full-range"
        return window_to_uint8(luma, 0.0, float(np.iinfo(rgb.dtype).max), invert=False)

    _drop_empty_display_elements(ds)
    domain, position = _integer_domain(stored)
    source = stored if domain is None else domain
    values = apply_modality_lut(source, ds)
    if "VOILUTSequence" in ds:
        if values.dtype.kind == "f":  # a LUT is indexed by integers (rescaled values are float)
            values = np.rint(values).astype(np.int32)
        values, (low, high) = apply_voi(values, ds), _voi_lut_range(ds)
        record.voi_source = "lut"
    elif _has_window(ds):
        values, (low, high) = apply_windowing(values, ds), _window_range(ds)
        record.voi_source = "window"
    elif (record.bits_stored or 16) <= 8 and values is source and source.dtype.kind in "ui":
        low, high = float(np.iinfo(source.dtype).min), float(np.iinfo(source.dtype).max)
        record.voi_source = "full-range"
    else:
        sample = subsample(stored)
        low, high = percentile_window(subsample(values) if domain is None else values[position(sample)])
        record.voi_source = "percentile"
    record.inverted = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and _text(ds, "PresentationLUTShape").upper() == "INVERSE"
    )
    grey = window_to_uint8(values, low, high, invert=record.inverted)
    return grey if domain is None else np.take(grey, position(stored))


def _integer_domain(stored: np.ndarray) -> tuple[np.ndarray | None, Callable[[np.ndarray], np.ndarray]]:
    """Every value an 8/16-bit integer image can hold, and where each pixel falls in that list.

    The grey pipeline is pointwise, so running it once over the (at most 65,536) possible values
    and looking each pixel up is exact, and much cheaper than running pydicom's float64 LUT and
    window code over millions of pixels. Other dtypes (float, 32-bit, byte-swapped) return None.
    """
    kind = stored.dtype
    if kind in (np.dtype(np.uint8), np.dtype(np.uint16)):
        return np.arange(np.iinfo(kind).max + 1, dtype=kind), lambda pixels: pixels
    if kind in (np.dtype(np.int8), np.dtype(np.int16)):
        info = np.iinfo(kind)
        unsigned = np.dtype(f"uint{info.bits}")
        offset = unsigned.type(-info.min)
        # two's complement with the sign bit flipped is the value minus the minimum: its position
        return np.arange(info.min, info.max + 1, dtype=kind), lambda pixels: pixels.view(unsigned) ^ offset
    return None, lambda pixels: pixels


def _drop_empty_display_elements(ds: Dataset) -> None:
    """Empty rescale/window values and LUT sequences without descriptor or data (all seen in the
    wild) mean "not given": drop them, as viewers do, rather than fail the image."""
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds and ds[keyword].value in (None, "", []):
            del ds[keyword]
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        items = ds.get(keyword)
        if items is not None and not (
            len(items) and items[0].get("LUTDescriptor") and items[0].get("LUTData") is not None
        ):
            del ds[keyword]


def _has_window(ds: Dataset) -> bool:
    try:
        return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    except Exception:
        return False


def _window_range(ds: Dataset) -> tuple[float, float]:
    """The output range pydicom's windowing maps onto: the images of -inf and +inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return float(low), float(high)


def _voi_lut_range(ds: Dataset) -> tuple[float, float]:
    """The smallest and largest entries of the first VOI LUT, found by looking the whole input
    domain up through pydicom's own `apply_voi`."""
    entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
    domain = np.arange(first_mapped, first_mapped + (entries or 2**16))
    lut = apply_voi(domain, ds)
    return float(lut.min()), float(lut.max())


def _decode_failure(ds: Dataset, exc: Exception) -> str:
    """A reason for a decode failure that says what to do about it."""
    uid = UID(_text(_meta(ds), "TransferSyntaxUID"))
    syntax = f"{uid.name} ({uid})" if uid.name != uid else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no decoder exists for transfer syntax {syntax}"
    missing = " ".join(decoder.missing_dependencies)
    if not decoder.is_available:
        return f"{syntax} needs a decoder plugin: pip install 'radscan[codecs]' (missing: {missing})"
    reason = f"cannot decode the pixel data ({syntax}): {one_line(exc)}"
    if "libjpeg" in missing and "does not support" in str(exc):
        reason += "; the GPL-3.0 decoder pylibjpeg-libjpeg may read it: pip install 'radscan[codecs-gpl]'"
    return reason


def _meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or Dataset()


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as one line of text; '' when absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    text = str(value) if not isinstance(value, bytes) else value.decode("latin-1", "replace")
    return " ".join(text.split()).strip("\x00 ")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None
