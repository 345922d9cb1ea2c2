"""JPEG and PNG files -> display-correct 8-bit grey image."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from radscan.policy import Policy
from radscan.preprocess import colour_notes, percentile_window, subsample, window_to_uint8
from radscan.records import ImageRecord

__all__ = ["read_raster"]

log = logging.getLogger(__name__)

_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def read_raster(path: Path, record: ImageRecord, policy: Policy) -> np.ndarray | None:
    """Decode a JPEG/PNG into a (H, W) uint8 display image, filling the QC fields of `record`.

    8-bit images are used as stored (voi_source ``full-range``); 16-bit PNGs keep their depth
    until a robust percentile window maps them to 8 bits. Colour is reduced to luma (ITU-R 601),
    a transparent or translucent image (grey or colour with alpha, a palette with a transparent
    entry) is composited over white, as a browser or viewer shows it on a white page, and the EXIF
    orientation is applied. Returns ``None`` (with `record` marked
    as an error) when the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                record.photometric = image.mode
                record.columns, record.rows = image.size
                record.frames = getattr(image, "n_frames", 1)
                record.frame_used = 0
                if image.width * image.height > policy.max_pixels:
                    record.fail(
                        f"image of {image.width}x{image.height} pixels exceeds the limit of "
                        f"{policy.max_pixels:,} (corrupt header or decompression bomb)"
                    )
                    return None
                image.load()
                return _to_grey(ImageOps.exif_transpose(image), record)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        record.fail(f"the {record.kind.upper()} declares more pixels than can be decoded safely "
                    "(corrupt header or decompression bomb)")
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        # Pillow's own message is written for programmers: logged, not put in the reason
        log.debug("cannot decode %s", path, exc_info=True)
        record.fail(f"cannot decode the {record.kind.upper()}: the file is truncated or corrupt")
        return None


def _to_grey(image: Image.Image, record: ImageRecord) -> np.ndarray:
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        record.bits_stored = 32 if image.mode in ("I", "F") else 16
        record.voi_source = "percentile"
        low, high = percentile_window(subsample(values))
        return window_to_uint8(values, low, high, invert=False)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        record.converted = colour_notes(rgba, rgba[..., 3])
        image = _over_white(image)
    elif image.mode != "L":  # colour, a palette, CMYK: is what is shown as luma coloured?
        record.converted = colour_notes(np.asarray(image.convert("RGB")))
    if image.mode != "L":
        image = image.convert("L")
    record.bits_stored = 8
    record.voi_source = "full-range"
    return np.asarray(image)


def _over_white(image: Image.Image) -> Image.Image:
    """`image` composited over an opaque white background (PNG, ISO/IEC 15948 12.16: a viewer shows
    alpha * colour + (1 - alpha) * background). Dropping the alpha instead showed what the file
    stores under transparent pixels, often black, where every viewer shows the page."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
