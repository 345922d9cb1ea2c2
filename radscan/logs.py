"""radscan's log on stderr: one timestamped format, for a command and for its decoding workers."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure"]

FORMAT = "%(asctime)s radscan %(levelname)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def configure(level: int) -> None:
    """Send the "radscan" loggers' records at `level` and above to stderr, timestamped (ISO 8601).
    A decoding worker process calls it too (radscan.ingest), with the command's level: without it a
    worker's warnings reached stderr raw, traceback and all, even under `-q` (a trial)."""
    log = logging.getLogger("radscan")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
