"""The notebook side's connection to the gateway: REST for leases, a websocket per kernel.

Synchronous on purpose: a cell magic is a plain function running on the kernel's main
thread, so blocking calls (interruptible by Ctrl-C) are the natural fit.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .protocol import KERNEL_WS_PROTOCOL_V1, TOKEN_ENV, URL_ENV, deserialize_ws_v1, serialize_ws_v1
from .transfer import UPLOAD_PROTOCOL


class GatewayError(RuntimeError):
    """The gateway said no, or could not be reached; the message says what to do."""

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
        url = os.environ.get(URL_ENV, "").rstrip("/")
        token = os.environ.get(TOKEN_ENV, "")
        if not url:
            raise GatewayError(
                f"no gateway configured: set {URL_ENV} (e.g. http://127.0.0.1:8765) and {TOKEN_ENV} "
                "in the notebook kernel's environment"
            )
        if not token:
            raise GatewayError(f"no token for {url}: set {TOKEN_ENV} (ask the operator for one)")
        return cls(url, token)


class GatewayClient:
    """REST calls to one gateway over one kept-alive HTTP connection."""

    def __init__(self, config: GatewayConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(config.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise GatewayError(f"{URL_ENV}={config.url!r} is not an http(s) URL such as http://127.0.0.1:8765")
        self._parsed = parsed
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._parsed.hostname or "", self._parsed.port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; every outbound HTTP call of the client goes through here."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"token {self.config.token}", "Content-Type": "application/json"}
        for attempt in (0, 1):
            reused = self._conn is not None
            conn = self._connection()
            conn.timeout = timeout or self.timeout
            try:
                conn.request(method, self._parsed.path + path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                # Retry once where that cannot do anything twice: a kept-alive connection the
                # server had closed, or a request that is safe to repeat.
                stale = reused and isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError)
                if attempt or not (stale or method in ("GET", "DELETE")):
                    raise GatewayError(
                        f"the gateway at {self.config.url} does not answer ({type(exc).__name__}: {exc}); "
                        f"check that it runs and that {URL_ENV} is right"
                    ) from None
        if response.status >= 400:
            raise _gateway_error(response.status, data)
        return json.loads(data) if data else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the API ----------------------------------------------------------------------------

    def types(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/gpu/types"))

    def create_lease(self, spec: str, idle_timeout: float | None, notebook: str) -> dict[str, Any]:
        body: dict[str, Any] = {"gpu": spec, "notebook": notebook}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return dict(self.request("POST", "/api/gpu/leases", body))

    def get_lease(self, lease_id: str, wait: float = 0) -> dict[str, Any]:
        query = f"?wait={wait}" if wait else ""
        return dict(self.request("GET", f"/api/gpu/leases/{lease_id}{query}", timeout=self.timeout + wait))

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

    def interrupt(self, kernel_id: str) -> None:
        self.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})

    def open_channel(self, kernel_id: str, session_id: str | None = None) -> KernelChannel:
        return KernelChannel.open(self.config, kernel_id, session_id)

    def upload(self, kernel_id: str, blob: Any, timeout: float = 60.0) -> str:
        """Send one large buffer to the kernel's staging directory; returns its upload id.

        One HTTP/1.1 Upgrade request: the gateway checks token, kernel and size and answers
        101, then the raw bytes follow (sent from the buffer itself, no copy in Python) and
        the gateway writes back one JSON line once all of them are in the file. Raises
        GatewayError, with ``reason == "unsupported"`` where the gateway cannot stage.
        """
        view = memoryview(blob).cast("B")
        port = self._parsed.port or (443 if self._parsed.scheme == "https" else 80)
        host = self._parsed.hostname or ""
        switched = False
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise GatewayError(f"the gateway at {self.config.url} does not answer ({exc})") from None
        try:
            if self._parsed.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            request = (
                f"GET {self._parsed.path}/api/kernels/{kernel_id}/upload?nbytes={len(view)} HTTP/1.1\r\n"
                f"Host: {self._parsed.netloc}\r\nAuthorization: token {self.config.token}\r\n"
                f"Connection: Upgrade\r\nUpgrade: {UPLOAD_PROTOCOL}\r\n\r\n"
            )
            sock.sendall(request.encode())
            reader = sock.makefile("rb")
            status, headers = _read_head(reader)
            if status != 101:
                body = reader.read(int(headers.get("content-length", "0") or 0))
                raise _gateway_error(status, body)
            switched = True
            # The gateway reads exactly len(view) bytes. Sent in slices, so that the timeout
            # is for a stall, not for the whole (sendall's timeout is a total).
            for offset in range(0, len(view), _UPLOAD_SLICE):
                sock.sendall(view[offset : offset + _UPLOAD_SLICE])
            line = reader.readline(64 * 1024)
            result = json.loads(line) if line else {"message": "the gateway closed the upload", "reason": "lost"}
            if "upload" not in result:
                raise GatewayError(result.get("message", "upload failed"), 500, result.get("reason", ""))
            return str(result["upload"])
        except (OSError, ValueError) as exc:
            # Before the 101 this is no answer from our gateway (a proxy in between?); after
            # it, the upload was lost mid-way.
            raise GatewayError(f"upload of {len(view)} bytes to the gateway at {self.config.url} failed: "
                               f"{type(exc).__name__}: {exc}", 0, "lost" if switched else "") from None
        finally:
            sock.close()


_UPLOAD_SLICE = 64 * 2**20


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


def _gateway_error(status: int, data: bytes) -> GatewayError:
    try:
        error = json.loads(data)
        message, reason = error.get("message", ""), error.get("reason", "")
    except ValueError:
        message, reason = data.decode(errors="replace")[:200], ""
    return GatewayError(message or f"HTTP {status}", status, reason)


class _BulkClientConnection(ClientConnection):
    """Reads the socket in 4 MiB gulps: pulled arrays arrive as multi-megabyte messages, and
    the default 64 KiB reads cost a Python round of parsing per 64 KiB."""

    recv_bufsize = 4 * 2**20


class KernelChannel:
    """One websocket to a kernel, speaking the v1 binary framing."""

    def __init__(self, ws: ClientConnection, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id

    @classmethod
    def open(cls, config: GatewayConfig, kernel_id: str, session_id: str | None = None) -> KernelChannel:
        session_id = session_id or uuid.uuid4().hex
        base = config.url.replace("http", "ws", 1)
        url = f"{base}/api/kernels/{kernel_id}/channels?session_id={session_id}"
        parsed = urllib.parse.urlsplit(config.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        sock = socket.create_connection((parsed.hostname or "", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, sent now
        try:
            ws = connect(
                url,
                sock=sock,
                subprotocols=[KERNEL_WS_PROTOCOL_V1],  # type: ignore[list-item]
                additional_headers={"Authorization": f"token {config.token}"},
                max_size=None,
                compression=None,
                create_connection=_BulkClientConnection,
                open_timeout=30,
            )
        except Exception as exc:
            sock.close()
            raise GatewayError(f"could not open the kernel websocket at {url}: {exc}") from None
        return cls(ws, session_id)

    def send(self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Any] = (),
             metadata: dict[str, Any] | None = None, parent: dict[str, Any] | None = None) -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session_id, "username": "jupyter-gpu",
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": "5.3"}
        parts = [json.dumps(header).encode(), json.dumps(parent or {}).encode(),
                 json.dumps(metadata or {}).encode(), json.dumps(content).encode(), *buffers]
        self.ws.send(serialize_ws_v1(channel, parts))
        return msg_id

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message, or None when ``timeout`` passed. Raises ConnectionClosed."""
        try:
            raw = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        if isinstance(raw, str):
            msg: dict[str, Any] = json.loads(raw)
            return msg
        channel, parts = deserialize_ws_v1(raw)
        header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
        return {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata,
                "content": content, "buffers": parts[4:]}

    @property
    def closed(self) -> bool:
        from websockets.protocol import State

        return bool(self.ws.protocol.state is not State.OPEN)

    def close_reason(self) -> str:
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.reason if rcvd is not None else ""

    @property
    def closed_by_gateway(self) -> bool:
        """The gateway closed the socket on purpose (lease ended), as opposed to a lost connection."""
        return self.ws.protocol.close_rcvd is not None

    def close(self) -> None:
        try:
            self.ws.close()
        except ConnectionClosed:
            pass
