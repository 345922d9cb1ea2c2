"""A stop that cannot be lost: Ctrl-C (SIGINT) and SIGTERM are remembered as well as raised.

Python raises a signal's exception in the main thread at whatever line it is running, and code
there may catch it: a bare ``except:`` in a library's import, a pool that turns a failure while
its workers start into an error of its own. A Ctrl-C taken there was lost (seen once in CI: a
run interrupted 1.4 s after its start finished with exit 0). So the handlers also record the
request, and a long command calls `raise_if_stop_asked` at the points where it can stop cleanly
(between batches, before it replaces its outputs): a request that was swallowed is raised again.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Terminated", "install_stop_handlers", "raise_if_stop_asked", "outcome_said"]

_asked: int | None = None  # the signal that asked the process to stop, once one has
_installed = False  # whether this process's stop signals are radscan's (the command line), not a host's


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (BaseException: no `except Exception` swallows it)."""


def install_stop_handlers() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`, each also recorded for
    `raise_if_stop_asked`. A second SIGTERM ends the process at once (the default action).
    Only the main thread can set handlers: elsewhere this does nothing."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_stop_signal)
        signal.signal(signal.SIGTERM, _on_stop_signal)
        _installed = True


def raise_if_stop_asked() -> None:
    """Raise the stop that a signal asked for, if one did (KeyboardInterrupt for SIGINT,
    `Terminated` for SIGTERM): for a request that code between the handler and here caught."""
    if _asked == signal.SIGTERM:
        raise Terminated
    if _asked == signal.SIGINT:
        raise KeyboardInterrupt


def _on_stop_signal(signum: int, frame: object) -> None:
    global _asked
    _asked = signum if _asked != signal.SIGTERM else _asked  # a SIGTERM is not downgraded by a later Ctrl-C
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated
    raise KeyboardInterrupt


def outcome_said() -> None:
    """A command has its outcome (its outputs are in place, its summary is being printed): stop
    signals are ignored from now on, so that the process exits with the code it printed, not
    130/143. A SIGTERM that landed in the teardown after "ok": true made the process exit 143, and a
    wrapper that reran as told got a usage error (the model was there: a trial); a handler that
    raised there was lost in Python's shutdown (a review). What is left is the teardown; SIGKILL
    still ends it. Only where `install_stop_handlers` set the handlers (the command line, not a
    program that calls radscan's commands), and from the main thread."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
