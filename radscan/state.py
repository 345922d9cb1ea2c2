"""What nightly runs remember: a lock on the outputs and a store of results already computed.

The lock is an advisory `flock` on a file beside the report: the kernel releases it when the
holder exits, however it exits, so it is never stale. The store is an SQLite database beside the
report: one row per input file, keyed by its root and path, valid while the file's size and
modification time and the run's fingerprint (model sha256, preprocessing version, selection
policy) are unchanged. Results are committed batch by batch, so a run killed at any moment loses at
most the batch in flight, and the next run resumes from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radscan.errors import LockHeldError, OutputError, SettingError
from radscan.records import READS_ONLY, VIEW_REJECTIONS, Status
from radscan.report import cannot_write, refuse_special

try:  # POSIX: a kernel lock that is released however its holder dies (never stale)
    import fcntl
except ImportError:  # Windows: radscan imports and scans, but `score` cannot lock its outputs
    fcntl = None

__all__ = ["hold_lock", "OutputLock", "StateStore", "StoredRow", "FileIdentity", "refuse_link", "store_files",
           "SECTIONS"]

log = logging.getLogger(__name__)


def store_files(path: Path) -> list[Path]:
    """The state store and the files SQLite keeps beside it (write-ahead log, shared memory, rollback
    journal): they are checked, and moved aside, together."""
    return [Path(path), *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]


def refuse_link(path: Path) -> None:
    """An output that is a symbolic link, not a regular file (a device, a FIFO), or a hard link to
    another name, is refused (OutputError, exit 73): writing through a link that radscan did not
    make would truncate or replace whatever it points to."""
    refuse_special(path)
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_nlink > 1:
            raise OutputError(f"{path} is a hard link to another file: radscan does not write through links it did "
                              "not make; remove it or choose another --out")


class OutputLock:
    """An exclusive `flock` on a lock file, which remembers the file (device, inode) it locked.

    A lock file that is deleted while its run holds it (a cleanup script, an operator) would let a
    second run create a new file at that path and lock it too; `confirm` notices, before the shared
    outputs are written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: Any = None
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Lock the file at `path` (created if absent), or raise LockHeldError (exit 75) at once."""
        refuse_link(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise cannot_write(self.path, exc) from None
        handle = os.fdopen(descriptor, "r+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise LockHeldError(f"another radscan run ({_holder(handle.read())}) is writing these outputs "
                                    f"(lock {self.path}); try again later") from None
            status = os.fstat(handle.fileno())
            if self._at_path() != (status.st_dev, status.st_ino):
                # the file was removed or replaced between our open and our lock (a holder that was
                # finishing removes it): what we locked is no longer what others will open
                raise LockHeldError(f"the lock {self.path} changed while it was being taken (another radscan run "
                                    "starting or finishing?); try again")
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(_holder_text(os.getpid()))
                handle.flush()
            except OSError as exc:  # a full disk
                raise OutputError(f"cannot write the lock file {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            # closing flushes again what a full disk refused: its OSError would replace the error
            # raised here (exit 1, "a bug", where a full disk is exit 73; a trial); the file closes either way
            with contextlib.suppress(OSError):
                handle.close()
            raise
        self._handle, self._identity = handle, (status.st_dev, status.st_ino)

    def confirm(self) -> None:
        """Check, before shared outputs are written, that the file at `path` is still the one this
        run locked. If it was deleted and nobody made a new one, lock a new one (a warning). If
        another file is there, another run took the lock while this one held it, and may have
        written the outputs and pruned the store meanwhile (or still be doing so): raise
        LockHeldError (exit 75) rather than write a worklist from a store that is not this run's."""
        found = self._at_path()
        if found == self._identity:
            return
        if found is not None:
            raise LockHeldError(f"the lock {self.path} was replaced during this run: another radscan run took it and "
                                "may have changed these outputs; nothing was written, rerun")
        log.warning("the lock file %s was removed while this run held it; taking it again", self.path)
        old = self._handle
        self.acquire()
        old.close()

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # the next run that finds the lock held must not name this one
                self._handle.seek(0)
                self._handle.truncate()
            with contextlib.suppress(OSError):  # closing releases the lock, even when its flush fails
                self._handle.close()
            self._handle = None

    def _at_path(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino


def _started(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (field 22 of Linux's /proc/PID/stat), or
    None where that cannot be read (no /proc: macOS; no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after the command's name, which may hold spaces
    return fields[19] if len(fields) > 19 and fields[19].isdigit() else None


def _holder_text(pid: int) -> str:
    """What a holder writes in its lock: "pid N", and where the system says it, "started T" (so that
    a later process given the same number is not taken for the holder)."""
    started = _started(pid)
    return f"pid {pid}" + (f" started {started}" if started else "") + "\n"


def _holder(text: str) -> str:
    """Who holds a lock, from the "pid N [started T]" its holder wrote: the PID, said to be gone when
    no process has it, or when the process that has it started at another time than T (the number
    reused); a process the holder started, e.g. a decoding worker, can outlive it and keep the lock.
    "unknown pid" for a holder that has not written it yet, or text that is not a PID."""
    match = re.fullmatch(r"pid ([1-9]\d{0,9})(?: started (\d{1,20}))?", text.strip())
    if match is None:
        return "unknown pid"
    gone = f"pid {match[1]}, no longer running: a process it started may still hold the lock"
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return gone
    except (OSError, OverflowError):  # another user's process (EPERM): it exists
        pass
    if match[2] and _started(int(match[1])) not in (None, match[2]):
        return gone  # the number is another process's now
    return f"pid {match[1]}"


@contextmanager
def hold_lock(path: Path) -> Iterator[OutputLock]:
    """Hold an exclusive lock on `path` for the duration, or fail at once with exit code 75.
    The lock file is opened without following a symbolic link (exit 73 if it is one). Call the
    yielded lock's `confirm` before writing what the lock protects."""
    if fcntl is None:
        raise SettingError("radscan score locks its outputs with POSIX flock, which this system lacks: run it on "
                           "Linux or macOS (scan, train, info and evaluate work here)")
    lock = OutputLock(path)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


@dataclass(frozen=True)
class FileIdentity:
    """A file as the store knows it: another size, modification time or inode means another file.

    The inode catches a file replaced by another of the same size and time (films swapped by
    name, a re-export that keeps sequential names and timestamps: a trial showed the previous
    patient's row): a rename or a new copy gets a new one, a chmod or an xattr does not."""

    key: str  # root + NUL + relative path
    size: int
    mtime_ns: int
    inode: int = -1  # -1: unknown (a file that cannot be read; a row stored before 0.3)


@dataclass
class StoredRow:
    """A row of the store as `StateStore.scored` returns it, with the key it is stored under."""

    key: bytes  # resolved root, NUL, path relative to it (exact bytes)
    row: dict[str, Any]

    @property
    def path(self) -> Path:
        """The input file (exact bytes of its name)."""
        root, relative = self.key.decode("utf-8", "surrogateescape").split("\0", 1)
        return Path(root) / relative


# A DICOM image the selection policy skipped (another Modality or body part, a multi-frame object,
# raw detector data): its header names its study, and a study must not vanish from the list because
# every image of it was skipped. Reports, presentation states and other non-images (no Rows) do.
_SKIPPED_DICOM = ("(status = 'skipped' AND COALESCE(json_extract(row, '$.StudyInstanceUID'), '') != '' "
                  "AND json_extract(row, '$.rows') IS NOT NULL)")
# An image in a format radscan does not read (TIFF, BMP: radscan.ingest): a film the site must export again,
# listed for IT with its study (a trial: a night of TIFF films showed none of them, and "0 to read")
_UNREAD_IMAGE = f"(status = 'skipped' AND instr(COALESCE(json_extract(row, '$.reason'), ''), '{READS_ONLY}') > 0)"
# the images a study lists: scored, failed, rejected, the DICOM images the policy skipped, images not read
_LISTED = f"(status IN ('ok', 'error', 'rejected') OR {_SKIPPED_DICOM} OR {_UNREAD_IMAGE})"
# Who a study is for (the study CSV's `study_section`): "reading", a reader (an image scored, or one
# quality control rejected: the reader judges the rejection); "unreadable", IT (no file of it could
# be read: nothing a reader can look at); "skipped", every image skipped by the selection policy.
SECTIONS = ("reading", "unreadable", "skipped")
_SECTION = """(CASE WHEN s.images_skipped = s.images THEN 'skipped'
                   WHEN s.images_scored = 0 AND s.images_rejected = 0 THEN 'unreadable' ELSE 'reading' END)"""
# whether a row was first listed by this run (rows of stores before `listed_since`: the run that read it)
_NEW = "(COALESCE(json_extract(row, '$.listed_since'), json_extract(row, '$.read_by_run')) IS :run)"
# the statuses of a file that reached the reader: scored, or rejected by quality control (the reader judges it)
_READ = (Status.OK, Status.REJECTED)
_FILM_KINDS = ("dicom", "jpeg", "png")
# the reason's words for a file an earlier run read as a film that is no film now (radscan.score)
FILM_GONE_BAD = "an earlier run read it as a {} film"
# the z-score breaks ties of the stored score (sigmoid(z), rounded to 6 decimals: 1.0 from z = 14.5 up)
_Z = "json_extract(row, '$.score_z')"
# a film quality control rejected by its header's view (a lateral beside the PA: routine, nothing to review)
_VIEW_REJECTED = "(" + " OR ".join(f"COALESCE(json_extract(row, '$.qc_reason'), '') LIKE '{opening}%'"
                                   for opening in VIEW_REJECTIONS) + ")"
_SECTION_ORDER = "CASE section " + " ".join(f"WHEN '{name}' THEN {rank}" for rank, name in enumerate(SECTIONS)) + " END"


class StateStore:
    """SQLite table of per-file results for one output location.

    The worklist is built from this table by SQL (grouping by study, sorting by score), streamed
    row by row: memory stays flat however many files a run sees.
    """

    # 3: JPEG/PNG study keys name their root (0.2.0 keyed them by the relative folder alone), and
    # DICOM header handling changed the display of some files: rows of older stores are not reused.
    SCHEMA_VERSION = 3
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS results (
            key BLOB PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            status TEXT NOT NULL,
            study_key TEXT NOT NULL,
            score REAL,
            flag INTEGER NOT NULL,
            sort_root TEXT NOT NULL,
            sort_path TEXT NOT NULL,
            seen TEXT NOT NULL,
            row TEXT NOT NULL,
            inode INTEGER NOT NULL DEFAULT -1
        )
    """

    _COLUMNS = ["key", "size", "mtime_ns", "fingerprint", "status", "study_key", "score", "flag", "sort_root",
                "sort_path", "seen", "row", "inode"]
    # DICOM results a PACS has accepted (radscan.pacs): what a rerun must not send again. Kept when the
    # results table is rebuilt: the UIDs of the objects say which model and source they belong to.
    _SENT = """
        CREATE TABLE IF NOT EXISTS sent (
            sop_instance_uid TEXT NOT NULL,
            destination TEXT NOT NULL,
            sent_at TEXT NOT NULL,
            PRIMARY KEY (sop_instance_uid, destination)
        )
    """

    # One row per finished run: how many films it scored anew and flagged, and with which model and
    # settings (the store's fingerprint): the drift check's history (radscan.drift). Kept when the
    # results table is rebuilt; a run is checked only against runs of its own model and settings, since
    # another model's share (or a night that rescored everything for a new one) says nothing about drift.
    _RUNS = """
        CREATE TABLE IF NOT EXISTS runs (
            run_id TEXT PRIMARY KEY,
            finished_at TEXT NOT NULL,
            scored INTEGER NOT NULL,
            flagged INTEGER NOT NULL,
            fingerprint TEXT
        )
    """

    # Runs that opened the store and have not finished (killed, crashed, out of memory): the rows they
    # saved were never on a published list, so the run that finishes next lists them as its own new ones.
    _STARTED = "CREATE TABLE IF NOT EXISTS started (run_id TEXT PRIMARY KEY)"

    def __init__(self, path: Path, fingerprint: str, run_id: str, history_key: str | None = None):
        # history_key: which runs are one drift history (the model and what decides a flag, not how the
        # list is drawn: --pictures or --phi change the fingerprint, not the history); the fingerprint by default
        self.fingerprint, self.run_id, self.history_key = fingerprint, run_id, history_key or fingerprint
        self.moved_aside: Path | None = None  # a damaged store, moved aside by this run (it may hold identifiers)
        for part in store_files(path):
            refuse_link(part)
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            # a damaged store must not stop every night: the scores in it are reproducible
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            self.moved_aside = aside
            log.warning("the state store %s is damaged (%s): moved aside to %s (readable by its owner only; it "
                        "may hold identifiers of earlier runs: delete it once inspected); every file is scored "
                        "again", path, exc, aside.name)
            with contextlib.suppress(Exception):
                self._db.close()
            for part in store_files(path):
                if part.exists():
                    moved = aside.with_name(aside.name + part.name[len(path.name):])
                    os.replace(part, moved)
                    with contextlib.suppress(OSError):
                        os.chmod(moved, 0o600)
            self._db = self._open(path)
        self._adopt_unfinished()

    def _adopt_unfinished(self) -> None:
        """Register this run as started, and make the rows of runs that started and never finished
        this run's: their films were read and saved batch by batch, but no worklist listed them, so
        they are new to this run's list and its drift check (which would otherwise count them never)."""
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.execute(self._STARTED)
            unfinished = "(SELECT run_id FROM started)"
            self._db.execute(
                "UPDATE results SET row = json_set(row, '$.listed_since', :run, '$.read_by_run', "
                "CASE WHEN json_extract(row, '$.read_by_run') IN " + unfinished + " THEN :run "
                "ELSE json_extract(row, '$.read_by_run') END) "
                "WHERE json_valid(row) AND COALESCE(json_extract(row, '$.listed_since'), "
                "json_extract(row, '$.read_by_run')) IN " + unfinished, {"run": self.run_id})
            self._db.execute("DELETE FROM started")
            self._db.execute("INSERT INTO started VALUES (?)", (self.run_id,))

    def _open(self, path: Path) -> sqlite3.Connection:
        """Connect, check and prepare the store. A file that is not a database or fails SQLite's
        integrity check raises sqlite3.DatabaseError (damaged); one that cannot be opened or
        written (read-only, disk full) raises OutputError (exit 73)."""
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            # deleted and replaced rows are overwritten with zeros, not left in free pages: a row
            # stored under --phi keep must not outlive a switch to --phi hash in the file
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != self.SCHEMA_VERSION:
                self._db.execute("DROP TABLE IF EXISTS results")  # written by another radscan: start afresh
                self._db.execute(f"PRAGMA user_version = {self.SCHEMA_VERSION}")
            self._db.execute(self._SCHEMA)
            if "inode" not in [row[1] for row in self._db.execute("PRAGMA table_info(results)")]:
                # a store of 0.2: its rows are read once more (the inode unknown), keeping when they were listed
                self._db.execute("ALTER TABLE results ADD COLUMN inode INTEGER NOT NULL DEFAULT -1")
            self._db.execute(self._RUNS)
            if "fingerprint" not in [row[1] for row in self._db.execute("PRAGMA table_info(runs)")]:
                self._db.execute("ALTER TABLE runs ADD COLUMN fingerprint TEXT")  # a store of 0.2's runs
            self._prepare_sent()
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(results)")]
            if columns != self._COLUMNS:  # a table of the same name made by something else
                raise sqlite3.DatabaseError(f"unexpected columns {columns}")
        except sqlite3.OperationalError as exc:
            raise OutputError(f"cannot open or write the state store {path}: {exc}") from None
        return self._db

    def _prepare_sent(self) -> None:
        """The table of accepted DICOM results, rebuilt when it is not the table radscan makes (a
        view, other columns): then the results are sent again, which a PACS takes as the same objects."""
        kind = self._db.execute("SELECT type FROM sqlite_master WHERE name = 'sent'").fetchone()
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(sent)")]
        if kind is not None and (kind[0] != "table" or columns != ["sop_instance_uid", "destination", "sent_at"]):
            log.warning("the state store's table of sent DICOM results is not radscan's: rebuilt (results are sent "
                        "again)")
            self._db.execute(f"DROP {kind[0].upper()} IF EXISTS sent")  # a table, view, index or trigger
        self._db.execute(self._SENT)

    def lookup(self, identity: FileIdentity) -> dict[str, Any] | None:
        """The stored row for this file if it is still valid (same file, same fingerprint, and a
        row whose score, flag and status agree with the columns they are sorted by)."""
        found = self._db.execute(
            "SELECT row, status, score, flag FROM results WHERE key = ? AND size = ? AND mtime_ns = ? "
            "AND inode = ? AND fingerprint = ?",
            (_blob(identity.key), identity.size, identity.mtime_ns, identity.inode, self.fingerprint),
        ).fetchone()
        if not found:
            return None
        row = _parse_row(found[0])
        if row is not None and (row["status"], row.get("score"), int(row.get("flag") is True)) != tuple(found[1:]):
            row = None
        if row is None:  # edited or damaged by hand: forget it, the file is read and scored again
            log.warning("a stored row of the state store is not valid; its file is scored again")
            with self._writing(), self._db:
                self._db.execute("DELETE FROM results WHERE key = ?", (_blob(identity.key),))
        return row

    def stored_picture(self, key: str) -> str:
        """The picture link (`residual_png`) of the row stored for the file `key`, whatever its size,
        time or settings, or "": a file read again leaves it behind when it lies in another folder."""
        found = self._db.execute("SELECT json_extract(row, '$.residual_png') FROM results WHERE key = ? "
                                 "AND json_valid(row)", (_blob(key),)).fetchone()
        return found[0] if found and isinstance(found[0], str) else ""

    def stored_film_kind(self, key: str) -> str | None:
        """The kind ("dicom", "jpeg", "png") of the file `key` when an earlier run read it as a film
        (scored, rejected by quality control, or failed while being read as one), or when its row says
        an earlier run did (FILM_GONE_BAD: damaged since, whatever became of it), whatever its size,
        time or settings; else None (never stored, skipped as no film, or not an image)."""
        found = self._db.execute("SELECT json_extract(row, '$.kind'), json_extract(row, '$.reason'), status "
                                 "FROM results WHERE key = ? AND json_valid(row)", (_blob(key),)).fetchone()
        if not found:
            return None
        if found[0] in _FILM_KINDS and found[2] != Status.SKIPPED:
            return found[0]
        gone_bad = re.search(FILM_GONE_BAD.format(r"(\w+)"), str(found[1] or ""))  # damaged since: still a film
        return gone_bad.group(1).lower() if gone_bad and gone_bad.group(1).lower() in _FILM_KINDS else None

    def why_stale(self, identity: FileIdentity) -> str:
        """Why a file with no valid row (`lookup`) is read: "store" (this run moved a damaged store
        aside and started an empty one), "new" (the store has no row for its path),
        "changed" (its size or modification time differ: a file that is now a broken link too),
        "settings" (the same file, read under another fingerprint: the model, the preprocessing,
        quality control's rules or an option) or "error" (the same file under the same settings: one
        that could not even be opened, retried)."""
        found = self._db.execute("SELECT size, mtime_ns, inode, fingerprint FROM results WHERE key = ?",
                                 (_blob(identity.key),)).fetchone()
        if found is None:
            return "store" if self.moved_aside is not None else "new"
        if tuple(found[:2]) != (identity.size, identity.mtime_ns) or found[2] not in (identity.inode, -1):
            return "changed"
        # the inode of a row stored before it was kept is unknown: read once more, as after an upgrade
        return "settings" if found[3] != self.fingerprint or found[2] != identity.inode else "error"

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that fails for lack of room or permission (a full disk, a store left read-only by
        another user's run) is exit 73 with a reason, not a crash."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise OutputError(f"cannot write the state store: {exc} (a full disk, or a store another user "
                              "owns?)") from None

    def mark_seen(self, files: Iterable[tuple[FileIdentity, str]]) -> None:
        """Stored rows that this run lists again, unchanged, each with its root as this run spells it
        (the `root` column: "../in" one night and "/data/in" the next name one folder, and a row kept
        from the first must not send a tool that joins root and path elsewhere: a trial)."""
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE results SET seen = ?, sort_root = ?, row = json_set(row, '$.root', ?) "
                                 "WHERE key = ?", [(self.run_id, root, root, _blob(i.key)) for i, root in files])

    def save(self, items: Iterable[tuple[FileIdentity, dict[str, Any]]]) -> None:
        """Store rows (seen by this run) in one transaction: all or nothing (exit 73 if it cannot).

        Each row gets `listed_since`, the run that first listed the file as it is now: a file read
        again only because the settings changed (another model, --qc, --pictures, --study-key) keeps
        the run it was first listed by, so "new this run" means a film that was not on the list. A
        film that reaches the reader (scored, or rejected by quality control) for the first time is
        new even if an earlier run listed it as unreadable (a read that timed out, a share that
        failed): it was never on the reading list."""
        items = list(items)
        for identity, row in items:
            read = row["status"] in _READ
            since, was_read = self._listed_since(identity)
            if since is None or (read and not was_read):
                since, was_read = self.run_id, read
            row["listed_since"], row["read_since_listed"] = since, was_read
        rows = [(_blob(i.key), i.size, i.mtime_ns, self.fingerprint, row["status"], row["study_key"],
                 row.get("score"), int(row.get("flag") is True), row["root"], row["path"], self.run_id,
                 json.dumps(row, default=str), i.inode)
                for i, row in items]
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 rows)

    def _listed_since(self, identity: FileIdentity) -> tuple[str | None, bool]:
        """(the run that first listed this file with this size and modification time, whether it
        reached the reader then or since), or (None, False) when it is not stored."""
        found = self._db.execute(
            "SELECT COALESCE(json_extract(row, '$.listed_since'), json_extract(row, '$.read_by_run')), "
            "COALESCE(json_extract(row, '$.read_since_listed'), status IN (?, ?)) "
            "FROM results WHERE key = ? AND size = ? AND mtime_ns = ? AND inode IN (?, -1) AND json_valid(row)",
            (*_READ, _blob(identity.key), identity.size, identity.mtime_ns, identity.inode)).fetchone()
        return (found[0], bool(found[1])) if found else (None, False)

    def scored(self, after: bytes = b"", limit: int = 500, status: str = "ok") -> list[StoredRow]:
        """Up to `limit` of this run's rows of `status` (scored, by default) with keys after `after`,
        in key order. Paging by key lets the caller `update` the rows it was given without disturbing
        the next page. Returns [] when done."""
        found = self._db.execute(
            "SELECT key, row FROM results WHERE seen = ? AND status = ? AND key > ? ORDER BY key LIMIT ?",
            (self.run_id, status, after, limit)).fetchall()
        return [StoredRow(bytes(key), parsed) for key, text in found if (parsed := _parse_row(text)) is not None]

    def update(self, rows: Iterable[StoredRow]) -> None:
        """Replace the stored row of each file (as returned by `scored`, then changed), keeping its
        identity, fingerprint and sort columns, in one transaction."""
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE results SET row = ? WHERE key = ?",
                                 [(json.dumps(item.row, default=str), item.key) for item in rows])

    def was_sent(self, sop_instance_uid: str, destination: str) -> bool:
        return self._db.execute("SELECT 1 FROM sent WHERE sop_instance_uid = ? AND destination = ?",
                                (sop_instance_uid, destination)).fetchone() is not None

    def destinations(self, sop_instance_uid: str) -> list[str]:
        """Where a DICOM result was sent (sorted; empty when nowhere)."""
        return [row[0] for row in self._db.execute("SELECT destination FROM sent WHERE sop_instance_uid = ? "
                                                   "ORDER BY destination", (sop_instance_uid,))]

    def mark_sent(self, sop_instance_uids: Iterable[str], destination: str, sent_at: str) -> None:
        """Record objects the destination accepted, in one transaction."""
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO sent VALUES (?, ?, ?)",
                                 [(uid, destination, sent_at) for uid in sop_instance_uids])

    _CURRENT = "current AS (SELECT * FROM results WHERE seen = :run)"
    _STUDY = """study AS (
        SELECT study_key, MAX(score) AS study_score, MAX(""" + _Z + """) AS study_z,
               SUM(""" + _LISTED + """) AS images,
               SUM(status = 'ok') AS images_scored,
               SUM(flag) AS images_flagged, SUM(status = 'error') AS images_error,
               SUM(status = 'rejected') AS images_rejected,
               SUM(status = 'rejected' AND NOT """ + _VIEW_REJECTED + """) AS images_to_review,
               SUM(flag AND COALESCE(json_extract(row, '$.qc_status'), '') NOT IN ('warn', 'fail'))
                   AS images_flagged_plainly,
               SUM(""" + _LISTED + " AND " + _NEW + """) AS images_new,
               SUM(status = 'ok' AND json_extract(row, '$.qc_status') IN ('warn', 'fail')) AS images_qc_warned,
               SUM(""" + _SKIPPED_DICOM + """) AS images_skipped,
               SUM(""" + _UNREAD_IMAGE + """) AS images_unread,
               COUNT(DISTINCT CASE WHEN """ + _SKIPPED_DICOM + """ THEN json_extract(row, '$.reason') END)
                   AS skip_reasons,
               COUNT(DISTINCT CASE WHEN status = 'error' THEN json_extract(row, '$.reason') END) AS error_reasons,
               -- files of the study that hold a DICOM image another of its files holds (one SOP Instance UID)
               SUM(""" + _LISTED + """ AND COALESCE(json_extract(row, '$.SOPInstanceUID'), '') != '')
                   - COUNT(DISTINCT CASE WHEN """ + _LISTED + """ THEN NULLIF(json_extract(row, '$.SOPInstanceUID'), '')
                                    END) AS images_duplicated,
               -- patients whose films the study holds: more than one is a sender's or anonymiser's error;
               -- films without a Patient ID beside films with one count as one more (the study row may name none)
               COUNT(DISTINCT CASE WHEN """ + _LISTED + """ THEN NULLIF(json_extract(row, '$.PatientID'), '')
                     END)
                 + (MAX(""" + _LISTED + """ AND COALESCE(json_extract(row, '$.PatientID'), '') = '')
                    AND MAX(""" + _LISTED + """ AND COALESCE(json_extract(row, '$.PatientID'), '') != ''))
                   AS patients
        FROM current GROUP BY study_key
        HAVING images > 0)"""

    def worklist(self) -> Iterator[dict[str, Any]]:
        """This run's rows, by study score then score (highest first), with their study's result,
        whether the study lists the image (`listed`: not a non-image file the policy skipped) and
        whether this run listed it first (`new_this_run`)."""
        query = f"""WITH {self._CURRENT}, {self._STUDY}
            SELECT c.row, s.study_score, s.images_flagged > 0, """ + _LISTED + ", " + _NEW + """
            FROM current c LEFT JOIN study s USING (study_key)
            ORDER BY s.study_score IS NULL, s.study_score DESC, s.study_z DESC, c.study_key,
                     c.score IS NULL, c.score DESC, """ + _Z + """ DESC, c.sort_root, c.sort_path"""
        for row, study_score, study_flag, listed, new in self._db.execute(query, {"run": self.run_id}):
            yield {**json.loads(row), "study_score": study_score,
                   "study_flag": None if study_flag is None else bool(study_flag), "listed": bool(listed),
                   "new_this_run": bool(new)}

    def studies(self) -> Iterator[dict[str, Any]]:
        """One entry per study with a scored, failed or rejected image, or with a DICOM image the
        selection policy skipped (a DX chest whose Modality says DR must not vanish from the list),
        with the row of its top image (highest score, else its first unscored, else its first
        skipped image) and its `study_section` (SECTIONS). The reading list comes first: flagged
        studies by study score, highest first (those whose every flagged film carries a quality
        control warning or failure, a score not comparable with the others, after the rest: a trial
        found adults' and 64 px films above the children's pneumonias), then the unflagged studies
        with a film quality control rejected for what it shows, not for its header's view (a reader
        judges it: those with none scored first, then by study score; a trial: a rejected pneumonia
        beside a scored normal film sank among the quiet studies), then the rest by study score; then
        the studies none of whose files could be read (for IT, not a reader); then those whose
        every image was skipped by the policy."""
        query = f"""WITH {self._CURRENT}, {self._STUDY},
            -- DICOM images (one SOP Instance UID) held by files of more than one study, and how many of each
            -- study's files hold one: a sender's or anonymiser's error, or two images given one UID (a trial)
            shared_sop AS (SELECT json_extract(row, '$.SOPInstanceUID') AS sop FROM current
                WHERE {_LISTED} AND COALESCE(json_extract(row, '$.SOPInstanceUID'), '') != ''
                GROUP BY sop HAVING COUNT(DISTINCT study_key) > 1),
            elsewhere AS (SELECT study_key, COUNT(*) AS files FROM current
                WHERE {_LISTED} AND json_extract(row, '$.SOPInstanceUID') IN (SELECT sop FROM shared_sop)
                GROUP BY study_key),
            ranked AS (SELECT study_key, row, ROW_NUMBER() OVER (
                PARTITION BY study_key ORDER BY status = 'skipped', score IS NULL, score DESC, {_Z} DESC,
                                                sort_root, sort_path) AS n
                FROM current WHERE {_LISTED})
            SELECT s.study_key, s.study_score, s.images, s.images_scored, s.images_flagged, s.images_error,
                   s.images_rejected, s.images_to_review, s.images_new, s.images_qc_warned, s.images_skipped,
                   s.skip_reasons, s.error_reasons, s.images_duplicated, COALESCE(e.files, 0), s.patients,
                   s.images_unread, r.row,
                   """ + _SECTION + """ AS section
            FROM study s JOIN ranked r ON r.study_key = s.study_key AND r.n = 1
                LEFT JOIN elsewhere e ON e.study_key = s.study_key
            ORDER BY """ + _SECTION_ORDER + """,
                     COALESCE(s.images_flagged, 0) > 0 DESC,
                     COALESCE(s.images_flagged, 0) > 0 AND COALESCE(s.images_flagged_plainly, 0) = 0,
                     COALESCE(s.images_flagged, 0) = 0 AND COALESCE(s.images_to_review, 0) > 0 DESC,
                     s.study_score IS NOT NULL, s.study_score DESC, s.study_z DESC, s.study_key"""
        for key, study_score, images, scored, flagged, errors, rejected, to_review, new, warned, skipped, reasons, \
                error_reasons, duplicated, elsewhere, patients, unread, row, section in self._db.execute(query,
                                                                                         {"run": self.run_id}):
            yield {"study_key": key, "study_score": study_score, "images": images, "images_scored": scored,
                   "images_flagged": flagged, "images_error": errors, "images_rejected": rejected,
                   "images_to_review": to_review or 0,
                   "images_skipped": skipped, "images_new": new, "images_qc_warned": warned,
                   "skip_reasons": reasons, "error_reasons": error_reasons or 0,
                   "images_duplicated": duplicated or 0, "images_in_another_study": elsewhere,
                   "patients": patients or 0, "images_unread": unread or 0,
                   "top": json.loads(row),
                   "study_section": section}

    def roots_listed(self) -> int:
        """How many input roots (as this run spells them) this run's rows come from."""
        return self._db.execute("SELECT COUNT(DISTINCT sort_root) FROM results WHERE seen = ?",
                                (self.run_id,)).fetchone()[0]

    def scored_now(self) -> tuple[int, int]:
        """(films scored, films flagged) that the drift check counts for this run: the files it listed
        first (new or changed files) and, on the first run of its history (another model, or other
        settings that decide a flag: `history_key`), every film it read again too, since none was
        counted under that history yet (a trial: a site's model put in place of another re-scored 40
        films, 65% flagged, and the check said there were no new films). Not those kept, nor, within
        a history, those read again only because other settings changed (pictures, a study's
        grouping): the drift check counts each film once per history."""
        first = self._db.execute("SELECT 1 FROM runs WHERE fingerprint IS ? AND run_id != ? LIMIT 1",
                                 (self.history_key, self.run_id)).fetchone() is None
        scored, flagged = self._db.execute(
            "SELECT COUNT(*), SUM(flag) FROM results WHERE seen = :run AND status = 'ok' "
            "AND json_extract(row, '$.read_by_run') = :run" + ("" if first else " AND " + _NEW),
            {"run": self.run_id}).fetchone()
        return scored, flagged or 0

    def read_without_picture(self) -> list[str]:
        """The identity keys (resolved root, NUL, path as the file system names it: what
        radscan.report.png_name hashes) of the files this run read that have no picture now. The
        rows' `root` and `path` are shown escaped (radscan.records.printable): a name with a
        backslash or a control character would name another picture."""
        rows = self._db.execute("SELECT key FROM results WHERE seen = :run AND json_extract(row, '$.read_by_run') = "
                                ":run AND COALESCE(json_extract(row, '$.residual_png'), '') = ''", {"run": self.run_id})
        return [key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key for (key,) in rows]

    def run_history(self, limit: int = 100) -> list[tuple[int, int]]:
        """(scored, flagged) of earlier finished runs that scored new films, with this store's model and
        the settings that decide a flag (its history key), newest first: a night without new films is
        no night of the history (the pooling of a small site's nights would otherwise run out on them).
        Runs that finished within the same second (times are kept to the second) are ordered as they
        were recorded: the later record is the newer run."""
        return self._db.execute("SELECT scored, flagged FROM runs WHERE run_id != ? AND fingerprint = ? AND scored > 0 "
                                "ORDER BY finished_at DESC, rowid DESC LIMIT ?",
                                (self.run_id, self.history_key, limit)).fetchall()

    def record_run(self, finished_at: str, scored: int, flagged: int) -> None:
        """This run finished and listed its rows (it is no longer one whose rows the next run adopts)."""
        with self._writing(), self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO runs (run_id, finished_at, scored, flagged, fingerprint) "
                             "VALUES (?, ?, ?, ?, ?)", (self.run_id, finished_at, scored, flagged, self.history_key))
            self._db.execute("DELETE FROM started WHERE run_id = ?", (self.run_id,))

    def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT status, COUNT(*) FROM results WHERE seen = ? GROUP BY status",
                                      (self.run_id,)).fetchall())
        flagged = self._db.execute("SELECT SUM(flag) FROM results WHERE seen = ?", (self.run_id,)).fetchone()[0]
        return {"ok": found.get("ok", 0), "skipped": found.get("skipped", 0), "error": found.get("error", 0),
                "rejected": found.get("rejected", 0), "flagged": flagged or 0}

    def skipped_rows(self) -> list[dict[str, Any]]:
        """The rows this run listed as skipped (what they say is said every night, not only when read)."""
        return [_parse_row(row) or {} for (row,) in self._db.execute(
            "SELECT row FROM results WHERE seen = ? AND status = ?", (self.run_id, "skipped"))]

    def films_by_root(self) -> dict[str, tuple[int, int, int]]:
        """Per resolved input root: (files this run listed, images among them, films of earlier runs it
        did not see, which `prune` would remove). Films as the study list counts them (`_LISTED`:
        scored, rejected, unreadable, DICOM images skipped, images in a format radscan does not read);
        images also any other DICOM object (a structured report: a PACS folder, the listener's spool)."""
        image = f"({_LISTED} OR json_extract(row, '$.kind') = 'dicom')"
        query = f"""SELECT substr(key, 1, instr(key, x'00') - 1) AS root, SUM(seen = :run),
                           SUM(seen = :run AND {image}), SUM(seen != :run AND {_LISTED})
                    FROM results GROUP BY root"""
        return {(root.decode("utf-8", "surrogateescape") if isinstance(root, bytes) else str(root)):
                (now or 0, images or 0, gone or 0)
                for root, now, images, gone in self._db.execute(query, {"run": self.run_id})}

    def prune(self, keep_roots: Collection[str] = ()) -> list[dict[str, Any]]:
        """Delete the rows of files this run did not see (deleted from the inputs, or under another
        root), except those under `keep_roots` (resolved roots, as `films_by_root` names them: a share
        that mounted in part), and return them, so that their pictures can go too. Call after a
        complete run."""
        kept = {_blob(root) for root in keep_roots}  # keys are bytes: the root, a NUL, the path
        unseen = [(key, row) for key, row in self._db.execute("SELECT key, row FROM results WHERE seen != ?",
                                                             (self.run_id,))
                  if bytes(key).partition(b"\0")[0] not in kept]
        if unseen:
            with self._writing():
                self._db.executemany("DELETE FROM results WHERE key = ?", [(key,) for key, _ in unseen])
        return [_parse_row(row) or {} for _, row in unseen]

    def close(self) -> None:
        """Close, folding the write-ahead log into the database (so no old page lingers in it)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


_STATUSES = (Status.OK, Status.SKIPPED, Status.ERROR, Status.REJECTED)


def _parse_row(text: Any) -> dict[str, Any] | None:
    """A stored row, or None when it is not the JSON object with a status, root and path that
    `save` writes (a store edited or damaged by hand must not stop the nightly run)."""
    try:
        row = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("status", "root", "path")):
        return None
    score = row.get("score")
    if row["status"] not in _STATUSES or row.get("flag") not in (True, False, None) or not (
            score is None or (isinstance(score, (int, float)) and not isinstance(score, bool)
                              and math.isfinite(score) and 0.0 <= score <= 1.0)):
        return None
    return row


def _blob(key: str) -> bytes:
    """File names need not be UTF-8: keep their exact bytes (JSON rows escape them as ASCII)."""
    return key.encode("utf-8", "surrogateescape")
