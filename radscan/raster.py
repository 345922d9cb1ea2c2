"""JPEG and PNG files -> display-correct 8-bit grey image."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from radscan.policy import Policy
from radscan.preprocess import colour_notes, luma, percentile_window, subsample, window_to_uint8
from radscan.records import ImageRecord

__all__ = ["read_raster"]

log = logging.getLogger(__name__)

_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# Pillow reads a 16-bit colour PNG, or 16-bit grey with alpha, as 8-bit RGB(A) by keeping each
# sample's high byte: a film whose values use 12 of the 16 bits came out nearly black (a trial). Its
# PNG decoder can be told another raw mode of the same bits per pixel: ";16L" over big-endian samples
# keeps the low bytes; plain "RGBA" over grey-alpha keeps all four bytes. raw mode -> (its companion,
# the channels it holds)
_SIXTEEN_BIT = {"RGB;16B": ("RGB;16L", 3), "RGBA;16B": ("RGBA;16L", 4), "LA;16B": ("RGBA", 2)}


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
                wide = _sixteen_bit_samples(path, image)
                if wide is not None:
                    return _wide_to_grey(wide, record)
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


def _sixteen_bit_samples(path: Path, image: Image.Image) -> np.ndarray | None:
    """For a 16-bit PNG that Pillow would reduce to 8 bits (`_SIXTEEN_BIT`), or 16-bit grey with a
    transparent key (tRNS), `image` opened and not yet loaded: its (H, W, C) uint16 samples (C 3 or 4
    colour, 2 grey with alpha; a key becomes an alpha channel), EXIF orientation applied; else None."""
    tile = image.tile[0] if image.format == "PNG" and len(image.tile) == 1 else None
    key = image.info.get("transparency")
    if tile is not None and image.mode in _HIGH_DEPTH_MODES and isinstance(key, int):
        image.load()
        grey = np.asarray(ImageOps.exif_transpose(image)).astype(np.uint16)
        return _with_key(grey[..., None], (key,))
    if tile is None or tile[3] not in _SIXTEEN_BIT:
        return None
    companion, channels = _SIXTEEN_BIT[tile[3]]
    decoded = []
    for rawmode in ((tile[3], companion) if channels > 2 else (companion,)):
        with Image.open(path) as twin:  # a fresh decoder per raw mode, as Pillow opens any file
            twin.tile = [(tile[0], tile[1], tile[2], rawmode)]
            twin.load()
            decoded.append(np.asarray(ImageOps.exif_transpose(twin)).astype(np.uint16))
    if channels == 2:  # bytes high, low of the grey, then of the alpha
        both = decoded[0]
        return np.stack([both[..., 0] << 8 | both[..., 1], both[..., 2] << 8 | both[..., 3]], axis=-1)
    samples = decoded[0] << 8 | decoded[1]
    return _with_key(samples, key) if channels == 3 and isinstance(key, tuple) else samples


def _with_key(samples: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
    """(H, W, C) samples and a tRNS key of C values (PNG: pixels of exactly that colour are fully
    transparent) -> (H, W, C + 1) with an alpha channel: 0 at the key, 65535 elsewhere."""
    transparent = (samples == np.array(key, dtype=np.uint16)).all(axis=-1)
    return np.concatenate([samples, np.where(transparent, 0, 65535).astype(np.uint16)[..., None]], axis=-1)


def _wide_to_grey(samples: np.ndarray, record: ImageRecord) -> np.ndarray:
    """(H, W, C) uint16 samples of a 16-bit PNG (C: 2 grey with alpha, 3 colour, 4 colour with
    alpha) -> (H, W) uint8: luma (ITU-R 601), the robust percentile window of 16-bit grey PNGs taken
    over the pixels drawn (more than half opaque), and transparency composited over white, as
    `_to_grey` shows 8-bit images: white being the window's top (composited over 65535 first, a
    12-bit film with transparent margins was windowed up to 65535 and came out black, a review)."""
    colour = samples.shape[-1] >= 3
    alpha = samples[..., -1] if samples.shape[-1] in (2, 4) else None
    grey = luma(samples) if colour else samples[..., 0].astype(np.float32)
    record.bits_stored = 16
    record.voi_source = "percentile"
    sample = subsample(grey)
    if alpha is not None:
        drawn = sample[subsample(alpha) > np.iinfo(np.uint16).max // 2]
        sample = drawn if drawn.size else sample
    low, high = percentile_window(sample)
    if alpha is not None:
        high = max(high, low + 1.0)  # one value drawn (or none): white must still be above it
        share = alpha.astype(np.float32) / np.iinfo(np.uint16).max
        grey = share * grey + (1 - share) * high
    # chroma judged in the window's grey levels: 12-bit values in 16-bit words are not 16x less coloured
    record.converted = colour_notes(samples[..., :3] if colour else None, alpha, full=max(high - low, 1.0))
    return window_to_uint8(grey, low, high, invert=False)


def _over_white(image: Image.Image) -> Image.Image:
    """`image` composited over an opaque white background (PNG, ISO/IEC 15948 12.16: a viewer shows
    alpha * colour + (1 - alpha) * background). Dropping the alpha instead showed what the file
    stores under transparent pixels, often black, where every viewer shows the page."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
