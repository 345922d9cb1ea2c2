"""Patient identifiers in radscan's outputs: kept, dropped, or replaced by a keyed HMAC (`--phi`).

Every record read by a run passes through `PhiFilter.apply` before anything is judged or written, so
the worklist, the pictures' captions, the page and the DICOM results show identifiers only as the
mode allows; ages are written as whole years, 90 and over as 090Y (HIPAA Safe Harbor).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from radscan.errors import SettingError
from radscan.qc import age_in_years
from radscan.records import ImageRecord
from radscan.report import cannot_write, sync_folder

__all__ = ["PHI_FIELDS", "PhiFilter", "load_phi_key", "age_string"]

log = logging.getLogger(__name__)

PHI_FIELDS = ("PatientID", "AccessionNumber")


class PhiFilter:
    """keep, drop, or replace identifiers by a keyed HMAC (same patient -> same token every night)."""

    def __init__(self, mode: str, key: bytes | None):
        if mode not in ("keep", "hash", "drop"):
            raise ValueError(f"--phi must be keep, hash or drop, not {mode!r}")
        if mode == "hash" and not key:
            raise ValueError("--phi hash needs a key")
        self.mode, self._key = mode, key

    def apply(self, record: ImageRecord) -> None:
        if self.mode == "keep":
            return
        if record.PatientAge:  # written as whole years, 90 and over as 090Y (HIPAA); unreadable: dropped
            age = age_in_years(record.PatientAge)
            record.PatientAge = "" if age is None else age_string(age)
        for field in PHI_FIELDS:
            value = getattr(record, field)
            if self.mode == "drop" or not value:
                setattr(record, field, "")
            else:
                setattr(record, field, hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:16])

    def token(self, values: Sequence[str]) -> str:
        """A short token standing for `values` (identifiers), as the mode allows: keyed (HMAC) under
        hash, a plain digest under keep (the identifiers are shown anyway), none under drop (nothing
        of them may remain). Stable from run to run with the same key."""
        if self.mode == "drop" or not any(values):
            return ""
        text = "\0".join(values).encode("utf-8", "surrogateescape")
        if self.mode == "hash":
            return hmac.new(self._key, b"study\0" + text, hashlib.sha256).hexdigest()[:12]
        return hashlib.sha256(b"study\0" + text).hexdigest()[:12]

    @property
    def fingerprint(self) -> str:
        """Changes when the mode or key changes (stored rows must then be rebuilt)."""
        key = hashlib.sha256(self._key).hexdigest()[:8] if self._key else ""
        return f"{self.mode}:{key}"


def age_string(years: float) -> str:
    """Years -> the Age String (PS3.5 6.2) radscan writes outside --phi keep: whole years, and
    ages of 90 and over as 090Y (HIPAA Safe Harbor makes them one category)."""
    return f"{min(int(years), 90):03d}Y"


# The shortest HMAC key accepted: a short key can be found by trying them all against one known patient's
# token, and then every token reverses to its identifier by trying the site's ID format (the key radscan
# makes has 64 hex digits)
MIN_KEY_CHARACTERS = 16


def _long_enough(key: bytes, what: str, remedy: str) -> bytes:
    """`key`, or SettingError (exit 2) when it has fewer than MIN_KEY_CHARACTERS characters (the
    message gives its length, never the key)."""
    characters = len(key.decode("utf-8", "replace").strip())  # padding is not randomness
    if characters < MIN_KEY_CHARACTERS:
        raise SettingError(f"{what} has {characters} characters: a key that short can be guessed, and with it every "
                           f"hashed identifier; {remedy}")
    return key


def load_phi_key(explicit: str | None, key_file: Path) -> bytes:
    """The HMAC key: given, or read from `key_file`, which is created (mode 0600) on first use.
    Raises SettingError (exit 2) for an empty key or one under MIN_KEY_CHARACTERS (given or in the file; the
    message never shows the key), or a key file that is not
    a regular file (a FIFO would hang the night), OutputError (73) when it cannot be made."""
    if explicit is not None:
        if not explicit.strip():  # an unset variable expanded to "": never fall back to another key silently
            raise SettingError("the PHI key given by --phi-key or RADSCAN_PHI_KEY is empty: give the site's key, or "
                               "leave both unset to use --phi-key-file")
        return _long_enough(explicit.encode(), "the PHI key given by --phi-key, RADSCAN_PHI_KEY or the settings",
                            f"give one of at least {MIN_KEY_CHARACTERS} random characters, or none, to use the "
                            "key file (--phi-key-file; radscan makes one of 64 characters)")
    if key_file.exists() or key_file.is_symlink():
        if not key_file.is_file():
            raise SettingError(f"the PHI key file {key_file} is not a regular file: point --phi-key-file at a file")
        key = key_file.read_bytes().strip()
        if not key:
            raise SettingError(f"the PHI key file {key_file} is empty: put the site's key in it, or delete it to "
                               "have a new one made (identifiers hashed before will then not match)")
        return _long_enough(key, f"the PHI key file {key_file}",
                            f"put a key of at least {MIN_KEY_CHARACTERS} random characters in it, or delete it to "
                            "have one of 64 made (identifiers hashed before will then not match)")
    try:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise cannot_write(key_file, exc) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_hex(32).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # a key lost to a power cut would unlink every identifier hashed with it
    except OSError as exc:  # a full disk: no empty key file left for the next run to refuse
        key_file.unlink(missing_ok=True)
        raise cannot_write(key_file, exc) from None
    sync_folder(key_file.parent)
    log.warning("created a new PHI key in %s: keep it safe; hashed identifiers only link across runs "
                "made with the same key", key_file)
    return key_file.read_bytes().strip()
