"""Start the real gateway as a process on loopback, and talk to it like a client would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tornado.websocket import WebSocketClientConnection, websocket_connect

from jupyter_gpu.protocol import (
    KERNEL_WS_PROTOCOL_V1,
    deserialize_ws_legacy_binary,
    deserialize_ws_v1,
    serialize_ws_legacy_binary,
    serialize_ws_v1,
)

READY = re.compile(r"listening at http://127\.0\.0\.1:(\d+)")


@dataclass
class Reply:
    status: int
    body: Any


@dataclass
class GatewayProcess:
    """One ``jupyter-gpu gateway`` process and the tokens of its users."""

    tmp: Path
    args: list[str]
    tokens: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log_path: Path | None = None

    def start(self, wait_warm: bool = True, timeout: float = 60.0) -> GatewayProcess:
        self.log_path = self.tmp / f"gateway-{uuid.uuid4().hex[:6]}.log"
        log = open(self.log_path, "w")  # the process owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JUPYTER_CONFIG_DIR": str(self.tmp / "config"),
               "JUPYTER_DATA_DIR": str(self.tmp / "data")}
        env.pop("JUPYTER_GPU_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_gpu.cli", "gateway", "--port", "0", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log_path.read_text())
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"gateway did not start:\n{self.log_text()}")
        if wait_warm:
            self.wait_warm(timeout)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def wait_warm(self, timeout: float = 60.0) -> None:
        """Wait until every type with a free device has its warm kernel."""
        user = next(iter(self.tokens))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            types = self.get(user, "/api/gpu/types").body
            if all(t["warm"] >= min(1, t["free"]) for t in types):
                return
            time.sleep(0.1)
        raise TimeoutError(f"warm kernels did not come up: {types}\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kernel_pids(self) -> set[int]:
        """Processes started by the gateway (its children), read from /proc."""
        assert self.proc is not None
        return children_of(self.proc.pid)

    # --- HTTP -----------------------------------------------------------------------------

    def request(self, user: str | None, method: str, path: str, body: Any = None, raw: bytes | None = None,
                token: str | None = None) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        presented = token if token is not None else (self.tokens[user] if user else None)
        if presented:
            request.add_header("Authorization", f"token {presented}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            payload, status = exc.read(), exc.code
        text = payload.decode()
        try:
            return Reply(status, json.loads(text) if text else None)
        except ValueError:
            return Reply(status, text)

    def get(self, user: str, path: str) -> Reply:
        return self.request(user, "GET", path)

    def post(self, user: str, path: str, body: Any = None) -> Reply:
        return self.request(user, "POST", path, body if body is not None else {})

    def delete(self, user: str, path: str) -> Reply:
        return self.request(user, "DELETE", path)

    def lease(self, user: str, gpu: str = "cpu", **extra: Any) -> dict[str, Any]:
        reply = self.post(user, "/api/gpu/leases", {"gpu": gpu, **extra})
        assert reply.status == 201, reply
        return dict(reply.body)

    async def connect(self, user: str, kernel_id: str, session_id: str | None = None,
                      binary: bool = True) -> KernelSocket:
        return await KernelSocket.open(self, user, kernel_id, session_id, binary)


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


class KernelSocket:
    """A minimal Jupyter websocket client: the protocol a notebook frontend speaks."""

    def __init__(self, ws: WebSocketClientConnection, session_id: str, binary: bool) -> None:
        self.ws = ws
        self.session_id = session_id
        self.binary = binary

    @classmethod
    async def open(cls, gateway: GatewayProcess, user: str, kernel_id: str, session_id: str | None,
                   binary: bool) -> KernelSocket:
        session_id = session_id or uuid.uuid4().hex
        url = gateway.url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?session_id={session_id}"
        url += f"&token={gateway.tokens[user]}"
        ws = await websocket_connect(url, subprotocols=[KERNEL_WS_PROTOCOL_V1] if binary else [],
                                     max_message_size=1 << 30)
        return cls(ws, session_id, binary)

    def send(self, channel: str, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None,
             buffers: list[bytes] | None = None, session: str | None = None,
             metadata: dict[str, Any] | None = None) -> str:
        """Send one message; ``session`` overrides the header's session (default: the URL's)."""
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": session or self.session_id, "username": "test",
                  "date": "2026-01-01T00:00:00Z", "version": "5.3"}
        parent = parent or {}
        buffers = buffers or []
        if self.binary:
            parts = [json.dumps(x).encode() for x in (header, parent, metadata or {}, content)]
            self.ws.write_message(serialize_ws_v1(channel, parts + buffers), binary=True)
        else:
            msg = {"header": header, "parent_header": parent, "metadata": metadata or {}, "content": content,
                   "channel": channel}
            if buffers:  # plain-JSON clients send buffers in the legacy binary frame
                self.ws.write_message(serialize_ws_legacy_binary(msg, buffers), binary=True)
            else:
                self.ws.write_message(json.dumps(msg))
        return msg_id

    def execute(self, code: str, allow_stdin: bool = False, session: str | None = None) -> str:
        return self.send("shell", "execute_request", {"code": code, "silent": False, "store_history": True,
                                                      "user_expressions": {}, "allow_stdin": allow_stdin,
                                                      "stop_on_error": True}, session=session)

    async def recv(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """The next message as a dict with its ``buffers`` (None when the socket closed)."""
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            return None
        if isinstance(raw, bytes) and self.binary:
            channel, parts = deserialize_ws_v1(raw)
            header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
            return {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata,
                    "content": content, "msg_type": header["msg_type"], "buffers": [bytes(p) for p in parts[4:]]}
        if isinstance(raw, bytes):  # plain JSON, but the message has buffers: the legacy binary frame
            msg, buffers = deserialize_ws_legacy_binary(raw)
            return {**msg, "buffers": buffers}
        return dict(json.loads(raw))

    async def recv_until(self, predicate: Callable[[dict[str, Any]], bool],
                         timeout: float = 30.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read until a message satisfies ``predicate``; return it and every message read before it."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message within {timeout} s; saw {[m['msg_type'] for m in seen]}")
            msg = await self.recv(remaining)
            if msg is None:
                raise ConnectionError(f"socket closed: {self.ws.close_code} {self.ws.close_reason}")
            if predicate(msg):
                return msg, seen
            seen.append(msg)

    async def run(self, code: str, timeout: float = 60.0,
                  session: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Execute and collect this request's IOPub messages until its reply and idle both came."""
        msg_id = self.execute(code, session=session)
        return await self.collect(msg_id, timeout)

    async def collect(self, msg_id: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        outputs: list[dict[str, Any]] = []
        reply: dict[str, Any] | None = None
        idle = False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            msg = await self.recv(max(0.1, deadline - time.monotonic()))
            if msg is None:
                raise ConnectionError(f"socket closed: {self.ws.close_code} {self.ws.close_reason}")
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                reply = msg
            elif msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
            else:
                outputs.append(msg)
        return reply, outputs

    def close(self) -> None:
        self.ws.close()


def stdout_text(outputs: list[dict[str, Any]]) -> str:
    return stream_text(outputs, "stdout")


def stream_text(outputs: list[dict[str, Any]], name: str) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)


T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}; last saw {value!r}")
        time.sleep(interval)


async def apoll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """``poll`` for async tests: the event loop keeps serving open websockets meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}; last saw {value!r}")
        await asyncio.sleep(interval)


def host_pid(gateway: GatewayProcess, kernel_id: str) -> int | None:
    """The host pid of the gateway's child that runs this sandboxed kernel: bubblewrap's command
    line names the kernel's directory, which is named by its kernel id."""
    for pid in gateway.kernel_pids():
        try:
            if kernel_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


async def kernel_host_pid(gateway: GatewayProcess, socket: KernelSocket, kernel_id: str) -> int:
    """The host pid of the process that runs this kernel, sandboxed or not (in a sandbox the
    kernel's own pid is its namespace's, 2)."""
    found = host_pid(gateway, kernel_id)
    if found is not None:
        return found
    reply, outputs = await socket.run("import os; print(os.getpid())")
    assert reply["content"]["status"] == "ok", reply
    return int(stdout_text(outputs))
