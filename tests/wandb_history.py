"""Read the history keys of an offline W&B run (.wandb file) without the network.

The file is a 7-byte W&B header followed by LevelDB-log framed protobuf `Record`s (the format
of wandb's former sdk/internal/datastore.py): 32 KiB blocks, each chunk with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7


def read_records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history_keys(run_dir: str | Path, expect: str | None = None, timeout_s: float = 30) -> set[str]:
    """The keys logged to the run's history. With `expect`, read again until that key is there
    or `timeout_s` passed: wandb's service process may still be writing the file on a busy
    machine when run.finish() has returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        (wandb_file,) = Path(run_dir).glob("run-*.wandb")
        keys = set()
        for record in read_records(wandb_file):
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        if expect is None or expect in keys or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)
