"""radscan's log lines (radscan.logs)."""

from __future__ import annotations

import contextlib
import io
import logging
import os

from hypothesis import given
from hypothesis import strategies as st

from radscan.logs import configure


@given(st.one_of(st.text(), st.binary().map(os.fsdecode),
                 st.just("x\n2026-12-05T10:00:00+0000 radscan INFO: run finished, 0 errors\x1b[2J.jpeg")))
def test_a_file_name_cannot_forge_a_log_line_or_drive_the_terminal(name):
    """A new user's trial: a file named "x\\n2026-... radscan INFO: run finished, 0 errors\\x1b[2J.jpeg"
    printed a forged INFO line and cleared the terminal. Whatever a name holds (line breaks, ESC,
    bytes that are not UTF-8), a message is one line of printable text."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        configure(logging.INFO)
    logging.getLogger("radscan.ingest").warning("worker for %s died", name)
    [line] = stderr.getvalue().splitlines()
    assert line.endswith(" died") and " radscan WARNING: worker for " in line
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in line)
    line.encode("utf-8")  # no lone surrogate left


def test_a_librarys_warning_is_a_timestamped_log_line_shown_only_with_debug():
    """A trial: pydicom's warnings on odd headers (which may quote a header value) reached the
    nightly log raw, without a timestamp. They are log lines in the one format, shown only at -vv."""
    import warnings

    for level, shown in ((logging.WARNING, False), (logging.INFO, False), (logging.DEBUG, True)):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            configure(level)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("unknown escape sequence in the patient's name\nDoe^John", UserWarning, stacklevel=1)
        lines = stderr.getvalue().splitlines()
        assert bool(lines) == shown, (level, lines)
        assert all(line[:4].isdigit() and line[10] == "T" and " radscan WARNING: " in line for line in lines)
        # a review: pydicom's text quotes header values (a birth date, a name); logs never show them
        assert not any("Doe" in line or "escape sequence" in line for line in lines), lines
        assert all("a library warning (UserWarning in " in line for line in lines)
    configure(logging.WARNING)
