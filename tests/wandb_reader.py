"""A small reader for W&B's offline transaction log (``run-*.wandb``); wandb 0.31 ships none.

The file is a 7-byte header (``":W&B"``, magic ``0xBEE1``, version 0) followed by 32 KiB blocks of
LevelDB-style records: ``crc32 (uint32) | length (uint16) | type (uint8) | data``, where a record that does not
fit in a block is split into FIRST/MIDDLE/LAST pieces and a block tail shorter than a record header is
padding. Each whole record is a protobuf ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class TruncatedLog(ValueError):
    """The log ends inside a record: its writer (wandb's service process) has not flushed it all yet."""


def read_records(path: str | Path, wait_s: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run's log. wandb's service process writes the log on its own time, even
    after ``finish()`` returns: wait up to ``wait_s`` for it to end with the run's ``exit`` record."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = _parse(path, Path(path).read_bytes())
        except TruncatedLog:
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise TruncatedLog(f"{path}: no complete log ending with the run's exit record after {wait_s} s")
        time.sleep(0.1)


def _parse(path: str | Path, data: bytes) -> list[wandb_internal_pb2.Record]:
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    records, pending, pos = [], b"", 7
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0 and length == 0:  # zero fill at the end of a block
            pos += left
            continue
        if pos + RECORD_HEADER + length > len(data):
            raise TruncatedLog(f"{path}: ends inside the record at byte {pos}")
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at byte {pos - length - RECORD_HEADER}")
        if kind == FULL:
            whole = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            whole, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown record type {kind}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        records.append(record)
    if pending:
        raise TruncatedLog(f"{path}: ends inside a record split across blocks")
    return records


def history_rows(path: str | Path) -> list[dict]:
    """The run's history rows as dicts of key -> decoded JSON value."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path: str | Path) -> dict:
    """The run's display name, group, exit code and config (every config update merged, values decoded)."""
    info: dict = {"name": None, "group": None, "exit_code": None, "config": {}}

    def merge(update) -> None:
        for item in update:
            key = item.key or "/".join(item.nested_key)
            info["config"][key] = json.loads(item.value_json)

    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["name"], info["group"] = record.run.display_name, record.run.run_group
            merge(record.run.config.update)
        elif kind == "config":
            merge(record.config.update)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    return info
