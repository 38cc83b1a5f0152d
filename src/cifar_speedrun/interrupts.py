"""SIGTERM and SIGINT as an exception that stops a run where it is, cleanly and visibly.

Schedulers and `timeout` send SIGTERM. Left to Lightning, SIGTERM only sets a flag and ends the fit
with SystemExit(None) at the next batch: exit status 0, no message, results.json saying 'failed'.
Here both signals raise `RunInterrupted` in the main thread at once (mid-epoch, mid-extraction);
`finally` blocks remove temporary files on the way out, the checkpoint of the last finished epoch
stays as it was (it is only ever replaced atomically), the run records 'interrupted', prints one
`error:` line with the resume command, and exits 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), as a shell reports a process killed by that signal. A multirun stops at that job.
"""

from __future__ import annotations

import signal
from types import FrameType


class RunInterrupted(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT. A BaseException, so `except Exception` lets it pass."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise RunInterrupted(signum)


def raise_on_signals() -> None:
    """Install the handlers (main thread only; Lightning chains its own SIGTERM handler to ours)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise)
