"""Results back into the PACS (`radscan score --dicom-out DIR [--send HOST:PORT]`).

After a run has scored its files, every scored DICOM image gets its DICOM results in DIR (a
Structured Report and a Secondary Capture, radscan.dicomresults), and those a destination has not
yet accepted are sent to it by C-STORE (PS3.4 Annex B; pynetdicom) over one association. The
state store remembers what each destination accepted, so a rerun sends nothing twice. A failed
send loses nothing: the objects stay in DIR, the row's reason says what happened, the run exits 3,
and the next run sends them. Each row says what became of its results (`dicom_result`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from radscan.dicomresults import DicomResult, ResultWriter, sop_instance_uid
from radscan.errors import OutputError, SettingError
from radscan.records import counted, one_line
from radscan.state import StateStore, StoredRow

__all__ = ["Destination", "Delivery", "deliver", "forget_results", "NOT_SENT", "check_ae_title"]

log = logging.getLogger(__name__)

NOT_SENT = "results not sent to"  # how a row's reason starts when its results did not reach the PACS
NOT_MADE = "no DICOM results"  # ... when they could not be made
_NAME = re.compile(r"^S[RC]_[0-9a-f]{24}\.dcm$")  # the names radscan gives its DICOM results
# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success, and the warnings coercion of data
# elements (B000), elements discarded (B006) and data set does not match SOP class (B007)
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# C-STORE failures that the next run meets again unless the PACS's configuration changes (PS3.4 B.2.3,
# PS3.7 C): refused because the SOP class is not supported (0122) or not authorised (0124), data set does not
# match the SOP class (A9xx), cannot understand (Cxxx). Out of resources (A7xx) and the rest may pass later.
def _lasting(code: int) -> bool:
    return code in (0x0122, 0x0124) or code >> 8 == 0xA9 or code >> 12 == 0xC


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 characters, no backslash


def check_ae_title(option: str, title: str) -> str:
    """`title` stripped, or SettingError (exit 2) unless it is a valid AE title (PS3.5 AE VR)."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise SettingError(f"{option} must be 1-16 printable ASCII characters without a backslash, not {title!r}")
    return title.strip()


@dataclass(frozen=True)
class Destination:
    """A DICOM storage SCP (a PACS or router) as an association needs it."""

    host: str
    port: int
    called_ae: str
    calling_ae: str

    @classmethod
    def parse(cls, address: str, called_ae: str, calling_ae: str) -> Destination:
        """`HOST:PORT` (a bracketed IPv6 address allowed), or `AE@HOST:PORT` as radscan writes a
        destination (the AE title there replaces `called_ae`), and the AE titles; SettingError (exit 2)
        with what to write instead when one is malformed."""
        title, at, address = address.strip().rpartition("@")
        match = re.fullmatch(r"\[?([^\[\]\s@]+?)\]?:([0-9]{1,5})", address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise SettingError(f"--send must be HOST:PORT or AE@HOST:PORT (e.g. pacs.example.org:104), not "
                               f"{(title + at + address)!r}")
        return cls(match.group(1), int(match.group(2)), check_ae_title("--called-ae", title if at else called_ae),
                   check_ae_title("--ae-title", calling_ae))

    def __str__(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


@dataclass
class Delivery:
    """What became of this run's DICOM results (the `dicom` part of the run summary)."""

    folder: str
    destination: str | None = None
    written: int = 0  # objects written this run
    sent: int = 0  # objects the destination accepted this run
    not_sent: int = 0  # objects still waiting for the destination (kept in the folder)
    not_made: int = 0  # scored DICOM images whose results could not be made (the row says why)
    send_failure: str = ""  # why the first object that was not sent this run was not (the PACS's words)
    refused: int = 0  # of not_sent: objects the PACS refuses, which no rerun sends until its configuration changes
    refusal: str = ""  # why the first of those was refused

    @property
    def complete(self) -> bool:
        return not (self.not_sent or self.not_made)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StoreSCU:
    """One association for the whole run, opened on first use; after a failure that leaves no
    association (refused, timed out, aborted), every later send answers the same reason at once,
    so a PACS that is down costs one timeout, not one per object."""

    def __init__(self, destination: Destination, timeout_s: float = 30.0):
        from pynetdicom import AE
        from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines echo dataset contents
        self.destination, self._assoc = destination, None
        self._broken: tuple[str, bool] | None = None  # why no association is left, and whether for good
        self._ae = AE(ae_title=destination.calling_ae)
        self._ae.connection_timeout = self._ae.acse_timeout = timeout_s
        self._ae.dimse_timeout = self._ae.network_timeout = 2 * timeout_s
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            self._ae.add_requested_context(sop_class)

    def send(self, path: Path, uid: str) -> tuple[str, bool]:
        """Send the object `uid` from `path`: ("", False) when the destination stored it, else why not
        (one line) and whether the PACS refuses it for good (its configuration must change: an
        association rejected, a SOP class it does not accept, a lasting failure status) rather than
        for now (unreachable, out of resources, a dropped connection). The file is sent only if it
        still holds that object."""
        import pydicom

        if self._broken:
            return self._broken
        if self._assoc is None or not self._assoc.is_established:
            try:
                self._assoc = self._ae.associate(self.destination.host, self.destination.port,
                                                 ae_title=self.destination.called_ae)
            except OSError as exc:  # a host name that does not resolve (socket.gaierror), no route
                self._broken = (f"cannot reach {self.destination.host}: {exc.strerror or one_line(exc)}; check "
                                "--send", False)
                return self._broken
            if not self._assoc.is_established:
                why = "association rejected" if self._assoc.is_rejected else "no association (refused, unreachable " \
                    "or timed out)"
                self._broken = (f"{why}; check --send, --called-ae and that the PACS knows AE title "
                                f"{self.destination.calling_ae}", self._assoc.is_rejected)
                return self._broken
        try:
            dataset = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file is a reason, never a crashed night
            return f"cannot read {path.name}: {one_line(exc)}; it is written again by the next run", False
        if str(dataset.get("SOPInstanceUID", "")) != uid:
            return f"{path.name} was changed since it was written; it is written again by the next run", False
        sop_class = str(dataset.get("SOPClassUID", ""))
        if sop_class not in {context.abstract_syntax for context in self._assoc.accepted_contexts}:
            name = getattr(dataset.get("SOPClassUID"), "name", sop_class)
            return f"the PACS does not accept {name} objects (it accepted no presentation context for them)", True
        try:
            status = self._assoc.send_c_store(dataset)
        except (ValueError, RuntimeError, OSError) as exc:  # a dropped connection
            return one_line(exc), False
        code = status.get("Status") if status else None
        if code is None:
            self._broken = "the association was aborted or timed out during C-STORE", False
            return self._broken
        return ("", False) if code in _STORED else (f"C-STORE refused with status 0x{code:04X}", _lasting(code))

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()


def deliver(store: StateStore, writer: ResultWriter, link_base: Path, destination: Destination | None,
            page_size: int = 200) -> Delivery:
    """Write the results of this run's scored DICOM images that are not yet in the folder, send
    those `destination` has not accepted, and record in every scored row what became of them
    (`dicom_result`, `dicom_sr`, `dicom_sc` relative to `link_base`, and the reason of a failed
    send). Pages through the store: memory stays flat in the number of files."""
    delivery = Delivery(folder=str(writer.folder), destination=str(destination) if destination else None)
    scu = _StoreSCU(destination) if destination else None
    sent_now: set[str] = set()  # accepted in this run (twins of one SOP Instance UID are sent once)
    try:
        for page in _pages(store, "ok", page_size):
            store.update([item for item in page if _deliver_row(item, writer, link_base, scu, store, delivery,
                                                                sent_now)])
        for page in _pages(store, "rejected", page_size):
            store.update([item for item in page if _no_results_for_rejected(item, writer, store)])
    finally:
        if scu is not None:
            scu.close()
    if delivery.refused:
        log.warning("the PACS %s refuses %s of radscan's DICOM results (%s): no rerun sends them until its "
                    "configuration changes", destination, counted(delivery.refused, "object"), delivery.refusal)
    if delivery.written or delivery.sent or not delivery.complete:
        log.info("DICOM results: %d objects written to %s%s%s", delivery.written, writer.folder,
                 f", {delivery.sent} sent to {destination}, {delivery.not_sent - delivery.refused} waiting to be sent"
                 + (f", {delivery.refused} refused" if delivery.refused else "") if destination
                 else "", f"; {delivery.not_made} scored DICOM images without results" if delivery.not_made else "")
    return delivery


def _pages(store: StateStore, status: str, page_size: int) -> Iterator[list[StoredRow]]:
    """This run's rows of `status`, a page at a time (memory flat in the number of files)."""
    after = b""
    while page := store.scored(after, page_size, status=status):
        after = page[-1].key
        yield page


def _deliver_row(item: StoredRow, writer: ResultWriter, link_base: Path, scu: _StoreSCU | None, store: StateStore,
                 delivery: Delivery, sent_now: set[str]) -> bool:
    """Bring one scored row's results up to date; True when the row changed."""
    row = item.row
    before = (row.get("dicom_result"), row.get("dicom_sr"), row.get("dicom_sc"), row.get("reason"))
    if row.get("reason", "").startswith((NOT_SENT, NOT_MADE)):
        row["reason"] = ""
    row["dicom_result"], result = _results_of(item, writer, link_base, delivery)
    row["dicom_sr"] = os.path.relpath(result.sr_path, link_base) if result else ""
    row["dicom_sc"] = os.path.relpath(result.sc_path, link_base) if result else ""
    if result is not None and scu is not None:
        waiting = [(path, uid) for path, uid in result.objects
                   if uid not in sent_now and not store.was_sent(uid, str(scu.destination))]
        failures = []
        for path, uid in waiting:
            why, lasting = scu.send(path, uid)
            if why:
                failures.append((why, lasting))
                delivery.not_sent += 1
                delivery.refused += lasting
                delivery.refusal = delivery.refusal or (why if lasting else "")
            else:  # recorded at once: a run killed after this object is not sent it again
                store.mark_sent([uid], str(scu.destination), datetime.now(timezone.utc).isoformat(timespec="seconds"))
                sent_now.add(uid)
                delivery.sent += 1
        if failures:
            why, lasting = next((failure for failure in failures if failure[1]), failures[0])
            delivery.send_failure = delivery.send_failure or why
            row["dicom_result"] = f"not sent: {why}"
            then = "sent by the next run" if not lasting else (
                f"tried again by every run in vain until the PACS's administrator lets AE title "
                f"{scu.destination.calling_ae} store them (or --send is dropped)")
            row["reason"] = f"{NOT_SENT} {scu.destination}: {why}; kept in {writer.folder.name}/ and {then}"
        else:
            row["dicom_result"] = f"sent to {scu.destination}"
    return before != (row.get("dicom_result"), row.get("dicom_sr"), row.get("dicom_sc"), row.get("reason"))


REJECTED_RESULT = "none: quality control rejected the film, so the model did not judge it"


def _no_results_for_rejected(item: StoredRow, writer: ResultWriter, store: StateStore) -> bool:
    """A DICOM film quality control rejected has no results; results an earlier run made for it (under
    another --qc, or another model's QC reference) are removed from the folder, since they are no
    longer its verdict. What a PACS was already sent stays there (C-STORE cannot withdraw an object):
    the row's dicom_result and a WARNING name the PACS and the objects' SOP Instance UIDs (UIDs of
    radscan's own results, no patient data), for the PACS staff to remove. True when the row changed."""
    row = item.row
    if row.get("kind") != "dicom":
        return False
    before = (row.get("dicom_result"), row.get("dicom_sr"), row.get("dicom_sc"))
    planned = writer.plan(item.key, row)
    stale = {path: sop_instance_uid(path) for path, _ in planned.objects if path.is_file()}
    for path in stale:
        _remove_result(path, writer.folder)
    if stale:
        log.info("removed the earlier DICOM results of a film quality control now rejects (%s)", row.get("path"))
    sent = {uid: store.destinations(uid) for uid in stale.values() if uid}
    where = sorted({destination for destinations in sent.values() for destination in destinations})
    result = REJECTED_RESULT
    if where:
        uids = ", ".join(uid for uid, destinations in sent.items() if destinations)
        result = (f"{REJECTED_RESULT}; results of an earlier run were sent to {', '.join(where)} and are still "
                  f"there: remove SOP Instance UID {uids}")
        log.warning("%s: the PACS %s holds results radscan sent earlier for a film quality control now rejects; "
                    "remove them there (SOP Instance UID %s)", row.get("path"), ", ".join(where), uids)
    elif str(row.get("dicom_result", "")).startswith(f"{REJECTED_RESULT}; "):
        result = row["dicom_result"]  # said by an earlier run, which removed the files: still true
    row["dicom_result"], row["dicom_sr"], row["dicom_sc"] = result, "", ""
    return before != (row["dicom_result"], row["dicom_sr"], row["dicom_sc"])


def _results_of(item: StoredRow, writer: ResultWriter, link_base: Path,
                delivery: Delivery) -> tuple[str, DicomResult | None]:
    """What became of a scored row's results, and the results when there are some; writes the
    objects that are missing."""
    row = item.row
    if row.get("kind") != "dicom":
        return "none: a JPEG or PNG file has no DICOM study to put results in", None
    planned = writer.plan(item.key, row)
    if planned.write_sr or planned.write_sc:
        picture = row.get("residual_png", "")
        try:
            if not picture:
                raise ValueError("it has no explanation picture")
            delivery.written += writer.write(item.path, row, link_base / picture, planned)
        except (ValueError, OutputError) as exc:  # this image's results, not the night's worklist
            delivery.not_made += 1
            for path, _ in planned.objects:  # an earlier result of this file is no longer its result
                _remove_result(path, writer.folder)
            why = one_line(exc) if isinstance(exc, ValueError) else f"cannot write them: {exc.message}"
            row["reason"] = f"{NOT_MADE}: {why}"
            return f"none: {why}", None
    return "written", planned


def forget_results(rows: list[dict[str, Any]], folder: Path | None, link_base: Path) -> None:
    """Remove the results of files no longer among the inputs (their rows were pruned)."""
    if folder is None:
        return
    for row in rows:
        for key in ("dicom_sr", "dicom_sc"):
            if row.get(key):
                _remove_result(link_base / row[key], folder)


def _remove_result(path: Path, folder: Path) -> None:
    """Delete a result file, only if it is one of radscan's, directly inside `folder`, whatever a
    stored row says."""
    if path.parent.resolve() == folder.resolve() and _NAME.match(path.name) and (
            path.is_symlink() or not path.is_dir()):
        path.unlink(missing_ok=True)  # a symbolic link is removed itself, never what it points to
