"""Pieces of a transfer go out in bounded messages and come back together byte for byte."""

from __future__ import annotations

import gc
import os
import stat
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jupyter_gpu import transfer
from jupyter_gpu.transfer import Assembler, DownloadOffer, split


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


@pytest.fixture(params=["disk", "memory"])
def staging_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A staging directory on disk or in memory (/dev/shm): both are mapped privately."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        yield Path(directory)


def test_staged_blobs_are_mapped_from_the_staging_dir_and_unlinked(staging_dir: Path) -> None:
    tmp_path = staging_dir
    upload = "ab" * 16
    (tmp_path / upload).write_bytes(b"x" * 5000)
    data, pieces = next(split([b"head", b"x" * 5000], staged={1: upload}))
    assert data["staged"] == {"1": upload} and [len(p) for p in pieces] == [4]  # no piece of the staged blob
    assembler = Assembler(str(tmp_path))
    assembler.feed(data, pieces)
    assert assembler.complete and bytes(assembler.blobs[1]) == b"x" * 5000
    assert not (tmp_path / upload).exists()
    memoryview(assembler.blobs[1])[0] = ord("y")  # writable, like the array it came from


@pytest.mark.parametrize("upload", ["../../etc/passwd", "AB" * 16, 7])
def test_a_staged_name_that_is_not_an_upload_id_is_refused(tmp_path: Path, upload: object) -> None:
    with pytest.raises(ValueError, match="is not an upload id"):
        Assembler(str(tmp_path)).feed({"seq": 0, "last": True, "sizes": [10], "pieces": [], "staged": {"0": upload}},
                                      [])


def test_a_staged_upload_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    upload = "cd" * 16
    (tmp_path / upload).write_bytes(b"short")
    with pytest.raises(ValueError, match="holds 5 bytes, not 10"):
        Assembler(str(tmp_path)).feed({"seq": 0, "last": True, "sizes": [10], "pieces": [], "staged": {"0": upload}},
                                      [])


@pytest.mark.parametrize("kind", ["writable array", "read-only bytes", "no vmsplice"])
def test_a_download_offer_delivers_exactly_its_bytes_then_ends(tmp_path: Path, kind: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A writable buffer's pages go into the pipe by reference; read-only bytes, or a system
    # without vmsplice, are copied into it: the reader gets the same bytes either way.
    data = np.random.default_rng(3).integers(0, 255, 3 * 2**20 + 7, dtype=np.uint8)
    if kind == "no vmsplice":
        monkeypatch.setattr(transfer, "_libc_vmsplice", None)
    offer = DownloadOffer(str(tmp_path), data.tobytes() if kind == "read-only bytes" else data)
    path = tmp_path / offer.id
    assert stat.S_ISFIFO(path.lstat().st_mode) and path.lstat().st_mode & 0o777 == 0o600
    fd = os.open(path, os.O_RDONLY)  # as the gateway opens it: what the kernel wrote, nothing else
    try:
        received = bytearray()
        while chunk := os.read(fd, 2**20):
            received += chunk
    finally:
        os.close(fd)
    assert bytes(received) == data.tobytes()  # and then end of file: the offer closed its end
    _wait_until_gone(path)


def test_a_download_offer_keeps_the_value_alive_until_it_is_dropped(tmp_path: Path) -> None:
    # The pipe and the gateway's socket refer to the value's pages after the offer fed them:
    # freed and reused meanwhile (a CUDA tensor's host copy exists only for the pull), the
    # client would receive whatever was written there next.
    data = np.arange(5 * 2**20, dtype=np.uint8)
    alive = weakref.ref(data)
    offer = DownloadOffer(str(tmp_path), data)
    del data
    fd = os.open(tmp_path / offer.id, os.O_RDONLY)
    try:
        while os.read(fd, 2**20):
            pass
    finally:
        os.close(fd)
    _wait_until_gone(tmp_path / offer.id)  # fed whole, the feeding thread is done with it
    assert alive() is not None
    del offer
    gc.collect()
    assert alive() is None


def test_a_download_offer_nobody_fetches_is_withdrawn_when_cancelled(tmp_path: Path) -> None:
    offer = DownloadOffer(str(tmp_path), np.ones(5 * 2**20, dtype=np.uint8))
    assert (tmp_path / offer.id).exists()
    offer.cancelled.set()
    _wait_until_gone(tmp_path / offer.id)


def _wait_until_gone(path: Path) -> None:
    deadline = time.monotonic() + 10
    while path.exists() or path.is_symlink():
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.05)
