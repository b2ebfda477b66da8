"""Pulled values on their way out: what the kernel writes into the FIFO it offered, spliced
into the client's socket (splice(2): the bytes never enter Python, and no file holds them),
or, for a kernel on a Ray node, what that node sends from it passed on to the client.

How a FIFO is opened and sent is :mod:`pool_manager.staging_io`'s, shared with the node's
receiving end (:mod:`pool_manager.node_bulk`); this is the gateway's part: worker threads,
and cutting every download when the gateway stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pool_manager.node_bulk import node_name
from pool_manager.staging_io import move, send_download, set_stall_timeouts

log = logging.getLogger(__name__)

#: Downloads sent at once (each holds a worker thread while it sends); more wait their turn.
MAX_SENDING = 8


class DownloadSender:
    """Sends one gateway's downloads on worker threads; cuts them when the gateway stops."""

    def __init__(self) -> None:
        self._workers = ThreadPoolExecutor(MAX_SENDING, thread_name_prefix="jupyter-gpu-download")
        self._active: set[socket.socket] = set()
        #: bytes of completed downloads: from this machine's kernels, relayed from Ray nodes (/metrics)
        self.bytes_sent = {"local": 0, "node": 0}

    async def send(self, sock: socket.socket, fd: int, nbytes: int) -> None:
        """Send ``nbytes`` of ``fd`` on ``sock`` from a worker thread; closes both."""
        try:
            await self._run(sock, "local", nbytes, _send, sock, fd, nbytes)
        except RuntimeError:  # the pool is shut down: the gateway is stopping
            os.close(fd)
            raise

    async def relay(self, sock: socket.socket, node: socket.socket, nbytes: int) -> None:
        """Pass ``nbytes`` from ``node`` (a kernel's Ray node sending a pull) on to ``sock``; closes both."""
        try:
            await self._run(sock, "node", nbytes, _relay, sock, node, nbytes)
        finally:
            node.close()

    async def _run(self, sock: socket.socket, path: str, nbytes: int, work: Callable[..., bool], *args: object
                   ) -> None:
        self._active.add(sock)
        try:
            if await asyncio.get_running_loop().run_in_executor(self._workers, work, *args):
                self.bytes_sent[path] += nbytes
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


def _send(sock: socket.socket, fd: int, nbytes: int) -> bool:
    try:
        send_download(sock, fd, nbytes)
        return True
    except OSError as exc:  # the client or the kernel went away, or stalled
        log.warning("download of %d bytes cut: %s", nbytes, exc)
        return False


def _relay(sock: socket.socket, node: socket.socket, nbytes: int) -> bool:
    try:
        set_stall_timeouts(node)
        set_stall_timeouts(sock)
        # No rate floor: the kernel writes its pull as fast as it can (a stall still ends it).
        move(node, sock.fileno(), nbytes, math.inf, sender=f"the kernel's node {node_name(node)}")
        sock.shutdown(socket.SHUT_WR)
        return True
    except OSError as exc:  # the client, the node or the kernel went away, or stalled
        log.warning("download of %d bytes from %s cut: %s", nbytes, node_name(node), exc)
        return False
