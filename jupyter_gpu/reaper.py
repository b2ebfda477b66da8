"""Frees replaced large values on a background thread, off the cell's critical path.

Rebinding a name to a freshly pushed (or pulled) gigabyte frees the old gigabyte, and
unmapping it costs ~0.15 s (the kernel returns 262,144 pages). Python's mmap releases the
GIL while it unmaps, so letting the last reference go on another thread frees the memory
while the cell goes on. Values still referenced elsewhere are unaffected: this thread only
holds one more reference, briefly.

Values known to be small are let go on the spot: handing one over wakes the thread, which
cProfile showed costing ~0.3-1 ms per value on a busy 2-core VM (more than freeing a
megabyte), and a %%gpu cell rebinds a few of them every time.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

_dropped: queue.SimpleQueue[Any] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


#: Values of fewer bytes than this are not handed over.
SMALL_BYTES = 16 * 2**20


def release_later(value: Any) -> None:
    """Hand over a reference; the caller drops its own right after."""
    global _thread
    size = _known_nbytes(value)
    if size is not None and size < SMALL_BYTES:
        return
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_drain, name="jupyter-gpu-reaper", daemon=True)
            _thread.start()
    _dropped.put(value)


def _known_nbytes(value: Any) -> int | None:
    """Bytes an array, tensor, buffer, string or number holds; None for anything else (a
    container may hold gigabytes)."""
    if value is None or isinstance(value, int | float | complex):
        return 0
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    if not hasattr(type(value), "nbytes"):  # looked up on the type: no proxy's __getattr__ runs
        return None
    try:
        nbytes = value.nbytes
    except Exception:  # a property that raises: size unknown
        return None
    return nbytes if isinstance(nbytes, int) else None


def _drain() -> None:
    while True:
        value = _dropped.get()
        del value  # the last reference, if it was: its memory is freed here, not on the cell's thread
