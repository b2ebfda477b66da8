"""Bytes into and out of a kernel's staging directory, moved with splice(2) (never through Python).

Standard library only, so that whatever serves a staging directory moves bytes the same way:
the gateway for its own kernels (:mod:`kernel_gateway.upload_receiver`,
:mod:`kernel_gateway.download_sender`), and the slot actor next to a kernel on a Ray node
(:mod:`pool_manager.node_bulk`), with the gateway relaying between the client and the node.

Uploads land in a new file (never an existing name) owned by the kernel's uid. Downloads
are FIFOs the kernel made, in a directory it can write: they are opened without following
links and without blocking, and served only if they are a FIFO with one name, so only the
bytes the kernel itself writes ever leave (never a file it names, such as a link to the
gateway's database). A FIFO is unlinked as soon as it is open, so that whatever happens
next (sent, client gone, kernel dead) nothing stays behind.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any

from jupyter_gpu.protocol import Reason, error_body
from jupyter_gpu.transfer import DOWNLOAD_ID

#: A transfer that moves nothing for this long is abandoned (an upload's file removed).
STALL_SECONDS = 30.0
#: ... and so is an upload slower than this on average (after the first STALL_SECONDS).
MIN_RATE = 10e6
#: Bytes moved per splice(2) call: the largest pipe an unprivileged process may ask for.
SPLICE_BYTES = 2**20
_F_SETPIPE_SZ = 1031
#: Bytes of an upload's file allocated per call, ahead of the bytes arriving (see AllocateAhead).
ALLOCATE_BYTES = 32 * 2**20


class DownloadUnavailable(Exception):
    """The named download cannot be served; the message says why (for a 404)."""


def upload_deadline(nbytes: int) -> float:
    """When an upload of ``nbytes`` must be in, at the slowest rate allowed."""
    return time.monotonic() + STALL_SECONDS + nbytes / MIN_RATE


def set_stall_timeouts(sock: socket.socket) -> None:
    """Blocking, with timeouts on the descriptor itself, so that splice(2) gives up as recv would."""
    sock.setblocking(True)
    stall = struct.pack("ll", int(STALL_SECONDS), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)


def new_upload_file(staging: str, upload_id: str) -> tuple[int, str]:
    """A new file for an upload in ``staging``, given to the kernel's uid: (descriptor, path)."""
    path = os.path.join(staging, upload_id)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    owner = os.stat(staging)
    if owner.st_uid != os.geteuid():  # a sandboxed kernel's own uid: the file is its to read, no one else's
        os.fchown(fd, owner.st_uid, owner.st_gid)
    return fd, path


def receive_upload(sock: socket.socket, fd: int, path: str, nbytes: int, upload_id: str) -> dict[str, Any]:
    """Move ``nbytes`` from ``sock`` into the upload's file; closes ``fd``, removes the file on
    failure, and returns the JSON line the sender gets (the upload's id, or why it failed)."""
    try:
        set_stall_timeouts(sock)
        with AllocateAhead(fd, nbytes):
            move(sock, fd, nbytes, upload_deadline(nbytes))
        return {"upload": upload_id, "nbytes": nbytes}
    except Exception as exc:
        unlink_quietly(path)
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        return error_body(f"the upload of {nbytes:,} bytes did not complete: {exc}",
                          Reason.NO_SPACE if full else Reason.UPLOAD_FAILED)
    finally:
        close_quietly(fd)


class AllocateAhead:
    """Allocates an upload's file in a helper thread, just ahead of the bytes being written to it.

    An upload's gigabyte is new memory (a file in /dev/shm), and on a VM new memory costs more
    than the copy into it (measured on the 2-core VM: 0.43 s of CPU to write 1 GB into a new
    tmpfs file; 0.30 s to fallocate it, then 0.18 s to write it). The receiving thread was the
    slowest stage of a push relayed to a Ray node; the helper takes the allocation to another
    core, as :mod:`jupyter_gpu.prefault` does for a pull on the client. The helper never
    writes: it allocates (FALLOC_FL_KEEP_SIZE: the file's size still grows only as bytes come),
    so it cannot race the receiver over contents; where fallocate(2) is missing or fails (no
    room, a file system without it) it stops, and the writes allocate as before.
    """

    def __init__(self, fd: int, nbytes: int) -> None:
        self.fd, self.nbytes = fd, nbytes
        self._stop = threading.Event()
        self._helper = threading.Thread(target=self._allocate, name="jupyter-gpu-allocate", daemon=True)

    def __enter__(self) -> AllocateAhead:
        if _fallocate is not None and self.nbytes > ALLOCATE_BYTES:
            self._helper.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._helper.is_alive():
            self._helper.join()  # before the caller closes the descriptor

    def _allocate(self) -> None:
        offset = 0
        while not self._stop.is_set():
            # behind the writer, its writes allocated already
            offset = max(offset, os.lseek(self.fd, 0, os.SEEK_CUR))
            if offset >= self.nbytes:
                return
            length = min(ALLOCATE_BYTES, self.nbytes - offset)
            if _fallocate(self.fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                return
            offset += length


def _libc_fallocate() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate64
    except (AttributeError, OSError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _libc_fallocate()
_FALLOC_FL_KEEP_SIZE = 1


def move(sock: socket.socket, fd: int, nbytes: int, deadline: float, sender: str = "the client") -> None:
    """Exactly ``nbytes`` from ``sock`` into ``fd`` (a file or another socket) by ``deadline``.

    Raises TimeoutError on a stall or a rate below MIN_RATE, ConnectionError when ``sender``
    closes early, OSError when ``fd`` cannot take them.
    """
    (_splice if hasattr(os, "splice") else _copy)(sock, fd, nbytes, deadline, sender)


def _splice(sock: socket.socket, fd: int, nbytes: int, deadline: float, sender: str) -> None:
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, SPLICE_BYTES)
        except OSError:  # a smaller pipe only means more calls
            pass
        done = 0
        while done < nbytes:
            try:
                moved = os.splice(sock.fileno(), write_end, min(SPLICE_BYTES, nbytes - done))
            except BlockingIOError:
                raise TimeoutError(f"no data for {STALL_SECONDS:.0f} s after {done:,} bytes") from None
            if moved == 0:
                raise ConnectionError(f"{sender} closed the connection after {done:,} of {nbytes:,} bytes")
            _check_rate(deadline, done, nbytes)
            while moved:
                written = os.splice(read_end, fd, moved)
                moved -= written
                done += written
    finally:
        os.close(read_end)
        os.close(write_end)


def _copy(sock: socket.socket, fd: int, nbytes: int, deadline: float, sender: str) -> None:
    buffer = memoryview(bytearray(min(nbytes, 16 * 2**20) or 1))
    done = 0
    while done < nbytes:
        try:
            got = sock.recv_into(buffer, min(len(buffer), nbytes - done))
        except BlockingIOError:
            raise TimeoutError(f"no data for {STALL_SECONDS:.0f} s after {done:,} bytes") from None
        if got == 0:
            raise ConnectionError(f"{sender} closed the connection after {done:,} of {nbytes:,} bytes")
        _check_rate(deadline, done, nbytes)
        written = 0
        while written < got:
            written += os.write(fd, buffer[written:got])
        done += got


def _check_rate(deadline: float, done: int, nbytes: int) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"slower than {MIN_RATE / 1e6:.0f} MB/s: {done:,} of {nbytes:,} bytes by the deadline")


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


def send_download(sock: socket.socket, fd: int, nbytes: int) -> None:
    """Splice ``nbytes`` the kernel writes into its FIFO ``fd`` into ``sock``, then end the
    connection's sending half; closes ``fd``. Raises OSError when the kernel or ``sock`` stalls
    or goes away."""
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
                moved = os.splice(fd, sock.fileno(), min(SPLICE_BYTES, nbytes - sent))
            except BlockingIOError:
                continue
            if moved == 0:  # no writer any more: the kernel ended
                raise ConnectionError(f"the kernel's pull ended after {sent:,} of {nbytes:,} bytes")
            sent += moved
        sock.shutdown(socket.SHUT_WR)
    finally:
        os.close(fd)


def free_bytes(path: str) -> int:
    stat_ = os.statvfs(path)
    return stat_.f_bavail * stat_.f_frsize


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
