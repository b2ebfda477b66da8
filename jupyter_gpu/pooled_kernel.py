"""Pieces of ipykernel the pool swaps in for its kernels (``pool_manager.backend.KERNEL_ARGUMENTS``).

They change what a kernel costs per execute, never what a cell sees: every pooled kernel
runs cells back to back for one user, and on a small machine the kernel's own bookkeeping
per execute is what limits how many executes per second the pool serves.
"""

from __future__ import annotations

import threading
from typing import Any

from ipykernel.iostream import OutStream


class PooledOutStream(OutStream):
    """``sys.stdout`` / ``sys.stderr`` whose ``flush()`` costs nothing when nothing is pending.

    ipykernel flushes both streams twice per execute request (before the reply and before
    the idle status). Each flush from the main thread schedules the send on the IOPub
    thread and then blocks until that thread has run: two thread hand-offs and about four
    context switches, ~0.6 ms of CPU and wall time per execute, even for a cell that printed
    nothing. Here a flush returns at once when every write so far has already been handed
    to the IOPub thread: messages the main thread publishes afterwards (the reply's idle
    status) queue behind that output, so the order clients see is unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Both counted under _buffer_lock: writes may come from any thread. Set before the
        # base class starts the thread that forwards output written to the fd.
        self._writes = 0  # write() calls whose text is in a buffer
        self._handed_over = 0  # of those, how many a _flush has taken out and queued
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def write(self, string: str) -> int | None:  # type: ignore[override]
        written = super().write(string)
        # Counted after the text is buffered: a _flush that sees this count took it too.
        with self._buffer_lock:
            self._writes += 1
        return written

    def _flush(self) -> None:
        with self._buffer_lock:
            writes = self._writes
        super()._flush()  # type: ignore[no-untyped-call]
        # Everything counted before the buffers were rotated is now queued for sending.
        self._handed_over = writes

    def flush(self) -> None:
        pub_thread = self.pub_thread
        thread = pub_thread.thread if pub_thread is not None else None
        if thread is not None and thread.is_alive() and thread.ident != threading.get_ident():
            with self._buffer_lock:
                if self._handed_over == self._writes:
                    return
        super().flush()  # type: ignore[no-untyped-call]
