"""Kept state of a kernel on a Ray node: its snapshot file out to the gateway, and a restore in.

The node's receiving end (:class:`~pool_manager.node_bulk.NodeReceiver`) serves these two
operations next to uploads and downloads, with the same handshake and the same per-kernel
secret, so that the gateway's snapshot store works for a kernel whose staging directory is
on another machine:

- ``snapshot-take`` (id: the 32-hex name the gateway gave the kernel's save; nbytes: the most
  the gateway takes): the file the kernel wrote as ``snapshot/NAME`` is opened without
  following a link (neither the folder nor the file), served only if it is a plain file with
  one name owned by the kernel's uid, unlinked, and sent whole: ``{"ready": true, "nbytes": N}``
  then N bytes.
- ``snapshot-restore`` (nbytes: the snapshot's size): the bytes go into a new file of the
  kernel's uid under ``snapshot/``, which becomes ``snapshot/restore`` once complete (the kernel
  never sees half a snapshot); the node answers ``{"restore": N}`` or why not.

The node never reads what is inside a snapshot (the gateway reads only its JSON header).
Standard library only: it runs inside the slot actor.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import stat
from typing import Any

from jupyter_gpu.protocol import Reason, error_body
from jupyter_gpu.snapshot_format import RESTORE_NAME, SNAPSHOT_SUBDIR

from .staging_io import STALL_SECONDS, close_quietly, free_bytes, move, set_stall_timeouts, upload_deadline

TAKE = "snapshot-take"
RESTORE = "snapshot-restore"
SNAPSHOT_OPS = (TAKE, RESTORE)
_NAME = re.compile(r"[0-9a-f]{32}")
_NOT_PLAIN = "snapshot {name} on the kernel's node is not a plain file the kernel wrote (a link?): not kept"
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotRefused(Exception):
    """The node will not serve this snapshot operation; the message says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def snapshot_refusal(staging: str, op: str, name: str, nbytes: int) -> dict[str, str] | None:
    """Why an authenticated snapshot request is not served (before any byte moves), or None."""
    if op == TAKE and not _NAME.fullmatch(name):
        return error_body(f"{name!r} is not a snapshot name (32 hex digits)", Reason.BAD_REQUEST)
    if op == RESTORE:
        free = free_bytes(staging)
        if nbytes < 1 or nbytes > free:
            return error_body(f"a snapshot of {nbytes:,} bytes does not fit: the kernel's staging area on its node "
                              f"has {free:,} bytes free", Reason.NO_SPACE)
    return None


def serve_snapshot(sock: socket.socket, staging: str, request: dict[str, Any]) -> None:
    """Steps 3 and on of one authenticated, well-formed snapshot request (see the module's doc)."""
    try:
        if request["op"] == TAKE:
            _send_snapshot(sock, staging, request["id"], request["nbytes"])
        else:
            _receive_restore(sock, staging, request["nbytes"])
    except SnapshotRefused as exc:
        _answer(sock, error_body(str(exc), exc.reason))


def _answer(sock: socket.socket, answer: dict[str, Any]) -> None:
    sock.sendall(json.dumps(answer).encode() + b"\n")


def _snapshot_folder(staging: str, create: bool) -> int:
    """A descriptor of ``snapshot/`` under ``staging``, never through a link the kernel planted."""
    top = os.open(staging, _DIRECTORY_FLAGS)
    try:
        if create:
            try:
                os.mkdir(SNAPSHOT_SUBDIR, 0o700, dir_fd=top)
                owner = os.fstat(top)
                os.chown(SNAPSHOT_SUBDIR, owner.st_uid, owner.st_gid, dir_fd=top, follow_symlinks=False)
            except FileExistsError:
                pass
        try:
            return os.open(SNAPSHOT_SUBDIR, _DIRECTORY_FLAGS, dir_fd=top)
        except OSError as exc:  # missing, or a link (ELOOP/ENOTDIR)
            raise SnapshotRefused(f"the kernel's staging area on its node has no snapshot folder "
                                  f"({os.strerror(exc.errno or 0)})", Reason.NOT_FOUND) from None
    finally:
        os.close(top)


def _send_snapshot(sock: socket.socket, staging: str, name: str, limit: int) -> None:
    folder = _snapshot_folder(staging, create=False)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise SnapshotRefused(f"the kernel wrote no snapshot {name} on its node "
                                      f"({os.strerror(exc.errno or 0)})", Reason.NOT_FOUND) from None
            os.unlink(name, dir_fd=folder)
            raise SnapshotRefused(_NOT_PLAIN.format(name=name), Reason.BAD_REQUEST) from None
        try:
            info, owner = os.fstat(fd), os.stat(staging)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != owner.st_uid:
                raise SnapshotRefused(_NOT_PLAIN.format(name=name), Reason.BAD_REQUEST)
            os.unlink(name, dir_fd=folder)  # whatever happens next, it does not stay on the node
            if info.st_size > limit:
                raise SnapshotRefused(f"the kernel's snapshot has {info.st_size:,} bytes, more than the "
                                      f"{limit:,} the gateway has room for: not kept", Reason.NO_SPACE)
            _answer(sock, {"ready": True, "nbytes": info.st_size})
            sock.settimeout(STALL_SECONDS)
            with os.fdopen(fd, "rb", closefd=False) as source:
                sock.sendfile(source, 0, info.st_size)
            sock.shutdown(socket.SHUT_WR)
        finally:
            os.close(fd)
    finally:
        os.close(folder)


def _receive_restore(sock: socket.socket, staging: str, nbytes: int) -> None:
    folder = _snapshot_folder(staging, create=True)
    partial = secrets.token_hex(16)  # a name nobody could have planted
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=folder)
        try:
            owner = os.fstat(folder)
            if owner.st_uid != os.geteuid():  # a sandboxed kernel's own uid: its to read and remove
                os.fchown(fd, owner.st_uid, owner.st_gid)
            _answer(sock, {"ready": True})
            set_stall_timeouts(sock)
            move(sock, fd, nbytes, upload_deadline(nbytes), "the gateway")
        finally:
            close_quietly(fd)
        os.replace(partial, RESTORE_NAME, src_dir_fd=folder, dst_dir_fd=folder)
    except Exception as exc:
        try:
            os.unlink(partial, dir_fd=folder)
        except OSError:
            pass
        if not isinstance(exc, OSError | ValueError):
            raise
        _answer(sock, error_body(f"the snapshot of {nbytes:,} bytes did not reach the kernel's node: {exc}",
                                 Reason.UPLOAD_FAILED))
        return
    finally:
        os.close(folder)
    _answer(sock, {"restore": nbytes})
