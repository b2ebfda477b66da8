"""Pieces of a transfer go out in bounded messages and come back together byte for byte."""

from __future__ import annotations

import numpy as np

from jupyter_gpu.transfer import Assembler, split


def test_blobs_split_into_bounded_messages_and_reassemble() -> None:
    blobs = [b"small pickle", np.arange(100_000, dtype=np.uint8), b"", bytes(range(256)) * 100]
    messages = list(split(blobs, chunk=4096))
    assert all(sum(len(b) for b in buffers) <= 4096 for _, buffers in messages)
    assert [data["last"] for data, _ in messages] == [False] * (len(messages) - 1) + [True]
    assembler = Assembler()
    for data, buffers in messages:
        assembler.feed(data, [bytes(b) for b in buffers])  # as received: copies, not views
    assert assembler.complete
    assert [bytes(b) for b in assembler.blobs] == [bytes(memoryview(b).cast("B")) for b in blobs]


def test_a_blob_that_fits_one_message_is_not_copied() -> None:
    blob = bytearray(b"x" * 100)
    (data, buffers), = split([blob], chunk=4096)
    assembler = Assembler()
    assembler.feed(data, buffers)
    assert assembler.blobs[0] is buffers[0]


def test_arrays_rebuilt_on_received_bytes_are_writable() -> None:
    import pickle

    from jupyter_gpu import serialize

    stream, buffers = serialize.dump(np.zeros(1000))
    messages = list(split([stream, *buffers]))
    assembler = Assembler()
    for data, pieces in messages:
        assembler.feed(data, [bytes(p) for p in pieces])  # what a socket hands over: immutable
    array = pickle.loads(assembler.blobs[0], buffers=assembler.blobs[1:])
    array[0] = 1.0  # a pulled array behaves like the one the cell made
    assert array[0] == 1.0
