"""Large buffers are not re-read when nothing wrote to them, and every kind of write is seen."""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from jupyter_gpu import serialize, write_tracking
from jupyter_gpu.write_tracking import TRACK_MIN_BYTES, WriteTracker

N = TRACK_MIN_BYTES // 8


class Counting:
    """A digest function that counts how often it had to read the buffer."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self, view: memoryview) -> bytes:
        self.reads += 1
        return xxhash.xxh3_128(view).digest()


@pytest.fixture
def tracker() -> Iterator[WriteTracker]:
    tracker = WriteTracker()
    if not tracker.available:
        pytest.skip(f"this kernel cannot track writes: {tracker._unavailable}")
    yield tracker


def view_of(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")


def test_unchanged_buffer_is_read_once(tracker: WriteTracker) -> None:
    array = np.arange(N, dtype=np.float64)
    digest = Counting()
    first = tracker.digest(view_of(array), digest)
    for _ in range(3):
        assert tracker.digest(view_of(array), digest) == first
    assert digest.reads == 1


@pytest.mark.parametrize("write", [
    lambda a: a.__setitem__(N // 2, -1.0),
    lambda a: a.__setitem__(N - 1, -1.0),  # the last page, which the buffer shares with nothing
    lambda a: a.__iadd__(1.0),
    lambda a: np.copyto(a[:10], 7.0),
])
def test_any_write_in_place_is_seen(tracker: WriteTracker, write: object) -> None:
    array = np.ones(N)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    write(array)  # type: ignore[operator]
    after = tracker.digest(view_of(array), digest)
    assert digest.reads == 2
    assert after != before
    assert after == xxhash.xxh3_128(view_of(array)).digest()


def test_writes_by_the_operating_system_are_seen(tracker: WriteTracker) -> None:
    array = np.ones(N)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    with tempfile.TemporaryFile() as source:
        source.write(b"\x07" * 10000)
        source.seek(0)
        source.readinto(view_of(array)[5000:15000])  # type: ignore[attr-defined]
    assert tracker.digest(view_of(array), digest) != before


def test_pages_never_touched_before_are_protected_too(tracker: WriteTracker) -> None:
    array = np.zeros(N)  # calloc: fresh pages, not faulted in yet
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    array[N // 3] = 5.0
    assert tracker.digest(view_of(array), digest) != before


def test_a_new_array_at_the_same_address_is_hashed_again(tracker: WriteTracker) -> None:
    digest = Counting()
    array = np.ones(N)
    tracker.digest(view_of(array), digest)
    del array
    other = np.full(N, 2.0)  # the allocator is free to hand back the same address
    assert tracker.digest(view_of(other), digest) == xxhash.xxh3_128(view_of(other)).digest()
    assert digest.reads == 2


def test_write_from_another_thread_is_seen(tracker: WriteTracker) -> None:
    array = np.ones(N)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    thread = threading.Thread(target=array.__setitem__, args=(123, 9.0))
    thread.start()
    thread.join()
    assert tracker.digest(view_of(array), digest) != before


def staged_mapping(directory: str, flags: int) -> tuple[mmap.mmap, str]:
    """A file like a pooled kernel's claimed upload: written, mapped, then unlinked."""
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.ftruncate(fd, TRACK_MIN_BYTES)
        mapping = mmap.mmap(fd, TRACK_MIN_BYTES, flags=flags)
    finally:
        os.close(fd)
    os.unlink(path)
    return mapping, path


def test_a_claimed_upload_in_the_trusted_directory_is_tracked(tracker: WriteTracker, tmp_path: Path) -> None:
    tracker.trust_deleted_files_in(str(tmp_path))
    mapping, _ = staged_mapping(str(tmp_path), mmap.MAP_PRIVATE)
    array = np.frombuffer(mapping, dtype=np.float64)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    assert tracker.digest(view_of(array), digest) == before and digest.reads == 1
    array[N // 2] = 3.0  # a page that was never faulted in
    assert tracker.digest(view_of(array), digest) != before
    del array


@pytest.mark.parametrize("flags", [mmap.MAP_SHARED, mmap.MAP_PRIVATE])
def test_file_mappings_anyone_else_could_write_are_hashed_every_time(tracker: WriteTracker, tmp_path: Path,
                                                                     flags: int) -> None:
    mapping, _ = staged_mapping(str(tmp_path), flags)  # no trusted directory: could be anyone's file
    array = np.frombuffer(mapping, dtype=np.float64)
    digest = Counting()
    tracker.digest(view_of(array), digest)
    tracker.digest(view_of(array), digest)
    assert digest.reads == 2
    del array


def test_a_memmap_written_through_the_file_is_seen(tracker: WriteTracker, tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * TRACK_MIN_BYTES)
    array = np.memmap(path, dtype=np.float64, mode="r+")
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    with open(path, "r+b") as other_writer:  # as another process would
        other_writer.seek(8 * 1000)
        other_writer.write(b"\x01" * 8)
    assert tracker.digest(view_of(array), digest) != before
    del array


def test_shared_memory_written_by_a_child_process_is_seen(tracker: WriteTracker) -> None:
    shared = mmap.mmap(-1, TRACK_MIN_BYTES, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(shared, dtype=np.float64)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    pid = os.fork()
    if pid == 0:  # the child writes the shared page and leaves at once
        array[10] = 1.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert tracker.digest(view_of(array), digest) != before
    del array


def test_an_array_and_a_slice_of_it_do_not_hide_each_others_writes(tracker: WriteTracker) -> None:
    array = np.zeros(N + N // 4)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    array[N // 8] = 1.0
    tracker.digest(view_of(array[N // 16:]), digest)  # re-protects pages the whole array is on
    assert tracker.digest(view_of(array), digest) != before


def test_a_forked_child_sees_its_own_writes_and_leaves_the_parent_right(tracker: WriteTracker) -> None:
    array = np.zeros(N)
    digest = Counting()
    before = tracker.digest(view_of(array), digest)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        array[7] = 2.0  # the child's private copy
        ok = tracker.digest(view_of(array), Counting()) == xxhash.xxh3_128(view_of(array)).digest()
        os.write(write_end, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    os.close(write_end)
    assert tracker.digest(view_of(array), digest) == before  # the parent's array never changed
    array[9] = 3.0
    assert tracker.digest(view_of(array), digest) != before


def test_fingerprint_is_the_same_with_and_without_tracking(tracker: WriteTracker,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides must agree on a value's fingerprint, whichever of them can track writes."""
    value = {"big": np.arange(N + 3, dtype=np.float64), "small": np.arange(10)}
    monkeypatch.setattr(write_tracking, "tracker", tracker)
    tracked = serialize.fingerprint(*serialize.dump(value))
    assert serialize.fingerprint(*serialize.dump(value)) == tracked
    monkeypatch.setattr(write_tracking, "TRACK_MIN_BYTES", 2**62)
    assert serialize.fingerprint(*serialize.dump(value)) == tracked
    value["big"][7] = 0.5
    monkeypatch.setattr(write_tracking, "TRACK_MIN_BYTES", TRACK_MIN_BYTES)
    assert serialize.fingerprint(*serialize.dump(value)) != tracked


def test_unavailable_tracking_falls_back_to_hashing() -> None:
    tracker = WriteTracker()
    tracker._unavailable = "pretend this kernel is too old"
    digest = Counting()
    array = np.ones(N)
    tracker.digest(view_of(array), digest)
    tracker.digest(view_of(array), digest)
    assert digest.reads == 2


def test_tracking_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(write_tracking.DISABLE_ENV, "0")
    tracker = WriteTracker()
    digest = Counting()
    array = np.ones(N)
    tracker.digest(view_of(array), digest)
    tracker.digest(view_of(array), digest)
    assert digest.reads == 2 and not tracker.available


def test_a_remembered_digest_stands_until_a_write(tracker: WriteTracker) -> None:
    """The receiving side takes the sender's digest instead of reading the value again."""
    array = np.ones(N)
    digest = Counting()
    told = xxhash.xxh3_128(view_of(array)).digest()
    tracker.remember(view_of(array), told)
    assert tracker.digest(view_of(array), digest) == told and digest.reads == 0
    array[N - 2] = 0.0
    assert tracker.digest(view_of(array), digest) != told and digest.reads == 1
