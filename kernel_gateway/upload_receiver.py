"""One gateway's uploads in progress: how many run (overall and per user), their
connections, and the worker threads that move their bytes into staging files, or on to
the Ray node of a kernel on another machine (:mod:`pool_manager.node_bulk`).

An object per gateway, not module state: stopping one gateway cuts its own uploads and
leaves another gateway in the same process (tests run several) untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from jupyter_gpu.protocol import Reason, error_body
from pool_manager.node_bulk import node_name, read_answer
from pool_manager.staging_io import (
    free_bytes,
    move,
    receive_upload,
    set_stall_timeouts,
    unlink_quietly,
    upload_deadline,
)

from .errors import ApiError

log = logging.getLogger(__name__)

#: Uploads at once: overall (one worker thread each, so none ever waits for a thread), and
#: per user (so that one user's stalled clients cannot take them all). Past these the
#: gateway answers 503 before the 101, and the magic sends over the websocket instead.
MAX_UPLOADS = 8
MAX_UPLOADS_PER_USER = 2


class UploadReceiver:
    """Admits, receives and, when the gateway stops, cuts one gateway's uploads."""

    def __init__(self) -> None:
        self._workers = ThreadPoolExecutor(MAX_UPLOADS, thread_name_prefix="jupyter-gpu-upload")
        #: connections of uploads past their 101, so that a stopping gateway need not wait for them
        self._active: set[socket.socket] = set()
        #: uploads admitted and not finished, per user
        self._running: dict[str, int] = {}
        self.stopping = False
        #: bytes of completed uploads: into this machine's staging files, relayed to Ray nodes (/metrics)
        self.bytes_received = {"local": 0, "node": 0}

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
        await self._run(sock, "local", nbytes, _serve, sock, fd, path, nbytes, upload_id, self._active)

    async def relay(self, sock: socket.socket, node: socket.socket, nbytes: int) -> None:
        """Pass ``nbytes`` from ``sock`` on to ``node`` (a kernel's Ray node that is ready for
        them) on a worker thread, pass its answer back, close both."""
        try:
            await self._run(sock, "node", nbytes, _relay, sock, node, nbytes, self._active)
        except BaseException:
            node.close()
            raise

    async def _run(self, sock: socket.socket, path: str, nbytes: int, work: Callable[..., bool], *args: object
                   ) -> None:
        self._active.add(sock)
        try:
            if await asyncio.get_running_loop().run_in_executor(self._workers, work, *args):
                self.bytes_received[path] += nbytes
        except BaseException:
            if sock in self._active:  # never reached a worker: nothing else will close it
                self._active.discard(sock)
                sock.close()
            raise

    def check(self, staging: str | None, nbytes_text: str, limit: int) -> int:
        """The upload's size, once it is known to be allowed and to fit; else the ApiError saying why."""
        nbytes = self.check_size(nbytes_text, limit)
        if staging is None:
            raise ApiError(501, "this gateway's kernels cannot take uploads: send the data over the kernel "
                                "websocket instead", Reason.UNSUPPORTED)
        free = free_bytes(staging)
        if nbytes > free:
            raise ApiError(507, f"an upload of {nbytes:,} bytes does not fit: the staging area {staging} has "
                                f"{free:,} bytes free; it goes over the websocket instead", Reason.NO_SPACE)
        return nbytes

    def check_size(self, nbytes_text: str, limit: int) -> int:
        """The upload's size, once it is known to be allowed here (where it goes checks the space)."""
        if not nbytes_text.isdigit() or int(nbytes_text) < 1:
            raise ApiError(400, f"nbytes={nbytes_text!r}: say how many bytes follow, as a whole number of at "
                                "least 1", Reason.BAD_REQUEST)
        nbytes = int(nbytes_text)
        if nbytes > limit:
            raise ApiError(413, f"an upload of {nbytes:,} bytes exceeds this gateway's limit of {limit:,} bytes "
                                "(GatewayApp.max_upload_size); push a smaller value", Reason.TOO_LARGE)
        if self.stopping:
            raise ApiError(501, "this gateway is stopping and takes no uploads: send the data over the kernel "
                                "websocket instead", Reason.UNSUPPORTED)
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


def _serve(sock: socket.socket, fd: int, path: str, nbytes: int, upload_id: str, active: set[socket.socket]) -> bool:
    """After the 101, in a worker thread: take the bytes, answer one JSON line, close; whether all came."""
    try:
        result = receive_upload(sock, fd, path, nbytes, upload_id)
        if "upload" not in result:
            log.warning("upload %s of %d bytes failed: %s", upload_id, nbytes, result["message"])
        try:
            sock.sendall(json.dumps(result).encode() + b"\n")
        except OSError:
            unlink_quietly(path)  # the client is gone: nobody will name this upload
            return False
        return "upload" in result
    finally:
        active.discard(sock)
        sock.close()


def _relay(sock: socket.socket, node: socket.socket, nbytes: int, active: set[socket.socket]) -> bool:
    """After the 101, in a worker thread: pass the bytes on to the kernel's node, pass its answer back;
    whether all came."""
    try:
        try:
            set_stall_timeouts(sock)
            set_stall_timeouts(node)
            move(sock, node.fileno(), nbytes, upload_deadline(nbytes))
            result = read_answer(node)  # the node's {"upload", "nbytes"}, or why it failed
        except (OSError, ValueError) as exc:
            log.warning("upload of %d bytes to %s failed: %s", nbytes, node_name(node), exc)
            result = error_body(f"the upload of {nbytes:,} bytes did not complete: {exc}", Reason.UPLOAD_FAILED)
        try:
            sock.sendall(json.dumps(result).encode() + b"\n")
        except OSError:
            return False  # the client is gone: nobody will name this upload; the kernel removes it in time
        return "upload" in result
    finally:
        active.discard(sock)
        sock.close()
        node.close()


