"""Run by tests/test_user_path.py in a child pytest: a test whose in-process run catches Ctrl-C, then more tests.

Not collected by the suite itself (its name does not start with test_)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cifar_speedrun.operations import interrupts


def test_a_run_that_handles_the_signal() -> None:
    interrupts.raise_on_signals()  # as train.py's main() does
    Path(os.environ["SIGNAL_PROBE_READY"]).write_text("ready")
    try:
        time.sleep(60)
    except interrupts.RunInterrupted:
        pass  # the run exits cleanly with 130 / 143; _main() in the tests turns that into a return code


def test_after_it() -> None:
    Path(os.environ["SIGNAL_PROBE_READY"]).write_text("ran on")


def test_between_tests_a_signal_also_stops_the_suite() -> None:
    Path(os.environ["SIGNAL_PROBE_READY"]).write_text("waiting")
    time.sleep(60)
