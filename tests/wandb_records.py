"""Read the records of an offline W&B run file (run-<id>.wandb) without a W&B server.

The file is a LevelDB-style log (wandb's own format): a 7-byte file header, then 32 KiB blocks of
records, each with a 7-byte header (crc32 uint32, length uint16, type uint8: 1 full, 2 first,
3 middle, 4 last) and a protobuf `Record` as payload.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # block trailer too short for a header: skip
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (2, 3):
            pending = chunk if kind == 2 else pending + chunk
            continue
        payload = pending + chunk if kind == 4 else chunk
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def summarize(path: str | Path) -> dict:
    """The run record (group, tags, name), the config keys, and the final summary values."""
    out: dict = {"group": None, "tags": [], "config": {}, "summary": {}, "history_keys": set()}

    def key_of(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"], out["name"] = record.run.run_group, list(record.run.tags), \
                record.run.display_name
        elif kind == "config":
            out["config"].update({key_of(u): u.value_json for u in record.config.update})
        elif kind == "summary":
            out["summary"].update({key_of(u): u.value_json for u in record.summary.update})
        elif kind == "history":
            out["history_keys"].update(key_of(item) for item in record.history.item)
    return out
