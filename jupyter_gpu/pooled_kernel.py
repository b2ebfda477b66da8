"""Pieces of ipykernel the pool swaps in for its kernels (``pool_manager.backend.kernel_arguments``).

They change what a kernel costs per execute, never what a cell sees: every pooled kernel
runs cells back to back for one user, and on a small machine the kernel's own bookkeeping
per execute is what limits how many executes per second the pool serves.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
from importlib.metadata import version
from typing import Any

from ipykernel import ipkernel
from ipykernel.iostream import IOPubThread, OutStream
from ipykernel.ipkernel import IPythonKernel

from .protocol import PULL_METADATA_KEY

try:
    from ipykernel.kernelbase import _accepts_parameters
except ImportError:  # another ipykernel: see supported()
    _accepts_parameters = None  # type: ignore[assignment]


#: The ipykernel releases whose internals the classes below copy or call: OutStream's
#: ``_flush`` (reproduced in ``PooledOutStream._flush``, with its ``_flush_pending``,
#: ``_subprocess_flush_pending``, ``echo`` and ``_hooks``), ``_flush_buffers`` and
#: ``_buffer_lock``, IOPubThread's ``_really_send`` and ``schedule``, Kernel's
#: ``_publish_execute_input``, and ``kernelbase._accepts_parameters`` as ``ipkernel`` looks
#: it up. Private names may change meaning in any minor release, so a release outside this
#: range runs stock kernels until someone has read its code and widened the range.
WRITTEN_FOR = ((7, 4), (7, 5))


def written_for(ipykernel_version: str) -> bool:
    """Whether ``ipykernel_version`` lies in ``WRITTEN_FOR`` (lowest included, highest not)."""
    numbers = re.match(r"(\d+)\.(\d+)", ipykernel_version)
    if numbers is None:
        return False
    release = (int(numbers.group(1)), int(numbers.group(2)))
    return WRITTEN_FOR[0] <= release < WRITTEN_FOR[1]


def supported(ipykernel_version: str | None = None) -> bool:
    """Whether the pool may swap these classes in for ipykernel ``ipykernel_version`` (default:
    the installed one): a release they were written for, with the internals they use present.

    The pool launches stock kernels otherwise: slower per execute, never broken.
    """
    needed = [
        (OutStream, ("_flush_buffers", "_flush")),
        (IOPubThread, ("_really_send", "schedule")),
        (IPythonKernel, ("_publish_execute_input",)),
    ]
    return (
        written_for(ipykernel_version if ipykernel_version is not None else version("ipykernel"))
        and _accepts_parameters is not None
        and hasattr(ipkernel, "_accepts_parameters")
        and all(hasattr(cls, name) for cls, names in needed for name in names)
    )

#: Stream text goes out in messages of at most about this many characters (cut after a
#: newline): a single 50 MB write as one message leaves every stage after the kernel (the
#: gateway, the notebook's magic, its own kernel, the browser) idle until the kernel has
#: encoded all of it, and then each in turn; in pieces they work at the same time.
STREAM_PIECE = 1 << 16


def pieces(text: str, size: int = STREAM_PIECE) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``size`` characters, after a newline
    where one is near (a line split across messages still reads the same once joined)."""
    if len(text) <= size:
        return [text]
    out = []
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        out.append(text[start:end])
        start = end
    return out


class _SendNow:
    """Stands for the IOPub thread, on that thread: sends at once instead of queueing."""

    def __init__(self, pub_thread: IOPubThread) -> None:
        self.pub_thread = pub_thread

    def send_multipart(self, *args: Any, **kwargs: Any) -> None:
        self.pub_thread._really_send(*args, **kwargs)  # type: ignore[no-untyped-call]


class PooledOutStream(OutStream):
    """``sys.stdout`` / ``sys.stderr`` whose ``flush()`` hands the text to the IOPub thread
    without waiting for it.

    ipykernel's flush from the main thread schedules the send on the IOPub thread and then
    blocks until that thread has run, even when nothing was written: two thread hand-offs
    and about four context switches per flush. A kernel flushes both streams twice per
    execute (~0.6 ms of CPU and wall time for a cell that printed nothing), and every
    ``print(..., flush=True)`` pays it too (10,000 of them: ~3 s of kernel CPU).

    Here a flush with nothing pending returns at once, and one with text queues the send
    and returns (one queued send at a time; later text joins it). The order clients see is
    unchanged: anything the main thread publishes after the flush (the reply's idle
    status) queues behind it, and the send runs in place on the IOPub thread rather than
    being queued again at the back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Counted under _buffer_lock, as writes may come from any thread. Set before the
        # base class starts the thread that forwards output written to the fd.
        self._writes = 0  # write() calls whose text is in a buffer
        self._handed_over = 0  # of those, how many a _flush has taken out and queued
        self._flush_queued = False  # a _flush is queued on the IOPub thread and not begun
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def write(self, string: str) -> int | None:  # type: ignore[override]
        written = super().write(string)
        # Counted after the text is buffered: a _flush that sees this count takes it too.
        with self._buffer_lock:
            self._writes += 1
        return written

    def flush(self) -> None:
        pub_thread = self.pub_thread
        thread = pub_thread.thread if pub_thread is not None else None
        if thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
            super().flush()  # type: ignore[no-untyped-call]
            return
        with self._buffer_lock:
            if self._handed_over == self._writes or self._flush_queued:
                return  # all sent already, or a queued _flush will take this text too
            self._flush_queued = True
        pub_thread.schedule(self._flush)

    def _flush(self) -> None:
        with self._buffer_lock:
            self._flush_queued = False
            writes = self._writes
        # As ipykernel 7.4's OutStream._flush, but on the IOPub thread the message is sent
        # in place, ahead of whatever the main thread queued after this flush.
        self._flush_pending = False
        self._subprocess_flush_pending = False
        if self.echo is not None:
            try:
                self.echo.flush()
            except OSError as e:
                if self.echo is not sys.__stderr__:
                    print(f"Flush failed: {e}", file=sys.__stderr__)
        pub_thread = self.pub_thread
        io_thread = pub_thread.thread if pub_thread is not None else None
        on_io_thread = io_thread is not None and io_thread.ident == threading.get_ident()
        destination: Any = _SendNow(pub_thread) if on_io_thread else pub_thread
        for parent, data in self._flush_buffers():  # type: ignore[no-untyped-call]
            for piece in pieces(data) if data else ():
                self.session.pid = os.getpid()
                msg = self.session.msg("stream", {"name": self.name, "text": piece}, parent=parent)
                for hook in self._hooks:
                    msg = hook(msg)
                    if msg is None:
                        break
                else:
                    self.session.send(destination, msg, ident=self.topic)
        # Everything counted before the buffers were rotated is now sent or queued.
        self._handed_over = writes


class PooledKernel(IPythonKernel):
    """IPythonKernel with less bookkeeping per execute (``--IPKernelApp.kernel_class``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        # traitlets leaves the application's logger at DEBUG and filters at its handler, so
        # each of the ~8 log.debug calls per execute builds a LogRecord (and walks the stack
        # for its caller) only for the handler to drop it. The logger's own level set to the
        # lowest its handlers pass drops them before any of that; what is logged is the same.
        log = self.log
        if isinstance(log, logging.Logger) and log.handlers:
            floor = min(handler.level for handler in log.handlers)
            if log.level < floor:
                log.setLevel(floor)
        # IPythonKernel.do_execute inspects run_cell_async's signature on every execute
        # (~50 us); a signature is a function's, so it is looked up once per function.
        ipkernel._accepts_parameters = _accepts_parameters_cached  # type: ignore[attr-defined]

    def _publish_execute_input(self, code: str, parent: dict[str, Any], execution_count: int) -> None:
        """Not for the ``%%gpu`` magic's cells (their request carries its pull spec): the magic
        has the cell's code and reads nothing of this broadcast, and each IOPub message is a
        hand-off to the IOPub thread, its sends, and a hop through the gateway to the notebook.
        Other clients' cells are echoed as ipykernel does."""
        if PULL_METADATA_KEY in (parent.get("metadata") or {}):
            return
        super()._publish_execute_input(code, parent, execution_count)  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=64)
def _accepts_parameters_of(function: Any, param_names: tuple[str, ...]) -> dict[str, bool]:
    return dict(_accepts_parameters(function, list(param_names)))  # type: ignore[no-untyped-call]


def _accepts_parameters_cached(meth: Any, param_names: list[str]) -> dict[str, bool]:
    function = getattr(meth, "__func__", None)
    if function is None:
        return dict(_accepts_parameters(meth, param_names))  # type: ignore[no-untyped-call]
    return dict(_accepts_parameters_of(function, tuple(param_names)))
