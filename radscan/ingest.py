"""From folders to model inputs: find files, tell their kind by content, read them in parallel.

`find_files` walks the inputs (cheap: names and stat only); `ingest_file` turns one file into an
`ImageRecord` and, when usable, its 128x128 model input; `iter_ingested` runs `ingest_file` over
worker processes and streams the results back in input order, so memory stays flat however many
files there are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from radscan.dicom import DICOM_HEAD_BYTES, read_dicom
from radscan.errors import NoInputError, SettingError
from radscan.logs import configure as configure_log
from radscan.policy import FOLDER_STUDY_LIMIT, STUDY_KEYS, Policy
from radscan.preprocess import (
    PREPROCESS_VERSION,
    FollowReference,
    film_bounds,
    padding_note,
    to_model_input,
    to_qc_input,
)
from radscan.raster import read_raster
from radscan.records import READS_ONLY, ImageRecord, Status, one_line, printable
from radscan.report import CsvStream

__all__ = ["CANNOT_READ", "CRASHED", "READER_REVISION", "failed_record", "hung_reason", "Found", "distinct_inputs",
           "find_files", "sniff_kind", "ingest_file", "iter_ingested", "Ingested", "load_images", "check_inputs",
           "fallback_study_key", "assign_study_keys"]

log = logging.getLogger(__name__)
# A run stopped early (Ctrl-C, SIGTERM, an error) drops joblib's result generator with decoded files
# unused, and joblib then warns "N tasks have been successfully executed but not used" after radscan
# has said the run was interrupted: nothing is lost (the next run reads them). Closing the generator
# explicitly instead can hang in loky's shutdown when the workers were interrupted too.
warnings.filterwarnings("ignore", message=r".*successfully executed\s+but not used", category=UserWarning)

CANNOT_READ = "cannot read this file"  # how the reason of a file that the system would not give starts
CRASHED = "the decoder crashed on this file (its worker process died)"
# Bumped when reading gives other pixels for some files while preprocessing is unchanged (a new
# PREPROCESS_VERSION, which models record, would make every model refuse): `radscan score` then reads
# every file once more instead of keeping what an older reader made of it. 2: 16-bit colour PNGs keep
# their depth (were 8 bits, nearly black), YBR_FULL DICOM over 8 bits is read (was an error). 3: header
# values read by a guess are said (`header_notes`); float pixel data holding NaN or infinities is an error
# that names them (was rejected as nearly blank).
READER_REVISION = 3
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Names that promise an image: such a file with other content is an error, not a skip.
_IMAGE_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima", ".jpg", ".jpeg", ".png"}
# Groups a DICOM data set without preamble can start with: file meta, or identifying (ACR-NEMA).
_FIRST_GROUPS = (0x0002, 0x0008)



@dataclass(frozen=True)
class Found:
    """A file found under a root; `problem` is set when it could not even be listed or opened."""

    root: str
    path: str  # relative to root, forward slashes
    problem: str = ""
    # the study when the content names none (assign_study_keys; "" = its folder): not part of the file's identity
    study_key: str = dataclasses.field(default="", compare=False)

    @property
    def full_path(self) -> Path:
        return Path(self.root) / self.path


Ingested = tuple[ImageRecord, "np.ndarray | None"]


def check_outputs_apart(inputs: Iterable[str | os.PathLike], outputs: Iterable[Path | None],
                        kind: str = "input") -> None:
    """Refuse (SettingError, exit 2) an output that is an input file or lies inside an input
    folder: it would overwrite a radiograph, or be read back as an input by the next run. `kind`
    names what the `inputs` are in the message ("input", "model")."""
    roots = [Path(path).resolve() for path in inputs]
    for output in filter(None, outputs):
        target = Path(output).resolve()
        for root in roots:
            if target == root or root in target.parents:
                what = (f"the {kind} folder" if root.is_dir() else f"the {kind} file") if target == root else \
                    f"inside the {kind} {root}"
                raise SettingError(f"the output {output} is {what}: radscan would overwrite or read back its own "
                                   "outputs; write them outside the folders it reads")


def check_inputs(inputs: Iterable[str | os.PathLike], what: str = "input") -> None:
    """Every input path must exist (a broken link counts as missing) and be readable (a folder:
    listable): else NoInputError, exit code 66, naming each and why, and `what` they were given as
    (an option's name). Below the inputs, what cannot be read is a row with its reason instead."""
    inputs = list(inputs)
    missing = [str(p) for p in inputs if not os.path.exists(p)]
    if missing:
        raise NoInputError(f"{what} path does not exist: {', '.join(missing)}")
    unreadable = [f"{p} ({reason})" for p in inputs if (reason := _unreadable(p))]
    if unreadable:
        raise NoInputError(f"cannot read {what} path: {', '.join(unreadable)}")


def _unreadable(path: str | os.PathLike) -> str:
    """Why `path` cannot be read (a folder listed, a file opened), or ''."""
    try:
        if os.path.isdir(path):
            with os.scandir(path):
                pass
        elif not os.path.isfile(path):  # opening a pipe waits for a writer: a run given one hung (a trial)
            return "a device, socket or pipe: neither a folder nor a file"
        else:
            with open(path, "rb"):
                pass
    except OSError as exc:
        return _os_reason(exc)
    return ""


def distinct_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The inputs less those named twice or lying inside another input (`/data /data/2026`,
    `a.dcm a.dcm`), in their given order: each file is then listed once, under one root, whatever
    the order of the command line, and no root looks empty because another one covered it."""
    given = [str(path) for path in inputs]
    resolved = [Path(path).resolve() for path in given]
    kept = []
    for index, (path, target) in enumerate(zip(given, resolved, strict=True)):
        covered = any(other in target.parents or (other == target and other_index < index)
                      for other_index, other in enumerate(resolved) if other_index != index)
        if covered:
            log.info("%s is already covered by another input: listed once", path)
        else:
            kept.append(path)
    return kept


def find_files(inputs: Iterable[str | os.PathLike], exclude: Iterable[Path] = (),
               study_key: str = "auto") -> list[Found]:
    """Every file under `inputs` (files or folders), sorted, each once (see distinct_inputs), with
    the study it belongs to when its content names none (`study_key`, one of STUDY_KEYS; see
    assign_study_keys).

    Symbolic links are followed, after the real entries of every root, and a folder is entered and a
    file reached through a link listed only once (by device and inode): link loops end, and what is
    reached both by its own path and through a link is listed under its own path. Every real entry is
    listed, hard links to one file too (each is a path a user gave a film under). Folders that cannot
    be listed and broken links are returned with a `problem`. `exclude` names outputs (e.g. the
    previews folder) that must not be read back as inputs.
    """
    excluded = _identities(exclude)
    seen_dirs: set[tuple[int, int]] = set()
    links: list[Link] = []
    found: list[Found] = []
    for given in distinct_inputs(inputs):
        path = Path(given)
        if path.is_dir():
            found.extend(_walk(path, seen_dirs, excluded, links))
        else:
            found.append(Found(str(path.parent), path.name))
    if links:
        # links last, after every root's real entries: what a link of one root leads into another root (or
        # into its own) is listed under its own path, not the link's. Only then is every listed file stat'ed
        listed = _identities(each.full_path for each in found if not each.problem)
        found.extend(_follow_links(links, seen_dirs, excluded, listed))
    return assign_study_keys(found, study_key)


def assign_study_keys(found: list[Found], mode: str) -> list[Found]:
    """`found` with `study_key` set by `mode` (STUDY_KEYS): "folder" the folder's key
    (folder_study_key), "file" the file's (the folder's key joined with its name), "auto" the
    folder's unless more than FOLDER_STUDY_LIMIT files were found directly in that folder. Counted
    by name, before any file is read (hidden files, Thumbs.db, DICOMDIR and text, web, archive
    files are not counted): a folder of many films is a flat export, not one examination. Raises
    SettingError for another mode."""
    if mode not in STUDY_KEYS:
        raise SettingError(f"--study-key must be one of {', '.join(STUDY_KEYS)}, not {mode!r}")
    folders = [folder_study_key(each) for each in found]
    sizes: dict[str, int] = {}
    for folder, each in zip(folders, found, strict=True):
        sizes[folder] = sizes.get(folder, 0) + _may_be_an_image(each.path)
    keyed = []
    for each, folder in zip(found, folders, strict=True):
        by_file = mode == "file" or (mode == "auto" and sizes[folder] > FOLDER_STUDY_LIMIT)
        name = printable(Path(each.path).name)
        keyed.append(dataclasses.replace(each, study_key=f"{folder.rstrip('/')}/{name}" if by_file else folder))
    return keyed


def _identities(paths: Iterable[Path]) -> set[tuple[int, int]]:
    """(device, inode) of each existing path: what a folder or file is, whatever path leads to it
    (comparing resolved paths instead costs a walk up the tree for every entry)."""
    identities = set()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            continue  # not there yet: nothing of it can be among the inputs
        identities.add((stat.st_dev, stat.st_ino))
    return identities


Link = tuple[Path, os.DirEntry]  # a symbolic link met in a walk, with the root it was met under


def _walk(root: Path, seen: set[tuple[int, int]], excluded: set[tuple[int, int]],
          links: list[Link]) -> Iterator[Found]:
    """The real entries under `root`, depth first in name order; the symbolic links met are added
    to `links` for `_follow_links` (after every root's real entries)."""
    listing, problem = _list_folder(root, root, seen, excluded)
    if problem:
        yield problem
    yield from _crawl(root, listing, seen, excluded, links)


def _follow_links(links: list[Link], seen: set[tuple[int, int]], excluded: set[tuple[int, int]],
                  listed: set[tuple[int, int]]) -> Iterator[Found]:
    """What the links lead to, in the order they were met, their own links after them: a folder not
    entered before (loops end), a file not `listed` before (by device and inode; added to it)."""
    while links:
        root, entry = links.pop(0)
        yield from _crawl(root, [entry], seen, excluded, links, listed)


def _crawl(root: Path, listing: list[os.DirEntry], seen: set[tuple[int, int]], excluded: set[tuple[int, int]],
           links: list[Link], listed: set[tuple[int, int]] | None = None) -> Iterator[Found]:
    """Depth first, with an explicit stack of folder listings: a tree of any depth is crawled
    (recursion would end at Python's limit, about 1,000 levels). A symbolic link below the first
    level is put in `links`, not followed. With `listed` (the files listed so far), what the first
    level's links lead to is crawled: a file among `listed` is not listed again. Without it, every
    real entry is listed, hard links to one file too (each a name a user gave a film), and no file
    is stat'ed unless outputs are `excluded`."""
    following = listed is not None
    stack = [iter(listing)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.is_symlink() and not (following and len(stack) == 1):
            links.append((root, entry))
            continue
        rel = Path(entry.path).relative_to(root).as_posix()
        try:
            if entry.is_dir():  # a link's target: loops are cut by `seen`
                listing, problem = _list_folder(root, Path(entry.path), seen, excluded)
                if problem:
                    yield problem
                stack.append(iter(listing))
            elif entry.is_file():
                identity = _identity(entry) if following or excluded else None
                if identity in excluded or (following and identity in listed):
                    continue
                if following:
                    listed.add(identity)
                yield Found(str(root), rel)
            else:
                yield Found(str(root), rel, _not_a_file(entry))
        except OSError as exc:
            yield Found(str(root), rel, f"cannot stat: {_os_reason(exc)}")


def _list_folder(root: Path, folder: Path, seen: set[tuple[int, int]],
                 excluded: set[tuple[int, int]]) -> tuple[list[os.DirEntry], Found | None]:
    """A folder's entries in name order, or none when it was entered before (a link loop) or is an
    output; a folder that cannot be listed gives a row that says why."""
    try:
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen or (stat.st_dev, stat.st_ino) in excluded:
            return [], None
        seen.add((stat.st_dev, stat.st_ino))
        return sorted(os.scandir(folder), key=lambda e: e.name), None
    except OSError as exc:
        return [], Found(str(root), folder.relative_to(root).as_posix(), f"cannot list folder: {_os_reason(exc)}")


def _identity(entry: os.DirEntry) -> tuple[int, int]:
    stat = entry.stat()  # follows a link: the file it names
    return stat.st_dev, stat.st_ino


def _not_a_file(entry: os.DirEntry) -> str:
    """Why an entry that is neither a folder nor a regular file is not read: a link whose target is
    missing is broken; a link to, or an entry that is, a device, socket or pipe is not a file."""
    if entry.is_symlink():
        try:
            entry.stat()  # follows the link
        except OSError:
            return "broken symbolic link"
        return f"{NOT_A_REGULAR_FILE} (a symbolic link to a device, socket or pipe)"
    return f"{NOT_A_REGULAR_FILE} (device, socket or pipe)"


NOT_A_REGULAR_FILE = "not a regular file"


def _os_reason(exc: OSError) -> str:
    """The operating system's words for an error ("Permission denied"), never Python's repr."""
    return exc.strerror or "the operating system refused access"


# what is read of a file first: `sniff_kind` and `_damaged_marker` read its first 140 bytes (the preamble,
# marker and an element), `read_dicom` its File Meta Information, in one read
HEAD_BYTES = DICOM_HEAD_BYTES


def sniff_kind(head: bytes) -> str:
    """'dicom', 'jpeg', 'png' or 'other', from the first 132 bytes of a file (never its name)."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return "other"


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A data set with no preamble (ACR-NEMA style or stripped meta): the first element is a tag of
    group 0002/0008 in either byte order, followed by an explicit VR or a short implicit length."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        if group in _FIRST_GROUPS:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return True
            return int.from_bytes(head[4:8], order) < 0x10000
    return False


def ingest_file(found: Found, policy: Policy) -> Ingested:
    """One file -> its record and, when usable, its (128, 128) uint8 model input.

    Never raises: whatever goes wrong becomes the record's status and reason.
    """
    # the crawl's study (a folder, or the file) unless the file says otherwise (DICOM StudyInstanceUID)
    record = ImageRecord(path=found.path, root=found.root, kind="other", preprocess_version=PREPROCESS_VERSION,
                         study_key=fallback_study_key(found))
    if found.problem.startswith(NOT_A_REGULAR_FILE):  # a pipe, socket or device is never a film: no error night
        return record.skip(found.problem), None  # after night (a trial: a FIFO left in a share, exit 3 each night)
    if found.problem:
        return record.fail(found.problem), None
    path = found.full_path
    _inject_fault(found)
    try:
        record.file_size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        record.kind = sniff_kind(head)
        if record.kind == "other":
            return _not_an_image(record, path, head), None
        if record.kind == "dicom":
            grey = read_dicom(path, record, policy, head)
        else:
            grey = read_raster(path, record, policy)
        if grey is None:
            return record, None
        if policy.trim_padding and policy.follow is not None:  # the chest decides: radscan.preprocess.film_bounds
            grey, record.qc_image = _without_padding(grey, record, policy.follow)
        record.film_shape = grey.shape  # the film read: turned by its EXIF orientation, less its padding
        if policy.crop is not None and record.qc_image is None:  # quality control judges the whole film
            record.qc_image = to_qc_input(grey)
        return record, to_model_input(grey, policy.crop, policy.follow, record.qc_image)
    except OSError as exc:
        if exc.errno is not None:  # the system's: gone since it was listed, unreadable, an unmounted share
            return record.fail(f"{CANNOT_READ}: {_os_reason(exc)}"), None
        return _unexpected(record, found, exc)  # a library's OSError about the content
    except Exception as exc:  # the last line of defence: one bad file never stops a run
        return _unexpected(record, found, exc)


def _without_padding(grey: np.ndarray, record: ImageRecord,
                     follow: FollowReference) -> tuple[np.ndarray, np.ndarray | None]:
    """The (H', W') uint8 film the model reads of an (H, W) uint8 image (radscan.preprocess.film_bounds):
    the image, or a view of it less its padding, said in the record's `converted`; and its whole film
    for quality control where the choice made it (else None: made by the caller)."""
    bounds, whole = film_bounds(grey, follow)
    top, bottom, left, right = bounds
    note = padding_note(bounds, *grey.shape)
    if note:
        record.converted = "; ".join(filter(None, [record.converted, note]))
    return grey[top:bottom, left:right], whole


def _unexpected(record: ImageRecord, found: Found, exc: Exception) -> Ingested:
    # the exception is for the developers (the log); the reason is for the PACS admin
    log.warning("unexpected error on %s: %s: %s", found.path, type(exc).__name__, one_line(exc))
    log.debug("traceback", exc_info=True)
    return record.fail("unexpected error while reading this file (a radscan bug: the log says more)"), None


# Files that sit beside the films of an examination and are never one: a stray .DS_Store or
# Thumbs.db must not turn a folder of 8 views into 8 studies (a DICOM file may have any name, so
# only these are left out of the count)
_NEVER_IMAGES = {"thumbs.db", "desktop.ini", "dicomdir"}
_NEVER_IMAGE_SUFFIXES = {".txt", ".csv", ".json", ".xml", ".html", ".htm", ".pdf", ".md", ".log", ".ini", ".db",
                         ".sqlite", ".zip", ".gz", ".tar", ".7z"}


def _may_be_an_image(path: str) -> bool:
    name = Path(path).name
    return not (name.startswith(".") or name.lower() in _NEVER_IMAGES
                or Path(name).suffix.lower() in _NEVER_IMAGE_SUFFIXES)


def fallback_study_key(found: Found) -> str:
    """The study of a file whose content names none: the one the crawl assigned (assign_study_keys),
    else its folder's (folder_study_key)."""
    return found.study_key or folder_study_key(found)


def folder_study_key(found: Found) -> str:
    """The study of a file whose content names none (JPEG, PNG, a DICOM without StudyInstanceUID):
    the folder that holds it, as the resolved scanned root joined with the folder relative to it,
    e.g. ``/data/incoming/p1``; a file directly in the root gets the root itself.

    Root and folder together, so that ``rootA/p1`` and ``rootB/p1`` stay two studies and a flat
    folder is a study of its own rather than ".". Resolved, so that the key does not depend on how
    the root is spelled on the command line and stays the same from run to run (the state store
    reuses rows across runs; its file identity resolves the root the same way). It names nothing
    that the `root` and `path` columns do not: no identifier is added. Bytes that are not UTF-8 are
    shown escaped, as in `path`.
    """
    return printable((Path(_resolved(found.root)) / found.path).parent.as_posix())


def _resolved(root: str) -> str:
    """A root resolved once per process and working directory, not once per file (a relative root
    names another folder once the working directory changes)."""
    return _resolved_in(root, "" if os.path.isabs(root) else os.getcwd())


@functools.lru_cache(maxsize=256)
def _resolved_in(root: str, cwd: str) -> str:
    return str(Path(cwd, root).resolve())


# compressed files and archives, by their signatures (research exports ship .dcm.gz and .zip)
_PACKED = ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "zip archive"), (b"BZh", "bzip2-compressed"),
           (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
           (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"))


# image formats radscan does not read, by their signature: a site exporting them is told to convert
_OTHER_IMAGES = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"),
                 (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                 (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000 codestream"))


def _other_image(head: bytes, size: int) -> str | None:
    """The name of an image format radscan does not read, from a file's first bytes and its size in
    bytes, or None. Text that happens to begin like one ("GIF89a is ...") is not an image: a header
    of printable characters only, or a TIFF whose first directory lies beyond the file's end."""
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head[:32]):
        return None
    if head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*"):
        offset = int.from_bytes(head[4:8], "little" if head[:2] == b"II" else "big")
        if not 8 <= offset < size:
            return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00" and len(head) >= 26:  # its reserved words are 0
        return "BMP"
    return next((kind for magic, kind in _OTHER_IMAGES if head.startswith(magic)), None)


def unread_formats(count: int) -> str:
    """What to say of `count` files (> 0) in an image format radscan does not read (`_other_image`):
    a site exporting TIFF would otherwise see every film skipped and nothing flagged, or a threshold
    set on the few JPEGs beside them. Logged by `load_images`, a problem of `radscan score`'s run."""
    return (f"{count} file{'' if count == 1 else 's'} {'is an image' if count == 1 else 'are images'} in a format "
            f"radscan does not read (TIFF, BMP, GIF, WebP, JPEG 2000), listed as skipped: {READS_ONLY}")


# the reasons of a file that is no kind of file radscan knows (not a TIFF, an archive, a resource fork)
EMPTY_FILE = "empty file (0 bytes)"
NOT_RECOGNISED = "not a DICOM, JPEG or PNG file (no DICM marker, no DICOM header, no image signature)"
DAMAGED_MARKER = ("a DICOM file whose \"DICM\" marker (bytes 128-131) is damaged: corrupted in storage or transfer; "
                  "send the film again")
ONLY_ZERO_BYTES = "the file holds only zero bytes: a copy that did not finish, or a damaged file"
CUT_IN_PREAMBLE = ("a DICOM file that ends inside its preamble or \"DICM\" marker (bytes 0-131): an incomplete "
                   "transfer; send the film again")


def _named_like_a_film(name: str) -> bool:
    """Whether a file's name is one a film may have: an image suffix (.dcm, .jpg, ...), or a name
    that holds a number and no other suffix than a number (IM00002, I0000001, a SOP Instance UID
    1.2.840....5, IM0001.002): PS3.10 sets no name, and PACS exports seldom give one. A hidden file,
    a name that is never a film (a text, web or archive suffix, Thumbs.db), another suffix (.lock,
    .part, .tmp: a transfer still under way, read by the next run) or a word without a number (DONE,
    _SUCCESS, LOCK: a folder watcher's flag, a review) is not."""
    suffix = Path(name).suffix.lower()
    if not _may_be_an_image(name):
        return False
    return suffix in _IMAGE_SUFFIXES or ((suffix == "" or suffix[1:].isdigit()) and any(c.isdigit() for c in name))


def _cut_in_preamble(head: bytes) -> bool:
    """Whether a file of fewer than 132 bytes is a DICOM Part 10 file cut short: a preamble of zero
    bytes (PS3.10 7.1: zeros where no application profile says otherwise), then no more than a
    beginning of the "DICM" marker. All zeros are left to `_only_zero_bytes`."""
    return (128 < len(head) < 132 and head[:128].count(0) == 128) and b"DICM".startswith(head[128:])


def _not_an_image(record: ImageRecord, path: Path, head: bytes) -> ImageRecord:
    name = path.name
    if name.startswith("._"):
        return record.skip("macOS resource-fork file (AppleDouble), not an image")
    packed = next((kind for magic, kind in _PACKED if head.startswith(magic)), None)
    if not head:
        if _named_like_a_film(name):  # a PACS names its files IM00001 or by UID: a transfer that failed
            return record.fail(f"{EMPTY_FILE}, named like a film (a DICOM file needs no extension): an incomplete "
                               "transfer? send the film again")
        reason = EMPTY_FILE
    elif _may_be_an_image(str(path)) and _only_zero_bytes(path, head):  # space a copy took and never filled
        return record.fail(ONLY_ZERO_BYTES)
    elif _cut_in_preamble(head):
        record.kind = "dicom"
        return record.fail(CUT_IN_PREAMBLE)
    elif _damaged_marker(head):  # a film lost, whatever its name or its preamble (which may hold a TIFF or
        record.kind = "dicom"  # zip header, PS3.10 7.5): an error night, not a skip
        return record.fail(DAMAGED_MARKER)
    elif packed:
        reason = f"a {packed} file, not an image: unpack it to score what it holds"
    elif other := _other_image(head, record.file_size or 0):
        return record.skip(f"a {other} image: {READS_ONLY}")
    else:
        reason = NOT_RECOGNISED
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return record.fail(f"{reason}, although named like an image: incomplete transfer or wrong file?")
    return record.skip(reason)


def _damaged_marker(head: bytes) -> bool:
    """Whether a file's first HEAD_BYTES are those of a DICOM Part 10 file but for its marker: after
    the 128-byte preamble, where "DICM" should be, other bytes, then the File Meta Information's first
    element, (0002,0000) UL or (0002,0001) OB in explicit VR little endian (PS3.10 7.1): eight bytes
    that other files hardly begin an element with at byte 132."""
    element = head[132:140]
    return (len(element) == 8 and element[:2] == b"\x02\x00" and element[2:4] in (b"\x00\x00", b"\x01\x00")
            and element[4:6] in (b"UL", b"OB"))


_ZERO_CHECKED = 1 << 20  # bytes of a file looked at for `_only_zero_bytes`


def _only_zero_bytes(path: Path, head: bytes) -> bool:
    """Whether the file starts with nothing but zero bytes, as far as its first MiB shows: a transfer
    that reserved the file's size and stopped, or a DICOM file cut within its zero preamble. A real
    film does not (a DICOM's 128-byte preamble is followed by "DICM")."""
    if head.count(0) != len(head):
        return False
    with open(path, "rb") as handle:
        start = handle.read(_ZERO_CHECKED)
    return start.count(0) == len(start)


_BATCH = 4  # files per task sent to a worker
_WINDOW = 512  # files per joblib call (the workers stay up between calls)


def iter_ingested(files: Sequence[Found], policy: Policy, workers: int = -1, in_flight: int = 0) -> Iterator[Ingested]:
    """`ingest_file` over `files` in worker processes, yielded in input order.

    Results stream back as they complete (joblib's generator output with at least `in_flight`
    tasks ahead, so that workers keep decoding while the caller is busy, e.g. with a model batch).
    joblib dispatches a new task whenever one completes, whether or not the caller has taken the
    result, so a caller slower than the decoders would pile up every decoded image of the run:
    the files go to joblib in windows of `_WINDOW` results at most, which bounds memory whatever
    the number of files.

    A decoder that crashes its process (a segfault in a C library) or hangs past `timeout` does
    not stop the run: the files that were in flight are retried one by one in their own worker,
    and the one that fails again gets an error row. ``workers=1`` runs in this process, without
    that protection (for debugging).
    """
    if workers == 1:
        yield from (ingest_file(found, policy) for found in files)
        return
    from joblib import delayed, effective_n_jobs

    ahead = max(4 * effective_n_jobs(workers), in_flight)
    timeout = policy.read_timeout
    done = 0
    while done < len(files):
        end = min(done + max(_WINDOW, 2 * ahead), len(files))
        parallel = _workers(n_jobs=workers, return_as="generator", batch_size=_BATCH, pre_dispatch=str(ahead),
                            timeout=timeout)
        try:
            for result in parallel(delayed(ingest_file)(found, policy) for found in files[done:end]):
                yield result
                done += 1
        except Exception as exc:  # TerminatedWorkerError, TimeoutError: a worker died or hung
            log.warning("a worker failed (%s); retrying the files in flight one by one", type(exc).__name__)
            for found in files[done:min(end, done + ahead + _BATCH * effective_n_jobs(workers))]:
                yield _ingest_isolated(found, policy, timeout)
                done += 1


def _workers(**kwargs: Any) -> Any:
    """joblib's Parallel on its loky processes, each of which watches this process (`_watch_parent`)."""
    from joblib import Parallel, parallel_config

    level = logging.getLogger("radscan").getEffectiveLevel()  # the workers log as the command does
    with parallel_config(backend="loky", initializer=_watch_parent, initargs=(os.getpid(), level)):
        return Parallel(**kwargs)


_watched_parent: int | None = None


def _watch_parent(parent: int, level: int = logging.WARNING) -> None:
    """Start (once per worker, as it starts) a thread that ends this process within a second of
    `parent` dying; the worker ignores SIGINT (Ctrl-C is the run's to handle) and logs at the
    command's `level` in its format (radscan.logs).

    Why: joblib's workers are kept for reuse and only notice a dead parent when they next ask it for
    work; a run killed with SIGKILL left them decoding for minutes (issue 22). PR_SET_PDEATHSIG is
    not used: it fires when the parent's *thread* that made the worker ends, which loky's manager
    thread does in normal operation."""
    global _watched_parent
    if _watched_parent == parent:
        return
    # Ctrl-C reaches every process of the terminal's foreground group: the run stops its workers
    # itself, and a worker that took the signal printed its own KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_log(level)
    if os.getppid() != parent:  # loky starts its workers from the run itself: the run is gone already
        os._exit(1)
    _watched_parent = parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="radscan-parent-watch", daemon=True).start()


def _ingest_isolated(found: Found, policy: Policy, timeout: float) -> Ingested:
    """`ingest_file` alone in a worker process, so that a crash or hang costs only this file."""
    from joblib import delayed

    try:
        return _workers(n_jobs=2, timeout=timeout)([delayed(ingest_file)(found, policy)])[0]
    except Exception as exc:  # joblib raises multiprocessing's TimeoutError, not the builtin one
        if "Timeout" in type(exc).__name__:
            reason = hung_reason(timeout)
        elif "TerminatedWorker" in type(exc).__name__:
            log.warning("worker for %s died", found.path)
            reason = CRASHED
        else:  # the worker could not run at all: not this file's fault
            log.warning("could not run a worker process for %s: %s: %s", found.path, type(exc).__name__, exc)
            reason = (f"radscan could not run a worker process ({type(exc).__name__}), not a problem of this file: "
                      "see the log; rerun, or use --workers 1")
    return failed_record(found, reason), None


def failed_record(found: Found, reason: str) -> ImageRecord:
    """The record of a file whose reading did not come back (its worker died or hung)."""
    record = ImageRecord(path=found.path, root=found.root, kind="other", preprocess_version=PREPROCESS_VERSION,
                         study_key=fallback_study_key(found))
    return record.fail(reason)


def hung_reason(timeout: float) -> str:
    return f"reading took longer than {timeout:g} s (a hung or pathologically slow decoder)"


def _inject_fault(found: Found) -> None:
    """Fault injection for the tests of crash and hang recovery (RADSCAN_TEST_FAULT=crash:NAME or
    hang:NAME makes the worker reading a file of that name die or hang)."""
    fault = os.environ.get("RADSCAN_TEST_FAULT", "")
    kind, _, name = fault.partition(":")
    if name and Path(found.path).name == name:
        if kind == "crash":
            os._exit(139)
        if kind == "hang":
            time.sleep(3600)


def load_images(paths: Sequence[str], policy: Policy, workers: int, progress: bool,
                inventory: Path | None = None, label: str = "",
                judge: Callable[[list[ImageRecord], list[np.ndarray]], list[bool]] | None = None,
                quiet: bool = False, with_roots: bool = False,
                unreadable: list[tuple[str, str]] | None = None,
                patients: list[str] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Every usable image under `paths` through the one preprocessing function.

    Returns (N, 128, 128) uint8 inputs, their paths relative to the folder given (`with_roots`: joined
    to it, as given, so that two folders' files of one name differ) and their study keys. With
    `inventory`, every file found is listed there with its status (nothing silently dropped).
    `judge` (e.g. quality control: radscan.qc.apply_qc) says which read images to keep; those it
    drops, like the files that could not be read, are counted in a WARNING line (`quiet`: no counts
    or warnings, for a first pass over files that are read again, radscan.train's thorax box). The
    (path, reason) of each file that could not be read (status error) is appended to `unreadable` when given:
    commands that read films exit 3 for them, as `radscan score` does. The Patient ID of each image
    returned ("" when its file names none: JPEG, PNG) is appended to `patients` when given.
    Raises NoInputError when no image is left.
    """
    check_inputs(paths)
    files = find_files(paths)
    images, names, studies, records = [], [], [], []
    counts = {Status.OK: 0, Status.SKIPPED: 0, Status.ERROR: 0}
    unread = 0  # skipped as an image format radscan does not read
    stream = CsvStream(inventory, ("path", "root", "kind", "status", "reason")) if inventory else None
    for record, image in tqdm(iter_ingested(files, policy, workers), total=len(files), unit="file",
                              desc=f"read {label}".strip(), disable=None if progress else True):
        counts[record.status] += 1
        unread += record.status == Status.SKIPPED and READS_ONLY in record.reason
        if unreadable is not None and record.status == Status.ERROR:
            unreadable.append((os.path.join(record.root, record.path), record.reason))
        if stream and image is None:  # a film read is listed once judged (below): it may be rejected yet
            stream.write(record.as_row())
        if image is not None:
            images.append(image)
            names.append(os.path.join(record.root, record.path) if with_roots else record.path)
            studies.append(record.study_key)
            records.append(record)
    log.log(logging.DEBUG if quiet else logging.INFO, "%s: %d usable images (%d skipped, %d errors)", label or "input",
            counts[Status.OK], counts[Status.SKIPPED], counts[Status.ERROR])
    if counts[Status.ERROR] and not quiet:
        log.warning("%s: %d file(s) could not be read and are not used", label or "input", counts[Status.ERROR])
    if unread and not quiet:
        log.warning("%s: %s", label or "input", unread_formats(unread))
    if judge is not None and images:
        keep = judge(records, images)
        dropped = [record for record, kept in zip(records, keep, strict=True) if not kept]
        if dropped and not quiet:
            log.warning("%s: %d of %d images failed quality control and are not used (e.g. %s: %s)", label or "input",
                        len(dropped), len(images), dropped[0].path, dropped[0].qc_reason)
        images = [image for image, kept in zip(images, keep, strict=True) if kept]
        names = [name for name, kept in zip(names, keep, strict=True) if kept]
        studies = [study for study, kept in zip(studies, keep, strict=True) if kept]
        records_kept = [record for record, kept in zip(records, keep, strict=True) if kept]
    else:
        records_kept = records
    if patients is not None:
        patients.extend(record.PatientID or "" for record in records_kept)
    if stream:
        for record in records:  # judged: a film quality control rejected is listed so, with the reason
            stream.write(record.as_row())
        stream.commit()
    if not images:
        if records:  # read, but every one failed quality control: say so, with an example
            examples = "; ".join(f"{record.path}: {record.qc_reason}" for record in records[:3])
            raise NoInputError(f"none of the {len(records)} images under {', '.join(paths)} passed quality control "
                               f"({examples}{'; ...' if len(records) > 3 else ''})")
        raise NoInputError(f"no usable images under {', '.join(paths)}")
    return np.stack(images), names, studies
