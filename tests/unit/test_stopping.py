"""Stop signals of the command line (radscan.stopping)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("code", [0, 3])
def test_a_stop_after_the_outcome_was_printed_keeps_its_exit_code(sig, code):
    """A new user's trial: a SIGTERM in the teardown after `"ok": true, "exit_code": 0` was printed
    made the process exit 143, and a wrapper that reran as told got a usage error."""
    program = ("import os, signal, time\n"
               "from radscan.stopping import install_stop_handlers, outcome_said\n"
               "install_stop_handlers()\n"
               "outcome_said()\n"
               f"os.kill(os.getpid(), {int(sig)})\n"
               "time.sleep(0.5)\n"
               f"raise SystemExit({code})\n")
    assert subprocess.run([sys.executable, "-c", program], timeout=60).returncode == code


def test_before_the_outcome_a_stop_is_130_or_143():
    program = ("import os, signal, time\n"
               "from radscan.stopping import install_stop_handlers, Terminated\n"
               "install_stop_handlers()\n"
               "try:\n"
               "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
               "except Terminated:\n"
               "    raise SystemExit(143)\n")
    assert subprocess.run([sys.executable, "-c", program], timeout=60).returncode == 143
