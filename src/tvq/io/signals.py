"""SIGTERM and SIGHUP as an exception, so the cleanups of atomic outputs run.

Python's default for SIGTERM is to die at once, leaving temporaries behind. The CLI entry
point (never an import) installs handlers that raise :class:`Terminated` in the main thread:
it derives from BaseException, like KeyboardInterrupt, so only ``finally`` blocks and
``except BaseException`` cleanups see it, and the error handler turns it into one line and
exit status 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """The process was asked to stop by a signal; cleanups run on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The status a shell reports for a process killed by this signal."""
        return 128 + self.signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # A second signal must not interrupt the cleanup the first one started.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def install_termination_handlers() -> None:
    """Make SIGTERM/SIGHUP raise :class:`Terminated` (main thread only; a signal already
    ignored, e.g. SIGHUP under ``nohup``, stays ignored)."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_terminated)
