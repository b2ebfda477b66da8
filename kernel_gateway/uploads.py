"""Large pushed buffers, straight from the client's socket into a file the kernel maps.

Over the websocket a gigabyte is framed and masked by the client, read, unmasked and
copied by tornado, sent over ZMQ and copied into place by the kernel: ~430 MB/s here. An
upload is one HTTP/1.1 Upgrade request per buffer (``GET /api/kernels/ID/upload?nbytes=N``
with ``Upgrade: jupyter-gpu-upload``): the gateway checks the token, that the kernel is the
caller's, the size and the free space, answers ``101`` with the upload id, then moves
exactly N raw bytes from the socket into a new file in the kernel's staging directory
with splice(2) (the bytes never enter Python), in a worker thread, and writes back one
JSON line: ``{"upload": ID, "nbytes": N}`` or ``{"message", "reason"}``. The client then
names the upload in its push message; the kernel maps the file and unlinks it.

Files a client uploaded but never named (it died in between) go with the kernel's staging
directory when the kernel ends.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_gpu.protocol import error_body
from jupyter_gpu.transfer import UPLOAD_PROTOCOL, new_upload_id

from .handlers import ApiError, ApiHandler

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

_workers = ThreadPoolExecutor(MAX_UPLOADS, thread_name_prefix="jupyter-gpu-upload")
#: Connections of uploads past their 101, so that a stopping gateway need not wait for them.
_active: set[socket.socket] = set()
#: Uploads accepted and not finished, per user.
_running: dict[str, int] = {}
_stopping = False


def abort_uploads() -> None:
    """Cut every upload in progress and refuse new ones (gateway shutdown)."""
    global _stopping
    _stopping = True
    for sock in list(_active):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    _workers.shutdown(wait=False, cancel_futures=True)


class UploadHandler(ApiHandler):
    async def get(self, kernel_id: str) -> None:
        lease = self.owned(kernel_id)
        if self.request.headers.get("Upgrade", "").lower() != UPLOAD_PROTOCOL:
            raise ApiError(400, f"an upload is a request with 'Connection: Upgrade' and 'Upgrade: {UPLOAD_PROTOCOL}', "
                                "followed by the raw bytes once the gateway answered 101", "bad_request")
        nbytes = self._nbytes()
        staging = self.gateway.staging_dir(lease.slot_id)
        if staging is None or _stopping:
            raise ApiError(501, "this gateway's kernels cannot take uploads: send the data over the kernel "
                                "websocket instead", "unsupported")
        free = _free_bytes(staging)
        if nbytes > free:
            raise ApiError(507, f"an upload of {nbytes:,} bytes does not fit: the staging area {staging} has "
                                f"{free:,} bytes free; it goes over the websocket instead", "no_space")
        mine = _running.get(self.user, 0)
        if mine >= MAX_UPLOADS_PER_USER or sum(_running.values()) >= MAX_UPLOADS:
            raise ApiError(503, f"{mine} of your uploads (at most {MAX_UPLOADS_PER_USER}) and "
                                f"{sum(_running.values())} in all (at most {MAX_UPLOADS}) are in progress; "
                                "send over the websocket for now", "busy")
        _running[self.user] = mine + 1
        try:
            await self._receive(staging, nbytes)
        finally:
            _running[self.user] -= 1
            if not _running[self.user]:
                del _running[self.user]

    async def _receive(self, staging: str, nbytes: int) -> None:
        upload_id = new_upload_id()
        path = os.path.join(staging, upload_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        sock: socket.socket | None = None
        try:
            sock = await self._switch_protocols()
            _active.add(sock)
            await asyncio.get_running_loop().run_in_executor(_workers, _serve, sock, fd, path, nbytes, upload_id)
        except BaseException:
            # Not served (no 101, or no worker any more: the gateway is stopping): nothing
            # else will close these.
            if sock is not None and sock in _active:
                _active.discard(sock)
                sock.close()
            _close_quietly(fd)
            _unlink_quietly(path)
            raise

    def _nbytes(self) -> int:
        limit: int = self.settings.get("max_upload_bytes", 0)
        raw = self.get_query_argument("nbytes", "")
        if not raw.isdigit() or int(raw) < 1:
            raise ApiError(400, f"nbytes={raw!r}: say how many bytes follow, as a whole number of at least 1",
                           "bad_request")
        nbytes = int(raw)
        if nbytes > limit:
            raise ApiError(413, f"an upload of {nbytes:,} bytes exceeds this gateway's limit of {limit:,} bytes "
                                "(GatewayApp.max_upload_size); push a smaller value", "too_large")
        return nbytes

    async def _switch_protocols(self) -> socket.socket:
        """Answer 101 and take the connection's socket away from tornado."""
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", UPLOAD_PROTOCOL)
        self.set_header("Connection", "Upgrade")
        self.finish()
        stream = self.detach()
        await stream.write(b"")  # the 101 is on the wire
        if getattr(stream, "_read_buffer_size", 0):
            # The client sent data before the 101: tornado holds part of it; refuse rather
            # than reassemble from a private buffer.
            stream.close()
            raise ConnectionError("the client sent data before the gateway answered 101")
        assert stream.socket is not None
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        stream.close()  # closes tornado's descriptor only: the connection lives on in ours
        return sock


def _serve(sock: socket.socket, fd: int, path: str, nbytes: int, upload_id: str) -> None:
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
            _unlink_quietly(path)
            log.warning("upload %s of %d bytes failed: %s", upload_id, nbytes, exc)
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            result = error_body(f"the upload of {nbytes:,} bytes did not complete: {exc}",
                                "no_space" if full else "upload_failed")
        finally:
            _close_quietly(fd)
        try:
            sock.sendall(json.dumps(result).encode() + b"\n")
        except OSError:
            _unlink_quietly(path)  # the client is gone: nobody will name this upload
    finally:
        _active.discard(sock)
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


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
