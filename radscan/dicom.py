"""DICOM files -> header fields, selection decision, display-correct 8-bit grey image.

The grey pipeline follows the DICOM grayscale display pipeline (PS3.4 N.2.1.1) with pydicom's own
functions: modality LUT -> VOI LUT or window -> MONOCHROME1 inversion. See `radscan.preprocess`.

Importing this module changes two of pydicom's process-wide settings (below the imports): values
that break the standard are read as they are (reading validation IGNORE, not a warning per element),
and pydicom's logger shows errors only. Every process that reads DICOM for radscan imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MediaStorageDirectoryStorage,
)

from radscan.policy import Policy
from radscan.preprocess import percentile_window, subsample, window_to_uint8
from radscan.records import DICOM_FIELDS, ImageRecord, visible_controls

__all__ = ["read_dicom", "skip_reason"]

# Invalid values in real-world headers are common; read them as they are instead of warning on each.
# NB: a process-wide pydicom setting, made when this module is imported (by radscan.ingest): a program
# that imports radscan and reads DICOM itself reads it with the same leniency.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

# Elements larger than this are read only when used: pixel data of skipped files is never loaded.
_DEFER_SIZE = "64 KB"
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Image Pixel module values without which pixel data cannot be laid out (PS3.3 C.7.6.3)
_LAYOUT = (("Rows", "Rows"), ("Columns", "Columns"), ("BitsAllocated", "Bits Allocated"))
_GREY = ("MONOCHROME1", "MONOCHROME2")
# compressed transfer syntaxes whose codec fixes the order of the colour components (interleaved output)
_INTERLEAVING_CODECS = frozenset((*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes))
_KNOWN_PHOTOMETRIC = (*_GREY, "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                      "YBR_PARTIAL_420", "XYB")
# Bits per LUT entry (third LUT Descriptor value): PS3.3 C.11.1.1.1 (modality), C.11.2.1.1 (VOI)
_MODALITY_LUT_BITS = (8, 16)
_VOI_LUT_BITS = (8, *range(10, 17))
# VOI LUT Function defined terms (PS3.3 C.11.2.1.3), keyed by the normalised header text
_VOI_FUNCTIONS = {"": "LINEAR", "LINEAR": "LINEAR", "LINEAR_EXACT": "LINEAR_EXACT", "SIGMOID": "SIGMOID"}


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
    except Exception:  # pydicom raises many types on malformed headers; its messages are for programmers
        log.debug("cannot parse %s", path, exc_info=True)
        record.fail("cannot read the DICOM header: the file is damaged or not a valid DICOM data set")
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
    problem = _repair_image_pixel_module(ds) or _pixel_data_size_problem(ds)
    if problem:
        record.fail(problem)
        return None

    index = {"skip": 0, "first": 0, "middle": frames // 2}[policy.frames]
    record.frame_used = index
    try:
        with _decoder_messages(path):
            stored = pixel_array(ds, index=index) if frames > 1 else ds.pixel_array
    except Exception as exc:
        log.debug("cannot decode %s", path, exc_info=True)
        record.fail(_decode_failure(ds, exc))
        return None
    try:
        return _display_grey(stored, ds, record)
    except Exception:  # every header value has a fallback: reaching this is a radscan bug
        log.warning("display pipeline failed on %s", path, exc_info=True)
        record.fail("cannot apply the display values of the header (Modality LUT, VOI LUT or window)")
        return None


_decoder_stderr: list = []  # one scratch file per process, reused


@contextlib.contextmanager
def _decoder_messages(path: object) -> Iterator[None]:
    """Catch what the codec libraries write straight to the process's stderr while a file decodes
    (OpenJPEG prints "Stream too short, expected SOT" from C): it bypassed `-q` and named no file.
    It goes to the log at DEBUG, with the file's path; the failure itself is reported in the file's
    row. File descriptor 2 is the whole process's, so for the decode's duration anything else written
    to stderr goes to the same place: decoding runs in worker processes that write nothing else
    (with `--workers 1`, in the run itself, where the main thread is the one decoding)."""
    if not _decoder_stderr:
        _decoder_stderr.append(tempfile.TemporaryFile())
    scratch = _decoder_stderr[0]
    scratch.seek(0)
    scratch.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(scratch.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        scratch.seek(0)
        said = scratch.read(4096).decode("utf-8", "replace").strip()
        if said:
            log.debug("the decoder wrote, for %s: %s", path, " / ".join(said.splitlines()))


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


def iso_date(value: str) -> str:
    """A DA value (PS3.5 6.2: YYYYMMDD, or the ACR-NEMA form YYYY.MM.DD that the standard still
    asks readers to accept) as ISO 8601 (YYYY-MM-DD); "" for anything that is not a real calendar
    date (20261399, 00000000, free text), so that no column sorts or filters on a wrong date."""
    text = value.strip().replace(".", "") if len(value.strip()) == 10 else value.strip()
    try:
        return datetime.strptime(text, "%Y%m%d").date().isoformat() if len(text) == 8 and text.isdigit() else ""
    except ValueError:
        return ""


def _fill_header_fields(ds: Dataset, record: ImageRecord) -> None:
    for keyword in DICOM_FIELDS:
        setattr(record, keyword, _text(ds, keyword))
    record.ImageType = "\\".join(_texts(ds, "ImageType"))
    record.StudyDate = iso_date(record.StudyDate)
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


def _repair_image_pixel_module(ds: Dataset) -> str:
    """Give the Image Pixel module (PS3.3 C.7.6.3) the values the decoder needs, or say why not.

    Rows, Columns and Bits Allocated lay the pixel data out: without them nothing can be decoded
    (the reason names them). The others have a next valid choice that archives' viewers make too:
    Bits Stored absent, 0 or larger than Bits Allocated -> Bits Allocated (the container);
    Pixel Representation absent or not 0/1 -> 0 (unsigned); Samples per Pixel absent or not 1/3
    -> what the Photometric Interpretation implies; Number of Frames empty or 0 -> 1;
    Photometric Interpretation in another case or with stray spaces -> its upper-case defined
    term, absent or unknown on one-sample data -> MONOCHROME2 (no inversion); Planar Configuration
    of colour data in a JPEG, JPEG-LS or JPEG 2000 transfer syntax -> 0, because those codecs order
    the components themselves and their decoders return them interleaved (PS3.5 8.2.1: "the value
    of Planar Configuration is irrelevant ... hence it shall be set to 0"; 8.2.3, 8.2.4 likewise).
    """
    missing = [name for keyword, name in _LAYOUT if not _int(ds, keyword)]
    if missing:
        return f"the header gives no {' / '.join(missing)} (absent or 0): the pixel data cannot be laid out"
    allocated = _int(ds, "BitsAllocated") or 0
    if not 0 < (_int(ds, "BitsStored") or 0) <= allocated:
        ds.BitsStored = allocated
        ds.HighBit = allocated - 1
    if _int(ds, "PixelRepresentation") not in (0, 1):
        ds.PixelRepresentation = 0
    if "NumberOfFrames" in ds and (_int(ds, "NumberOfFrames") or 0) < 1:
        ds.NumberOfFrames = 1  # empty, 0 or not a number: one frame, as without the element
    photometric = _text(ds, "PhotometricInterpretation").upper()
    samples = _int(ds, "SamplesPerPixel")
    if samples not in (1, 3):  # absent, 0 or out of range (C.7.6.3.1.1): as the photometric says
        samples = 3 if photometric in _KNOWN_PHOTOMETRIC and photometric not in (*_GREY, "PALETTE COLOR") else 1
        ds.SamplesPerPixel = samples
    if samples == 3 and _meta(ds).get("TransferSyntaxUID") in _INTERLEAVING_CODECS:
        ds.PlanarConfiguration = 0  # a stray 1 would make the decoder's interleaved output read as planes
    if photometric not in _KNOWN_PHOTOMETRIC:
        if samples != 1:
            shown = f"'{photometric}'" if photometric else "absent"
            return f"unknown Photometric Interpretation for colour data: {shown}, {samples} samples per pixel"
        photometric = "MONOCHROME2"
    ds.PhotometricInterpretation = photometric
    return ""


def _pixel_data_size_problem(ds: Dataset) -> str:
    """'' when the length of native pixel data fits Rows x Columns x frames, else why not.

    PS3.5 8.1.1 and 7.1.1: native pixel data is exactly the image's bits, padded to an even
    length with one byte; a pad of one 16-bit word is tolerated as well (seen in the wild). Too
    little data cannot be shown; more data than the header's image size means Rows or Columns
    are wrong, and reading the first part would show a sheared image. Compressed data is
    checked by its decoder.
    """
    try:
        if UID(_text(_meta(ds), "TransferSyntaxUID")).is_encapsulated:
            return ""
    except ValueError:  # not a transfer syntax pydicom knows: its decoder lookup says so
        return ""
    keyword = next((keyword for keyword in _PIXEL_TAGS if keyword in ds), None)
    if keyword is None:
        return ""
    try:  # the declared length of a deferred element may promise more than the file holds
        held = len(ds[keyword].value)  # native data is loaded whole for decoding anyway
    except Exception:
        return "the file ends inside its pixel data (truncated or incomplete transfer?)"
    frames = _int(ds, "NumberOfFrames") or 1
    samples = _int(ds, "SamplesPerPixel") or 1
    pixels = (_int(ds, "Rows") or 0) * (_int(ds, "Columns") or 0) * frames
    allocated = _int(ds, "BitsAllocated") or 0
    if allocated != 1 and allocated % 8:  # PS3.5 8.1.1: native samples fill whole bytes (or single bits)
        whole = pixels * samples * -(-allocated // 8)
        if whole <= held <= whole + 2:  # the data is in whole bytes: the header's count is wrong, as viewers assume
            ds.BitsAllocated = 8 * -(-allocated // 8)
            return ""
        return (f"Bits Allocated {allocated} is not valid for uncompressed pixel data (1 or a multiple of 8, "
                f"PS3.5 8.1.1), and the {held:,} bytes of pixel data fit no whole number of bytes per sample")
    try:
        needed = get_expected_length(ds, "bytes")
    except Exception:  # a layout pydicom cannot compute: leave it to the decoder
        return ""
    if needed <= held <= needed + 2:
        return ""
    full = pixels * 3 * max(1, allocated // 8)
    if _text(ds, "PhotometricInterpretation").upper() == "YBR_FULL_422" and full <= held <= full + 2:
        return ("the header says YBR_FULL_422 (two samples per pixel, chroma shared), but the pixel data holds "
                "three full samples per pixel (RGB or YBR_FULL): the Photometric Interpretation in the header is wrong")
    size = f"Rows x Columns ({_int(ds, 'Rows')} x {_int(ds, 'Columns')}"
    size += (f" x {frames} frames" if frames > 1 else "") + (f" x {samples} samples" if samples > 1 else "")
    size += f", {_int(ds, 'BitsAllocated')} bits allocated)"
    if held < needed:
        return (f"too little pixel data for the header's image size: {held:,} bytes, but {size} need "
                f"{needed:,} (truncated file, or Rows/Columns wrong in the header)")
    return (f"more pixel data than the header's image size: {held:,} bytes, but {size} need {needed:,}; "
            "Rows/Columns disagree with the pixel data, and the image would be shown sheared")


def _display_grey(stored: np.ndarray, ds: Dataset, record: ImageRecord) -> np.ndarray:
    """Stored values -> (H, W) uint8 as a radiologist's display would show them.

    Grey data follows PS3.4 N.2.1.1: Modality LUT or rescale (PS3.3 C.11.1), then the first
    usable VOI LUT, else the first usable window pair (C.11.2), else an automatic window, then
    MONOCHROME1 / INVERSE inversion. Header values that cannot be used fall back to the next
    choice instead of failing the image. Padding (C.7.5.1.1.2) takes no part in the automatic
    window and is shown black.
    """
    photometric = record.photometric
    if stored.ndim == 3 or photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        # pydicom has already converted YBR to RGB; luma weights of ITU-R BT.601, as Pillow's "L"
        luma = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        record.voi_source = "full-range"
        return window_to_uint8(luma, 0.0, float(np.iinfo(rgb.dtype).max), invert=False)

    record.inverted = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and _text(ds, "PresentationLUTShape").upper() == "INVERSE"
    )
    domain, position = _integer_domain(stored)
    source = stored if domain is None else domain
    values = _modality_values(source, ds)
    sample = subsample(stored)
    sample_values = subsample(values) if domain is None else values[position(sample)]
    padding = _tagged_padding(stored, ds)
    shown = sample_values if padding is None else sample_values[~subsample(padding)]

    voi = _first_usable_voi_lut(values, ds)
    window = None if voi is not None else _first_usable_window(ds, shown)
    if voi is not None:
        values, (low, high) = voi
        record.voi_source = "lut"
    elif window is not None:
        window, step = window
        values = apply_windowing(values if step == 1 else values / step, window)
        low, high = _window_range(window)
        record.voi_source = "window"
    elif (_int(ds, "BitsStored") or 16) <= 8 and values is source and source.dtype.kind in "ui":
        low, high = _stored_range(ds)  # BitsStored, not the 16-bit word that may hold 8-bit data
        record.voi_source = "full-range"
    else:
        if padding is None:
            padding = _untagged_padding(stored, record.inverted)
            shown = sample_values if padding is None else sample_values[~subsample(padding)]
        low, high = percentile_window(shown)
        record.voi_source = "percentile"
    grey = window_to_uint8(values, low, high, invert=record.inverted)
    grey = grey if domain is None else np.take(grey, position(stored))
    return grey if padding is None else np.where(padding, np.uint8(0), grey)


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


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """The smallest and largest stored value that Bits Stored and Pixel Representation allow
    (PS3.3 C.7.6.3.1.1): 0..2**n - 1 unsigned, -2**(n-1)..2**(n-1) - 1 two's complement."""
    bits = _int(ds, "BitsStored") or 16
    if _int(ds, "PixelRepresentation") == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_values(source: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT stage (PS3.3 C.11.1) with pydicom's `apply_modality_lut`.

    A Modality LUT Sequence that cannot be used (no descriptor or data, fewer entries than the
    descriptor says, an entry size other than 8 or 16 bits: C.11.1.1.1) is dropped in favour of
    the rescale. A Rescale Slope that is absent, empty, not a number or 0 means 1; such a Rescale
    Intercept means 0 (a slope of 0 would map every pixel to one value). An identity rescale is
    dropped, so that 8-bit data keeps its own range.
    """
    items = ds.get("ModalityLUTSequence")
    if items is not None and not (len(items) and _usable_lut(items[0], _MODALITY_LUT_BITS)):
        del ds.ModalityLUTSequence
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            del ds[keyword]
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    try:
        return apply_modality_lut(source, ds)
    except Exception:  # a LUT pydicom cannot apply after all: the rescale is the next choice
        if "ModalityLUTSequence" not in ds:
            raise
        del ds.ModalityLUTSequence
        return apply_modality_lut(source, ds)


def _first_usable_voi_lut(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The first usable item of the VOI LUT Sequence (PS3.3 C.11.2.1.1) applied with pydicom's
    `apply_voi`, and the range of its entries; None when there is none."""
    items = ds.get("VOILUTSequence") or []
    for index, item in enumerate(items):
        if not _usable_lut(item, _VOI_LUT_BITS):
            continue
        # a LUT is indexed by integers (rescaled values are float)
        indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        try:
            return apply_voi(indices, ds, index), _voi_lut_range(ds, index)
        except Exception:  # an item pydicom cannot apply: try the next, then the window
            log.debug("VOI LUT item %d unusable", index, exc_info=True)
    return None


def _usable_lut(item: Dataset, bits: tuple[int, ...]) -> bool:
    """Whether a LUT item has a three-valued LUT Descriptor with an allowed entry size and at
    least as many LUT Data entries as the descriptor announces (PS3.3 C.11.1.1.1, C.11.2.1.1;
    0 entries means 2**16)."""
    try:
        entries, _, depth = (int(value) for value in item.get("LUTDescriptor"))
        data = item.get("LUTData")
    except Exception:
        return False
    if data is None or depth not in bits:
        return False
    count = len(data) // 2 if isinstance(data, bytes) else len(data) if isinstance(data, (list, MultiValue)) else 1
    return count >= (entries or 2**16)


def _first_usable_window(ds: Dataset, shown: np.ndarray) -> tuple[Dataset, float] | None:
    """The first usable Window Center / Width pair (PS3.3 C.11.2.1.2), as a small dataset for
    pydicom's `apply_windowing` and the step its input is to be divided by; None when no pair is
    usable.

    A pair is unusable when a value is absent, empty or not a finite number, when the width is
    out of range for its function (LINEAR needs >= 1, LINEAR_EXACT and SIGMOID > 0: C.11.2.1.2.1,
    C.11.2.1.3), or when every pixel of the image (`shown`, the rescaled values of a sample without
    padding) lies on one side of the window, which would display a blank image. The VOI LUT
    Function (C.11.2.1.3) is read case-insensitively; empty or unknown means LINEAR, the default;
    a single value applies to every pair and several are paired with the windows by position.

    LINEAR's 1 and 0.5 (the minimum width, and the half-step its formula shifts by) are one stored
    value: after a fractional Rescale Slope s the rescaled values step by |s|, and taking them as
    one rescaled unit made a window of width 1.1 over values stepping by 0.001 a tenth as wide as
    the same window stored with slope 1 (issue 22). LINEAR is applied in units of the step: the
    values, centre and width divided by |s| (< 1; 1 otherwise), so a file displays as its twin
    stored with slope 1 and a width down to |s| is a window.

    The dataset handed to pydicom holds only the chosen pair and an unsigned 16-bit output range.
    pydicom derives the output range from the stored range put through the rescale, and with a
    negative Rescale Slope that range comes out reversed, which turns the window upside down;
    C.11.2.1.2.1 maps values below the window to the minimum output and values above to the
    maximum, whatever the slope.
    """
    centers, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
    functions = [_VOI_FUNCTIONS.get(name, "LINEAR") for name in _texts(ds, "VOILUTFunction")] or ["LINEAR"]
    low, high = (float(shown.min()), float(shown.max())) if shown.size else (-np.inf, np.inf)
    rescale_step = 1.0 if "ModalityLUTSequence" in ds else min(1.0, abs(_number(ds, "RescaleSlope") or 1.0))
    for index, (center, width) in enumerate(zip(centers, widths, strict=False)):  # unequal counts: the pairs there are
        if len(functions) == 1:
            function = functions[0]
        else:
            function = functions[index] if index < len(functions) else "LINEAR"
        step = rescale_step if function == "LINEAR" else 1.0
        if center is None or width is None or width < (step if function == "LINEAR" else np.nextafter(0, 1)):
            continue
        if high <= center - width / 2 or low > center + width / 2:
            continue
        window = Dataset()
        window.PhotometricInterpretation = "MONOCHROME2"
        window.BitsStored, window.PixelRepresentation = 16, 0
        window.WindowCenter, window.WindowWidth, window.VOILUTFunction = center / step, width / step, function
        return window, step
    return None


def _window_range(ds: Dataset) -> tuple[float, float]:
    """The output range pydicom's windowing maps onto: the images of -inf and +inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return float(low), float(high)


def _voi_lut_range(ds: Dataset, index: int = 0) -> tuple[float, float]:
    """The smallest and largest entries of a VOI LUT, found by looking the whole input domain up
    through pydicom's own `apply_voi`."""
    entries, first_mapped = ds.VOILUTSequence[index].LUTDescriptor[:2]
    domain = np.arange(first_mapped, first_mapped + (entries or 2**16))
    lut = apply_voi(domain, ds, index)
    return float(lut.min()), float(lut.max())


def _tagged_padding(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """(H, W) bool: the pixels whose stored value is the Pixel Padding Value, or lies between it
    and the Pixel Padding Range Limit (inclusive), PS3.3 C.7.5.1.1.2. Both are stored values,
    compared before the Modality LUT. None when the header tags no padding, or none is found, or
    everything would be padding."""
    value = _number(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _number(ds, "PixelPaddingRangeLimit")
    if stored.dtype.kind == "i":  # US/SS is ambiguous: a signed value may have been read as unsigned
        bits = 8 * stored.dtype.itemsize
        value, limit = (v - 2**bits if v is not None and v >= 2 ** (bits - 1) else v for v in (value, limit))
    if limit is None:
        mask = stored == value
    else:
        mask = (stored >= min(value, limit)) & (stored <= max(value, limit))
    return mask if mask.any() and not mask.all() else None


def _untagged_padding(stored: np.ndarray, inverted: bool) -> np.ndarray | None:
    """(H, W) bool: padding that the header does not tag, or None.

    A border of one value at the black end of the data (the smallest stored value, or the largest
    when the image is inverted) that fills at least half of the image's outer edge: the padding of
    PS3.3 C.7.5.1.1.2 without its Pixel Padding Value. Those pixels are black whatever the window,
    so excluding them changes only the automatic window, which they would otherwise drag to their
    value (a wide black frame takes far more than the percentile's tail).
    """
    value = stored.max() if inverted else stored.min()
    edge = np.concatenate([stored[0], stored[-1], stored[1:-1, 0], stored[1:-1, -1]])
    if np.count_nonzero(edge == value) * 2 < edge.size:
        return None
    mask = stored == value
    return None if mask.all() else mask


def _decode_failure(ds: Dataset, exc: Exception) -> str:
    """A reason for a decode failure that says what to do about it (the decoder's own message is
    logged, not shown: it is written for programmers)."""
    uid = UID(_text(_meta(ds), "TransferSyntaxUID"))
    syntax = f"{uid.name} ({uid})" if uid.name != uid else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no decoder exists for transfer syntax {syntax}"
    missing = " ".join(decoder.missing_dependencies)
    if not decoder.is_available:
        return f"{syntax} needs a decoder plugin: pip install 'radscan[codecs]' (missing: {missing})"
    if uid.is_compressed:
        problem = "the compressed image is damaged or uses a variant the installed decoders do not support"
    else:
        problem = "the pixel data does not fit the header's Image Pixel values (Bits Allocated, Samples per Pixel)"
    reason = f"cannot decode the pixel data ({syntax}): {problem}"
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
    if isinstance(value, (list, MultiValue)):  # several values: joined as the standard writes them
        return "\\".join(_text_value(item) for item in value)
    return _text_value(value)


def _text_value(value: object) -> str:
    text = str(value) if not isinstance(value, bytes) else value.decode("latin-1", "replace")
    return visible_controls(" ".join(text.split()).strip("\x00 "))


def _texts(ds: Dataset, keyword: str) -> list[str]:
    """Every value of a multi-valued text element, each stripped and upper-cased; [] when absent.
    An empty element gives [''] (present but empty)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return [str(item).strip(" \x00").upper() for item in items] or [""]


def _numbers(ds: Dataset, keyword: str) -> list[float | None]:
    """Every value of a numeric element (DS, IS, US, SS) as a float, None for each value that is
    empty or not a finite number; [] when absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None or value == "":
        return []
    numbers: list[float | None] = []
    for item in list(value) if isinstance(value, (list, MultiValue)) else [value]:
        try:
            number = float(item)
        except (TypeError, ValueError):
            number = None
        numbers.append(number if number is not None and np.isfinite(number) else None)
    return numbers


def _number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric element when it is a finite number, else None."""
    numbers = _numbers(ds, keyword)
    return numbers[0] if numbers else None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None
