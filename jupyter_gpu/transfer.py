"""Large values cross the websocket in pieces, both ways, and are put back together here.

One multi-gigabyte websocket message is slow at every hop (one frame is assembled,
unmasked and copied whole) and must fit the gateway's message limit; pieces of a few
megabytes stream through instead. A transfer is a list of blobs (pickle streams and their
out-of-band buffers); each message carries some pieces ``[blob, offset, length]`` and the
first one also says how large every blob is.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from typing import Any

#: Bytes of buffers per message: large enough to amortise per-message costs, small
#: enough to pipeline through client, gateway and kernel.
CHUNK_BYTES = 8 * 2**20

Piece = tuple[int, int, int, memoryview]


def split(blobs: Sequence[Any], chunk: int = CHUNK_BYTES) -> Iterator[tuple[dict[str, Any], list[memoryview]]]:
    """Yield ``(data, buffers)`` per message; ``data`` has seq, last, pieces (and sizes first)."""
    views = [memoryview(blob).cast("B") for blob in blobs]
    batches: list[list[Piece]] = [[]]
    size = 0
    for index, view in enumerate(views):
        for offset in range(0, max(1, len(view)), chunk):
            piece = view[offset : offset + chunk]
            if size and size + len(piece) > chunk:
                batches.append([])
                size = 0
            batches[-1].append((index, offset, len(piece), piece))
            size += len(piece)
    for seq, batch in enumerate(batches):
        data: dict[str, Any] = {"seq": seq, "last": seq == len(batches) - 1,
                                "pieces": [[i, o, n] for i, o, n, _ in batch]}
        if seq == 0:
            data["sizes"] = [len(view) for view in views]
        yield data, [piece for *_, piece in batch]


class Assembler:
    """Puts the pieces of one transfer back together; a blob sent whole is not copied."""

    def __init__(self) -> None:
        self.blobs: list[Any] = []
        self.sizes: list[int] = []
        self.complete = False

    def feed(self, data: dict[str, Any], buffers: Sequence[Any]) -> None:
        if data.get("seq", 0) == 0:
            self.sizes = list(data.get("sizes", []))
            self.blobs = [None] * len(self.sizes)
            self.complete = False
        for (index, offset, length), buffer in zip(data.get("pieces", []), buffers, strict=True):
            size = self.sizes[index]
            if offset == 0 and length == size:
                # Whole in one piece: keep it, unless it is read-only (received bytes), since
                # arrays rebuilt on it must be writable like the ones they came from.
                self.blobs[index] = bytearray(buffer) if memoryview(buffer).readonly else buffer
                continue
            if self.blobs[index] is None:
                # Anonymous mmap, faulted in by the kernel in one go: bytearray(size) would
                # memset it first, and a plain mmap takes a page fault per 4 KiB written.
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
                self.blobs[index] = mmap.mmap(-1, size, flags=flags)
            memoryview(self.blobs[index])[offset : offset + length] = buffer
        if data.get("last", True):
            self.complete = True
