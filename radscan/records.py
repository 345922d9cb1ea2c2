"""The typed record that travels from ingest to every report: one per input file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ImageRecord", "Status", "DICOM_FIELDS", "RECORD_COLUMNS", "one_line", "printable", "counted"]


def counted(number: int, noun: str) -> str:
    """'1 file', '2 files', '1 epoch': a count in the words a person reads (regular plurals only)."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# The openings of quality control's rejections by a film's header (radscan.qc): a lateral or decubitus view, a
# view that is not frontal, a localizer. Routine beside a study's frontal film, nothing for a reader to review
# (radscan.state ranks studies by the other rejections).
VIEW_REJECTIONS = ("a lateral view", "a decubitus view", "not a frontal view", "a localizer/scout image")


class Status:
    OK = "ok"
    SKIPPED = "skipped"  # deliberately not used (policy: not an image, other modality, ...)
    ERROR = "error"  # should have been used but could not be read
    REJECTED = "rejected"  # read, but failed quality control: not a film the model can judge (radscan.qc)


# the reason of a file in an image format radscan does not read (radscan.ingest), which a run counts and the
# study list lists (radscan.state): a TIFF film is a film a site must export again, not a stray file
READS_ONLY = "radscan reads DICOM, JPEG and PNG films (export them as DICOM or PNG)"

# `ImageRecord.age_by_dates` of a film with a real birth date but no usable date of its own
NO_FILM_DATE = float("-inf")

# DICOM keywords copied verbatim into the inventory and the worklist, in column order.
DICOM_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "ImageType",
    "PatientAge",
    # the acquisition device, so that flag rates can be read per scanner (issue 21 item 7)
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
)


@dataclass
class ImageRecord:
    """What radscan knows about one input file. Field order is the CSV column order."""

    path: str  # relative to the scanned root, with forward slashes
    root: str  # the scanned root, as given on the command line
    kind: str  # dicom / jpeg / png / other
    status: str = Status.OK
    reason: str = ""
    study_key: str = ""  # StudyInstanceUID for DICOM; else the folder: resolved root + relative folder
    StudyInstanceUID: str = ""
    SeriesInstanceUID: str = ""
    SOPInstanceUID: str = ""
    AccessionNumber: str = ""
    PatientID: str = ""
    StudyDate: str = ""
    Modality: str = ""
    ViewPosition: str = ""
    BodyPartExamined: str = ""
    ImageType: str = ""  # values joined with backslashes, as the standard writes them
    PatientAge: str = ""  # Age String (nnnD/W/M/Y); 90 years and over are written as 090Y outside --phi keep
    Manufacturer: str = ""
    ManufacturerModelName: str = ""
    StationName: str = ""
    # quality control (radscan.qc): pass / warn / fail, and why
    qc_status: str = ""
    qc_reason: str = ""
    # QC fields
    transfer_syntax: str = ""
    photometric: str = ""
    inverted: bool = False
    voi_source: str = ""  # lut / window / full-range / percentile
    # what the grey image stands for beyond the stored values: "colour" (coloured content shown as its
    # luma), "transparency" (composited over white) (radscan.preprocess.colour_notes), "padding cut: left 25%"
    # (radscan.preprocess.padding_note), joined by "; ", or ""
    converted: str = ""
    # header values radscan could not use and what it did instead, in plain words joined by "; " (a
    # Photometric Interpretation that is no defined term read as MONOCHROME2, a damaged VOI LUT left for
    # an automatic window...): the film was read by a guess or a fallback (radscan.dicom, radscan.display)
    header_notes: str = ""
    bits_stored: int | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    frame_used: int | None = None
    file_size: int | None = None
    preprocess_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # not a column: the (128, 128) uint8 whole film that quality control judges when the model reads
    # only part of it (a thorax-box model's box; radscan.ingest.ingest_file). Dropped once judged.
    qc_image: Any = field(default=None, repr=False, compare=False)
    # not a column: the patient's age in years at the study from the header's PatientBirthDate and the
    # study's date (radscan.dicom.age_by_dates; negative when the birth is after the film: a header that
    # cannot be right), for quality control's population check where PatientAge is absent or unreadable;
    # the birth date itself is never kept (an identifier)
    age_by_dates: float | None = field(default=None, repr=False, compare=False)
    # not a column: (rows, columns) of the film read (radscan.ingest): after an EXIF orientation, less
    # its padding where that was cut (the `converted` column says so); None until read
    film_shape: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    def film_size(self) -> tuple[int | None, int | None]:
        """(rows, columns) of the film read, in pixels (turned by its EXIF orientation, less its padding
        where that was cut); the header's or the file's until it is read (None where unknown). Quality
        control's size and shape checks and the pictures' aspect read it."""
        return self.film_shape or (self.rows, self.columns)

    def note_header(self, note: str) -> None:
        """Add `note` to `header_notes`."""
        self.header_notes = f"{self.header_notes}; {note}" if self.header_notes else note

    def skip(self, reason: str) -> ImageRecord:
        self.status, self.reason = Status.SKIPPED, reason
        return self

    def fail(self, reason: str) -> ImageRecord:
        self.status, self.reason = Status.ERROR, reason
        return self

    def as_row(self) -> dict[str, Any]:
        """A flat dict for CSV writing; `extra` columns (e.g. preview_png) come last."""
        row = {name: getattr(self, name) for name in RECORD_COLUMNS}
        row["path"], row["root"] = printable(self.path), printable(self.root)
        row.update(self.extra)
        return row


RECORD_COLUMNS = tuple(f.name for f in fields(ImageRecord) if f.name not in ("extra", "qc_image", "age_by_dates",
                                                                                     "film_shape"))


# Unicode's explicit directional formatting characters (UAX #9, 2.1-2.4): embeddings, overrides and
# isolates reorder the text after them, so a header value or a file name could make another
# study's accession number read backwards in the page ("A12345" shown as "54321A").
_BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_SHOWN_CONTROLS = {ord(char): f"\\u{ord(char):04x}" for char in _BIDI_CONTROLS}
# C0 and C1 control characters and DEL: a terminal escape (ESC [31m) in a file name or a header value
# reached the terminal that printed the CSV, and a newline, tab or ESC drew as a space or a box in a
# picture's caption (a new user's trial)
# (C1 as \\u0080-\\u009f: \\x80-\\x9f are how `printable` shows bytes that are not UTF-8)
_SHOWN_CONTROLS |= {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
_SHOWN_CONTROLS |= {code: f"\\u{code:04x}" for code in range(0x80, 0xA0)}


def visible_controls(text: str) -> str:
    """`text` with every bidirectional embedding, override or isolate written out as \\uXXXX, and
    every control character (C0 and DEL as \\xNN: a newline, a tab, a terminal's ESC; C1 as
    \\uXXXX), so that it is seen and reorders or does nothing (the page also isolates every value)."""
    return text.translate(_SHOWN_CONTROLS)


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) become \\xNN,
    and a backslash of the name becomes two, so that two different names never print alike
    (``caf\\xe9`` typed in a name is ``caf\\\\xe9``; the byte 0xE9 is ``caf\\xe9``); bidirectional
    controls are written out (`visible_controls`)."""
    escaped = visible_controls(name.replace("\\", "\\\\"))
    return escaped.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as a short single line, for the `reason` column."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _OBJECT_ADDRESS.sub("<object>", text)  # keep reasons identical from run to run
    return text if len(text) <= limit else text[: limit - 3] + "..."
