"""The snapshot file's layout, shared by the kernel (writes and loads it) and the gateway
(reads only its header: the gateway never unpickles what a kernel wrote).

One file: ``MAGIC | header length (u64 LE) | header (JSON) | pickle stream | buffer 0 | ...``.
The pickle stream and every out-of-band buffer start at an ALIGN boundary, so that a
mapped file hands numpy and torch aligned memory without a copy. Offsets in the header
count from the first byte after the header's padding (``data_offset``).

Standard library only: the gateway loads it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MAGIC = b"JGPUSNP1"
FORMAT = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sQ")
#: The gateway reads the header of a file a kernel (a stranger's code) wrote: bounded.
HEADER_LIMIT = 16 * 2**20

#: Under the kernel's staging directory: where the gateway puts the snapshot a new kernel
#: restores (RESTORE_NAME) and where a kernel writes the snapshot the gateway asked for.
#: A subdirectory, so the helper's sweep of abandoned uploads (plain files) passes it by.
SNAPSHOT_SUBDIR = "snapshot"
RESTORE_NAME = "restore"


class SnapshotFormatError(ValueError):
    """Not a snapshot file, or a damaged one."""


def padding(position: int) -> int:
    return -position % ALIGN


def prefix(header: bytes) -> bytes:
    """The bytes before the data: magic, header length, header, padding."""
    head = _PREFIX.pack(MAGIC, len(header)) + header
    return head + b"\0" * padding(len(head))


def data_offset(header_length: int) -> int:
    end = _PREFIX.size + header_length
    return end + padding(end)


def read_header(path: str) -> tuple[dict[str, Any], int]:
    """The header of the snapshot at ``path`` and the offset its data starts at.

    Checks that the file is as long as the header says, so a file cut short (a full disk,
    an interrupted copy) is never taken for a whole snapshot.
    """
    with open(path, "rb") as file:
        raw = file.read(_PREFIX.size)
        if len(raw) != _PREFIX.size:
            raise SnapshotFormatError(f"{path}: too short to be a snapshot")
        magic, length = _PREFIX.unpack(raw)
        if magic != MAGIC:
            raise SnapshotFormatError(f"{path}: not a jupyter-gpu snapshot")
        if length > HEADER_LIMIT:
            raise SnapshotFormatError(f"{path}: header of {length} bytes exceeds {HEADER_LIMIT}")
        body = file.read(length)
        size = os.fstat(file.fileno()).st_size
    try:
        header = json.loads(body)
    except ValueError as exc:
        raise SnapshotFormatError(f"{path}: damaged header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotFormatError(f"{path}: snapshot format {header.get('format') if isinstance(header, dict) else '?'}"
                                  f" is not {FORMAT}")
    offset = data_offset(length)
    if size < offset + int(header.get("data_bytes", 0)):
        raise SnapshotFormatError(f"{path}: {size} bytes, but its header needs {offset + header['data_bytes']}")
    return header, offset


def summary(header: dict[str, Any]) -> dict[str, Any]:
    """What a listing shows of a snapshot: its variables' names, size, what was not kept."""
    return {
        "names": [str(v.get("name")) for v in header.get("variables", [])][:1000],
        "unsaved": {str(k): str(v)[:300] for k, v in list(header.get("unsaved", {}).items())[:100]},
        "nbytes": int(header.get("data_bytes", 0)),
        "created": float(header.get("created", 0.0)),
    }
