"""The one client of the gateway: the ``%%gpu`` magic and the sidebar's server extension both use it.

Its REST methods are async first, each with a one-line blocking twin (``types`` for
``atypes``), as nbclient does: the server extension awaits them on jupyter_server's loop,
the magic (a plain function on the kernel's main thread) calls the twins. Every REST call
goes through :meth:`GatewayClient.arequest` and every failure becomes one
:class:`GatewayError` with a status and a :class:`~jupyter_gpu.protocol.Reason`, so both
users see the same words. The data path stays blocking, on sockets of its own: uploads
(one raw socket per buffer) and the kernel websocket the magic reads while a cell runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jupyter_core.utils import run_sync
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.netutil import Resolver
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .protocol import (
    KERNEL_WS_PROTOCOL_V1,
    TOKEN_ENV,
    URL_ENV,
    Reason,
    deserialize_ws_v1,
    error_body,
    serialize_ws_v1,
)
from .transfer import UPLOAD_PROTOCOL


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
        url = os.environ.get(URL_ENV, "").rstrip("/")
        token = os.environ.get(TOKEN_ENV, "")
        if not url:
            raise GatewayError(
                f"no gateway configured: set {URL_ENV} (e.g. http://127.0.0.1:8765) and {TOKEN_ENV} "
                "in the notebook kernel's environment", 0, Reason.NOT_CONFIGURED
            )
        if not token:
            raise GatewayError(f"no token for {url}: set {TOKEN_ENV} (ask the operator for one)", 0,
                               Reason.NOT_CONFIGURED)
        return cls(url, token)


class GatewayClient:
    """The gateway's API for one token: REST (async, with blocking twins), uploads, kernel websockets."""

    def __init__(self, config: GatewayConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(config.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise GatewayError(f"{URL_ENV}={config.url!r} is not an http(s) URL such as http://127.0.0.1:8765", 0,
                               Reason.NOT_CONFIGURED)
        self._parsed = parsed
        self._addresses: list[tuple[int, Any]] | None = None

    async def arequest(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; every REST call of the client goes through here."""
        seconds = timeout or self.timeout
        payload = json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT") else None)
        request = HTTPRequest(
            self.config.url + path,
            method=method,
            body=payload,
            headers={"Authorization": f"token {self.config.token}", "Content-Type": "application/json",
                     "Accept": "application/json"},
            connect_timeout=min(5.0, seconds),
            request_timeout=seconds,
            follow_redirects=False,  # the known addresses are the gateway's only
        )
        for attempt in (0, 1):
            try:
                response = await self._fetch(request)
                break
            except (OSError, HTTPClientError) as exc:  # refused, unknown host, timeout (599)
                # Once more where that cannot do anything twice: a request that is safe to repeat.
                if attempt or method not in ("GET", "DELETE"):
                    raise GatewayError(
                        f"gateway at {self.config.url} does not answer ({exc}): is `jupyter-gpu gateway` running "
                        f"there? (set by {URL_ENV})", 0, Reason.GATEWAY_UNREACHABLE
                    ) from None
        if response.code >= 400:
            raise self._error(response.code, response.body)
        try:
            return json.loads(response.body) if response.body else None
        except ValueError:
            raise self._error(response.code, response.body) from None

    async def _fetch(self, request: HTTPRequest) -> HTTPResponse:
        """Send one request on a connection of its own to the gateway's (cached) address.

        The address is looked up once, while the process runs normally: tornado's own
        lookup needs a worker thread, and there are none left when the interpreter exits,
        which is when the magic releases a notebook's leases.
        """
        if self._addresses is None:
            host = self._parsed.hostname or ""
            port = self._parsed.port or (443 if self._parsed.scheme == "https" else 80)
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            self._addresses = [(family, address) for family, _, _, _, address in infos]
        client = AsyncHTTPClient(force_instance=True, resolver=_KnownAddresses(self._addresses))
        try:
            return await client.fetch(request, raise_error=False)
        finally:
            client.close()

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

    # --- the API (async, and each one's blocking twin) ----------------------------------------

    async def atypes(self) -> list[dict[str, Any]]:
        return list(await self.arequest("GET", "/api/gpu/types"))

    async def aleases(self) -> list[dict[str, Any]]:
        return list(await self.arequest("GET", "/api/gpu/leases"))

    async def acreate_lease(self, spec: str, idle_timeout: float | None, notebook: str) -> dict[str, Any]:
        body: dict[str, Any] = {"gpu": spec, "notebook": notebook}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return dict(await self.arequest("POST", "/api/gpu/leases", body))

    async def aget_lease(self, lease_id: str, wait: float = 0) -> dict[str, Any]:
        query = f"?wait={wait}" if wait else ""
        return dict(await self.arequest("GET", f"/api/gpu/leases/{lease_id}{query}", timeout=self.timeout + wait))

    async def adelete_lease(self, lease_id: str, forget: bool = False) -> dict[str, Any]:
        """End a lease; ``forget``: keep none of its variables for the notebook's next lease."""
        return dict(await self.arequest("DELETE", f"/api/gpu/leases/{lease_id}" + ("?forget=1" if forget else "")))

    async def asnapshots(self) -> list[dict[str, Any]]:
        return list(await self.arequest("GET", "/api/gpu/snapshots"))

    async def aforget_snapshots(self, notebook: str) -> list[str]:
        query = urllib.parse.urlencode({"notebook": notebook})
        return list((await self.arequest("DELETE", f"/api/gpu/snapshots?{query}"))["deleted"])

    async def ausage(self) -> dict[str, Any]:
        return dict(await self.arequest("GET", "/api/gpu/usage"))

    async def ainterrupt(self, kernel_id: str) -> None:
        await self.arequest("POST", f"/api/kernels/{kernel_id}/interrupt", {})

    types = run_sync(atypes)
    leases = run_sync(aleases)
    create_lease = run_sync(acreate_lease)
    get_lease = run_sync(aget_lease)
    delete_lease = run_sync(adelete_lease)
    snapshots = run_sync(asnapshots)
    forget_snapshots = run_sync(aforget_snapshots)
    usage = run_sync(ausage)
    interrupt = run_sync(ainterrupt)

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
        port = self._parsed.port or (443 if self._parsed.scheme == "https" else 80)
        host = self._parsed.hostname or ""
        switched = False
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise GatewayError(f"gateway at {self.config.url} does not answer ({exc})", 0,
                               Reason.GATEWAY_UNREACHABLE) from None
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
                raise self._error(status, body)
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


_UPLOAD_SLICE = 64 * 2**20


class _KnownAddresses(Resolver):
    """A tornado resolver that answers with addresses looked up before (see GatewayClient._fetch)."""

    def initialize(self, addresses: list[tuple[int, Any]]) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC) -> list[Any]:
        return [(fam, address) for fam, address in self.addresses if family in (socket.AF_UNSPEC, fam)]


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
