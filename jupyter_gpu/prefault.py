"""Fresh memory for a large received value, faulted in by a second thread just ahead of the receiver.

A pulled gigabyte needs a gigabyte of new memory in the notebook's kernel, and on a VM the
kernel's first touch of it costs as much CPU as receiving it (measured on the 2-core VM:
~0.45 s to fault in 1 GB, ~0.3 s to receive it). Faulted in first (MAP_POPULATE) the two
costs add up while the sender waits; faulted in page by page by the receiving copy they
cost more still. Here a helper thread asks the kernel to fault in (MADV_POPULATE_WRITE, a
batch per call, the GIL released) the stretch the receiver reaches next, while the
receiver copies into what is already there: the two run on two cores.

The helper never writes: it only makes pages present, so it cannot race the receiver over
contents. Where MADV_POPULATE_WRITE is missing (Linux < 5.14, another OS) it stops, and
the receiver's own copy faults the pages in.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from typing import Any

#: Bytes faulted in per call: large enough to batch the kernel's work, small enough to
#: stay just ahead of the receiver.
STRETCH_BYTES = 32 * 2**20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class PrefaultedBuffer:
    """Anonymous private memory of ``nbytes``; ``reached`` is how far the receiver has written.

    Use as a context manager around the receive: on exit the helper has stopped and holds
    no reference to the memory, so ``buffer`` can be handed on (or closed).
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buffer = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.reached = 0
        self._stop = threading.Event()
        self._helper = threading.Thread(target=self._fault_ahead, name="jupyter-gpu-prefault", daemon=True)

    def __enter__(self) -> PrefaultedBuffer:
        if _madvise is not None:
            self._helper.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._helper.is_alive():
            self._helper.join()

    def _fault_ahead(self) -> None:
        anchor = ctypes.c_char.from_buffer(self.buffer)  # the address (an export: the map stays)
        try:
            base, offset = ctypes.addressof(anchor), 0
            while not self._stop.is_set():
                offset = max(offset, self.reached)  # behind the receiver, its copy faulted them in
                if offset >= self.nbytes:
                    return
                length = min(STRETCH_BYTES, self.nbytes - offset)
                if _madvise(base + offset, length, _MADV_POPULATE_WRITE) != 0:
                    return  # not offered here: the receiver faults pages in itself
                offset += length
        finally:
            del anchor


def _libc_madvise() -> Any:
    if not sys.platform.startswith("linux"):  # the advice's number means something else elsewhere
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()
