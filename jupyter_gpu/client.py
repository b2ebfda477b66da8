"""The one client of the gateway: the ``%%gpu`` magic and the sidebar's server extension both use it.

Its REST methods block; those the server extension calls have a one-line async twin (``atypes``
for ``types``) that runs it in a worker thread: the magic (a plain function on the kernel's main thread, inside the
kernel's running event loop) calls them directly, the server extension awaits the twins on
jupyter_server's loop. Blocking first because the magic is where latency shows: a call costs
one round trip on a kept-alive connection, with no event loop or thread in between, and it
still works at interpreter exit, when the magic releases a notebook's leases and the worker
threads an async call would need are gone. Every REST call goes through :meth:`GatewayClient.request` and
every failure becomes one :class:`GatewayError` with a status and a
:class:`~jupyter_gpu.protocol.Reason`, so both users see the same words. The data path blocks
too, on sockets of its own: uploads (one raw socket per buffer) and the kernel websocket the
magic reads while a cell runs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import http.client
import json
import mmap
import os
import secrets
import select
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

from . import hub, prefault
from .protocol import (
    KERNEL_WS_PROTOCOL_V1,
    TOKEN_ENV,
    URL_ENV,
    Reason,
    deserialize_ws_v1,
    error_body,
    ws_v1_prefix,
)
from .transfer import DOWNLOAD_PROTOCOL, UPLOAD_PROTOCOL


class GatewayError(RuntimeError):
    """The gateway said no, or could not be reached; the message says what to do.

    ``status`` is the gateway's HTTP status (0: no answer) and ``reason`` its word for why.
    """

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class GatewayConfig:
    url: str
    token: str

    @classmethod
    def from_env(cls) -> GatewayConfig:
        """From JUPYTER_GPU_URL and JUPYTER_GPU_TOKEN; in a JupyterHub server, whichever is unset comes
        from the Hub: the gateway's address from its service list, and the server's own Hub token."""
        url = os.environ.get(URL_ENV, "").rstrip("/")
        token = os.environ.get(TOKEN_ENV, "")
        if hub.in_hub() and not (url and token):
            try:
                url = url or hub.gateway_url_from_hub()
            except hub.HubDiscoveryError as exc:
                raise GatewayError(str(exc), 0, exc.reason) from None
            token = token or hub.hub_token()
        if not url:
            raise GatewayError(
                f"no gateway configured: set {URL_ENV} (e.g. http://127.0.0.1:8765) and {TOKEN_ENV} "
                "in the notebook kernel's environment", 0, Reason.NOT_CONFIGURED
            )
        if not token:
            raise GatewayError(f"no token for {url}: set {TOKEN_ENV} (ask the operator for one)", 0,
                               Reason.NOT_CONFIGURED)
        return cls(url, token)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _in_thread(blocking: Callable[_P, _T]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """The async twin of a blocking method: the same call, in the event loop's worker threads."""

    @functools.wraps(blocking)
    async def twin(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await asyncio.to_thread(blocking, *args, **kwargs)

    return twin


class GatewayClient:
    """The gateway's API for one token: REST (blocking, with async twins), uploads, kernel websockets."""

    def __init__(self, config: GatewayConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(config.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise GatewayError(f"{URL_ENV}={config.url!r} is not an http(s) URL such as http://127.0.0.1:8765", 0,
                               Reason.NOT_CONFIGURED)
        self._parsed = parsed
        # Kept-alive connections not in use: one for the magic, a few while the server
        # extension's requests overlap. A connection is only ever used by one request at a time.
        self._idle: list[http.client.HTTPConnection] = []
        self._idle_lock = threading.Lock()

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; every REST call of the client goes through here, and every failure
        comes out as one GatewayError."""
        seconds = timeout or self.timeout
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            conn, reused = self._checkout()
            try:
                status, data = self._exchange(conn, method, path, payload, seconds)
                break
            except (OSError, http.client.HTTPException) as exc:  # refused, unknown host, timeout, reset
                conn.close()
                # Once more where that cannot do anything twice: a kept-alive connection the
                # gateway had closed before reading the request, or a request safe to repeat.
                stale = reused and isinstance(exc, ConnectionResetError | BrokenPipeError)
                if attempt or not (stale or method in ("GET", "DELETE")):
                    raise GatewayError(
                        f"gateway at {self.config.url} does not answer ({type(exc).__name__}: {exc}): is "
                        f"`jupyter-gpu gateway` running there? (set by {URL_ENV})", 0, Reason.GATEWAY_UNREACHABLE
                    ) from None
            except BaseException:  # Ctrl-C mid-request: the connection is in an unknown state
                conn.close()
                raise
        self._checkin(conn)
        if status >= 400:
            raise self._error(status, data)
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise self._error(status, data) from None

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str, payload: bytes | None,
                  seconds: float) -> tuple[int, bytes]:
        """Send one request on ``conn`` and read its whole answer, within ``seconds`` of silence."""
        if conn.sock is None:
            conn.timeout = min(_CONNECT_TIMEOUT, seconds)
            conn.connect()
        # http.client applies .timeout only when it connects: a kept-alive socket would keep
        # the timeout of the request that opened it (a long poll would time out early).
        conn.sock.settimeout(seconds)
        conn.request(method, self._parsed.path + path, body=payload, headers=self._headers)
        response = conn.getresponse()  # closes conn when the gateway will not keep it alive
        return response.status, response.read()

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.config.token}", "Content-Type": "application/json",
                "Accept": "application/json"}

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection (True) or a new one, not yet connected (False).

        A kept-alive one that has something to read has been closed by the gateway (an answer
        never comes unasked): it is dropped here rather than failing the request.
        """
        while True:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
                return cls(self._parsed.hostname or "", self._parsed.port, timeout=self.timeout), False
            if conn.sock is not None and not _readable(conn.sock):
                return conn, True
            conn.close()

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._idle_lock:
            if conn.sock is not None and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _error(self, status: int, data: bytes) -> GatewayError:
        """The gateway's own ``{"message", "reason"}``, or words for an answer that is not the gateway's."""
        try:
            error = json.loads(data)
        except ValueError:
            error = None
        if not isinstance(error, dict):
            return GatewayError(f"{self.config.url} answered {status} with something that is not JSON: is {URL_ENV} "
                                "the address of a jupyter-gpu gateway?", status, Reason.BAD_GATEWAY)
        message = str(error.get("message") or f"gateway at {self.config.url} answered {status}")
        return GatewayError(message, status, str(error.get("reason") or Reason.GATEWAY_ERROR))

    # --- the API (blocking; the server extension's calls have async twins) ----------------------

    def types(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/gpu/types"))

    def leases(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/gpu/leases"))

    def create_lease(self, spec: str, idle_timeout: float | None, notebook: str) -> dict[str, Any]:
        body: dict[str, Any] = {"gpu": spec, "notebook": notebook}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return dict(self.request("POST", "/api/gpu/leases", body))

    def get_lease(self, lease_id: str, wait: float = 0, timeout: float | None = None) -> dict[str, Any]:
        """The lease as the gateway describes it; ``wait``: long-poll while it is queued;
        ``timeout``: seconds to wait for the answer (default: the client's, plus ``wait``)."""
        query = f"?wait={wait}" if wait else ""
        seconds = self.timeout + wait if timeout is None else timeout
        return dict(self.request("GET", f"/api/gpu/leases/{lease_id}{query}", timeout=seconds))

    def delete_lease(self, lease_id: str, forget: bool = False) -> dict[str, Any]:
        """End a lease; ``forget``: keep none of its variables for the notebook's next lease."""
        return dict(self.request("DELETE", f"/api/gpu/leases/{lease_id}" + ("?forget=1" if forget else "")))

    def snapshots(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/gpu/snapshots"))

    def forget_snapshots(self, notebook: str) -> list[str]:
        query = urllib.parse.urlencode({"notebook": notebook})
        return list(self.request("DELETE", f"/api/gpu/snapshots?{query}")["deleted"])

    def usage(self) -> dict[str, Any]:
        return dict(self.request("GET", "/api/gpu/usage"))

    def budgets(self) -> list[dict[str, Any]]:
        """What is left of each budget that applies to me (none: an empty list)."""
        return list(self.request("GET", "/api/gpu/budgets"))

    def interrupt(self, kernel_id: str) -> None:
        self.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})

    atypes = _in_thread(types)
    aleases = _in_thread(leases)
    adelete_lease = _in_thread(delete_lease)
    abudgets = _in_thread(budgets)

    def open_channel(self, kernel_id: str, session_id: str | None = None) -> KernelChannel:
        return KernelChannel.open(self.config, kernel_id, session_id)

    def upload(self, kernel_id: str, blob: Any, timeout: float = 60.0) -> str:
        """Send one large buffer to the kernel's staging directory; returns its upload id.

        One HTTP/1.1 Upgrade request: the gateway checks token, kernel and size and answers
        101, then the raw bytes follow (sent from the buffer itself, no copy in Python) and
        the gateway writes back one JSON line once all of them are in the file. Raises
        GatewayError, with ``reason == Reason.UNSUPPORTED`` where the gateway cannot stage.
        """
        view = memoryview(blob).cast("B")
        sock = self._connect(timeout)
        switched = False
        try:
            reader = self._upgrade(sock, f"/api/kernels/{kernel_id}/upload?nbytes={len(view)}", UPLOAD_PROTOCOL)
            switched = True
            # The gateway reads exactly len(view) bytes. Sent in slices, so that the timeout
            # is for a stall, not for the whole (sendall's timeout is a total).
            for offset in range(0, len(view), _UPLOAD_SLICE):
                sock.sendall(view[offset : offset + _UPLOAD_SLICE])
            line = reader.readline(64 * 1024)
            result = json.loads(line) if line else error_body("the gateway closed the upload", Reason.LOST)
            if "upload" not in result:
                raise GatewayError(result.get("message", "upload failed"), 500, result.get("reason", ""))
            return str(result["upload"])
        except (OSError, ValueError) as exc:
            # Before the 101 this is no answer from our gateway (a proxy in between?); after
            # it, the upload was lost mid-way.
            raise GatewayError(f"upload of {len(view)} bytes to the gateway at {self.config.url} failed: "
                               f"{type(exc).__name__}: {exc}", 0, Reason.LOST if switched else "") from None
        finally:
            sock.close()

    def download(self, kernel_id: str, download_id: str, nbytes: int, timeout: float = 60.0) -> mmap.mmap:
        """Fetch one large pulled buffer from the kernel's staging directory, into new memory.

        One HTTP/1.1 Upgrade request: the gateway checks token, kernel and file and answers
        101, then exactly ``nbytes`` raw bytes follow, received straight into the buffer the
        value is rebuilt on (no copy in Python). Raises GatewayError: 404 (``not_found``) when
        the file or the kernel is gone, ``lost`` when the connection ends early.
        """
        # New memory, faulted in by a helper thread just ahead of the receive (see prefault).
        fresh = prefault.PrefaultedBuffer(nbytes)
        buffer = fresh.buffer
        view = memoryview(buffer)[:nbytes]
        sock = self._connect(timeout)
        switched = False
        got = 0
        try:
            reader = self._upgrade(sock, f"/api/kernels/{kernel_id}/download/{download_id}?nbytes={nbytes}",
                                   DOWNLOAD_PROTOCOL)
            switched = True
            with fresh:
                while got < nbytes:  # the reader hands over what it read ahead, then receives in place
                    received = reader.readinto(view[got : got + prefault.STRETCH_BYTES])
                    if not received:
                        raise ConnectionError(f"the gateway closed the download after {got:,} of {nbytes:,} bytes")
                    got += received
                    fresh.reached = got
        except (OSError, ValueError) as exc:
            view.release()
            buffer.close()
            raise GatewayError(f"download of {nbytes:,} bytes from the gateway at {self.config.url} failed: "
                               f"{type(exc).__name__}: {exc}", 0, Reason.LOST if switched else "") from None
        except BaseException:
            view.release()
            buffer.close()
            raise
        finally:
            sock.close()
        view.release()
        return buffer

    def _connect(self, timeout: float) -> socket.socket:
        """A new connection to the gateway for one upload or download (TLS where the URL says https)."""
        host = self._parsed.hostname or ""
        port = self._parsed.port or (443 if self._parsed.scheme == "https" else 80)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise GatewayError(f"gateway at {self.config.url} does not answer ({exc})", 0,
                               Reason.GATEWAY_UNREACHABLE) from None
        if self._parsed.scheme == "https":
            import ssl

            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except OSError as exc:
                sock.close()
                raise GatewayError(f"no TLS connection to the gateway at {self.config.url}: {exc}", 0,
                                   Reason.GATEWAY_UNREACHABLE) from None
        return sock

    def _upgrade(self, sock: socket.socket, path: str, protocol: str) -> Any:
        """Ask for ``path`` with ``Upgrade: protocol``; the reader past the gateway's 101, else its error."""
        sock.sendall((f"GET {self._parsed.path}{path} HTTP/1.1\r\nHost: {self._parsed.netloc}\r\n"
                      f"Authorization: token {self.config.token}\r\n"
                      f"Connection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n").encode())
        reader = sock.makefile("rb")
        status, headers = _read_head(reader)
        if status != 101:
            body = reader.read(int(headers.get("content-length", "0") or 0))
            raise self._error(status, body)
        return reader


_UPLOAD_SLICE = 64 * 2**20
#: Seconds to wait for a new REST connection (a request may wait longer for its answer).
_CONNECT_TIMEOUT = 5.0
#: Kept-alive REST connections one client holds while none is in use.
_MAX_IDLE = 4


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read now (poll where there is one: select fails on a
    descriptor above 1023, which a busy Jupyter server has)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _read_head(reader: Any) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased) of an HTTP/1.1 response."""
    status_line = reader.readline(64 * 1024).decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(64 * 1024).decode("latin-1").strip()
        if not line:
            return int(parts[1]), headers
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()


class KernelChannel:
    """One websocket to a kernel, speaking the v1 binary framing, read on the caller's thread.

    websockets' sans-I/O protocol on a plain blocking socket: the threaded sync client reads
    on a thread of its own and hands every message over through a queue, a thread switch per
    message (seven per cell), which on a busy machine was the largest fixed cost of a cell.
    A large frame's payload is received straight into the buffer its message is made of (one
    copy, from the kernel's socket buffer); the rest is read in gulps into a buffer kept for it.
    Messages go out as frames written here, masked part by part (see :func:`masked_frame`).
    """

    def __init__(self, sock: socket.socket, protocol: ClientProtocol, session_id: str) -> None:
        self.sock = sock
        self.protocol = protocol
        self.session_id = session_id
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._text = False  # the message being received is text
        self._messages: collections.deque[bytes | bytearray | memoryview | str] = collections.deque()
        self._gulp = memoryview(bytearray(_WS_READ_BYTES))
        if not isinstance(protocol.reader, _DirectReader):
            raise TypeError("a KernelChannel reads through client_protocol()'s reader")
        self._reader = protocol.reader

    @classmethod
    def open(cls, config: GatewayConfig, kernel_id: str, session_id: str | None = None) -> KernelChannel:
        session_id = session_id or uuid.uuid4().hex
        base = config.url.replace("http", "ws", 1)
        url = f"{base}/api/kernels/{kernel_id}/channels?session_id={session_id}"
        parsed = urllib.parse.urlsplit(config.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            sock = socket.create_connection((parsed.hostname or "", port), timeout=10)
        except OSError as exc:
            raise GatewayError(f"could not open the kernel websocket at {url}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, sent now
        try:
            if parsed.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parsed.hostname)
            protocol = client_protocol(url)
            request = protocol.connect()
            request.headers["Authorization"] = f"token {config.token}"
            protocol.send_request(request)
            sock.settimeout(30)
            sock.sendall(b"".join(protocol.data_to_send()))
            while not protocol.events_received():
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the gateway closed the connection during the handshake")
                protocol.receive_data(data)
            if protocol.handshake_exc is not None:
                raise protocol.handshake_exc
            sock.settimeout(None)
        except Exception as exc:
            sock.close()
            raise GatewayError(f"could not open the kernel websocket at {url}: {exc}") from None
        return cls(sock, protocol, session_id)

    def _flush(self) -> None:
        """Send what the protocol has to send (our frames, pongs, the close handshake)."""
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)
            elif self.protocol.close_expected():
                self.sock.shutdown(socket.SHUT_WR)

    def _receive(self, timeout: float | None) -> bool:
        """Read once from the socket (waiting up to ``timeout``); False when nothing came."""
        if not self._poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return False
        target = self._reader.target
        try:
            if target is not None:  # the rest of a large payload, into its own buffer
                got = self.sock.recv_into(target[self._reader.filled :])
            else:
                got = self.sock.recv_into(self._gulp)
        except OSError:
            got = 0
        if not got:
            self.protocol.receive_eof()
        elif target is not None:
            self._reader.filled += got
            self.protocol.receive_data(b"")  # the parser looks whether the payload is whole
        else:
            self.protocol.receive_data(self._gulp[:got])  # type: ignore[arg-type]  # copied in at once
        for event in self.protocol.events_received():
            if not isinstance(event, Frame) or event.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                continue  # pings are answered by the protocol; a close ends the loop in recv()
            if event.opcode is not Opcode.CONT:
                self._text = event.opcode is Opcode.TEXT
            self._fragments.append(event.data)
            if event.fin:
                whole = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
                self._fragments = []
                self._messages.append(bytes(whole).decode() if self._text else whole)
        self._flush()
        return True

    def send(self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Any] = (),
             metadata: dict[str, Any] | None = None, parent: dict[str, Any] | None = None) -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session_id, "username": "jupyter-gpu",
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": "5.3"}
        parts = [json.dumps(header).encode(), json.dumps(parent or {}).encode(),
                 json.dumps(metadata or {}).encode(), json.dumps(content).encode(), *buffers]
        if self.protocol.state is not State.OPEN:
            raise self.protocol.close_exc
        try:
            self._flush()  # what the protocol has queued (a pong) goes first
            _send_pieces(self.sock, masked_frame([ws_v1_prefix(channel, parts), *parts]))
        except OSError:
            self.protocol.receive_eof()
            raise self.protocol.close_exc from None
        return msg_id

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message, or None when ``timeout`` passed. Raises ConnectionClosed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if self.protocol.state is State.CLOSED:
                raise self.protocol.close_exc
            if not self._receive(None if deadline is None else deadline - time.monotonic()):
                return None
        raw = self._messages.popleft()
        if isinstance(raw, str):
            msg: dict[str, Any] = json.loads(raw)
            return msg
        channel, parts = deserialize_ws_v1(memoryview(raw))
        header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
        return {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata,
                "content": content, "buffers": parts[4:]}

    @property
    def closed(self) -> bool:
        # Between cells nothing reads the socket: take in what came meanwhile (the gateway's
        # close when the lease ended) before answering.
        while self.protocol.state is State.OPEN and self._receive(0):
            pass
        return bool(self.protocol.state is not State.OPEN)

    def close_reason(self) -> str:
        rcvd = self.protocol.close_rcvd
        return rcvd.reason if rcvd is not None else ""

    @property
    def closed_by_gateway(self) -> bool:
        """The gateway closed the socket on purpose (lease ended), as opposed to a lost connection."""
        return self.protocol.close_rcvd is not None

    def close(self) -> None:
        try:
            if self.protocol.state is State.OPEN:
                self.protocol.send_close()
                self._flush()
        except OSError:
            pass
        self.sock.close()


#: Bytes per read of the kernel websocket (a large payload is read into its own buffer instead).
_WS_READ_BYTES = 256 * 1024
#: Payloads from this size on are received straight into the buffer that holds them.
_DIRECT_BYTES = 64 * 1024


def client_protocol(url: str, state: State = State.CONNECTING) -> ClientProtocol:
    """websockets' client protocol for a kernel websocket, reading through a _DirectReader."""
    protocol = ClientProtocol(parse_uri(url), subprotocols=[Subprotocol(KERNEL_WS_PROTOCOL_V1)], state=state,
                              max_size=None)
    # Nothing was read yet: the parser restarts on the reader that takes large payloads
    # straight from the socket.
    protocol.reader = _DirectReader()
    protocol.parser = protocol.parse()
    next(protocol.parser)
    return protocol


class _DirectReader(StreamReader):
    """websockets' stream reader, except that a large payload is not gathered in its buffer:
    ``read_exact`` hands the channel ``target``, the bytearray the frame's data will be, to
    receive into (``filled`` bytes so far). websockets' own reader copies every received
    byte into its buffer and once more into the frame; on this VM, fresh memory written
    once costs about as much as the copy, and a pulled megabyte took three."""

    def __init__(self) -> None:
        super().__init__()
        self.target: memoryview | None = None
        self.filled = 0

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        if n < _DIRECT_BYTES:
            return (yield from super().read_exact(n))
        payload = bytearray(n)
        self.filled = min(len(self.buffer), n)
        payload[: self.filled] = self.buffer[: self.filled]
        del self.buffer[: self.filled]
        self.target = memoryview(payload)
        try:
            while self.filled < n:
                if self.eof:
                    raise EOFError(f"stream ends after {self.filled} bytes, expected {n} bytes")
                yield
        finally:
            self.target = None
        return payload
#: Parts of a message from this size on are masked on their own, not joined with the others first.
_LARGE_PART = 64 * 1024


def masked_frame(parts: Sequence[bytes | memoryview]) -> list[bytes]:
    """One final binary websocket frame of the concatenated ``parts``, as a client sends it
    (RFC 6455 section 5.3: masked), in pieces to write in order.

    websockets' own framing joins the message, copies it behind the frame head and masks
    that: three copies of a pushed megabyte. Here the small parts are joined, and every
    large one is masked straight from the value's memory (the mask applied at its offset):
    one copy, the one masking has to make.
    """
    views = [memoryview(part).cast("B") for part in parts]
    length = sum(len(view) for view in views)
    if length < 126:
        head = struct.pack("!BB", 0x80 | Opcode.BINARY, 0x80 | length)
    elif length < 2**16:
        head = struct.pack("!BBH", 0x80 | Opcode.BINARY, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | Opcode.BINARY, 0x80 | 127, length)
    mask = secrets.token_bytes(4)
    groups: list[bytes | memoryview] = []
    small: list[memoryview] = []
    for view in views:
        if len(view) < _LARGE_PART:
            small.append(view)
            continue
        if small:
            groups.append(b"".join(small))
            small = []
        groups.append(view)
    if small:
        groups.append(b"".join(small))
    pieces = [head + mask]
    offset = 0
    for group in groups:
        turn = offset % 4  # the mask runs on over the whole payload
        pieces.append(apply_mask(group, mask[turn:] + mask[:turn]))
        offset += len(group)
    return pieces


def _send_pieces(sock: socket.socket, pieces: list[bytes]) -> None:
    """Write ``pieces`` in order: one system call where the socket gathers (not TLS)."""
    if type(sock) is not socket.socket:
        for piece in pieces:
            sock.sendall(piece)
        return
    views = [memoryview(piece) for piece in pieces]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
