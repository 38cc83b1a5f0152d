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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


# The last signal the handler below turned into RunInterrupted: a caller that runs runs in its own
# process and must itself stop on Ctrl-C (the test suite) reads it after the run has handled it.
last_signal: int | None = None


def _raise(signum: int, frame: FrameType | None) -> None:
    global last_signal
    last_signal = signum
    raise RunInterrupted(signum)


def raise_on_signals() -> None:
    """Install the handlers (main thread only; Lightning chains its own SIGTERM handler to ours)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back for the block, then deliver the first that came.

    For cleanups that must finish: removing a 60,000-file scratch folder takes a second or two, and
    a second Ctrl-C or `timeout`'s second signal in that time would leave ~170 MB behind. The Python
    handlers are swapped for one that only remembers (blocking the signal with pthread_sigmask would
    not do: the kernel hands a process-wide signal to any thread that does not block it, and torch
    starts threads), then restored, and a remembered signal is raised again through them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, remember) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
