"""What nightly runs remember: a lock on the outputs and a store of results already computed.

The lock is an advisory `flock` on a file beside the report: the kernel releases it when the
holder exits, however it exits, so it is never stale. The store is an SQLite database beside the
report: one row per input file, keyed by its root and path, valid while the file's size and
modification time and the run's fingerprint (model sha256, preprocessing version, selection
policy) are unchanged. Results are committed batch by batch, so a run killed at any moment loses at
most the batch in flight, and the next run resumes from there.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radscan.errors import LockHeldError

__all__ = ["hold_lock", "StateStore", "FileIdentity"]


@contextmanager
def hold_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the duration, or fail at once with exit code 75."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise LockHeldError(f"another radscan run ({holder or 'unknown pid'}) is writing these outputs "
                                f"(lock {path}); try again later") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


@dataclass(frozen=True)
class FileIdentity:
    """A file as the store knows it: changed size or mtime means changed file."""

    key: str  # root + NUL + relative path
    size: int
    mtime_ns: int


class StateStore:
    """SQLite table of per-file results for one output location."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS results (
            key BLOB PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            status TEXT NOT NULL,
            row TEXT NOT NULL
        )
    """

    def __init__(self, path: Path, fingerprint: str):
        self.fingerprint = fingerprint
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(self._SCHEMA)

    def lookup(self, identity: FileIdentity) -> dict[str, Any] | None:
        """The stored row for this file if it is still valid (same file, same fingerprint)."""
        found = self._db.execute(
            "SELECT row FROM results WHERE key = ? AND size = ? AND mtime_ns = ? AND fingerprint = ?",
            (_blob(identity.key), identity.size, identity.mtime_ns, self.fingerprint),
        ).fetchone()
        return json.loads(found[0]) if found else None

    def save(self, items: Iterable[tuple[FileIdentity, dict[str, Any]]]) -> None:
        """Store rows in one transaction (all or nothing)."""
        rows = [(_blob(i.key), i.size, i.mtime_ns, self.fingerprint, row["status"], json.dumps(row, default=str))
                for i, row in items]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


def _blob(key: str) -> bytes:
    """File names need not be UTF-8: keep their exact bytes (JSON rows escape them as ASCII)."""
    return key.encode("utf-8", "surrogateescape")
