"""Writing outputs safely: atomic files, streamed CSVs, PNGs without metadata.

A run killed at any moment (SIGKILL included) leaves every previous output intact: each file is
written under a temporary name in the same folder, flushed to disk and renamed over the old one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from radscan.errors import OutputError

__all__ = ["atomic_output", "AtomicFile", "commit_together", "prepare_folder", "refuse_special",
           "remove_stale_temporaries", "cannot_write", "head_card", "CsvStream", "write_png", "write_png_bytes",
           "write_bytes", "encode_png", "png_name", "sync_folder", "sync_files", "swap_folders"]


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
        if self._durable:
            sync_folder(self.path.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename or removal in it survives a power cut (POSIX keeps a file's
    name in its folder's data: an fsynced file renamed in place can still vanish until the folder is
    synced). Best effort: some file systems cannot open or sync a folder."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def sync_files(folder: Path) -> None:
    """fsync every regular file directly in `folder`, then the folder: files copied into it (a copy
    does not sync) survive a power cut once it is renamed into place. Raises OutputError (exit 73)
    naming the file that cannot be synced (a full disk shows here at the latest)."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.is_symlink():
            try:
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            except OSError as exc:
                raise cannot_write(path, exc) from None
    sync_folder(folder)


def swap_folders(new: Path, old: Path) -> None:
    """Put folder `new` in the place of folder `old` as one step; `new` then holds what `old` held
    (for the caller to remove). Linux's renameat2(RENAME_EXCHANGE) swaps the two names atomically:
    a process killed at any moment leaves `old`'s place holding one complete folder or the other.
    Where the file system cannot (NFS, another OS), two renames back to back, `old` kept aside
    under `new`'s name until the second is done. Raises OSError."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE (linux/fcntl.h, linux/fs.h)
    if exchange is not None and exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(old), rename_exchange) == 0:
        sync_folder(Path(old).parent)
        return
    aside = Path(new).with_name(Path(new).name + ".old")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)
    sync_folder(Path(old).parent)


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
    for folder in {file.path.parent for file in files if file._durable}:  # after the renames: they stay close
        sync_folder(folder)


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


def head_card(card: Path, notice: str) -> None:
    """Put `notice` (Markdown) under the title of a model card (README.md), when there is one: what a
    later step (`radscan calibrate`, `radscan export`) changed in the model the card describes."""
    if not card.is_file():
        return
    title, _, rest = card.read_text(encoding="utf-8").partition("\n\n")
    with atomic_output(card, "w") as handle:
        handle.write(f"{title}\n\n{notice}\n\n{rest}")


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
    """An (H, W) grey or (H, W, 3) RGB uint8 image as an 8-bit PNG (ISO/IEC 15948), with no text
    chunks (no identifiers).

    Every row is stored with the "Up" filter (its difference from the row above) and deflated at
    zlib's fastest level. Pillow's encoder tries all five PNG filters on every row and keeps the
    best, which is 3x slower on the explanation pictures (15 ms against 5 ms for a 1,500 x 630
    picture, files within 2% of each other's size): their panels are enlarged pixel for pixel, so
    most rows repeat the one above and "Up" turns them into zeros. zlib releases the GIL, so the
    pictures of a batch are encoded in parallel threads. Raises ValueError for another dtype or shape."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) \
            or not image.size:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    rows = image.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # "Up": each byte minus the byte above it, modulo 256
    filtered[0, 0] = 0  # the first row has none above it: stored as it is ("None")
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    colour_type = 0 if image.ndim == 2 else 2  # grey, or RGB
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                    _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1)), _png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data (ISO/IEC 15948 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an 8-bit grey or RGB image atomically as PNG (`encode_png`)."""
    write_png_bytes(path, encode_png(image))


def write_png_bytes(path: Path, data: bytes) -> None:
    """Write an encoded PNG atomically (not fsynced: the many small pictures skip it)."""
    write_bytes(path, data, durable=False)


def write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` as the file `path`, atomically and (with `durable`) fsynced before the rename, so
    that neither a killed process nor a power cut leaves a partial file under the name. Raises
    OutputError (exit 73) when it cannot be written (a full disk, a read-only folder)."""
    with atomic_output(path, "wb", durable=durable) as handle:
        try:
            handle.write(data)
        except OSError as exc:
            raise cannot_write(path, exc) from None
