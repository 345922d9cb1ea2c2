"""Writing outputs safely: atomic files, streamed CSVs, PNGs without metadata.

A run killed at any moment (SIGKILL included) leaves every previous output intact: each file is
written under a temporary name in the same folder, flushed to disk and renamed over the old one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radscan.errors import OutputError

__all__ = ["render_film", "atomic_output", "AtomicFile", "commit_together", "prepare_folder", "refuse_special",
           "remove_stale_temporaries", "cannot_write", "CsvStream", "write_png", "write_png_bytes", "encode_png",
           "png_name", "render_explanation"]


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class AtomicFile:
    """A file written under a temporary name beside `path`, which becomes `path` only on `commit`
    (or `sync` now and `replace` later, to put several files in place together: `commit_together`).

    `durable` also fsyncs before the rename, so that a power cut cannot leave an empty file; the
    many small PNGs skip it (the rename alone keeps them whole on a crash of the process).
    Raises OutputError (exit 73) when the file cannot be made, written or renamed."""

    def __init__(self, path: Path, mode: str = "w", durable: bool = True) -> None:
        self.path, self._durable = Path(path), durable
        refuse_special(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:  # read-only folder, a parent that is a file, disk full: exit 73, one line
            raise cannot_write(self.path, exc) from None
        try:
            os.chmod(self._tmp, FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask-based mode
            # file names that are not UTF-8 appear with \x.. escapes rather than breaking the CSV
            kwargs = {"newline": "", "encoding": "utf-8", "errors": "backslashreplace"} if "b" not in mode else {}
            self.handle: IO[Any] = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            self.abort()
            raise

    def sync(self) -> None:
        """Flush and close the temporary file (fsync when durable): all that can fail but the rename."""
        if self.handle.closed:
            return
        try:
            with self.handle:
                if self._durable:
                    self.handle.flush()
                    os.fsync(self.handle.fileno())
        except OSError as exc:  # a full disk shows here at the latest
            raise cannot_write(self.path, exc) from None

    def replace(self) -> None:
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise cannot_write(self.path, exc) from None

    def commit(self) -> None:
        self.sync()
        self.replace()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def commit_together(files: Sequence[AtomicFile]) -> None:
    """Put several written files in place as one step, in the order given: every file is synced
    first (where a full disk or an I/O error shows), then the renames follow back to back, so that
    a run killed between two of them leaves a mismatched set only within microseconds, never after
    writing a whole file. On an error before the renames, none is put in place."""
    try:
        for file in files:
            file.sync()
    except BaseException:
        for file in files:
            file.abort()
        raise
    for file in files:
        file.replace()


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "w", durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success, rename it onto `path` (`AtomicFile`)."""
    file = AtomicFile(path, mode, durable)
    try:
        yield file.handle
        file.commit()
    except BaseException:
        file.abort()
        raise


def refuse_special(path: Path) -> None:
    """An output path that is a symbolic link, or exists as anything but a regular file (a device
    such as /dev/null, a FIFO, a socket, a folder), is refused with OutputError (exit 73): renaming
    a file over it would replace a link set up for something else, or a device node of the system."""
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link: radscan does not write through or replace links it did not "
                          "make; remove the link or choose another --out")
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OutputError(f"{path} is {kind}: radscan writes its outputs as regular files; choose another --out")


def prepare_folder(path: Path, option: str) -> None:
    """Make an output folder for pictures, refusing (OutputError, exit 73) one that is a symbolic
    link (pictures would land, and old ones be deleted, wherever it points) or that cannot be made
    (a parent that is a file, a read-only place)."""
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link: radscan does not write through links it did not make; "
                          f"remove the link or choose another {option}")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder: choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None


def remove_stale_temporaries(folder: Path, names: str) -> int:
    """Delete the temporary files that atomic_output left in `folder` for outputs matching the glob
    `names` when a run was killed (SIGKILL, power cut) before renaming them: they may hold rows of
    that run. Call under the lock of the outputs, so that no running writer owns them. Returns how
    many were removed."""
    removed = 0
    for stale in Path(folder).glob(f".{names}.*.tmp"):
        if stale.is_file() and not stale.is_symlink():
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
    return removed


def cannot_write(path: Path, exc: OSError) -> OutputError:
    """The one-line error (exit 73) for an output that cannot be written, naming a parent that is
    a file when that is the cause (the operating system only says "File exists")."""
    blocking = next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
    why = f"{blocking} is a file, not a folder" if blocking else exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {why}")


class CsvStream:
    """Rows written as they come to a temporary file (`file`, an AtomicFile), which becomes `path`
    only on `commit` (or with other files, `commit_together`)."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.file, self._path = AtomicFile(path), path
        self._writer = csv.DictWriter(self.file.handle, fieldnames=list(columns), extrasaction="ignore")
        self.write_header()

    def write_header(self) -> None:
        try:
            self._writer.writeheader()
        except OSError as exc:
            self.file.abort()
            raise cannot_write(self._path, exc) from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._writer.writerow({key: _cell(value) for key, value in row.items()})
        except OSError as exc:  # e.g. the disk filled up
            raise cannot_write(self._path, exc) from None

    def commit(self) -> None:
        self.file.commit()

    def abort(self, exc: BaseException | None = None) -> None:
        self.file.abort()

    def __enter__(self) -> CsvStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.commit()
        else:
            self.abort(exc)


# Text that a spreadsheet would run as a formula (OWASP "CSV Injection"): a file name or a DICOM
# value such as =HYPERLINK(...) or @SUM(...) is written with a leading apostrophe, which
# spreadsheets show as text. Numbers (negative scores) are not text and are written as they are.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def png_name(*identity: str) -> str:
    """A file name for an image that reveals nothing about the patient: a hash of its identity
    (root and relative path), stable from run to run."""
    digest = hashlib.sha256("\0".join(identity).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{digest[:24]}.png"


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit grey or RGB image as PNG, with no text chunks (no identifiers). Fast zlib level:
    on a nightly run, encoding at the default level costs more than the model."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an 8-bit grey or RGB image atomically as PNG (`encode_png`)."""
    write_png_bytes(path, encode_png(image))


def write_png_bytes(path: Path, data: bytes) -> None:
    """Write an encoded PNG atomically."""
    with atomic_output(path, "wb", durable=False) as handle:
        try:
            handle.write(data)
        except OSError as exc:
            raise cannot_write(path, exc) from None


# Maps are shown on fixed scales, so that colours mean the same in every picture. The score map
# is in z-score units per image area (see SimSID._score_chunk): 0 .. SCORE_MAP_SCALE_MAX; the
# reconstruction difference in model units (the image spans -1..1, so 0.5 is a quarter of it).
SCORE_MAP_SCALE_MAX = 30.0
RESIDUAL_SCALE_MAX = 0.5
COLOUR_MAP = "inferno"  # perceptually uniform and readable in grey print (matplotlib)
_PANEL = 512  # height of the main panels, pixels
_SMALL = 256
_BAR = 16
_MARGIN = 8
_BESIDE = _BAR + 44  # a colour bar and its labels
_BELOW = 44  # the panels' labels
# Where the main panel lies in a picture, for the worklist page, which shows it alone as the row's
# thumbnail and finds it from the picture's size (worklist.html.j2, `panelBox`): an explanation
# picture is PICTURE_LAYOUT["fixed_width"] + 2 x the panel's width wide and its caption + panel +
# "below" high, the map panel right of the film's panel (after "margin"); a rejected film's picture
# is its caption + panel high, the film at the left.
PICTURE_LAYOUT = {"panel": _PANEL, "margin": _MARGIN, "below": _BELOW,
                  "fixed_width": 3 * _BESIDE + _MARGIN + _SMALL}


@functools.lru_cache(maxsize=1)
def _colour_table() -> np.ndarray:
    """(256, 3) uint8 RGB of COLOUR_MAP (matplotlib is imported once, on the first picture)."""
    from matplotlib import colormaps

    return (colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """0..1 -> COLOUR_MAP colours (black-purple-orange-yellow), as (..., 3) uint8."""
    return _colour_table()[(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)]


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _overlay(grey: Image.Image, heat: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """`heat` (128, 128) in 0..1 blended over the grey input (more opaque where hotter), then
    enlarged to `size` (width, height) pixel for pixel (nearest neighbour)."""
    opacity = Image.fromarray((0.75 * 255 * np.clip(heat, 0.0, 1.0)).astype(np.uint8))
    blended = Image.composite(Image.fromarray(heat_colours(heat)), grey, opacity)
    return blended.resize(size, Image.Resampling.NEAREST)


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, height: int, top: str,
                bottom: str) -> None:
    bar = np.repeat(heat_colours(np.linspace(1.0, 0.0, height))[:, None, :], _BAR, axis=1)
    canvas.paste(Image.fromarray(bar), (x, y))
    draw.text((x + _BAR + 4, y), top, fill="white", font=_font(12))
    draw.text((x + _BAR + 4, y + height - 14), bottom, fill="white", font=_font(12))


def render_explanation(image: np.ndarray, score_map: np.ndarray, residual: np.ndarray, caption: str,
                       score_kind: str = "critic", aspect: float = 1.0) -> np.ndarray:
    """The picture of one scored film, (H, W, 3) uint8, for a reader:

    - a caption on top (`caption`, one or more lines: score, flag, identity as the PHI mode
      allows, view, date, model; written by the caller);
    - left: the film as the model saw it (`image`, (128, 128) uint8), shown at the film's own
      width/height ratio `aspect` (clamped to 0.5..2; the model input is squashed to a square);
    - middle, the main panel: where the film raises the anomaly score (`score_map`, (128, 128)
      float >= 0, z-score units per image area, fixed scale 0..SCORE_MAP_SCALE_MAX), over the film
      at the same ratio, in a perceptually uniform colour map with its scale;
    - right, small: how differently the model redrew the film (`residual`, |input - reconstruction|,
      (128, 128), model units, 0..RESIDUAL_SCALE_MAX), and whether the score uses it (`score_kind`).

    Overlays are blended at model resolution and enlarged pixel for pixel (nearest neighbour): the
    picture shows the pixels the model saw, and the blocky result deflates about 5x smaller and 3x
    faster than a smoothed one (this runs once per image)."""
    grey = Image.fromarray(image).convert("RGB")
    width = round(_PANEL * min(2.0, max(0.5, aspect)))
    lines = caption.splitlines() or [""]
    top = 12 + 20 * len(lines)
    small_x = 2 * width + 2 * _BESIDE + _MARGIN
    canvas = Image.new("RGB", (small_x + _SMALL + _BESIDE, top + _PANEL + _BELOW), "black")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, 6 + 20 * index), line, fill="white", font=_font(15))
    canvas.paste(grey.resize((width, _PANEL), Image.Resampling.NEAREST), (0, top))
    canvas.paste(_overlay(grey, score_map / SCORE_MAP_SCALE_MAX, (width, _PANEL)), (width + _MARGIN, top))
    _colour_bar(draw, canvas, 2 * width + _MARGIN + 4, top, _PANEL, f"{SCORE_MAP_SCALE_MAX:g} z", "0 z")
    small_height = round(_SMALL / min(2.0, max(0.5, aspect)))
    draw.text((small_x, top), "how differently the model redrew it", fill="white", font=_font(12))
    canvas.paste(_overlay(grey, residual / RESIDUAL_SCALE_MAX, (_SMALL, small_height)), (small_x, top + 18))
    _colour_bar(draw, canvas, small_x + _SMALL + 4, top + 18, small_height, f"{RESIDUAL_SCALE_MAX:g}", "0")
    note = ("scale 0 to 0.5: a quarter of the grey range\nnot used by the score: pneumonia often\n"
            "reconstructs closer than normal" if score_kind in ("critic", "density")
            else f"scale 0 to 0.5: a quarter of the grey range\nthe {score_kind} score is made from it")
    draw.text((small_x, top + small_height + 24), note, fill="grey", font=_font(12))
    draw.text((4, top + _PANEL + 4), "the film as the model saw it", fill="white", font=_font(13))
    draw.text((width + _MARGIN + 4, top + _PANEL + 4),
              "where this film raises the anomaly score: coloured where it does\n"
              "so more than 95% of normal films do (z: the score's units)",
              fill="white", font=_font(13))
    return np.asarray(canvas)


def render_film(image: np.ndarray, caption: str, aspect: float = 1.0) -> np.ndarray:
    """The picture of a film that was read but not judged (quality control rejected it), (H, W, 3)
    uint8: the caption on top and the film as the model would have seen it (`image`, (128, 128)
    uint8) at its own width/height ratio `aspect` (clamped to 0.5..2), enlarged pixel for pixel, so
    that a reader can judge the rejection (a chest the wrong way round, or not a chest at all)."""
    width = round(_PANEL * min(2.0, max(0.5, aspect)))
    lines = caption.splitlines() or [""]
    top = 12 + 20 * len(lines)
    text_width = max(_font(15).getlength(line) for line in lines) + 2 * _MARGIN
    canvas = Image.new("RGB", (max(width, round(text_width)), top + _PANEL), "black")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, 6 + 20 * index), line, fill="white", font=_font(15))
    canvas.paste(Image.fromarray(image).convert("RGB").resize((width, _PANEL), Image.Resampling.NEAREST), (0, top))
    return np.asarray(canvas)
