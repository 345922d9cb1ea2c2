"""radscan's log on stderr: one timestamped format, for a command and for its decoding workers."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from radscan.records import visible_controls

__all__ = ["configure", "one_line_text", "error_line"]

FORMAT = "%(asctime)s radscan %(levelname)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


_LINE_SEPARATORS = {0x2028: "\\u2028", 0x2029: "\\u2029"}  # Unicode's line breaks that are not controls


def one_line_text(text: str) -> str:
    """`text` as one line of printable text: control characters and Unicode line separators written
    out (\\x0a, \\x1b, \\u2028), bytes that are not UTF-8 as \\udcXX. For what radscan prints about
    paths and header values: a log message, a command's last line, an error."""
    return visible_controls(text).translate(_LINE_SEPARATORS).encode("utf-8", "backslashreplace").decode("utf-8")


class _OneLineFormatter(logging.Formatter):
    """Each message on one line, its control characters written out (\\x0a, \\x1b) and bytes that
    are not UTF-8 as \\udcXX: a file name or header value with a newline forged a log line of its
    own ("run finished, 0 errors"), and an ESC drove the terminal (a trial). A traceback (-vv)
    follows as Python writes it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line_text(record.message)
        return super().formatMessage(record)


def configure(level: int) -> None:
    """Send the "radscan" loggers' records at `level` and above to stderr, timestamped (ISO 8601).
    A decoding worker process calls it too (radscan.ingest), with the command's level: without it a
    worker's warnings reached stderr raw, traceback and all, even under `-q` (a trial)."""
    log = logging.getLogger("radscan")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(FORMAT, DATE_FORMAT))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # libraries' warnings (pydicom's on an odd header, which may quote a header value) reached stderr raw,
    # without a timestamp (a trial's log parser): as log lines, shown only with -vv; each film's row says
    # what became of it
    logging.captureWarnings(False)  # and again: it does nothing if called before and showwarning was reset since
    logging.captureWarnings(True)
    library = logging.getLogger("py.warnings")
    library.filters[:] = [_without_text]
    library.handlers[:] = [handler]
    library.setLevel(level if level <= logging.DEBUG else logging.CRITICAL + 1)
    library.propagate = False


_WARNING = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): ")


def _without_text(record: logging.LogRecord) -> bool:
    """A library warning's log line names its kind and where it was raised, not its text: pydicom's
    quote header values ("Invalid value for VR DA: '19401305'", a birth date; a review), and logs
    never show header values (docs/scoring.md)."""
    found = _WARNING.match(record.getMessage())
    where = f"{Path(found['file']).parent.name}/{Path(found['file']).name}" if found else "a library"
    record.msg, record.args = (f"a library warning ({found['category'] if found else 'Warning'} in {where}): its text "
                               "is not logged, as it may quote a header value"), ()
    return True


def error_line(message: str) -> str:
    """A command's last line when it fails, in the log's format (timestamped, one line), so that a
    log parser reads it as it reads the others."""
    return _OneLineFormatter(FORMAT, DATE_FORMAT).format(
        logging.LogRecord("radscan", logging.ERROR, "", 0, message, None, None))
