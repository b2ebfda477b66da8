"""One gateway's uploads in progress: how many run (overall and per user), their
connections, and the worker threads that move their bytes into staging files.

An object per gateway, not module state: stopping one gateway cuts its own uploads and
leaves another gateway in the same process (tests run several) untouched.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from jupyter_gpu.protocol import Reason, error_body

from .errors import ApiError

log = logging.getLogger(__name__)

#: An upload that sends nothing for this long is abandoned (its file removed).
STALL_SECONDS = 30.0
#: ... and so is one slower than this on average (after the first STALL_SECONDS).
MIN_RATE = 10e6
#: Uploads at once: overall (one worker thread each, so none ever waits for a thread), and
#: per user (so that one user's stalled clients cannot take them all). Past these the
#: gateway answers 503 before the 101, and the magic sends over the websocket instead.
MAX_UPLOADS = 8
MAX_UPLOADS_PER_USER = 2
#: Bytes moved per splice(2) call: the largest pipe an unprivileged process may ask for.
_SPLICE_BYTES = 2**20
_F_SETPIPE_SZ = 1031


class UploadReceiver:
    """Admits, receives and, when the gateway stops, cuts one gateway's uploads."""

    def __init__(self) -> None:
        self._workers = ThreadPoolExecutor(MAX_UPLOADS, thread_name_prefix="jupyter-gpu-upload")
        #: connections of uploads past their 101, so that a stopping gateway need not wait for them
        self._active: set[socket.socket] = set()
        #: uploads admitted and not finished, per user
        self._running: dict[str, int] = {}
        self.stopping = False

    @contextmanager
    def admitted(self, user: str) -> Iterator[None]:
        """Hold one of ``user``'s upload places for the block; 503 when none is left."""
        mine, everyone = self._running.get(user, 0), sum(self._running.values())
        if mine >= MAX_UPLOADS_PER_USER or everyone >= MAX_UPLOADS:
            raise ApiError(503, f"{mine} of your uploads (at most {MAX_UPLOADS_PER_USER}) and "
                                f"{everyone} in all (at most {MAX_UPLOADS}) are in progress; "
                                "send over the websocket for now", Reason.BUSY)
        self._running[user] = mine + 1
        try:
            yield
        finally:
            self._running[user] -= 1
            if not self._running[user]:
                del self._running[user]

    async def receive(self, sock: socket.socket, fd: int, path: str, nbytes: int, upload_id: str) -> None:
        """Move ``nbytes`` from ``sock`` into ``fd`` on a worker thread, answer, close both.

        If the upload cannot be served (the gateway is stopping), ``sock`` is closed here and
        the caller still owns ``fd`` and ``path``.
        """
        self._active.add(sock)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._workers, _serve, sock, fd, path, nbytes, upload_id, self._active
            )
        except BaseException:
            if sock in self._active:  # never reached a worker: nothing else will close it
                self._active.discard(sock)
                sock.close()
            raise

    def check(self, staging: str | None, nbytes_text: str, limit: int) -> int:
        """The upload's size, once it is known to be allowed and to fit; else the ApiError saying why."""
        if not nbytes_text.isdigit() or int(nbytes_text) < 1:
            raise ApiError(400, f"nbytes={nbytes_text!r}: say how many bytes follow, as a whole number of at "
                                "least 1", Reason.BAD_REQUEST)
        nbytes = int(nbytes_text)
        if nbytes > limit:
            raise ApiError(413, f"an upload of {nbytes:,} bytes exceeds this gateway's limit of {limit:,} bytes "
                                "(GatewayApp.max_upload_size); push a smaller value", Reason.TOO_LARGE)
        if staging is None or self.stopping:
            raise ApiError(501, "this gateway's kernels cannot take uploads: send the data over the kernel "
                                "websocket instead", Reason.UNSUPPORTED)
        free = _free_bytes(staging)
        if nbytes > free:
            raise ApiError(507, f"an upload of {nbytes:,} bytes does not fit: the staging area {staging} has "
                                f"{free:,} bytes free; it goes over the websocket instead", Reason.NO_SPACE)
        return nbytes

    def abort(self) -> None:
        """Cut every upload in progress and refuse new ones (gateway shutdown)."""
        self.stopping = True
        for sock in list(self._active):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._workers.shutdown(wait=False, cancel_futures=True)


def _serve(sock: socket.socket, fd: int, path: str, nbytes: int, upload_id: str, active: set[socket.socket]) -> None:
    """After the 101, in a worker thread: take the bytes, answer one JSON line, close."""
    try:
        try:
            sock.setblocking(True)
            # Timeouts on the descriptor itself, so that splice(2) gives up as recv would.
            stall = struct.pack("ll", int(STALL_SECONDS), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
            deadline = time.monotonic() + STALL_SECONDS + nbytes / MIN_RATE
            (_splice_into if hasattr(os, "splice") else _copy_into)(sock, fd, nbytes, deadline)
            result: dict[str, Any] = {"upload": upload_id, "nbytes": nbytes}
        except Exception as exc:
            unlink_quietly(path)
            log.warning("upload %s of %d bytes failed: %s", upload_id, nbytes, exc)
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            result = error_body(f"the upload of {nbytes:,} bytes did not complete: {exc}",
                                Reason.NO_SPACE if full else Reason.UPLOAD_FAILED)
        finally:
            close_quietly(fd)
        try:
            sock.sendall(json.dumps(result).encode() + b"\n")
        except OSError:
            unlink_quietly(path)  # the client is gone: nobody will name this upload
    finally:
        active.discard(sock)
        sock.close()


def _splice_into(sock: socket.socket, fd: int, nbytes: int, deadline: float) -> None:
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, _SPLICE_BYTES)
        except OSError:  # a smaller pipe only means more calls
            pass
        done = 0
        while done < nbytes:
            try:
                moved = os.splice(sock.fileno(), write_end, min(_SPLICE_BYTES, nbytes - done))
            except BlockingIOError:
                raise TimeoutError(f"no data for {STALL_SECONDS:.0f} s after {done:,} bytes") from None
            if moved == 0:
                raise ConnectionError(f"the client closed the connection after {done:,} of {nbytes:,} bytes")
            _check_rate(deadline, done, nbytes)
            while moved:
                written = os.splice(read_end, fd, moved)
                moved -= written
                done += written
    finally:
        os.close(read_end)
        os.close(write_end)


def _copy_into(sock: socket.socket, fd: int, nbytes: int, deadline: float) -> None:
    buffer = memoryview(bytearray(min(nbytes, 16 * 2**20) or 1))
    done = 0
    while done < nbytes:
        try:
            got = sock.recv_into(buffer, min(len(buffer), nbytes - done))
        except BlockingIOError:
            raise TimeoutError(f"no data for {STALL_SECONDS:.0f} s after {done:,} bytes") from None
        if got == 0:
            raise ConnectionError(f"the client closed the connection after {done:,} of {nbytes:,} bytes")
        _check_rate(deadline, done, nbytes)
        written = 0
        while written < got:
            written += os.write(fd, buffer[written:got])
        done += got


def _check_rate(deadline: float, done: int, nbytes: int) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"slower than {MIN_RATE / 1e6:.0f} MB/s: {done:,} of {nbytes:,} bytes by the deadline")


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
