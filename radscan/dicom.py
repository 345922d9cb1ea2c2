"""DICOM files -> header fields, selection decision, display-correct 8-bit grey image.

Once the pixels are decoded, radscan.display turns them into the grey image a display shows (the
DICOM grayscale display pipeline, PS3.4 N.2.1.1); radscan.dicomheader reads header values as they
are found. See `radscan.preprocess` for where each step of the grey pipeline lives.

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
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
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

from radscan.codestream import stream_header
from radscan.dicomheader import file_meta, header_int, header_quoted, header_text, header_texts
from radscan.display import UnusablePalette, display_grey, ybr_full_to_rgb
from radscan.policy import DEFAULT_BODY_PARTS, Policy, names_the_chest
from radscan.records import DICOM_FIELDS, NO_FILM_DATE, ImageRecord

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
_SOP_CLASS_UID = 0x00080016
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Image Pixel module values without which pixel data cannot be laid out (PS3.3 C.7.6.3)
_LAYOUT = (("Rows", "Rows"), ("Columns", "Columns"), ("BitsAllocated", "Bits Allocated"))
_GREY = ("MONOCHROME1", "MONOCHROME2")
# compressed transfer syntaxes whose codec fixes the order of the colour components (interleaved output)
_INTERLEAVING_CODECS = frozenset((*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes))
_KNOWN_PHOTOMETRIC = (*_GREY, "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                      "YBR_PARTIAL_420", "XYB")


def read_dicom(path: Path, record: ImageRecord, policy: Policy, head: bytes = b"") -> np.ndarray | None:
    """Read one DICOM file: fill `record`, decide whether it is used, decode it if so.

    Returns a (H, W) uint8 display image, or ``None`` when the file is skipped or unreadable
    (then ``record.status`` and ``record.reason`` say why). pydicom's warnings about malformed
    values are silenced: what matters about a file ends up in its reason. `head`: the file's first
    DICOM_HEAD_BYTES when the caller has read them (else read here).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(path, record, policy, head)


DICOM_HEAD_BYTES = 4096  # the first bytes of a file `read_dicom` looks at before pydicom: its File Meta Information
_DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian (PS3.5 A.5)
_MAX_BYTES_PER_PIXEL = 6  # three 16-bit samples: what a data set of max_pixels may need at most
_INFLATE_CHUNK = 1 << 20
# explicit VR little endian: VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))


def _meta_end(head: bytes) -> int | None:
    """Where the File Meta Information (group 0002, explicit VR little endian, PS3.10 7.1) ends in a
    file that begins with `head`: after a 128-byte preamble and "DICM", or at byte 0 in a file without
    them; None when its elements run past `head` or are not group 0002. Walked element by element,
    not taken from (0002,0000), which a writer may get wrong."""
    at = 132 if head[128:132] == b"DICM" else 0
    if head[at:at + 2] != b"\x02\x00":
        return None
    while at + 8 <= len(head) and head[at:at + 2] == b"\x02\x00":
        vr = head[at + 4:at + 6]
        if vr in _LONG_VRS:
            if at + 12 > len(head):
                return None
            at += 12 + int.from_bytes(head[at + 8:at + 12], "little")
        else:
            at += 8 + int.from_bytes(head[at + 6:at + 8], "little")
    return at if at <= len(head) else None


def _inflates_beyond(path: Path, head: bytes, limit: int) -> str:
    """'' unless the file whose first bytes are `head` has a deflated data set (PS3.5 A.5) that
    inflates to more than `limit` bytes: then why it is not read. pydicom inflates a deflated data
    set whole before reading any element, so a 2 MB file inflating to 2 GB of zeros in a private
    element held 4 GB and was scored (a trial); here it is inflated in chunks, counted and thrown
    away, and read only when it fits. A stream that is not valid deflate is left to pydicom's reading,
    which says so."""
    if _DEFLATED not in head:
        return ""
    start = _meta_end(head)
    if start is None or _DEFLATED not in head[:start]:  # the UID elsewhere, or a meta header too long to walk
        return ""
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0  # raw deflate, no zlib header (PS3.5 A.5)
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            while not inflater.eof and (chunk := handle.read(_INFLATE_CHUNK)):
                while chunk and not inflater.eof and inflated <= limit:  # bytes after the stream's end: padding
                    inflated += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                    chunk = inflater.unconsumed_tail
                if inflated > limit:
                    return (f"its deflated data set inflates to more than {limit / 2**20:,.0f} MiB, more than an "
                            "image within the pixel limit needs (a decompression bomb or a damaged file)")
    except zlib.error:
        return ""
    return ""


def _sop_class(ds: Dataset) -> UID:
    """The SOP Class: the file meta's (which a data set cut short inside its own SOP Class UID still
    has), else the data set's."""
    return UID(header_text(file_meta(ds), "MediaStorageSOPClassUID") or header_text(ds, "SOPClassUID"))


def _is_image_class(sop_class: UID) -> bool:
    """An image storage class (CR, DX, secondary capture, ...): its pixel data is mandatory (PS3.3
    Image Pixel module)."""
    return "Image Storage" in sop_class.name


def _read_dicom(path: Path, record: ImageRecord, policy: Policy, head: bytes) -> np.ndarray | None:
    if not head:
        with open(path, "rb") as handle:
            head = handle.read(DICOM_HEAD_BYTES)
    inflated = _inflates_beyond(path, head, policy.max_pixels * _MAX_BYTES_PER_PIXEL)
    if inflated:
        record.fail(inflated)
        return None
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
        truncated = len(ds) == 0  # pydicom gives up the whole data set when the pixel data is cut short
        if truncated:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)  # keep what the header says
    except Exception:  # pydicom raises many types on malformed headers; its messages are for programmers
        log.debug("cannot parse %s", path, exc_info=True)
        record.fail("cannot read the DICOM header: the file is damaged, truncated or not a valid DICOM data set")
        return None

    _fill_header_fields(ds, record)
    if truncated and "Modality" not in ds:  # cut before the tags a policy reads: the cut is the reason
        record.fail("the file ends inside its header (truncated or incomplete transfer?)")
        return None
    if not truncated and _is_image_class(_sop_class(ds)) and not any(tag in ds for tag in _PIXEL_TAGS):
        # an image object cut short inside its header: the tags a policy would read are missing too, so
        # the cut is the reason, not the policy (a file without Modality would otherwise read as skipped)
        record.fail("an image object without pixel data: truncated or incomplete file?")
        return None
    if not truncated and not _sop_class(ds) and not any(tag in ds for tag in _PIXEL_TAGS) and \
            all(tag <= _SOP_CLASS_UID for tag in ds.keys()):
        # every stored object names its SOP class (Type 1, PS3.3 C.12.1), among its first elements: a data
        # set that ends there without one is a transfer cut short, not a non-image. One with later elements
        # and no SOP class (a modality worklist file, a saved query) stays a skip, as before (a review)
        record.fail("neither a SOP Class UID nor pixel data: a DICOM file cut short or damaged (an incomplete "
                    "transfer?)")
        return None
    reason = skip_reason(ds, policy)
    if reason:
        record.skip(reason)
        return None
    if truncated:
        record.fail("the file ends inside its pixel data (truncated or incomplete transfer?)")
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
    problem = (_repair_image_pixel_module(ds, record) or _pixel_data_size_problem(ds, record)
               or _stream_problem(ds, policy))
    if problem:
        record.fail(problem)
        return None

    index = {"skip": 0, "first": 0, "middle": frames // 2}[policy.frames]
    record.frame_used = index
    try:
        with _decoder_messages(path):
            stored = _decoded(ds, index if frames > 1 else None)
    except Exception as exc:
        log.debug("cannot decode %s", path, exc_info=True)
        record.fail(_decode_failure(ds, exc))
        return None
    problem = _non_finite_problem(stored)
    if problem:
        record.fail(problem)
        return None
    try:
        return display_grey(stored, ds, record)
    except UnusablePalette as exc:
        record.fail(str(exc))
        return None
    except Exception as exc:  # every header value has a fallback: reaching this is a radscan bug
        log.warning("display pipeline failed on %s (%s: please report it; -vv shows the traceback)", path,
                    type(exc).__name__)
        log.debug("traceback", exc_info=True)
        record.fail("cannot apply the display values of the header (Modality LUT, VOI LUT or window)")
        return None


def _non_finite_problem(stored: np.ndarray) -> str:
    """'' unless decoded pixel values (Float or Double Float Pixel Data) hold NaN or infinities, which
    no display transform maps: then why the film cannot be shown. A trial: a film with 60 such rows
    was rejected as "nearly blank", a reason that sent the reader to the window."""
    if stored.dtype.kind != "f":
        return ""
    bad = int(np.count_nonzero(~np.isfinite(stored)))
    if not bad:
        return ""
    return (f"damaged pixel data: {bad:,} of its {stored.size:,} pixel values ({bad / stored.size:.1%}) are not "
            "numbers (NaN or infinite)")


def _decoded(ds: Dataset, index: int | None) -> np.ndarray:
    """The frame `index` (all frames when None) as pydicom decodes it, colour as RGB. pydicom turns
    YBR_FULL and YBR_FULL_422 into RGB for 8-bit samples only: wider ones are decoded as stored and
    converted here (radscan.display.ybr_full_to_rgb)."""
    photometric = header_text(ds, "PhotometricInterpretation").upper()
    if photometric not in ("YBR_FULL", "YBR_FULL_422") or (header_int(ds, "BitsAllocated") or 8) <= 8:
        return pixel_array(ds, index=index) if index is not None else ds.pixel_array
    stored = pixel_array(ds, index=index, raw=True)
    bits = header_int(ds, "BitsStored") or 0  # 8 bits in 16-bit words too: chroma is centred on 2**(bits - 1)
    bits = bits if 0 < bits <= 8 * stored.dtype.itemsize else 8 * stored.dtype.itemsize
    return ybr_full_to_rgb(stored, bits) if stored.ndim >= 3 and stored.shape[-1] == 3 else stored


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


# how the reason of a file skipped for its Modality begins (`skip_reason`), which a run counts
MODALITY_SKIPS = ("Modality ", "no Modality")


def skip_reason(ds: Dataset, policy: Policy) -> str:
    """Why this dataset is not scored, or '' when it should be. Header only: pixels are not read."""
    sop_class = _sop_class(ds)
    no_image = not any(tag in ds for tag in _PIXEL_TAGS) and not _is_image_class(sop_class)
    # A DICOMDIR is its SOP class (PS3.10 7.2), or a record sequence with no image of its own; an image
    # that merely carries a stray Directory Record Sequence is still an image and is read.
    if sop_class == MediaStorageDirectoryStorage or ("DirectoryRecordSequence" in ds and no_image):
        return "DICOMDIR: a media index, not an image (its images are scanned as files)"
    if no_image:
        return f"no pixel data: not an image ({sop_class.name if sop_class else 'unknown SOP class'})"
    modality = header_text(ds, "Modality").upper()
    if policy.modalities is not None and modality not in policy.modalities:
        shown = f"{MODALITY_SKIPS[0]}{modality} is not scored" if modality else f"{MODALITY_SKIPS[1]}: not scored"
        return f"{shown} (allowed: {', '.join(policy.modalities)}; see --modalities)"
    body_part = header_text(ds, "BodyPartExamined").upper()
    if policy.body_parts is not None and body_part and body_part not in policy.body_parts and not (
            set(policy.body_parts) & set(DEFAULT_BODY_PARTS) and names_the_chest(body_part)):
        return (
            f"BodyPartExamined {body_part} is not a chest "
            f"(allowed: {', '.join(policy.body_parts)}; see --body-parts)"
        )
    if not policy.for_processing and header_text(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        return "FOR PROCESSING image (raw detector data, not for display; see --for-processing)"
    frames = header_int(ds, "NumberOfFrames") or 1
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


def _birth_date(value: str) -> str:
    """A PatientBirthDate (DA) as ISO 8601 when it is a real birth date, else "": not a calendar date,
    or before 1901 (de-identification's placeholder 19000101: see `age_by_dates`)."""
    born = iso_date(value)
    return born if born >= "1901" else ""


def age_by_dates(birth: str, on: str) -> float | None:
    """Whole years from a birth date to a date, both DA values (PS3.5 6.2; read as `iso_date`), as a
    birthday counts them; negative (-1 or less) when the birth is after the date, a header that
    cannot be right (quality control says so: a trial's films born after their study, or in 2099,
    passed as of unknown age); None when either is not a real date, or the birth date is before
    1901: de-identification's placeholder (19000101, three of the real files in ../shared/data, one
    of them a 10-year-old's by its PatientAge), not a birth (`_birth_date`)."""
    born, then = _birth_date(birth), iso_date(on)
    if not born or not then:
        return None
    (y0, m0, d0), (y1, m1, d1) = ((int(part) for part in text.split("-")) for text in (born, then))
    return float(y1 - y0 - ((m1, d1) < (m0, d0)))


# the dates of the film, in the order they stand for the day it was taken (PS3.3 C.7.2.1, C.7.3.1, C.7.6.1)
_FILM_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def _fill_header_fields(ds: Dataset, record: ImageRecord) -> None:
    for keyword in DICOM_FIELDS:
        setattr(record, keyword, header_text(ds, keyword))
    record.ImageType = "\\".join(header_texts(ds, "ImageType"))
    # PatientAge is Type 3 and often absent where the birth date is not (a trial: a 64-year-old passed
    # a children's model's population check); the birth date is read here and not kept
    taken = next((text for keyword in _FILM_DATES if iso_date(text := header_text(ds, keyword))), "")
    birth = header_text(ds, "PatientBirthDate")
    # a real birth date and no usable date of the film (StudyDate 2024-13-45, or none): the age cannot be
    # counted, which quality control says rather than pass the film as of unknown age (a trial)
    record.age_by_dates = NO_FILM_DATE if not taken and _birth_date(birth) else age_by_dates(birth, taken)
    record.StudyDate = iso_date(record.StudyDate)
    record.study_key = record.StudyInstanceUID or record.study_key
    record.transfer_syntax = shown_uid(header_text(file_meta(ds), "TransferSyntaxUID"))
    record.photometric = header_text(ds, "PhotometricInterpretation").upper()
    record.bits_stored = header_int(ds, "BitsStored")
    record.rows = header_int(ds, "Rows")
    record.columns = header_int(ds, "Columns")
    record.frames = header_int(ds, "NumberOfFrames") or (1 if any(t in ds for t in _PIXEL_TAGS) else None)


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


def _repair_image_pixel_module(ds: Dataset, record: ImageRecord) -> str:
    """Give the Image Pixel module (PS3.3 C.7.6.3) the values the decoder needs, or say why not.
    Each value replaced by a guess is said in `record.header_notes` (a trial: a Photometric
    Interpretation of FOOBAR, or Bits Stored 16 in 8-bit words, were read with no word of it).

    Rows, Columns and Bits Allocated lay the pixel data out: without them nothing can be decoded
    (the reason names them). The others have a next valid choice that archives' viewers make too:
    Bits Stored absent, 0 or larger than Bits Allocated -> Bits Allocated (the container);
    Pixel Representation absent or not 0/1 -> 0 (unsigned); Samples per Pixel absent or not 1/3
    -> what the Photometric Interpretation implies; Number of Frames empty or 0 -> 1;
    Photometric Interpretation in another case or with stray spaces -> its upper-case defined
    term, absent or unknown on one-sample data -> MONOCHROME2 (no inversion); Planar Configuration
    of colour data in a JPEG, JPEG-LS or JPEG 2000 transfer syntax -> 0, because those codecs order
    the components themselves and their decoders return them interleaved (PS3.5 8.2.1: "the value
    of Planar Configuration is irrelevant ... hence it shall be set to 0"; 8.2.3, 8.2.4 likewise);
    Planar Configuration of other colour data absent or not 0/1 -> 0 (interleaved, C.7.6.3.1.3).
    """
    missing = [name for keyword, name in _LAYOUT if not header_int(ds, keyword)]
    if missing:
        return f"the header gives no {' / '.join(missing)} (absent or 0): the pixel data cannot be laid out"
    allocated = header_int(ds, "BitsAllocated") or 0
    integers = "PixelData" in ds  # Float and Double Float Pixel Data have no Bits Stored nor sign (C.7.6.24)
    if not 0 < (header_int(ds, "BitsStored") or 0) <= allocated:
        if integers:
            record.note_header(f"Bits Stored {header_quoted(ds, 'BitsStored')} read as {allocated}")
        ds.BitsStored = allocated
        ds.HighBit = allocated - 1
    if header_int(ds, "PixelRepresentation") not in (0, 1):
        if integers:
            record.note_header(f"Pixel Representation {header_quoted(ds, 'PixelRepresentation')} read as 0 "
                               "(unsigned)")
        ds.PixelRepresentation = 0
    if "NumberOfFrames" in ds and (header_int(ds, "NumberOfFrames") or 0) < 1:
        record.note_header(f"Number of Frames {header_quoted(ds, 'NumberOfFrames')} read as 1")
        ds.NumberOfFrames = 1  # empty, 0 or not a number: one frame, as without the element
    photometric = header_text(ds, "PhotometricInterpretation").upper()
    samples = header_int(ds, "SamplesPerPixel")
    if samples not in (1, 3):  # absent, 0 or out of range (C.7.6.3.1.1): as the photometric says
        samples = 3 if photometric in _KNOWN_PHOTOMETRIC and photometric not in (*_GREY, "PALETTE COLOR") else 1
        record.note_header(f"Samples per Pixel {header_quoted(ds, 'SamplesPerPixel')} read as {samples}")
        ds.SamplesPerPixel = samples
    if samples == 3 and file_meta(ds).get("TransferSyntaxUID") in _INTERLEAVING_CODECS:
        ds.PlanarConfiguration = 0  # a stray 1 would make the decoder's interleaved output read as planes
    elif samples == 3 and header_int(ds, "PlanarConfiguration") not in (0, 1):
        record.note_header(f"Planar Configuration {header_quoted(ds, 'PlanarConfiguration')} read as 0")
        ds.PlanarConfiguration = 0  # absent or out of range (Type 1C): interleaved, as most colour data is
    if photometric not in _KNOWN_PHOTOMETRIC:
        if samples != 1:
            shown = f"'{photometric}'" if photometric else "absent"
            return f"unknown Photometric Interpretation for colour data: {shown}, {samples} samples per pixel"
        record.note_header(f"Photometric Interpretation {header_quoted(ds, 'PhotometricInterpretation')} read "
                           "as MONOCHROME2")
        photometric = "MONOCHROME2"
    ds.PhotometricInterpretation = photometric
    return ""


def _pixel_data_size_problem(ds: Dataset, record: ImageRecord) -> str:
    """'' when the length of native pixel data fits Rows x Columns x frames, else why not.

    PS3.5 8.1.1 and 7.1.1: native pixel data is exactly the image's bits, padded to an even
    length with one byte; a pad of one 16-bit word is tolerated as well (seen in the wild). Too
    little data cannot be shown; more data than the header's image size means Rows or Columns
    are wrong, and reading the first part would show a sheared image. Compressed data is
    checked by its decoder.
    """
    try:
        if UID(header_text(file_meta(ds), "TransferSyntaxUID")).is_encapsulated:
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
    frames = header_int(ds, "NumberOfFrames") or 1
    samples = header_int(ds, "SamplesPerPixel") or 1
    pixels = (header_int(ds, "Rows") or 0) * (header_int(ds, "Columns") or 0) * frames
    allocated = header_int(ds, "BitsAllocated") or 0
    if allocated != 1 and allocated % 8:  # PS3.5 8.1.1: native samples fill whole bytes (or single bits)
        whole = pixels * samples * -(-allocated // 8)
        if whole <= held <= whole + 2:  # the data is in whole bytes: the header's count is wrong, as viewers assume
            ds.BitsAllocated = 8 * -(-allocated // 8)
            record.note_header(f"Bits Allocated {allocated} read as {ds.BitsAllocated} (the pixel data's length)")
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
    if header_text(ds, "PhotometricInterpretation").upper() == "YBR_FULL_422" and full <= held <= full + 2:
        return ("the header says YBR_FULL_422 (two samples per pixel, chroma shared), but the pixel data holds "
                "three full samples per pixel (RGB or YBR_FULL): the Photometric Interpretation in the header is wrong")
    size = f"Rows x Columns ({header_int(ds, 'Rows')} x {header_int(ds, 'Columns')}"
    size += (f" x {frames} frames" if frames > 1 else "") + (f" x {samples} samples" if samples > 1 else "")
    size += f", {header_int(ds, 'BitsAllocated')} bits allocated)"
    if held < needed:
        return (f"too little pixel data for the header's image size: {held:,} bytes, but {size} need "
                f"{needed:,} (truncated file, or Rows/Columns wrong in the header)")
    return (f"more pixel data than the header's image size: {held:,} bytes, but {size} need {needed:,}; "
            "Rows/Columns disagree with the pixel data, and the image would be shown sheared")


def shown_uid(value: str) -> str:
    """A UID from a header as a reason or column may show it: itself when it is a valid UID (PS3.5
    9.1: digits and dots, at most 64 characters), else a description. A Transfer Syntax UID of
    "MRN12345678.DOE.JOHN" reached the CSV, the page and the logs under --phi hash (a trial)."""
    return value if not value or UID(value).is_valid else "a value that is not a UID"


def _first_fragment(ds: Dataset) -> bytes:
    """The first fragment of encapsulated pixel data (PS3.5 A.4: an item for the Basic Offset Table,
    then one item per fragment), or b"" when there is none or the items are damaged."""
    try:
        data = ds.PixelData
    except Exception:  # cut short, or no Pixel Data (Float Pixel Data is never encapsulated)
        return b""
    at = 0
    for _ in range(2):  # the offset table's item, then the first fragment's
        if len(data) < at + 8 or data[at:at + 4] != b"\xfe\xff\x00\xe0":
            return b""
        length = int.from_bytes(data[at + 4:at + 8], "little")
        start, at = at + 8, at + 8 + length
    return bytes(data[start:min(at, start + (1 << 16))])


def _stream_problem(ds: Dataset, policy: Policy) -> str:
    """'' unless the codestream of compressed pixel data (radscan.codestream) declares more pixels than
    `policy.max_pixels` (a decompression bomb: a 7.8 KB file declaring 20000 x 20000 took 2.3 GB before
    its decoder gave up), or an image of another size or number of components than the header's Rows,
    Columns and Samples per Pixel: then why it is not decoded. It had failed as "damaged or a variant",
    sending IT after decoders, or was shown as a 256 x 2 strip or a blank film."""
    try:
        if not UID(header_text(file_meta(ds), "TransferSyntaxUID")).is_encapsulated:
            return ""
    except ValueError:
        return ""
    header = stream_header(_first_fragment(ds))
    if header is None:
        return ""
    declared = f"{header.width}x{header.height}"
    if header.width * header.height > policy.max_pixels:
        return (f"its compressed image declares {declared} pixels, beyond the limit of {policy.max_pixels:,} "
                "(a decompression bomb or a damaged file)")
    rows, columns = header_int(ds, "Rows"), header_int(ds, "Columns")
    if header.height and (header.width, header.height) != (columns, rows):  # height 0: set later (a DNL marker)
        return (f"its compressed image is {declared} pixels, but the header's Columns x Rows say {columns}x{rows}: "
                "the file disagrees with itself; ask the sender to export it again")
    samples = header_int(ds, "SamplesPerPixel") or 1
    if header.components != samples:
        return (f"its compressed image has {header.components} component(s) per pixel (3 for colour, 1 for grey), "
                f"but the header's Samples per Pixel says {samples}: the file disagrees with itself; ask the "
                "sender to export it again")
    return ""


def _decode_failure(ds: Dataset, exc: Exception) -> str:
    """A reason for a decode failure that says what to do about it (the decoder's own message is
    logged, not shown: it is written for programmers)."""
    uid = UID(header_text(file_meta(ds), "TransferSyntaxUID"))
    syntax = f"{uid.name} ({uid})" if uid.name != uid else shown_uid(uid)
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
    header = stream_header(_first_fragment(ds)) if uid.is_encapsulated else None
    bits = header_int(ds, "BitsStored")
    # a vendor's 8-bit JPEG under Bits Stored 12 (a 12-bit lossy stream under Bits Stored 10 is valid, PS3.5 8.2.1)
    if header is not None and bits and header.precision < bits:
        reason += (f"; its compressed image holds {header.precision}-bit samples, but the header's Bits Stored says "
                   f"{bits}: ask the sender to export it again")
    if "libjpeg" in missing and "does not support" in str(exc):
        reason += "; the GPL-3.0 decoder pylibjpeg-libjpeg may read it: pip install 'radscan[codecs-gpl]'"
    return reason
