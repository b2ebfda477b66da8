"""Relay Jupyter messages between websocket clients and one pooled kernel's ZMQ sockets.

The I/O only: what goes where (sessions, routing, replay, busy/idle, a kernel's death) is
decided by :class:`~kernel_gateway.relay_state.RelayState`, which this layer feeds with
what the kernel's sockets and the clients' websockets bring and whose deliveries it sends.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq

from .relay_state import (
    TO_KERNEL_CHANNELS,
    ClientConnection,
    ClientSession,
    Delivery,
    Output,
    Part,
    RelayState,
    RelayTotals,
)

log = logging.getLogger(__name__)

DELIMITER = b"<IDS|MSG>"
#: Frames sent to a kernel below this size are copied rather than sent zero-copy (see connect()).
COPY_BELOW_BYTES = 8 * 2**20


class KernelSocket:
    """One of the relay's ZMQ sockets, driven straight from the event loop.

    pyzmq's ZMQStream costs three ``EVENTS`` queries, a loop callback and a handler update
    per message received, and the same again per message sent (it queues every send for a
    later POLLOUT): about a third of the gateway's CPU per execute. Here a wake-up drains
    what is ready (a bounded batch, then the loop's turn), and sends go out at once.

    ZMQ's FD is edge-triggered and any operation on the socket may consume the edge of a
    message that arrived meanwhile, so after every send ``EVENTS`` is asked again and a
    drain is scheduled if something is waiting; otherwise that message would sit unread.
    """

    #: messages handled per wake-up before other sockets and clients get their turn
    BATCH = 64

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        on_message: Callable[[list[zmq.Frame]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.socket = socket
        self.on_message = on_message
        self.loop = loop
        self.fd = cast(int, socket.getsockopt(zmq.FD))
        #: sends the kernel had no room for yet (its high-water mark), in order
        self.backlog: deque[list[Part]] = deque()
        self._drain_scheduled = False
        self.closed = False
        loop.add_reader(self.fd, self._drain)

    def send(self, frames: list[Part]) -> None:
        if self.closed:
            return
        if not self.backlog:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.backlog.append(frames)
        else:
            self.backlog.append(frames)
        if self.backlog or _events(self.socket) & zmq.POLLIN:
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        socket = self.socket
        for _ in range(self.BATCH):
            if self.closed:
                return
            events = _events(socket)
            while self.backlog and events & zmq.POLLOUT:
                try:
                    socket.send_multipart(self.backlog[0], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.backlog.popleft()
                events = _events(socket)
            if not events & zmq.POLLIN:
                return  # all read: the FD signals again when more arrives
            self.on_message(socket.recv_multipart(zmq.NOBLOCK, copy=False))
        self._schedule_drain()  # more is waiting: continue after the loop's other work

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.socket.close(linger=0)


class KernelRelay:
    """The gateway's ZMQ connection to one kernel, shared by all of its websocket clients."""

    def __init__(
        self,
        kernel_id: str,
        connection_info: dict[str, Any],
        context: zmq.Context[zmq.Socket[bytes]],
        replay_limit_bytes: int,
        on_activity: Callable[[bool], None],
        totals: RelayTotals,
    ) -> None:
        self.kernel_id = kernel_id
        self.info = connection_info
        self.context = context
        self.on_activity = on_activity
        key = connection_info.get("key", b"")
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        self.state = RelayState(replay_limit_bytes, totals)
        self.sockets: dict[str, KernelSocket] = {}
        self._iopub_seen = asyncio.Event()
        self.closed = False

    @property
    def session(self) -> str:
        """The gateway's own session id with this kernel (its notices carry it)."""
        return self.state.session

    @property
    def sessions(self) -> dict[str, ClientSession]:
        return self.state.sessions

    @property
    def execution_state(self) -> str:
        return self.state.execution_state

    # --- set-up ---------------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        transport, ip = self.info.get("transport", "tcp"), self.info.get("ip", "127.0.0.1")

        def url(channel: str) -> str:
            port = self.info[f"{channel}_port"]
            return f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}"

        loop = asyncio.get_running_loop()
        identity = self.session.encode()
        server_key = self.info.get("curve_publickey") or b""
        server_key = server_key.encode() if isinstance(server_key, str) else bytes(server_key)
        for channel in (*TO_KERNEL_CHANNELS, "iopub"):
            if channel == "iopub":
                socket = self.context.socket(zmq.SUB)
                socket.rcvhwm = 0  # never drop output on our side, however fast it comes
                socket.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                socket = self.context.socket(zmq.DEALER)
                # shell and stdin share an identity: ipykernel sends input_request to the
                # identity of the shell socket that sent the execute_request.
                socket.identity = identity if channel != "control" else identity + b"-control"
            socket.linger = 0
            # Frames up to this size are copied into the message: sent without a copy, each one
            # wakes pyzmq's garbage-collector thread (which takes the GIL) once libzmq is done.
            socket.copy_threshold = COPY_BELOW_BYTES
            if server_key:  # CurveZMQ: the kernel's public key authenticates it; ours is throwaway
                socket.curve_serverkey = server_key
                socket.curve_publickey, socket.curve_secretkey = zmq.curve_keypair()
            socket.connect(url(channel))
            self.sockets[channel] = KernelSocket(socket, functools.partial(self._receive, channel), loop)
        await self._nudge(timeout)

    async def _nudge(self, timeout: float) -> None:
        """Wait until IOPub is subscribed, so the first cell's output is not lost.

        A SUB socket misses what is published before its subscription lands; kernel_info
        requests make the kernel publish until we see one of its status messages.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._iopub_seen.is_set():
            self._send_frames("shell", self.state.own_request("shell", "kernel_info_request", {}).parts)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"kernel {self.kernel_id} did not answer on IOPub within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._iopub_seen.wait(), min(0.005, remaining))
            except TimeoutError:
                continue

    def begin_lease(self) -> None:
        """The kernel, connected while it waited warm, is leased: its clients may come."""
        self.state.begin_lease()

    # --- clients --------------------------------------------------------------------------

    def attach(self, session_id: str, connection: ClientConnection) -> None:
        self._carry_out(self.state.attach(session_id, connection))

    def detach(self, connection: ClientConnection) -> None:
        self.state.detach(connection)

    def route(self, header_session: str, session_id: str) -> None:
        self.state.route(header_session, session_id)

    def send_from_client(self, channel: str, header: dict[str, Any], parts: Sequence[Part]) -> None:
        """Sign and forward a client's message (already validated) to the kernel."""
        self._carry_out(self.state.from_client(channel, header, parts))
        self._send_frames(channel, parts)

    def _send_frames(self, channel: str, parts: Sequence[Part]) -> None:
        signer = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts[:4]:
            signer.update(part)
        signature = signer.hexdigest().encode() if self.key else b""
        self.sockets[channel].send([DELIMITER, signature, *parts])

    def _carry_out(self, outputs: list[Output]) -> None:
        for output in outputs:
            if type(output) is Delivery:
                if not output.connection.send(output.message):
                    self.state.undelivered(output.connection, output.message)
            else:
                self.on_activity(output.busy)  # type: ignore[union-attr]

    # --- from the kernel ------------------------------------------------------------------

    def _receive(self, channel: str, frames: list[zmq.Frame]) -> None:
        try:
            start = next(i for i, f in enumerate(frames) if len(f) == len(DELIMITER) and f.bytes == DELIMITER)
            # Kernel -> gateway signatures are not checked: these sockets are connected only
            # to this kernel's own ports, so nobody else can write into them.
            parts: list[Part] = [frames[start + 2].bytes, frames[start + 3].bytes]
            parts.extend(frame.buffer for frame in frames[start + 4 :])
            self._carry_out(self.state.receive(channel, parts))
        except Exception:  # one odd message must not stop the relay
            log.exception("could not relay a %s message from kernel %s", channel, self.kernel_id)
        if self.state.iopub_seen:
            self._iopub_seen.set()

    # --- the end --------------------------------------------------------------------------

    def kernel_died(self, explanation: str) -> None:
        """Tell every waiting client that its cell will never finish, and why."""
        self._carry_out(self.state.kernel_died(explanation))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        for connection in self.state.connections():
            connection.close_connection(code, reason)
        for socket in self.sockets.values():
            socket.close()


def _events(socket: zmq.Socket[bytes]) -> int:
    # getsockopt, not the EVENTS attribute: that goes through pyzmq's __getattr__
    return cast(int, socket.getsockopt(zmq.EVENTS))
