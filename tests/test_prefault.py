"""Fresh memory for a download: faulted in ahead of the receiver, never written by the helper."""

from __future__ import annotations

import ctypes
import sys
import time

import numpy as np
import pytest

from jupyter_gpu import prefault
from jupyter_gpu.prefault import PrefaultedBuffer


def _resident_bytes(buffer: object) -> int:
    """Rss of the mapping that holds ``buffer``, from /proc/self/smaps."""
    anchor = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]
    address = ctypes.addressof(anchor)
    del anchor
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(part, 16) for part in first.split("-"))
                inside = start <= address < end
            elif inside and first == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_what_the_receiver_writes_arrives_whole_while_the_helper_faults_ahead() -> None:
    data = np.random.default_rng(5).integers(0, 255, 3 * prefault.STRETCH_BYTES + 12345, dtype=np.uint8)
    fresh = PrefaultedBuffer(data.nbytes)
    view = memoryview(fresh.buffer)
    with fresh:
        for offset in range(0, data.nbytes, 1_000_003):  # as a socket hands it over: odd pieces
            piece = data[offset : offset + 1_000_003]
            view[offset : offset + len(piece)] = piece.tobytes()
            fresh.reached = offset + len(piece)
    assert np.array_equal(np.frombuffer(fresh.buffer, dtype=np.uint8), data)
    view.release()
    fresh.buffer.close()  # the helper let go of it: nothing else holds the memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_the_helper_makes_the_memory_resident_before_the_receiver_gets_there() -> None:
    fresh = PrefaultedBuffer(2 * prefault.STRETCH_BYTES)
    with fresh:
        deadline = time.monotonic() + 10
        while _resident_bytes(fresh.buffer) < fresh.nbytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _resident_bytes(fresh.buffer) >= fresh.nbytes
    assert not any(fresh.buffer[:: 2**20])  # made present, never written: still zeros
    fresh.buffer.close()
