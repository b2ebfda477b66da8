"""Large values cross the websocket in pieces, both ways, and are put back together here.

One multi-gigabyte websocket message is slow at every hop (one frame is assembled,
unmasked and copied whole) and must fit the gateway's message limit; pieces of a few
megabytes stream through instead. A transfer is a list of blobs (pickle streams and their
out-of-band buffers); each message carries some pieces ``[blob, offset, length]`` and the
first one also says how large every blob is.

Blobs of at least UPLOAD_MIN_BYTES do not cross the websocket at all where the gateway can
stage them: the client sends each as the raw body of an HTTP/1.1 Upgrade request
(UPLOAD_PROTOCOL), the gateway moves the bytes from its socket into a file in the kernel's
staging directory, and the first message names the file (``staged``: blob index -> upload
id) instead of carrying pieces. The kernel maps that file; nothing is copied on the way.

Pulls take the mirror path: the kernel offers each blob of at least DOWNLOAD_MIN_BYTES as a
FIFO in its own staging directory (:class:`DownloadOffer`), the first ``pulled`` message
names it (``downloads``: blob index -> download id), and the client fetches it with one
HTTP/1.1 Upgrade request (DOWNLOAD_PROTOCOL); the gateway opens and unlinks the FIFO and
splices what the kernel writes into it straight into the client's socket.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import select
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

#: Bytes of buffers per message: large enough to amortise per-message costs, small
#: enough to pipeline through client, gateway and kernel.
CHUNK_BYTES = 8 * 2**20

#: Blobs from this size on are uploaded to the kernel's staging directory where the gateway
#: offers it: below it, one more HTTP request costs more than the copies it saves.
UPLOAD_MIN_BYTES = 4 * 2**20
#: The ``Upgrade`` token of an upload request; the gateway answers ``101`` and then reads
#: exactly ``nbytes`` raw bytes, and writes back one JSON line.
UPLOAD_PROTOCOL = "jupyter-gpu-upload"
#: Where a pooled kernel finds the files uploaded for it (set by the kernel backend).
STAGING_DIR_ENV = "JUPYTER_GPU_STAGING_DIR"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")

#: Pulled blobs from this size on leave the kernel as staged files where the client asked
#: for it and the kernel has a staging directory.
DOWNLOAD_MIN_BYTES = 4 * 2**20
#: The ``Upgrade`` token of a download request; after ``101`` the gateway sends exactly the
#: ``nbytes`` the request named and closes.
DOWNLOAD_PROTOCOL = "jupyter-gpu-download"
#: A pulled blob's FIFO in the kernel's staging directory: ``pull-`` and 32 hex digits, a name
#: no upload or snapshot file has, so that a download can only ever serve what a pull offered.
DOWNLOAD_ID = re.compile(r"pull-[0-9a-f]{32}")

Piece = tuple[int, int, int, memoryview]


def new_upload_id() -> str:
    return os.urandom(16).hex()


def new_download_id() -> str:
    return "pull-" + os.urandom(16).hex()


def split(blobs: Sequence[Any], chunk: int = CHUNK_BYTES, staged: Mapping[int, str] | None = None,
          downloads: Mapping[int, str] | None = None) -> Iterator[tuple[dict[str, Any], list[memoryview]]]:
    """Yield ``(data, buffers)`` per message; ``data`` has seq, last, pieces (and sizes first).

    Blobs in ``staged`` (index -> upload id) were uploaded already, and those in ``downloads``
    (index -> download id) wait in the kernel's staging directory: the first message names
    them and no piece of them is sent.
    """
    staged = staged or {}
    downloads = downloads or {}
    views = [memoryview(blob).cast("B") for blob in blobs]
    batches: list[list[Piece]] = [[]]
    size = 0
    for index, view in enumerate(views):
        if index in staged or index in downloads:
            continue
        for offset in range(0, max(1, len(view)), chunk):
            piece = view[offset : offset + chunk]
            if size and size + len(piece) > chunk:
                batches.append([])
                size = 0
            batches[-1].append((index, offset, len(piece), piece))
            size += len(piece)
    for seq, batch in enumerate(batches):
        data: dict[str, Any] = {"seq": seq, "last": seq == len(batches) - 1,
                                "pieces": [[i, o, n] for i, o, n, _ in batch]}
        if seq == 0:
            data["sizes"] = [len(view) for view in views]
            if staged:
                data["staged"] = {str(index): upload for index, upload in staged.items()}
            if downloads:
                data["downloads"] = {str(index): download for index, download in downloads.items()}
        yield data, [piece for *_, piece in batch]


class Assembler:
    """Puts the pieces of one transfer back together; a blob sent whole is not copied."""

    def __init__(self, staging_dir: str | None = None) -> None:
        self.staging_dir = staging_dir
        self.blobs: list[Any] = []
        self.sizes: list[int] = []
        #: blobs still to fetch from the kernel's staging directory: index -> download id
        self.downloads: dict[int, str] = {}
        self.complete = False

    def feed(self, data: dict[str, Any], buffers: Sequence[Any]) -> None:
        if data.get("seq", 0) == 0:
            self.sizes = list(data.get("sizes", []))
            self.blobs = [None] * len(self.sizes)
            self.complete = False
            self.downloads = {int(index): str(download) for index, download in (data.get("downloads") or {}).items()}
            for index, upload in (data.get("staged") or {}).items():
                self.blobs[int(index)] = self._map_staged(upload, self.sizes[int(index)])
        for (index, offset, length), buffer in zip(data.get("pieces", []), buffers, strict=True):
            size = self.sizes[index]
            if offset == 0 and length == size:
                # Whole in one piece: keep it, unless it is read-only (received bytes), since
                # arrays rebuilt on it must be writable like the ones they came from.
                self.blobs[index] = bytearray(buffer) if memoryview(buffer).readonly else buffer
                continue
            if self.blobs[index] is None:
                # Anonymous mmap, faulted in by the kernel in one go: bytearray(size) would
                # memset it first, and a plain mmap takes a page fault per 4 KiB written.
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
                self.blobs[index] = mmap.mmap(-1, size, flags=flags)
            memoryview(self.blobs[index])[offset : offset + length] = buffer
        if data.get("last", True):
            self.complete = True

    def _map_staged(self, upload: str, size: int) -> mmap.mmap:
        """The uploaded file, mapped privately and unlinked."""
        if self.staging_dir is None:
            raise ValueError("a staged upload arrived, but this kernel has no staging directory")
        if not isinstance(upload, str) or not _UPLOAD_ID.fullmatch(upload):
            raise ValueError(f"{upload!r} is not an upload id")
        path = os.path.join(self.staging_dir, upload)
        fd = os.open(path, os.O_RDWR)
        try:
            # Unlinked at once: the mapping keeps the pages, and they go when the value does.
            os.unlink(path)
            if os.fstat(fd).st_size != size:
                raise ValueError(f"upload {upload} holds {os.fstat(fd).st_size} bytes, not {size}")
            # Private: the array's writes stay in this process (copied on write), never reach
            # the file (on a disk they would be written back), and no other process can
            # change what the array holds, which is what lets write tracking trust it.
            # Pages come in as the cell reads them, 16 at a time.
            return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
        finally:
            os.close(fd)



class DownloadOffer:
    """A pulled blob offered through a FIFO in the kernel's staging directory.

    The value's own pages go into the pipe (vmsplice(2): the pipe refers to them, nothing is
    copied) and from there, spliced by the gateway, into the client's socket: no file is
    written, no staging space is used, and no fresh memory is touched on the kernel's side
    (on a VM that hands freed memory back to its host, fresh memory is what makes a gigabyte
    slow). Copying them into the pipe instead cost the kernel ~0.3 s of CPU per gigabyte on a
    2-core VM, on the cores the gateway and the client need. The pipe, then the socket, refer
    to the pages until the client has read them, within the pull: the offer holds the value
    until it is dropped, and a value the cell's own threads still change meanwhile arrives as
    torn as a copy made at the same moment would. A read-only buffer
    (which vmsplice cannot take the address of here) is written. A thread feeds the pipe; the FIFO
    is opened read-write so that feeding never waits for the gateway to open it, and gives up
    (removing the FIFO) when nobody has read for ``OFFER_STALL_SECONDS`` or when cancelled.
    """

    def __init__(self, staging_dir: str, blob: Any) -> None:
        self.id = new_download_id()
        self.path = os.path.join(staging_dir, self.id)
        self.cancelled = threading.Event()
        os.mkfifo(self.path, 0o600)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.unlink(self.path)
            raise
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:  # a smaller pipe only means more wake-ups
            pass
        # Held until the offer is dropped (the kernel helper drops it at the next pull, after the
        # client's fetch): the pipe, and then the socket, refer to the value's pages until the
        # client has read them, so its memory must not be freed and reused before (a CUDA
        # tensor's host copy, say, lives only as long as this reference).
        self.view = memoryview(blob).cast("B")
        threading.Thread(target=self._feed, args=(fd, self.view), daemon=True, name="jupyter-gpu-pull").start()

    def _feed(self, fd: int, view: memoryview) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        done, last_progress = 0, time.monotonic()
        by_reference = _libc_vmsplice is not None and not view.readonly
        try:
            while done < len(view) and not self.cancelled.is_set():
                if time.monotonic() - last_progress > OFFER_STALL_SECONDS:
                    return
                if not poller.poll(_POLL_MS):
                    continue
                try:
                    if by_reference:
                        done += _vmsplice(fd, view, done, _PIPE_BYTES)
                    else:
                        done += os.write(fd, view[done : done + _PIPE_BYTES])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if not by_reference or exc.errno not in _NO_VMSPLICE:
                        raise
                    by_reference = False  # a sandbox that forbids it: copy instead
                    continue
                last_progress = time.monotonic()
        finally:
            os.close(fd)
            try:
                os.unlink(self.path)  # the gateway unlinks it when it opens it; not if nobody came
            except FileNotFoundError:
                pass


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_SPLICE_F_NONBLOCK = 2
#: What vmsplice answers where a sandbox (seccomp) or the system does not offer it.
_NO_VMSPLICE = {errno.ENOSYS, errno.EPERM, errno.EINVAL}


def _vmsplice(fd: int, view: memoryview, offset: int, length: int) -> int:
    """Put up to ``length`` bytes of ``view`` from ``offset`` into the pipe ``fd`` by reference;
    the bytes taken. Raises BlockingIOError when the pipe is full, OSError otherwise."""
    anchor = ctypes.c_char.from_buffer(view)  # the address, and an export that keeps the memory
    try:
        iov = _IoVec(ctypes.addressof(anchor) + offset, min(length, len(view) - offset))
        moved = int(_libc_vmsplice(fd, ctypes.byref(iov), 1, _SPLICE_F_NONBLOCK))
    finally:
        del anchor
    if moved < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error)) if error != errno.EAGAIN else BlockingIOError(error, "pipe full")
    return moved


_libc_vmsplice: Any = getattr(ctypes.CDLL(None, use_errno=True), "vmsplice", None)  # Linux only
if _libc_vmsplice is not None:
    _libc_vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint]
    _libc_vmsplice.restype = ctypes.c_ssize_t

#: An offered download nobody reads from for this long is withdrawn.
OFFER_STALL_SECONDS = 120.0
_POLL_MS = 1000
#: The pipe's size (the largest an unprivileged process may ask for), and bytes per write.
_PIPE_BYTES = 2**20
_F_SETPIPE_SZ = 1031
