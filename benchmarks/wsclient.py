"""A notebook frontend's side of the Jupyter kernel websocket, for any kernel server.

The same code drives Jupyter Kernel Gateway and the jupyter-gpu gateway, so the two are
measured with one client: asyncio ``websockets`` (asyncio sets TCP_NODELAY on its sockets,
as browsers do), the ``v1.kernel.websocket.jupyter.org`` binary framing that JupyterLab
asks for, a token in the Authorization header. Standard library + websockets only: it runs
in the project's venv and in the peers' venvs.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

V1 = "v1.kernel.websocket.jupyter.org"


def frame_v1(channel: str, parts: list[bytes]) -> bytes:
    channel_bytes = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel_bytes))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return b"".join([struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets), channel_bytes, *parts])


def unframe_v1(data: bytes) -> tuple[str, list[memoryview]]:
    view = memoryview(data)
    (count,) = struct.unpack_from("<Q", view, 0)
    offsets = struct.unpack_from(f"<{count}Q", view, 8)
    channel = bytes(view[offsets[0] : offsets[1]]).decode()
    return channel, [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


def rest(base: str, token: str, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", f"token {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


@dataclass
class _Pending:
    future: asyncio.Future[None]
    keep_text: bool
    reply: dict[str, Any] | None = None
    idle: bool = False
    lines: int = 0
    chunks: list[str] = field(default_factory=list)


@dataclass
class ExecResult:
    elapsed: float
    status: str
    lines: int
    text: str


class WsKernel:
    """One websocket to one kernel; any number of executes may be in flight."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self.pending: dict[str, _Pending] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, base: str, token: str, kernel_id: str) -> WsKernel:
        session = uuid.uuid4().hex
        url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={session}"
        ws = await connect(url, subprotocols=[V1], additional_headers={"Authorization": f"token {token}"},  # type: ignore[list-item]
                           max_size=None, compression=None, open_timeout=60)
        if ws.subprotocol != V1:
            raise RuntimeError(f"{base} did not accept the {V1} subprotocol")
        return cls(ws, session)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, str):
                    continue
                channel, parts = unframe_v1(raw)
                parent = json.loads(bytes(parts[1])) if len(parts[1]) > 2 else {}
                pending = self.pending.get(parent.get("msg_id", ""))
                if pending is None:
                    continue
                msg_type = json.loads(bytes(parts[0]))["msg_type"]
                if channel == "shell" and msg_type == "execute_reply":
                    pending.reply = json.loads(bytes(parts[3]))
                elif msg_type == "status":
                    pending.idle = json.loads(bytes(parts[3]))["execution_state"] == "idle"
                elif msg_type == "stream":
                    content = json.loads(bytes(parts[3]))
                    if content["name"] == "stdout":
                        pending.lines += content["text"].count("\n")
                        if pending.keep_text:
                            pending.chunks.append(content["text"])
                if pending.reply is not None and pending.idle and not pending.future.done():
                    pending.future.set_result(None)
        except Exception as exc:  # the socket closed: fail whatever waits
            for pending in self.pending.values():
                if not pending.future.done():
                    pending.future.set_exception(ConnectionError(f"websocket closed: {exc!r}"))

    async def execute(self, code: str, timeout: float = 120.0, keep_text: bool = False) -> ExecResult:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session, "username": "bench",
                  "date": "2026-01-01T00:00:00Z", "version": "5.3"}
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        pending = _Pending(asyncio.get_running_loop().create_future(), keep_text)
        self.pending[msg_id] = pending
        started = time.perf_counter()
        await self.ws.send(frame_v1("shell", [json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]))
        try:
            await asyncio.wait_for(pending.future, timeout)
        finally:
            self.pending.pop(msg_id, None)
        elapsed = time.perf_counter() - started
        status = (pending.reply or {}).get("status", "?")
        return ExecResult(elapsed, status, pending.lines, "".join(pending.chunks))

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


# --- measurements shared by both gateways ---------------------------------------------------


async def warm_roundtrips(base: str, token: str, kernel_id: str, code: str, repeats: int, warmup: int) -> list[float]:
    kernel = await WsKernel.open(base, token, kernel_id)
    try:
        for _ in range(warmup):
            await kernel.execute(code)
        samples = []
        for _ in range(repeats):
            result = await kernel.execute(code)
            if result.status != "ok":
                raise RuntimeError(f"execute failed: {result.status}")
            samples.append(result.elapsed)
        return samples
    finally:
        await kernel.close()


async def output_flood(base: str, token: str, kernel_id: str, code: str, timeout: float) -> dict[str, Any]:
    """Run a cell that prints a lot; how long until it finished and how many lines arrived."""
    kernel = await WsKernel.open(base, token, kernel_id)
    try:
        await kernel.execute("x = 1")
        try:
            result = await kernel.execute(code, timeout=timeout)
        except TimeoutError:
            return {"seconds": None, "lines": None, "status": f"no reply within {timeout:.0f} s"}
        return {"seconds": result.elapsed, "lines": result.lines, "status": result.status}
    finally:
        await kernel.close()


async def throughput(base: str, token: str, kernel_ids: list[str], clients_per_kernel: int, seconds: float,
                     warmup: float, code: str = "x = 1") -> dict[str, Any]:
    """Every client executes ``code`` back to back on its kernel; executes/s over ``seconds``."""
    kernels = [await WsKernel.open(base, token, kid) for kid in kernel_ids for _ in range(clients_per_kernel)]
    counts = [0] * len(kernels)
    latencies: list[float] = []
    state = {"measuring": False, "stop": False}

    async def client(index: int, kernel: WsKernel) -> None:
        while not state["stop"]:
            result = await kernel.execute(code, timeout=60)
            if state["measuring"] and not state["stop"]:
                counts[index] += 1
                latencies.append(result.elapsed)

    tasks = [asyncio.get_running_loop().create_task(client(i, k)) for i, k in enumerate(kernels)]
    try:
        await asyncio.sleep(warmup)
        state["measuring"] = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        state["stop"] = True
        window = time.perf_counter() - started
        await asyncio.wait(tasks, timeout=60)
    finally:
        for task in tasks:
            task.cancel()
        for kernel in kernels:
            await kernel.close()
    return {"executes_per_s": sum(counts) / window, "executes": sum(counts), "window_s": window,
            "clients": len(kernels), "kernels": len(kernel_ids), "latency": latencies}
