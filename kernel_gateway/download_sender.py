"""Pulled values on their way out: what the kernel writes into the FIFO it offered, spliced
into the client's socket (splice(2): the bytes never enter Python, and no file holds them).

Standard library only (no tornado, no gateway state), so that whatever serves a kernel's
staging directory can send from it the same way: this gateway for its local kernels, and
later a per-node service next to kernels on Ray nodes.

The FIFO was made by the kernel, a stranger's code, in a directory it can write: it is
opened without following links and without blocking, and served only if it is a FIFO with
one name. So the gateway only ever passes on bytes the kernel itself writes, never a file
the kernel names (a link to the gateway's database, say). It is unlinked as soon as it is
open, so that whatever happens next (sent, client gone, kernel dead) nothing stays behind.
A kernel that stops writing is given up on after STALL_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import stat
import struct
from concurrent.futures import ThreadPoolExecutor

from jupyter_gpu.transfer import DOWNLOAD_ID

log = logging.getLogger(__name__)

#: A download whose client takes nothing, or whose kernel writes nothing, for this long is abandoned.
STALL_SECONDS = 30.0
#: Downloads sent at once (each holds a worker thread while it sends); more wait their turn.
MAX_SENDING = 8
#: Bytes per splice(2) call: the kernel's pipe holds this much.
_SEND_BYTES = 2**20


class DownloadUnavailable(Exception):
    """The named download cannot be served; the message says why (for a 404)."""


def open_download(staging: str, download_id: str) -> int:
    """An open, non-blocking descriptor of the kernel's offered FIFO ``download_id``, already unlinked."""
    if not DOWNLOAD_ID.fullmatch(download_id):
        raise DownloadUnavailable(f"{download_id!r} is not a download id (pull- and 32 hex digits)")
    path = os.path.join(staging, download_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # gone (fetched already, or the kernel ended), or a link
        raise DownloadUnavailable(f"download {download_id} is not in the kernel's staging area "
                                  f"({os.strerror(exc.errno or 0)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISFIFO(info.st_mode) or info.st_nlink != 1:
            raise DownloadUnavailable(f"download {download_id} is not a pull the kernel offered")
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DownloadSender:
    """Sends one gateway's downloads on worker threads; cuts them when the gateway stops."""

    def __init__(self) -> None:
        self._workers = ThreadPoolExecutor(MAX_SENDING, thread_name_prefix="jupyter-gpu-download")
        self._active: set[socket.socket] = set()

    async def send(self, sock: socket.socket, fd: int, nbytes: int) -> None:
        """Send ``nbytes`` of ``fd`` on ``sock`` from a worker thread; closes both."""
        self._active.add(sock)
        try:
            await asyncio.get_running_loop().run_in_executor(self._workers, _send, sock, fd, nbytes)
        except RuntimeError:  # the pool is shut down: the gateway is stopping
            os.close(fd)
            raise
        finally:
            self._active.discard(sock)
            sock.close()

    def abort(self) -> None:
        """Cut every download in progress (gateway shutdown)."""
        for sock in list(self._active):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._workers.shutdown(wait=False, cancel_futures=True)


def _send(sock: socket.socket, fd: int, nbytes: int) -> None:
    read_end = select.poll()
    read_end.register(fd, select.POLLIN)
    try:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(STALL_SECONDS), 0))
        sent = 0
        while sent < nbytes:
            if not read_end.poll(STALL_SECONDS * 1000):
                raise TimeoutError(f"the kernel wrote nothing for {STALL_SECONDS:.0f} s after {sent:,} bytes")
            try:
                moved = os.splice(fd, sock.fileno(), min(_SEND_BYTES, nbytes - sent))
            except BlockingIOError:
                continue
            if moved == 0:  # no writer any more: the kernel ended
                raise ConnectionError(f"the kernel's pull ended after {sent:,} of {nbytes:,} bytes")
            sent += moved
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:  # the client or the kernel went away, or stalled
        log.warning("download of %d bytes cut: %s", nbytes, exc)
    finally:
        os.close(fd)
