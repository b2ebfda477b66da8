"""A Ray node's receiving end for bulk bytes (pushes and pulls of its kernel), and the gateway's way in.

A kernel on another machine has its staging directory there, not on the gateway's file
system. Its slot actor serves that directory on the node's address, on a port of its own
(:class:`NodeReceiver`); the gateway learns the address, port and a per-kernel secret through
Ray when the slot starts (:class:`BulkEndpoint`; never sent to the client or the kernel) and
relays each upload or download between the client's upgraded connection and the node with
splice(2). Clients talk only to the gateway, with the same endpoints and authorization as for
a kernel on the gateway's machine.

One connection per transfer, in lock step (so neither end ever reads past a line):

1. node: a fresh random challenge, one line;
2. gateway: one JSON line ``{"op": "upload"|"download", "id", "nbytes", "mac"}``, ``mac`` being
   HMAC-SHA256 of the challenge and the request under the kernel's secret (compared in
   constant time; the secret itself never crosses the network, and a recorded request
   cannot be replayed);
3. node: one JSON line, ``{"ready": true}`` or ``{"message", "reason"}`` (refused: wrong mac,
   no such pull, no room), then the raw bytes: ``nbytes`` from the gateway for an upload,
   after which the node answers ``{"upload", "nbytes"}`` or why not; ``nbytes`` to the gateway
   for a download.

Kept state (a kernel's snapshot file out, a restore in) takes the same handshake with ops of its
own: :mod:`pool_manager.node_snapshots`.
The bytes themselves are not encrypted (see the README's Ray section for what that means).
Standard library only: it runs inside the slot actor and inside the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from jupyter_gpu.protocol import Reason, error_body
from jupyter_gpu.transfer import DOWNLOAD_ID, new_upload_id

from .node_snapshots import SNAPSHOT_OPS, serve_snapshot, snapshot_refusal
from .staging_io import (
    DownloadUnavailable,
    close_quietly,
    free_bytes,
    new_upload_file,
    open_download,
    receive_upload,
    send_download,
    unlink_quietly,
)

log = logging.getLogger(__name__)

UPLOAD = "upload"
DOWNLOAD = "download"
#: Seconds either end waits for the other's line before giving up on the connection.
HANDSHAKE_SECONDS = 10.0
#: Longest line either end reads (a request or an answer is ~200 bytes).
MAX_LINE = 4096
#: Transfers one node receiver serves at once (its gateway admits at most 2 uploads per user,
#: and sends at most 8 downloads); more wait for a thread.
NODE_WORKERS = 4


@dataclass(frozen=True)
class BulkEndpoint:
    """Where the gateway reaches one kernel's node for bulk bytes, and the kernel's secret."""

    host: str
    port: int
    secret: str  # hex; known to the slot actor and the gateway only

    def mac(self, challenge: str, op: str, transfer_id: str, nbytes: int) -> str:
        return request_mac(self.secret, challenge, op, transfer_id, nbytes)


def request_mac(secret: str, challenge: str, op: str, transfer_id: str, nbytes: int) -> str:
    message = f"{challenge}\n{op}\n{transfer_id}\n{nbytes}".encode()
    return hmac.new(bytes.fromhex(secret), message, hashlib.sha256).hexdigest()


def node_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "the kernel's node"


def read_line(sock: socket.socket) -> bytes:
    """One line, and not a byte past it (raw bytes may follow at once): peek, then take what is the line's."""
    line = b""
    while True:
        seen = sock.recv(MAX_LINE, socket.MSG_PEEK)
        if not seen:
            raise ConnectionError(f"{node_name(sock)} closed the connection")
        end = seen.find(b"\n")
        line += sock.recv(len(seen) if end < 0 else end + 1)
        if end >= 0:
            return line[:-1]
        if len(line) >= MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} bytes from {node_name(sock)}")


def read_answer(sock: socket.socket) -> dict[str, Any]:
    answer = json.loads(read_line(sock))
    if not isinstance(answer, dict):
        raise ValueError(f"{node_name(sock)} answered {answer!r}, not a JSON object")
    return answer


def open_node_transfer(endpoint: BulkEndpoint, op: str, transfer_id: str, nbytes: int
                       ) -> tuple[socket.socket, dict[str, Any]]:
    """The gateway's side of steps 1-3 (blocking): the connection and the node's answer.

    On ``{"ready": true}`` the caller owns the connection; on a refusal it is closed already.
    Raises OSError (the node did not answer) or ValueError (it answered nonsense).
    """
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=HANDSHAKE_SECONDS)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = read_line(sock).decode("ascii")
        request = {"op": op, "id": transfer_id, "nbytes": nbytes,
                   "mac": endpoint.mac(challenge, op, transfer_id, nbytes)}
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = read_answer(sock)
    except BaseException:
        sock.close()
        raise
    if not answer.get("ready"):
        sock.close()
    return sock, answer


class NodeReceiver:
    """Serves one kernel's staging directory on ``host`` to whoever proves the kernel's secret.

    Runs in the slot actor: a thread accepts, worker threads move the bytes (with the same
    code, limits and errors as the gateway uses for a kernel on its own machine).
    """

    def __init__(self, host: str, staging: str) -> None:
        self.staging = staging
        self.secret = secrets.token_hex(32)
        self._listener = socket.create_server((host, 0), backlog=16)
        self.endpoint = BulkEndpoint(host, self._listener.getsockname()[1], self.secret)
        self._workers = ThreadPoolExecutor(NODE_WORKERS, thread_name_prefix="jupyter-gpu-node-bulk")
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()  # _active: the accepting thread, the workers and close() all touch it
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="jupyter-gpu-node-bulk-accept", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop listening and cut every transfer in progress (the kernel is going away)."""
        self._closed = True
        with self._lock:
            cut = [self._listener, *self._active]
        for sock in cut:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._active.add(sock)
            try:
                self._workers.submit(self._serve, sock)
            except RuntimeError:  # shut down meanwhile
                self._forget(sock)

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(HANDSHAKE_SECONDS)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            challenge = secrets.token_hex(16)
            sock.sendall(challenge.encode() + b"\n")
            request = read_answer(sock)
            refusal = self._refusal(challenge, request)
            if refusal is not None:
                log.warning("bulk transfer from %s refused: %s", node_name(sock), refusal["message"])
                sock.sendall(json.dumps(refusal).encode() + b"\n")
            elif request["op"] in SNAPSHOT_OPS:
                serve_snapshot(sock, self.staging, request)
            elif request["op"] == UPLOAD:
                self._upload(sock, request["nbytes"])
            else:
                self._download(sock, request["id"], request["nbytes"])
        except (OSError, ValueError) as exc:
            log.warning("bulk transfer from %s failed: %s", node_name(sock), exc)
        finally:
            self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._active.discard(sock)
        sock.close()

    def _refusal(self, challenge: str, request: dict[str, Any]) -> dict[str, str] | None:
        """Why the request is not served, or None when it is the gateway's and well formed."""
        op, transfer_id, nbytes = request.get("op"), request.get("id"), request.get("nbytes")
        if op not in (UPLOAD, DOWNLOAD, *SNAPSHOT_OPS) or not isinstance(transfer_id, str) or type(nbytes) is not int:
            return error_body("a request names op (upload or download), id and nbytes", Reason.BAD_REQUEST)
        mac = request.get("mac")
        expected = request_mac(self.secret, challenge, op, transfer_id, nbytes)
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), expected.encode()):
            return error_body("not authorized: this port serves its kernel's gateway only", Reason.UNAUTHORIZED)
        if op in SNAPSHOT_OPS:
            return snapshot_refusal(self.staging, op, transfer_id, nbytes)
        if op == UPLOAD:
            free = free_bytes(self.staging)
            if nbytes < 1 or nbytes > free:
                return error_body(f"an upload of {nbytes:,} bytes does not fit: the kernel's staging area on its "
                                  f"node has {free:,} bytes free; it goes over the websocket instead",
                                  Reason.NO_SPACE)
        elif not DOWNLOAD_ID.fullmatch(transfer_id) or nbytes < 0:
            return error_body(f"{transfer_id!r} is not a download id (pull- and 32 hex digits)", Reason.NOT_FOUND)
        return None

    def _upload(self, sock: socket.socket, nbytes: int) -> None:
        upload_id = new_upload_id()
        try:
            fd, path = new_upload_file(self.staging, upload_id)
        except OSError as exc:  # the kernel ended meanwhile, and its staging directory with it
            refusal = error_body(f"the kernel's staging area cannot take the upload: {exc}", Reason.UPLOAD_FAILED)
            sock.sendall(json.dumps(refusal).encode() + b"\n")
            return
        try:
            sock.sendall(b'{"ready": true}\n')
        except BaseException:
            close_quietly(fd)
            unlink_quietly(path)
            raise
        result = receive_upload(sock, fd, path, nbytes, upload_id)
        if "upload" not in result:
            log.warning("upload %s of %d bytes failed: %s", upload_id, nbytes, result["message"])
        sock.sendall(json.dumps(result).encode() + b"\n")

    def _download(self, sock: socket.socket, download_id: str, nbytes: int) -> None:
        try:
            fd = open_download(self.staging, download_id)
        except DownloadUnavailable as exc:
            sock.sendall(json.dumps(error_body(str(exc), Reason.NOT_FOUND)).encode() + b"\n")
            return
        try:
            sock.sendall(b'{"ready": true}\n')
        except BaseException:
            close_quietly(fd)
            raise
        send_download(sock, fd, nbytes)
