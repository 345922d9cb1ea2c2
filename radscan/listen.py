"""`radscan listen`: a DICOM storage SCP that scores the studies the PACS sends it.

The PACS (or a router, a modality) sends images by C-STORE (PS3.4 Annex B; pynetdicom). Each
instance is written to the spool before the sender is answered: into `SPOOL/incoming/<study>/`,
as a temporary file that is flushed, fsynced and renamed (a crash leaves a whole file or none,
never half of one), under names that are digests of its UIDs, never header text. A study is
complete when no instance of it has arrived for `quiet_s` seconds: its files move to
`SPOOL/studies/<study>/`, and a scoring run over `SPOOL/studies` (radscan.score, the same state
store, worklist, page and DICOM results as `radscan score`, under the same lock) scores what is new.
A nightly `radscan score SPOOL/studies --out` the same worklist is the same run, so the two never
write at once (the one that finds the lock held waits; the listener tries again).

Refused: associations from calling AE titles not in `allow_ae` (when given), an instance when the
spool's disk has less than `min_free_bytes` left (status A700, out of resources: the sender keeps it
and retries; nothing already received is lost). Every storage SOP class is accepted and kept; what
radscan does not score (a CT, an SR) is listed as skipped with the reason, as in any folder.

On SIGTERM or Ctrl-C the listener stops accepting, finishes the scoring run in hand and exits;
studies still arriving stay in `incoming/` and a restart scores them once they are quiet.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radscan.errors import LockHeldError, OutputError, SettingError
from radscan.records import printable
from radscan.report import sync_folder

__all__ = ["ListenSettings", "Spool", "listen"]

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ListenSettings:
    """How the listener is reached and when a study is complete."""

    port: int
    ae_title: str = "RADSCAN"
    bind: str = ""  # every interface
    allow_ae: tuple[str, ...] = ()  # calling AE titles accepted; empty: any
    quiet_s: float = 30.0  # a study with no new instance for this long is complete
    min_free_bytes: int = 256 * 1024 * 1024  # refuse instances (A700) below this much free space
    poll_s: float = 1.0
    retry_s: float = 300.0  # DICOM results a run could not send are tried again this often, new studies or not


def _digest(text: str) -> str:
    """A file or folder name for a UID: its digest, so that no header text ever becomes a path."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _same_bytes(path: Path, encoded: bytes) -> bool:
    """Whether the file at `path` holds exactly `encoded` (False when it cannot be read)."""
    try:
        return path.stat().st_size == len(encoded) and path.read_bytes() == encoded
    except OSError:
        return False


class Spool:
    """The listener's folder: `incoming/` (studies still arriving) and `studies/` (complete ones,
    the input of the scoring runs). Thread-safe: pynetdicom answers each association in a thread."""

    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root, self.min_free_bytes = Path(root), min_free_bytes
        self.incoming, self.studies = self.root / "incoming", self.root / "studies"
        try:
            for folder in (self.incoming, self.studies):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the spool {self.root}: {exc.strerror or exc}") from None
        if not all(os.access(folder, os.W_OK | os.X_OK) for folder in (self.incoming, self.studies)):
            # found at the start, not by answering every instance 0xA700 while looking healthy
            raise OutputError(f"cannot write in the spool {self.root} (read-only, or another user's)")
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # study folder -> when its last instance arrived (monotonic)
        self._writing: Counter[str] = Counter()  # study folder -> instances being written now
        for folder in self.incoming.iterdir():  # a restart: what was received before counts as arrived now
            if folder.is_dir():
                self._last[folder.name] = time.monotonic()
        # instance file name -> the study folder that holds it (arriving or complete): an instance sent
        # again under another study (a study merge, a patient's reconciliation) must replace its copy
        self._study_of = {path.name: path.parent.name
                          for path in (*self.studies.glob("*/*.dcm"), *self.incoming.glob("*/*.dcm"))}

    def store(self, encoded: bytes, study_uid: str, sop_uid: str) -> Path:
        """Write one instance (its encoded file, preamble and meta included) durably; its path.
        Raises OSError (ENOSPC when the disk is below the reserve).

        While it writes, its study counts as arriving: `complete` never moves a study with a write
        in progress (a study that went quiet just as one more instance came lost its half-written
        file, and the sender got 0xA700)."""
        if shutil.disk_usage(self.root).free < len(encoded) + self.min_free_bytes:
            raise OSError(errno.ENOSPC, "the spool's disk is full (below the reserve)")
        study = _digest(study_uid or f"no study UID: {sop_uid}")
        folder = self.incoming / study
        path = folder / f"{_digest(sop_uid)}.dcm"
        with self._lock:
            self._writing[study] += 1
            before = self._study_of.get(path.name)
        wrote = False
        try:
            earlier = [copy for copy in (path, self.studies / study / path.name) if copy.is_file()]
            if any(_same_bytes(copy, encoded) for copy in earlier):
                # a sender's retry (a lost acknowledgement, a PACS resending a study): nothing new to score,
                # and leaving the earlier file untouched keeps its result (the state store knows it unchanged)
                log.info("an identical copy of an instance already received was sent again: kept the earlier "
                         "one (study %s)", study)
                return earlier[0]
            if earlier:
                log.warning("an instance was sent again with a SOP Instance UID already received and other bytes "
                            "(new content, or only another transfer syntax): the new copy replaces the earlier "
                            "one, and its result the earlier result (study %s)", study)
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{path.name}.{threading.get_ident()}.part"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(encoded)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
                sync_folder(folder)  # acknowledged next: the name must survive a power cut too
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            wrote = True
            if before not in (None, study):
                self._forget_copies(path.name, before, study)
            return path
        finally:
            with self._lock:
                self._writing[study] -= 1
                if not self._writing[study]:
                    del self._writing[study]
                if wrote or study in self._last:
                    self._last[study] = time.monotonic()
                if wrote:
                    self._study_of[path.name] = study

    def _forget_copies(self, name: str, earlier: str, study: str) -> None:
        """Remove the copies of instance file `name` that study folder `earlier` holds: it was received
        again under `study`, which replaces them (the next scoring run drops their rows). Under the lock,
        so that `complete` does not move a copy while it is looked for."""
        removed = 0
        with self._lock:
            for folder in (self.incoming / earlier, self.studies / earlier):
                if (folder / name).is_file():
                    (folder / name).unlink(missing_ok=True)
                    sync_folder(folder)
                    removed += 1
        if removed:  # else the earlier study was removed from the spool since (a cron clean-up): nothing to say
            log.warning("an instance already received was sent again under another study (a study merge or a "
                        "patient's reconciliation?): it replaces the earlier copy, whose row leaves the list at the "
                        "next run (study %s, earlier %s)", study, earlier)

    def complete(self, quiet_s: float) -> list[tuple[str, int]]:
        """Move the studies quiet for `quiet_s` seconds, with no instance being written, to
        `studies/`; (study, instances moved) of each. Holds the lock while it moves them (renames),
        so that no instance of a study starts arriving while its files move."""
        now, done = time.monotonic(), []
        with self._lock:
            quiet = [study for study, last in self._last.items()
                     if now - last >= quiet_s and study not in self._writing]
            for study in quiet:
                del self._last[study]
                source, target = self.incoming / study, self.studies / study
                if not source.is_dir():
                    continue
                target.mkdir(exist_ok=True)
                moved = 0
                for path in sorted(source.glob("*.dcm")):
                    os.replace(path, target / path.name)  # a resent instance replaces the earlier copy
                    moved += 1
                sync_folder(target)  # scored next: the moved names must survive a power cut
                for leftover in source.glob(".*.part"):  # no write is in progress: a crash's, never acknowledged
                    leftover.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    source.rmdir()
                if not moved:  # its only instance went to another study (radscan.listen.Spool._forget_copies)
                    with contextlib.suppress(OSError):
                        target.rmdir()
                    continue
                done.append((study, moved))
        return done


def _store_handler(spool: Spool, stopping: threading.Event) -> Callable[[Any], int]:
    def handle(event: Any) -> int:
        if stopping.is_set():
            return OUT_OF_RESOURCES  # shutting down: the sender keeps the instance and sends it again later
        try:
            sop_uid = str(event.request.AffectedSOPInstanceUID or "")
            study_uid = str(event.dataset.get("StudyInstanceUID", "") or "")
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot read is the sender's error
            log.warning("refused an instance that cannot be read (%s): status C000", type(exc).__name__)
            return CANNOT_UNDERSTAND
        if not sop_uid:
            return CANNOT_UNDERSTAND
        try:
            spool.store(encoded, study_uid, sop_uid)
        except OSError as exc:
            log.error("cannot keep an instance (%s): answered A700, out of resources; the sender keeps it",
                      exc.strerror or exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    return handle


def _refuse_without_instance_uid(event: Any) -> None:
    """Answer at once, with C000 (cannot understand), a C-STORE request that names no Affected SOP
    Instance UID (an object whose SOP Instance UID is empty, though DICOM requires one): pynetdicom
    drops such a request unanswered, so the sender waited out its timeout, aborted, and the rest of
    its association was not delivered (a trial)."""
    from pynetdicom.dimse_primitives import C_STORE

    command = event.message.command_set
    if command.get("CommandField") != 0x0001 or command.get("AffectedSOPInstanceUID"):  # 0x0001: C-STORE-RQ
        return
    response = C_STORE()
    response.MessageIDBeingRespondedTo = command.get("MessageID")
    if command.get("AffectedSOPClassUID"):
        response.AffectedSOPClassUID = command.AffectedSOPClassUID
    response.Status = CANNOT_UNDERSTAND
    event.assoc.dimse.send_msg(response, event.message.context_id)
    requestor = event.assoc.requestor
    log.warning("refused an instance from %s (%s) without a SOP Instance UID (status C000): DICOM requires one; "
                "correct the object at the sender", printable(str(requestor.ae_title).strip()), requestor.address)


def listen(settings: ListenSettings, spool: Spool, run_score: Callable[[list[Path]], dict[str, Any]],
           status: Callable[[dict[str, Any]], None] | None = None, stop: threading.Event | None = None) -> int:
    """Receive, spool and score until SIGTERM, Ctrl-C or `stop`; returns the number of scoring runs.

    `run_score(inputs)` scores the given folders into the worklist and returns its summary (it
    raises LockHeldError while another run holds the worklist: the listener tries again at the next
    poll). `status` receives one dict per completed study (its folder, instances, the run's exit
    code and counts), for the `--json` lines."""
    try:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
    except ImportError:
        raise SettingError("radscan listen needs pynetdicom: pip install 'radscan[pacs]'") from None

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines echo data set contents
    # pynetdicom's standard handlers only write the DEBUG lines silenced above, and they raise on a
    # request that lacks a required element, which keeps EVT_DIMSE_RECV from reaching ours
    from pynetdicom import _config as pynetdicom_config
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    stop = stop or threading.Event()  # set: instances are answered 0xA700, and the loop ends after the run in hand
    ae = AE(ae_title=settings.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)  # C-ECHO: how a PACS tests a new destination (pynetdicom answers it)
    ae.require_called_aet = True  # an association addressed to another AE title is rejected
    if settings.allow_ae:
        ae.require_calling_aet = list(settings.allow_ae)
    handlers = [(evt.EVT_C_STORE, _store_handler(spool, stop)),
                (evt.EVT_DIMSE_RECV, _refuse_without_instance_uid),
                (evt.EVT_REJECTED, _log_association("rejected (calling or called AE title not accepted)",
                                                    logging.WARNING)),
                (evt.EVT_ACCEPTED, _log_association("accepted", logging.INFO)),
                (evt.EVT_ABORTED, _log_association("aborted by the sender or the network", logging.WARNING))]
    try:
        server = ae.start_server((settings.bind, settings.port), block=False, evt_handlers=handlers)
    except OSError as exc:
        raise SettingError(f"cannot listen on port {settings.port}: {exc.strerror or exc}") from None
    # SIGTERM and Ctrl-C end the loop after the run in hand (a handler can only be set from the main thread)
    previous = ({sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    log.info("listening as %s on port %d; spool %s; a study is complete after %gs without a new instance; "
             "accepting associations from %s", settings.ae_title, settings.port, spool.root, settings.quiet_s,
             ", ".join(settings.allow_ae) if settings.allow_ae else "any calling AE title")
    # a restart scores the complete studies once (the state store skips what was scored before)
    runs, rescan = 0, "restart" if any(folder.is_dir() for folder in spool.studies.iterdir()) else ""
    pending: list[tuple[str, int]] = []  # complete studies not yet scored: (folder, instances)
    retry_at = None  # when to run again for DICOM results a run could not send (a PACS that was down)
    said_waiting = [-float("inf")]
    try:
        while not stop.is_set():
            pending += spool.complete(settings.quiet_s)
            if retry_at is not None and time.monotonic() >= retry_at:
                rescan, retry_at = rescan or "retry", None
            if pending or rescan:
                outcome = _score_once(run_score, spool, said_waiting)
                if outcome is not None:  # else another run holds the worklist: try again at the next poll
                    runs += 1
                    # retried: results a PACS that was down can still take (not those that cannot be made or
                    # that it refuses for good, which a retry would only repeat); a run that sent them clears it
                    retry_at = None
                    if outcome.get("results_waiting"):
                        retry_at = time.monotonic() + settings.retry_s
                        log.warning("DICOM results of this run are waiting to be sent: tried again in %gs",
                                    settings.retry_s)
                    # every run says what it was for, so that monitoring sees pending results clear too
                    for entry in _run_entries(pending, rescan, outcome):
                        if status:
                            status(entry)
                    pending, rescan = [], ""
            stop.wait(settings.poll_s)
    finally:
        stop.set()
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        waiting = sum(1 for _ in spool.incoming.glob("*/*.dcm"))
        log.info("stopped listening; %d instance(s) of studies still arriving stay in %s and are scored after a "
                 "restart", waiting, spool.incoming)
    return runs


def _run_entries(pending: list[tuple[str, int]], rescan: str,
                 outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """The log lines and --json entries of one scoring run: one per study it was run for, or one
    for the run itself when it was run after a restart or to send waiting DICOM results again."""
    for study, instances in pending:
        log.info("study %s complete (%d instances): scored by run %s", study, instances, outcome.get("run_id"))
    if pending:
        files = _files_by_study(Path(outcome["worklist"]), {study for study, _ in pending}) if "worklist" in outcome \
            else {}
        return [{"study": study, "instances": instances, **outcome, "study_files": files.get(study, {}),
                 "study_ok": not files.get(study, {}).get("error")} for study, instances in pending]
    why = {"restart": "the complete studies found at the start (those scored before are kept)",
           "retry": "DICOM results that were waiting to be sent"}[rescan]
    log.info("run %s: %s; DICOM results still pending: %s", outcome.get("run_id"), why,
             "yes" if outcome.get("results_pending") else "none")
    return [{"study": None, "instances": 0, "event": rescan, **outcome}]


def _files_by_study(worklist: Path, studies: set[str]) -> dict[str, dict[str, int]]:
    """The rows of each spool study folder in `worklist` (the scoring run's report CSV), counted by
    status: a study's --json line says its own outcome, where the run's exit code counts every
    unreadable file still in the spool (one left there made every later study's line read "ok":
    false, a trial). Empty when the worklist cannot be read."""
    counts: dict[str, Counter[str]] = {study: Counter() for study in studies}
    try:
        with open(worklist, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                folder = row.get("path", "").split("/", 1)[0]
                if folder in counts:
                    counts[folder][row.get("status", "")] += 1
    except (OSError, csv.Error):
        return {}
    return {study: dict(found) for study, found in counts.items()}


def _log_association(what: str, level: int) -> Callable[[Any], None]:
    def handle(event: Any) -> None:
        requestor = event.assoc.requestor
        # both titles: a rejection may be for the title the sender called, not for its own
        called = getattr(requestor.primitive, "called_ae_title", "") or ""
        log.log(level, "association from %s (%s:%s) to AE title %s %s", printable(str(requestor.ae_title).strip()),
                requestor.address, requestor.port, printable(str(called).strip()) or "(no title)", what)

    return handle


def _score_once(run_score: Callable[[list[Path]], dict[str, Any]], spool: Spool,
                said_waiting: list[float]) -> dict[str, Any] | None:
    """One scoring run over the complete studies; None while another run holds the worklist's lock,
    which is said once a minute, not at every poll (`said_waiting`: when it was last said)."""
    try:
        return run_score([spool.studies])
    except LockHeldError:
        now = time.monotonic()
        if now - said_waiting[0] >= 60:
            log.info("another run holds the worklist: the listener scores after it")
            said_waiting[0] = now
        return None


def status_line(entry: dict[str, Any]) -> str:
    """A study's --json status line."""
    return json.dumps(entry, default=str)
