"""DICOM header values as real archives hold them, read without exceptions: a value that is absent,
empty, unreadable or not a number is "" or None, never an error (radscan.dicom and radscan.display
read every header through these)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from radscan.records import visible_controls

__all__ = ["file_meta", "header_text", "header_texts", "header_numbers", "header_number", "header_int",
           "header_quoted"]


def file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or Dataset()


def header_text(ds: Dataset, keyword: str) -> str:
    """A header value as one line of text; '' when absent or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):  # several values: joined as the standard writes them
        return "\\".join(visible_controls(_plain_value(item)) for item in value)
    return visible_controls(_plain_value(value))


def _plain_value(value: object) -> str:
    """One value as text on one line, its padding stripped; controls not yet written out."""
    text = str(value) if not isinstance(value, bytes) else value.decode("latin-1", "replace")
    return " ".join(text.split()).strip("\x00 ")


def header_quoted(ds: Dataset, keyword: str, limit: int = 16) -> str:
    """A header value as a message quotes it: 'VALUE', several values joined by backslashes, cut to
    `limit` characters before its controls are written out (an escape is never cut in two); "absent"
    or "empty" when there is none."""
    if keyword not in ds:
        return "absent"
    try:
        value = ds.get(keyword)
    except Exception:
        return "unreadable"
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    raw = "\\".join(_plain_value(item) for item in items)
    return f"'{visible_controls(raw[:limit])}'" if raw else "empty"


def header_texts(ds: Dataset, keyword: str) -> list[str]:
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


def header_numbers(ds: Dataset, keyword: str) -> list[float | None]:
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


def header_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric element when it is a finite number, else None."""
    numbers = header_numbers(ds, keyword)
    return numbers[0] if numbers else None


def header_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None
