"""Lightning's checkpoint I/O through storage.py: written atomically, read as data only.

Its own module so that storage.py, which every run-folder check and lock imports, does not import
Lightning: a command refused before training, or a process that only takes a run folder's lock,
starts without it.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from cifar_speedrun.operations import storage


class AtomicCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O, written atomically beside the target and read as data only.

    Lightning's default writes through fsspec, whose local temporary file lives in $TMPDIR: on a
    cluster that is often another filesystem, where the final move is a copy over `last.ckpt`, so a
    kill or a full disk mid-copy leaves a torn file and the previous good one is gone. Here the bytes
    go to a temporary file in the checkpoint's own folder, fsync'ed, then os.replace'd.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        storage.write_bytes_atomic(buffer.getvalue(), str(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return storage.load_checkpoint(str(path))

    def remove_checkpoint(self, path: Any) -> None:
        storage.remove(str(path))
