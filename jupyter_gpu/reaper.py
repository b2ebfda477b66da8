"""Frees replaced large values on a background thread, off the cell's critical path.

Rebinding a name to a freshly pushed (or pulled) gigabyte frees the old gigabyte, and
unmapping it costs ~0.15 s (the kernel returns 262,144 pages). Python's mmap releases the
GIL while it unmaps, so letting the last reference go on another thread frees the memory
while the cell goes on. Values still referenced elsewhere are unaffected: this thread only
holds one more reference, briefly.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

_dropped: queue.SimpleQueue[Any] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def release_later(value: Any) -> None:
    """Hand over a reference; the caller drops its own right after."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_drain, name="jupyter-gpu-reaper", daemon=True)
            _thread.start()
    _dropped.put(value)


def _drain() -> None:
    while True:
        value = _dropped.get()
        del value  # the last reference, if it was: its memory is freed here, not on the cell's thread
