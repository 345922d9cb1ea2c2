"""The DICOM grayscale display pipeline (PS3.4 N.2.1.1), with pydicom's own functions: stored
values -> Modality LUT or rescale -> VOI LUT or window (or an automatic window) -> MONOCHROME1 /
INVERSE inversion -> 8-bit grey, as a radiologist's display shows the film. Colour images become
their luma. Called by radscan.dicom once the pixels are decoded; see radscan.preprocess for the
steps after it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

from radscan.dicomheader import header_int, header_number, header_numbers, header_quoted, header_text, header_texts
from radscan.preprocess import colour_notes, luma, percentile_window, subsample, window_to_uint8
from radscan.records import ImageRecord

__all__ = ["display_grey", "ybr_full_to_rgb", "UnusablePalette"]

log = logging.getLogger(__name__)

# Bits per LUT entry (third LUT Descriptor value): PS3.3 C.11.1.1.1 (modality), C.11.2.1.1 (VOI)
_MODALITY_LUT_BITS = (8, 16)
_VOI_LUT_BITS = (8, *range(10, 17))
# VOI LUT Function defined terms (PS3.3 C.11.2.1.3), keyed by the normalised header text
_VOI_FUNCTIONS = {"": "LINEAR", "LINEAR": "LINEAR", "LINEAR_EXACT": "LINEAR_EXACT", "SIGMOID": "SIGMOID"}


class UnusablePalette(ValueError):
    """A PALETTE COLOR image whose palette cannot be applied: the file's row gives the message."""


def _colour_range(rgb: np.ndarray, ds: Dataset, photometric: str) -> float:
    """The full range of colour values: for PALETTE COLOR, that of its LUT entries (8 or 16 bits,
    the third value of the LUT Descriptor, PS3.3 C.7.6.3.1.5), which pydicom returns in 16-bit words
    either way (8-bit entries over a 16-bit range would show a film nearly black); else that of Bits
    Stored (12-bit colour in 16-bit words showed nearly black, a trial), else the dtype's. A
    descriptor or Bits Stored that understates the values (values above its range) is not trusted."""
    full = float(np.iinfo(rgb.dtype).max)
    if photometric == "PALETTE COLOR":
        try:
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            return full
        bits = bits if bits in (8, 16) else 0
    else:
        bits = header_int(ds, "BitsStored") or 0
    top = float(2**bits - 1) if 0 < bits < 8 * rgb.dtype.itemsize else full
    return top if rgb.max(initial=0) <= top else full


def _palette_applied(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's apply_color_lut, or UnusablePalette naming what is wrong (a missing or damaged
    palette raised pydicom's own errors, and the row blamed the Modality LUT or window)."""
    try:
        return apply_color_lut(stored, ds)
    except Exception:  # pydicom raises ValueError, TypeError, KeyError... for a bad palette
        log.debug("palette unusable", exc_info=True)
        raise UnusablePalette("a PALETTE COLOR image whose palette (Palette Color Lookup Table) is missing or "
                              "damaged: its colours cannot be known") from None


def ybr_full_to_rgb(ybr: np.ndarray, bits: int) -> np.ndarray:
    """YBR_FULL samples (..., 3) of `bits` bits (1-16; Y, Cb, Cr in full range, chroma centred on
    2**(bits - 1)) -> RGB of the same dtype, clipped to 0..2**bits - 1: the equations of PS3.3
    C.7.6.3.1.2 (ITU-R BT.601 coefficients, as JPEG's JFIF), scaled from 8 bits to `bits`. pydicom
    converts YBR to RGB for 8-bit samples only (wider ones raised "Invalid ndarray.dtype", and a
    12-bit colour film was an error row, a trial)."""
    top, half = float(2**bits - 1), float(2 ** (bits - 1))
    y, cb, cr = (ybr[..., channel].astype(np.float64) for channel in range(3))
    rgb = np.stack([y + 1.402 * (cr - half),
                    y - 0.344136 * (cb - half) - 0.714136 * (cr - half),
                    y + 1.772 * (cb - half)], axis=-1)
    return np.clip(np.rint(rgb), 0, top).astype(ybr.dtype)


def display_grey(stored: np.ndarray, ds: Dataset, record: ImageRecord) -> np.ndarray:
    """Stored values -> (H, W) uint8 as a radiologist's display would show them.

    Grey data follows PS3.4 N.2.1.1: Modality LUT or rescale (PS3.3 C.11.1), then the first
    usable VOI LUT, else the first usable window pair (C.11.2), else an automatic window, then
    MONOCHROME1 / INVERSE inversion. Header values that cannot be used fall back to the next
    choice instead of failing the image. Padding (C.7.5.1.1.2) takes no part in the automatic
    window and is shown black.
    """
    photometric = record.photometric
    if stored.ndim == 3 or photometric == "PALETTE COLOR":
        rgb = _palette_applied(stored, ds) if photometric == "PALETTE COLOR" else stored
        top = _colour_range(rgb, ds, photometric)
        record.converted = colour_notes(rgb, full=top)
        record.voi_source = "full-range"  # YBR is RGB by now (pydicom, or radscan.dicom for wider samples)
        return window_to_uint8(luma(rgb), 0.0, top, invert=False)

    record.inverted = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and header_text(ds, "PresentationLUTShape").upper() == "INVERSE"
    )
    domain, position = _integer_domain(stored)
    source = stored if domain is None else domain
    # a VOI LUT Sequence, or a window with a value (anonymisers leave empty ones), that the header gives
    said_voi = "VOILUTSequence" in ds
    said_window = bool(header_text(ds, "WindowCenter") or header_text(ds, "WindowWidth"))
    values = _modality_values(source, ds, record)
    sample = subsample(stored)
    sample_values = subsample(values) if domain is None else values[position(sample)]
    padding = _tagged_padding(stored, ds)
    shown = sample_values if padding is None else sample_values[~subsample(padding)]

    voi = _first_usable_voi_lut(values, ds, shown)
    window = None if voi is not None else _first_usable_window(ds, shown)
    if voi is not None:
        values, (low, high) = voi
        record.voi_source = "lut"
    elif window is not None:
        window, step = window
        values = apply_windowing(values if step == 1 else values / step, window)
        low, high = _window_range(window)
        record.voi_source = "window"
    elif (header_int(ds, "BitsStored") or 16) <= 8 and values is source and source.dtype.kind in "ui":
        low, high = _stored_range(ds)  # BitsStored, not the 16-bit word that may hold 8-bit data
        record.voi_source = "full-range"
    else:
        if padding is None:
            padding = _untagged_padding(stored, record.inverted)
            shown = sample_values if padding is None else sample_values[~subsample(padding)]
        low, high = percentile_window(shown)
        record.voi_source = "percentile"
    _note_unused_voi(record, ds, said_voi, said_window)
    grey = window_to_uint8(values, low, high, invert=record.inverted)
    grey = grey if domain is None else np.take(grey, position(stored))
    return grey if padding is None else np.where(padding, np.uint8(0), grey)


# what was shown instead of a VOI LUT or window the header gave but that could not be used
_INSTEAD = {"window": "window used", "full-range": "stored range shown", "percentile": "automatic window"}


def _note_unused_voi(record: ImageRecord, ds: Dataset, said_voi: bool, said_window: bool) -> None:
    """Say in `record.header_notes` that a VOI LUT Sequence or a window the header gave was not used
    (empty, damaged, out of range, or it would show the film blank: `_first_usable_voi_lut`,
    `_first_usable_window`), and what was shown instead; and a VOI LUT Function that is no defined
    term, read as LINEAR. A trial: five kinds of damaged VOI LUT fell back to an automatic window
    with no word but `voi_source`."""
    if said_voi and record.voi_source != "lut":
        record.note_header(f"VOI LUT Sequence unusable: {_INSTEAD[record.voi_source]}")
    if said_window and record.voi_source not in ("lut", "window"):
        record.note_header(f"Window Center/Width {header_quoted(ds, 'WindowCenter')}/"
                           f"{header_quoted(ds, 'WindowWidth')} unusable: {_INSTEAD[record.voi_source]}")
    if record.voi_source == "window" and any(name and name not in _VOI_FUNCTIONS
                                             for name in header_texts(ds, "VOILUTFunction")):
        record.note_header(f"VOI LUT Function {header_quoted(ds, 'VOILUTFunction')} read as LINEAR")


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
    bits = header_int(ds, "BitsStored") or 16
    if header_int(ds, "PixelRepresentation") == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_values(source: np.ndarray, ds: Dataset, record: ImageRecord) -> np.ndarray:
    """The Modality LUT stage (PS3.3 C.11.1) with pydicom's `apply_modality_lut`.

    A Modality LUT Sequence that cannot be used (no descriptor or data, fewer entries than the
    descriptor says, an entry size other than 8 or 16 bits: C.11.1.1.1) is dropped in favour of
    the rescale. A Rescale Slope that is absent, empty, not a number or 0 means 1; such a Rescale
    Intercept means 0 (a slope of 0 would map every pixel to one value). An identity rescale is
    dropped, so that 8-bit data keeps its own range. What was not used is said in
    `record.header_notes`.
    """
    items = ds.get("ModalityLUTSequence")
    if items is not None and not (len(items) and _usable_lut(items[0], _MODALITY_LUT_BITS)):
        record.note_header("Modality LUT Sequence unusable: rescale used")
        del ds.ModalityLUTSequence
    slope, intercept = header_number(ds, "RescaleSlope"), header_number(ds, "RescaleIntercept")
    if "ModalityLUTSequence" not in ds:  # a usable Modality LUT is applied instead of any rescale
        if header_text(ds, "RescaleSlope") and (slope is None or slope == 0):  # an empty one says nothing
            record.note_header(f"Rescale Slope {header_quoted(ds, 'RescaleSlope')} read as 1")
        if header_text(ds, "RescaleIntercept") and intercept is None:
            record.note_header(f"Rescale Intercept {header_quoted(ds, 'RescaleIntercept')} read as 0")
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
        record.note_header("Modality LUT Sequence unusable: rescale used")
        del ds.ModalityLUTSequence
        return apply_modality_lut(source, ds)


def _first_usable_voi_lut(values: np.ndarray, ds: Dataset,
                          shown: np.ndarray) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The first usable item of the VOI LUT Sequence (PS3.3 C.11.2.1.1) applied with pydicom's
    `apply_voi`, and the range of its entries; None when there is none. An item is unusable, as a
    window is (`_first_usable_window`), when it would show a blank film: when at least
    LUT_OUTSIDE_SHARE of the image's values (`shown`, a sample without padding) lie at or beyond the
    ends of the values it maps (its first mapped value and entry count: the ends stand for every
    value beyond them), or when its entries exceed the bits its descriptor gives them. A trial: a descriptor of
    256 entries over 12-bit data, or a first mapped value of 60000, showed a blank film."""
    items = ds.get("VOILUTSequence") or []
    for index, item in enumerate(items):
        if not (_usable_lut(item, _VOI_LUT_BITS) and _lut_maps(item, shown)):
            continue
        entries, first, depth = (int(value) for value in item.LUTDescriptor)
        if depth == 8 and (entries or 2**16) > 256:
            # pydicom (3.0) holds a LUT's indices in the entries' own type: with 8-bit entries an index
            # above 255 wrapped round, and a 12-bit film through a 4096-entry 8-bit LUT showed as noise
            # (a trial). Its entries are read the same as 16-bit ones (a word each, in OW)
            item.LUTDescriptor = [entries, first, 16]
        # a LUT is indexed by integers (rescaled values are float)
        indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        try:
            return apply_voi(indices, ds, index), _voi_lut_range(ds, index)
        except Exception:  # an item pydicom cannot apply: try the next, then the window
            log.debug("VOI LUT item %d unusable", index, exc_info=True)
    return None


# share of an image's values at or beyond the ends of a VOI LUT's input range (shown as its first or
# last entry) above which the LUT would show it blank: a radiograph is grey in more than a tenth of it
LUT_OUTSIDE_SHARE = 0.9


def _lut_maps(item: Dataset, shown: np.ndarray) -> bool:
    """Whether a VOI LUT item (`_usable_lut`) maps the image: most of `shown` within its input range
    and its entries within the bits its descriptor gives them."""
    entries, first, depth = (int(value) for value in item.LUTDescriptor)
    entries = entries or 2**16
    if first >= 2**15 and shown.size and float(np.min(shown)) < 0:  # US or SS (C.11.2.1.1): signed data's
        first -= 2**16
    at_ends = (shown <= first) | (shown >= first + entries - 1)  # shown as the first or the last entry
    if shown.size and float(at_ends.mean()) >= LUT_OUTSIDE_SHARE:
        return False
    data = item.LUTData
    if isinstance(data, bytes):  # OW: a 16-bit word per entry, as pydicom reads it (little endian: PS3.5 A.3)
        data = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    return not len(data) or int(np.max(data)) <= 2**depth - 1


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
    centers, widths = header_numbers(ds, "WindowCenter"), header_numbers(ds, "WindowWidth")
    functions = [_VOI_FUNCTIONS.get(name, "LINEAR") for name in header_texts(ds, "VOILUTFunction")] or ["LINEAR"]
    low, high = (float(shown.min()), float(shown.max())) if shown.size else (-np.inf, np.inf)
    rescale_step = 1.0 if "ModalityLUTSequence" in ds else min(1.0, abs(header_number(ds, "RescaleSlope") or 1.0))
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
    value = header_number(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = header_number(ds, "PixelPaddingRangeLimit")
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
