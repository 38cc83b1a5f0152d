"""Reading and writing files that may live on a local disk or behind an fsspec URL (gs://, s3://, memory://).

Every write goes to a temporary name beside the target (same filesystem), is flushed and fsync'ed,
and is then renamed over the target with os.replace, so a run killed halfway (or a full disk) never
leaves a truncated cache, results file or checkpoint that a later run would trust, and never
destroys the previous good one. Temporary names carry the host and process id
(`<name>.tmp-<host>-<pid>-<random>`), so a later run can remove the leftovers of a process that
died (`remove_stale`). Files get the permissions of the user's umask, like any file they create.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from typing import Any

import fsspec
import torch

from cifar_speedrun.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import, while the process is single-threaded
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_tag() -> str:
    """The part of a temporary name that says who made it: '<host>-<pid>-'."""
    return f"{HOST}-{os.getpid()}-"


def _file_in_the_way(path: str) -> str:
    """The first part of `path` that exists and is not a folder (what stops the folders being made)."""
    parts = os.path.abspath(os.path.expanduser(str(path))).split(os.sep)
    for index in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:index])
        try:
            if os.path.exists(prefix) and not os.path.isdir(prefix):
                return prefix
        except (OSError, ValueError):
            break
    return str(path)


def os_error_reason(error: OSError, path: str) -> str | None:
    """Why `path` cannot be written, in words, for the classes a user fixes by choosing another place:
    a full disk or quota, a read-only filesystem, no permission, a file where a folder must be (or a
    folder where a file must be), a name longer than the filesystem allows, a symlink loop. None for
    other errors."""
    if error.errno in _FULL:
        return f"the disk is full at {os.path.dirname(str(path)) or '.'}"
    if error.errno == errno.EROFS:
        return "it is on a read-only filesystem"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "no permission to write there"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{_file_in_the_way(path)} is a file, not a folder"
    if error.errno == errno.EISDIR:
        return f"{path} is a folder"
    if error.errno == errno.ENAMETOOLONG:
        return "a name in it is longer than the filesystem allows (255 bytes)"
    if error.errno == errno.ELOOP:
        return "it goes through a symlink loop"
    return None


def path_error(error: OSError, path: str) -> UserError | None:
    """An OS error about where a file goes, as one line naming the place and the fix; None for others."""
    where, name = os.path.dirname(str(path)) or ".", os.path.basename(str(path))
    if error.errno in _FULL:
        return UserError(f"disk full at {where} (writing {name}): free space there or "
                         "point paths.output_dir / paths.cache_dir elsewhere")
    if error.errno == errno.EROFS:
        return UserError(f"{where} is on a read-only filesystem (writing {name}): choose "
                         "a writable hydra.run.dir / paths.cache_dir")
    if error.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"no permission to write {path}: choose a writable hydra.run.dir / paths.cache_dir")
    reason = os_error_reason(error, path)
    if reason is None:
        return None
    return UserError(f"cannot write {path}: {reason}; choose another hydra.run.dir / paths.cache_dir / "
                     "paths.checkpoint_dir")


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.expanduser(path)


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(_local(base), *parts)
    return "/".join([str(base).rstrip("/"), *parts])


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(_local(path))
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def remove(path: str) -> None:
    """Remove a file if it is there (Lightning's checkpoint I/O removes old top-k checkpoints through this)."""
    if is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(path))
        return
    fs, inner = fsspec.core.url_to_fs(path)
    if fs.exists(inner):
        fs.rm(inner)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    else:
        fs, inner = fsspec.core.url_to_fs(path)
        fs.makedirs(inner, exist_ok=True)


def _write_file(handle: int, data: bytes) -> None:
    """Write, flush and fsync one open file (a seam for the disk-full tests)."""
    with os.fdopen(handle, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write to `<path>.tmp-<host>-<pid>-<random>` beside the target, fsync, then os.replace over it.

    A full disk, a read-only folder or a missing permission becomes one UserError naming where; the
    previous file, if any, is left as it was.
    """
    if is_local(path):
        target = _local(path)
        folder = os.path.dirname(target) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f"{os.path.basename(target)}.tmp-{temp_tag()}", dir=folder)
        except OSError as error:
            named = path_error(error, target)
            if named is None:
                raise
            raise named from error
        try:
            os.fchmod(handle, 0o666 & ~UMASK)  # mkstemp makes 0600; a results folder may be shared
            _write_file(handle, data)
            os.replace(temp, target)
            _fsync_folder(folder)
        except BaseException as error:
            if os.path.exists(temp):
                os.remove(temp)
            named = path_error(error, target) if isinstance(error, OSError) else None
            if named is None:
                raise
            raise named from error
        return
    fs, inner = fsspec.core.url_to_fs(path)
    temp = f"{inner}.tmp-{temp_tag()}{uuid.uuid4().hex}"
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(temp, data)
    fs.mv(temp, inner)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX: fsync the directory)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


_TAGGED = re.compile(r"(?:\.tmp-|^extract-)(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str) -> list[str]:
    """Remove temporary files and extraction folders left in `folder` by dead processes of this host.

    Only names this project makes (`*.tmp-<host>-<pid>-*`, `extract-<host>-<pid>-*`) whose process is
    gone; another host's (a shared cluster home) or a live process's are left alone.
    """
    if not is_local(folder) or not os.path.isdir(_local(folder)):
        return []
    removed = []
    for entry in os.scandir(_local(folder)):
        match = _TAGGED.search(entry.name)
        if not match or match["host"] != HOST or _alive(int(match["pid"])) or int(match["pid"]) == os.getpid():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.remove(entry.path)
            except OSError:
                continue
        removed.append(entry.path)
    return removed


def read_bytes(path: str) -> bytes:
    if is_local(path):
        with open(_local(path), "rb") as handle:
            return handle.read()
    with fsspec.open(path, "rb") as handle:
        return handle.read()


def save_tensors_atomic(obj: dict[str, Any], path: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def load_tensors(path: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)


def load_data_file(path: str, missing: str, unreadable: str) -> Any:
    """A file of tensors and plain values, loaded as data only (weights_only: a handed file runs no code).

    The one place a checkpoint or model file is read: a missing file raises UserError(`missing`), a torn,
    foreign or pickled-code file UserError(`unreadable` with the error's type in brackets); never advice
    to load it unsafely. `{path}` and `{error}` in the messages are filled in.
    """
    if not exists(path):
        raise UserError(missing.format(path=path))
    try:
        return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(missing.format(path=path)) from None
    except Exception as error:
        raise UserError(unreadable.format(path=path, error=type(error).__name__)) from None


def load_checkpoint(path: str) -> dict[str, Any]:
    """A Lightning checkpoint's contents (load_data_file), refused in one line unless it holds a state_dict."""
    blob = load_data_file(path, "checkpoint {path} does not exist",
                          "{path} is not a readable checkpoint of this project ({error}): it is torn, foreign or not "
                          "a checkpoint; give a <run>/checkpoints/last.ckpt")
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict): give a <run>/checkpoints/last.ckpt")
    return blob


def write_json_atomic(obj: Any, path: str) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, default=str) + "\n").encode(), path)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode())


def check_writable(directory: str, setting: str) -> None:
    """Create `directory` and write/remove a probe file, before a run spends time on anything else.

    Any OS error (a file in the way, a name too long, no permission, a read-only or full disk, an
    unreachable bucket) becomes one UserError naming `setting`, the key that chose the folder.
    """
    try:
        makedirs(directory)
        probe = join(directory, f".write-probe-{uuid.uuid4().hex}")
        write_bytes_atomic(b"", probe)
        if is_local(probe):
            os.remove(_local(probe))
        else:
            fs, inner = fsspec.core.url_to_fs(probe)
            fs.rm(inner)
    except UserError as error:
        raise UserError(f"cannot use {setting}={directory}: {error}") from None
    except OSError as error:
        reason = os_error_reason(error, directory) if is_local(directory) else None
        reason = reason or error.strerror or str(error) or type(error).__name__
        raise UserError(f"cannot use {setting}={directory}: {reason}; choose another folder") from None
