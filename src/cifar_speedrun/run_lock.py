"""One run per folder: an exclusive lock on `<run dir>/.run.lock`, held while the process lives.

Two `train.py` processes writing into one folder overwrite each other's results.json and `.hydra/`,
mix a checkpoint of one with the config of the other and truncate metrics.csv. So before Hydra
writes anything, the run's folder (a multirun's sweep folder) is locked with `flock`: the kernel
releases the lock when the process ends in any way, SIGKILL included, so a killed run never leaves
a folder stuck. A second run into a folder in use is refused in one line naming the holder.

A folder the user did not choose (the default `logs/<task>/runs/<time>`) is never shared: when two
runs start in the same second, or the folder already holds a run, the later one takes the next free
name (`<time>_1`, `<time>_2`, ...) instead of being refused.

Where locks do not reach: only local folders are locked (Hydra's run folder is always local). A
`paths.checkpoint_dir` on a remote filesystem (gs://, s3://) is not locked, so two runs given the
same remote checkpoint folder still overwrite each other's `last.ckpt`. On NFS, `flock` works between
clients of Linux >= 2.6.12 (it is emulated with byte-range locks); a filesystem without locks (some
FUSE mounts) is run unlocked with one warning.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cifar_speedrun.errors import UserError
from cifar_speedrun.storage import HOST, os_error_reason


def _reason(error: OSError, folder: str) -> str:
    return os_error_reason(error, folder) or error.strerror or str(error)

LOCK_NAME = ".run.lock"
# A folder that holds either of these already holds a run.
_RUN_MARKERS = (".hydra", "results.json")
# How many `<time>_N` names to try for a default folder before giving up (two runs a second is normal
# for a script; a hundred would be a loop gone wrong).
MAX_SUFFIX = 100

_held: dict[str, tuple[int, int]] = {}  # real path -> (file descriptor, how many holders in this process)


def is_secondary_process() -> bool:
    """A DDP worker that Lightning started for local rank > 0: it writes into its parent's folder."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0
    except ValueError:
        return False


def _holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def try_lock(folder: str, setting: str) -> bool:
    """Lock `folder` for this process (re-entrant). False when another process holds it.

    Creates the folder. A folder that cannot be made or written is one UserError naming `setting`.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        real = os.path.realpath(folder)
    except OSError as error:
        raise UserError(f"cannot use {setting}={folder}: {_reason(error, folder)}; choose another folder") from None
    if real in _held:
        descriptor, count = _held[real]
        _held[real] = (descriptor, count + 1)
        return True
    try:
        descriptor = os.open(os.path.join(real, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise UserError(f"cannot use {setting}={folder}: {_reason(error, folder)}; choose another folder") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    except OSError as error:  # ENOLCK / EOPNOTSUPP: a filesystem without locks
        print(f"warning: {folder} cannot be locked ({error.strerror or error}); a second run into it would not be "
              "noticed", file=sys.stderr, flush=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {HOST}, since {started}\n".encode(), 0)
    except OSError:
        pass  # who holds it is for the message only
    _held[real] = (descriptor, 1)
    return True


def holder_of(folder: str) -> str:
    """Who holds the lock of `folder`, as its lock file says."""
    try:
        descriptor = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return "another process"
    try:
        return _holder(descriptor)
    finally:
        os.close(descriptor)


def holds_a_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, marker)) for marker in _RUN_MARKERS)


def lock_run_folder(folder: str, chosen: bool, setting: str = "hydra.run.dir") -> str:
    """Lock the run's folder and return it; a default folder moves to the next free name.

    `chosen`: the user named the folder (hydra.run.dir=..., a resume): then a folder in use is
    refused, and a finished run's folder is reused as asked.
    """
    if is_secondary_process():
        return folder
    if chosen:
        if not try_lock(folder, setting):
            raise UserError(f"{folder} is in use by another run ({holder_of(folder)}): wait for it to finish, or "
                            f"choose another {setting}")
        return folder
    for suffix in range(MAX_SUFFIX):
        candidate = folder if suffix == 0 else f"{folder}_{suffix}"
        fresh = not os.path.exists(candidate) or not holds_a_run(candidate)
        if fresh and try_lock(candidate, setting):
            if holds_a_run(candidate):  # a run finished in between: leave it alone
                release(candidate)
                continue
            return candidate
    raise UserError(f"{folder} and {MAX_SUFFIX - 1} numbered folders beside it are all in use: set {setting}")


def release(folder: str) -> None:
    """Drop one hold of this process on `folder` (the lock goes with the last)."""
    real = os.path.realpath(folder)
    if real not in _held:
        return
    descriptor, count = _held[real]
    if count > 1:
        _held[real] = (descriptor, count - 1)
        return
    del _held[real]
    os.close(descriptor)  # closing the descriptor releases the flock


@contextmanager
def held(folder: str, setting: str) -> Iterator[None]:
    """Hold the lock of `folder` for a block (re-entrant: a folder this process holds already is fine)."""
    if is_secondary_process():
        yield
        return
    if not try_lock(folder, setting):
        raise UserError(f"{folder} is in use by another run ({holder_of(folder)}): wait for it to finish, or "
                        f"choose another {setting}")
    try:
        yield
    finally:
        release(folder)


def pin_run_folder(args: list[str], checked: tuple[str, bool, bool] | None) -> list[str]:
    """Lock the run's folder (a multirun's sweep folder) before Hydra writes into it, and pin it.

    `checked` is config.check_composition's answer: (folder, chosen by the user, multirun), or None
    when Hydra only prints something. The folder is resolved once (its `${now:...}` included) and
    handed to Hydra as an override, so the folder locked is the folder written; a default folder
    already in use moves to `<time>_N`.
    """
    if checked is None:
        return args
    folder, chosen, multirun = checked
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    locked = lock_run_folder(folder, chosen, key)
    return [arg for arg in args if arg.lstrip("+").split("=", 1)[0] != key] + [f"{key}={locked}"]
