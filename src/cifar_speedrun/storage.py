"""Reading and writing files that may live on a local disk or behind an fsspec URL (gs://, s3://, memory://).

Every write goes to a temporary name first and is then moved into place, so a run killed halfway
never leaves a truncated cache or results file that a later run would trust.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from typing import Any

import fsspec
import torch


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


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    else:
        fs, inner = fsspec.core.url_to_fs(path)
        fs.makedirs(inner, exist_ok=True)


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write to `<path>.tmp-<random>` beside the target, then rename over it."""
    if is_local(path):
        target = _local(path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=os.path.basename(target) + ".tmp-", dir=os.path.dirname(target) or ".")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise
        return
    fs, inner = fsspec.core.url_to_fs(path)
    temp = f"{inner}.tmp-{uuid.uuid4().hex}"
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(temp, data)
    fs.mv(temp, inner)


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


def load_checkpoint(path: str) -> dict[str, Any]:
    """A Lightning checkpoint's contents, loaded as data only (weights_only: a handed file runs no code)."""
    from cifar_speedrun.errors import UserError

    try:
        blob = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(error).__name__}): it is "
                        "torn, foreign or not a checkpoint; give a <run>/checkpoints/last.ckpt") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict): give a <run>/checkpoints/last.ckpt")
    return blob


def write_json_atomic(obj: Any, path: str) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, default=str) + "\n").encode(), path)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode())


def check_writable(directory: str) -> None:
    """Create `directory` and write/remove a probe file; raises OSError when that is impossible."""
    makedirs(directory)
    probe = join(directory, f".write-probe-{uuid.uuid4().hex}")
    write_bytes_atomic(b"", probe)
    if is_local(probe):
        os.remove(_local(probe))
    else:
        fs, inner = fsspec.core.url_to_fs(probe)
        fs.rm(inner)
