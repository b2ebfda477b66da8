"""The gateway's side of kept state for a kernel on a Ray node (see :mod:`pool_manager.node_snapshots`).

Both directions stream between a file on the gateway's disk and the node's receiving end,
with the kernel's secret and the node's challenge (never the whole snapshot in memory; the
gateway reads only the header of what it takes). Blocking: run them in a thread.
"""

from __future__ import annotations

import json
import os
import socket

from pool_manager.node_bulk import BulkEndpoint, open_node_transfer, read_answer
from pool_manager.node_snapshots import RESTORE, TAKE
from pool_manager.staging_io import STALL_SECONDS, move, set_stall_timeouts, upload_deadline


class NodeSnapshotError(RuntimeError):
    """The kernel's node did not hand over or take a snapshot; the message says why."""


def take_from_node(endpoint: BulkEndpoint, name: str, spool_dir: str, limit: int) -> str:
    """Move the snapshot the kernel wrote as ``snapshot/NAME`` on its node into ``spool_dir``
    (at most ``limit`` bytes); returns the new file's path."""
    sock, answer = _open(endpoint, TAKE, name, limit)
    path = os.path.join(spool_dir, name)
    try:
        nbytes = answer.get("nbytes")
        if type(nbytes) is not int or not 0 <= nbytes <= limit:
            raise NodeSnapshotError(f"node {endpoint.host} offered a snapshot of {nbytes!r} bytes "
                                    f"(the gateway takes at most {limit:,})")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            set_stall_timeouts(sock)
            move(sock, fd, nbytes, upload_deadline(nbytes), f"node {endpoint.host}")
        finally:
            os.close(fd)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    finally:
        sock.close()
    return path


def send_to_node(endpoint: BulkEndpoint, path: str) -> None:
    """Stage the snapshot file at ``path`` as the kernel's ``snapshot/restore`` on its node."""
    nbytes = os.path.getsize(path)
    sock, _ = _open(endpoint, RESTORE, "restore", nbytes)
    try:
        sock.settimeout(STALL_SECONDS)
        with open(path, "rb") as source:
            sock.sendfile(source, 0, nbytes)
        answer = read_answer(sock)
    finally:
        sock.close()
    if answer.get("restore") != nbytes:
        raise NodeSnapshotError(f"node {endpoint.host}: {answer.get('message', json.dumps(answer))}")


def _open(endpoint: BulkEndpoint, op: str, transfer_id: str, nbytes: int) -> tuple[socket.socket, dict[str, object]]:
    try:
        sock, answer = open_node_transfer(endpoint, op, transfer_id, nbytes)
    except (OSError, ValueError) as exc:
        raise NodeSnapshotError(f"the kernel's node {endpoint.host} did not answer: {exc}") from exc
    if not answer.get("ready"):
        raise NodeSnapshotError(f"node {endpoint.host}: {answer.get('message', json.dumps(answer))}")
    return sock, answer
