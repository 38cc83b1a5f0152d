"""One run per folder: an exclusive lock on `<folder>/.run.lock`, held while the process lives.

Two `train.py` processes writing into one folder overwrite each other's results.json and `.hydra/`,
mix a checkpoint of one with the config of the other and truncate metrics.csv. So before Hydra
writes anything, the run's folder is locked with `flock` (a multirun: its sweep folder, which covers
its jobs' folders): the kernel releases the lock when the process ends in any way, SIGKILL included, so a
killed run never leaves a folder stuck. A second run into a folder in use is refused in one line
naming the holder, before anything is written. `train()` and `evaluate()` also hold the folders they
write into (the output folder and a local checkpoint folder), so `paths.output_dir=` or
`paths.checkpoint_dir=` pointing into a running run's folder is refused too.

A folder the user did not choose (the default `logs/<task>/runs/<time>`) is never shared: when two
runs start in the same second, or the folder already holds a run, the later one takes the next free
name (`<time>_1`, `<time>_2`, ...) instead of being refused.

Processes a run starts itself (Lightning's DDP workers, submitit's jobs) write into the folders their
parent locked: the parent names them in the environment variable `CIFAR_SPEEDRUN_HELD_FOLDERS`, and
only those folders are taken as held.

A run writes only files it creates itself, never through a link: a symbolic link anywhere inside a
folder being locked (`<dir>/.run.lock -> ~/.bashrc`, `<dir>/checkpoints -> /elsewhere`) was planted, since
no run makes one, and the folder is refused in one line naming the link before anything is written;
the lock file itself is opened with O_NOFOLLOW. (The folder's own path may go through links: that is
where the user put it.)

Where locks do not reach: remote folders (gs://, s3://; `paths.checkpoint_dir` may be one) are not
locked, so two runs given the same remote checkpoint folder still overwrite each other's
`last.ckpt`. A multirun with its own `hydra.sweep.subdir` has its sweep folder locked, not each job's
until the job starts. On NFS, `flock` works between clients of Linux >= 2.6.12 (it is emulated with
byte-range locks); a filesystem without locks (some FUSE mounts) is run unlocked with one warning.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations.storage import HOST, os_error_reason

LOCK_NAME = ".run.lock"
# Folders locked by the process that started this one (its DDP workers, its submitit jobs).
HELD_BY_PARENT = "CIFAR_SPEEDRUN_HELD_FOLDERS"
# A folder that holds either of these already holds a run.
_RUN_MARKERS = (".hydra", "results.json")
# How many `<time>_N` names to try for a default folder before giving up (two runs a second is normal
# for a script; a hundred would be a loop gone wrong).
MAX_SUFFIX = 100

_held: dict[str, tuple[int, int]] = {}  # real path -> (file descriptor, how many holders in this process)


class FolderRefused(UserError):
    """A folder nothing may be written into, not even a failure record."""


class FolderInUse(FolderRefused):
    """Another run holds the folder."""


class PlantedLink(FolderRefused):
    """The folder holds a link no run makes."""


@dataclass(frozen=True)
class RunFolders:
    """Where a command will write, as config.check_composition works it out before Hydra starts."""

    folder: str            # the run's folder, or a multirun's sweep folder (`${now:...}` resolved)
    chosen: bool           # the user named it (hydra.run.dir= / hydra.sweep.dir=, a resume)
    multirun: bool
    jobs: int = 1          # a multirun's job count
    numbered_jobs: bool = True  # its jobs go to <sweep>/<job number> (the default hydra.sweep.subdir)


def _reason(error: OSError, folder: str) -> str:
    return os_error_reason(error, folder) or error.strerror or str(error)


def _held_by_parent() -> set[str]:
    """Folders the process that started this one holds (named in the environment; this process's own
    exported ones too)."""
    return {path for path in os.environ.get(HELD_BY_PARENT, "").split(os.pathsep) if path}


def _holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _in_use_by_another(folder: str) -> bool:
    """Whether another process holds `folder`'s lock (probed with a shared lock, nothing created)."""
    lock_file = os.path.join(folder, LOCK_NAME)
    if folder in _held or not os.path.exists(lock_file):
        return False
    try:
        descriptor = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while someone holds it
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)  # our shared probe goes with it
    return False


def _held_elsewhere(real: str) -> str | None:
    """The nearest folder above `real` that another process holds (its lock covers its subtree), or None."""
    mine = _held_by_parent()
    parent = os.path.dirname(real)
    while parent and parent != os.path.dirname(parent):
        if parent not in mine and _in_use_by_another(parent):
            return parent
        parent = os.path.dirname(parent)
    return None


def planted_link(folder: str) -> str | None:
    """The first symbolic link inside `folder`'s tree (not followed), or None."""
    for root, folders, files in os.walk(folder):  # followlinks=False: a linked folder is listed, not entered
        for name in sorted(folders + files):
            path = os.path.join(root, name)
            if os.path.islink(path):
                return path
    return None


def refuse_links(real: str, folder: str, setting: str) -> None:
    """Raise PlantedLink naming the first link inside `real` (`folder` as the user gave it, chosen by `setting`)."""
    link = planted_link(real)
    if link is not None:
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        raise PlantedLink(f"{setting}={folder} holds a link no run makes: {link} -> {target}; remove it (a run "
                          "writes only files it creates, never through a link) or choose another folder")


def try_lock(folder: str, setting: str) -> str | None:
    """Lock `folder` for this process (re-entrant). Returns None when locked, or the folder another
    process holds: `folder` itself, or a folder above it (a run's lock covers its subfolders).

    Creates the folder. A folder that cannot be made or written is one UserError naming `setting`.
    """
    try:
        real = os.path.realpath(folder)
    except OSError as error:
        raise UserError(f"cannot use {setting}={folder}: {_reason(error, folder)}; choose another folder") from None
    if real in _held:
        descriptor, count = _held[real]
        _held[real] = (descriptor, count + 1)
        return None
    if real in _held_by_parent():
        return None
    above = _held_elsewhere(real)  # before anything is made inside a folder in use
    if above is not None:
        return above
    refuse_links(real, folder, setting)
    try:
        os.makedirs(real, exist_ok=True)
        descriptor = os.open(os.path.join(real, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        raise UserError(f"cannot use {setting}={folder}: {_reason(error, folder)}; choose another folder") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return folder
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
    return None


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


def in_use(folder: str, setting: str, holder: str | None = None) -> FolderInUse:
    """The refusal for `folder`, naming the folder another run holds (`holder`: it, or one above it)."""
    held = holder or folder
    inside = "" if os.path.realpath(held) == os.path.realpath(folder) else f" (inside {held})"
    return FolderInUse(f"{folder}{inside} is in use by another run ({holder_of(held)}): wait for it to finish, or "
                       f"choose another {setting}")


def holds_a_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, marker)) for marker in _RUN_MARKERS)


def lock_run_folder(folder: str, chosen: bool, setting: str = "hydra.run.dir") -> str:
    """Lock the run's folder and return it; a default folder moves to the next free name.

    `chosen`: the user named the folder (hydra.run.dir=..., a resume): then a folder in use is
    refused, and a finished run's folder is reused as asked.
    """
    if chosen:
        blocker = try_lock(folder, setting)
        if blocker is not None:
            raise in_use(folder, setting, blocker)
        return folder
    for suffix in range(MAX_SUFFIX):
        candidate = folder if suffix == 0 else f"{folder}_{suffix}"
        fresh = not os.path.exists(candidate) or not holds_a_run(candidate)
        if fresh and try_lock(candidate, setting) is None:
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


def _is_local(folder: str) -> bool:
    return "://" not in str(folder) or str(folder).startswith("file://")


@contextmanager
def held(folders: dict[str, str]) -> Iterator[None]:
    """Hold the locks of `folders` (folder -> the setting that chose it) for a block; remote ones are
    skipped. Re-entrant: a folder this process (or its launcher) holds already is fine. Processes
    started inside the block (DDP workers) are told these folders are their parent's."""
    taken: list[str] = []
    exported = os.environ.get(HELD_BY_PARENT)
    try:
        for folder, setting in folders.items():
            if not folder or not _is_local(folder):
                continue
            path = folder[len("file://"):] if folder.startswith("file://") else folder
            blocker = try_lock(path, setting)
            if blocker is not None:
                raise in_use(path, setting, blocker)
            taken.append(path)
        _export(taken)
        yield
    finally:
        for path in taken:
            release(path)
        if exported is None:
            os.environ.pop(HELD_BY_PARENT, None)
        else:
            os.environ[HELD_BY_PARENT] = exported


def _export(folders: list[str]) -> None:
    """Name the folders this process holds for the processes it starts (DDP workers, submitit jobs)."""
    known = _held_by_parent() | {os.path.realpath(folder) for folder in folders}
    os.environ[HELD_BY_PARENT] = os.pathsep.join(sorted(known))


def pin_run_folder(args: list[str], where: RunFolders | None) -> list[str]:
    """Lock where a command will write before Hydra writes anything there, and pin the folder.

    `where` is config.check_composition's answer (None when Hydra only prints something). The folder
    is resolved once (its `${now:...}` included) and handed to Hydra as an override, so the folder
    locked is the folder written; a default folder already in use moves to `<time>_N`. A multirun
    also locks each job's folder (`<sweep>/<n>`), so a job never writes into a running run's folder.
    """
    if where is None:
        return args
    key = "hydra.sweep.dir" if where.multirun else "hydra.run.dir"
    locked = lock_run_folder(where.folder, where.chosen, key)
    if where.multirun and where.numbered_jobs:  # the sweep's lock covers its jobs from now on; one held before?
        for number in range(where.jobs):
            job = os.path.join(locked, str(number))
            if _in_use_by_another(os.path.realpath(job)):
                release(locked)
                raise in_use(job, key)
    _export([locked])
    return [arg for arg in args if arg.lstrip("+").split("=", 1)[0] != key] + [f"{key}={locked}"]
