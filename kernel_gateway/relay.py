"""Relay Jupyter messages between websocket clients and one pooled kernel's ZMQ sockets.

Frames from the kernel are forwarded as they arrive, without decoding their content: only
the small header and parent header are parsed, to route replies to the client session
that asked and to see when the kernel starts and stops executing. Nothing is rate
limited or dropped; a session whose websocket is gone gets its messages kept in a
bounded buffer and replayed when it reconnects with the same session id.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import zmq

log = logging.getLogger(__name__)

DELIMITER = b"<IDS|MSG>"
TO_KERNEL_CHANNELS = ("shell", "control", "stdin")
Part = bytes | memoryview


@dataclass(slots=True)
class RelayedMessage:
    """One Jupyter message as frames: header, parent header, metadata, content, buffers."""

    channel: str
    msg_id: str
    msg_type: str
    parts: Sequence[Part]

    @property
    def nbytes(self) -> int:
        return sum(len(part) for part in self.parts)


class ClientConnection(Protocol):
    """What the relay needs of a websocket: send a message, close with a reason."""

    def send(self, message: RelayedMessage) -> bool:
        """Hand the message to the socket; False when it is closing and cannot take it."""
        ...

    def close_connection(self, code: int, reason: str) -> None: ...


def make_message(channel: str, msg_type: str, content: dict[str, Any], parent: Part, session: str) -> RelayedMessage:
    """A message the gateway itself speaks (notices, the death of a kernel)."""
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": "jupyter-gpu",
        "date": datetime.now(UTC).isoformat(),
        "version": "5.3",
    }
    parts = [json.dumps(header).encode(), bytes(parent), b"{}", json.dumps(content).encode()]
    return RelayedMessage(channel, msg_id, msg_type, parts)


class ClientSession:
    """One client session id: its live connections, or a bounded buffer while it has none."""

    def __init__(self, session_id: str, limit_bytes: int) -> None:
        self.session_id = session_id
        self.limit_bytes = limit_bytes
        self.connections: list[ClientConnection] = []
        self.buffer: deque[RelayedMessage] = deque()
        self.buffered_bytes = 0
        self.lost_messages = 0
        self.lost_bytes = 0
        self.lost_parent: Part = b"{}"
        self.ever_connected = False

    def deliver(self, message: RelayedMessage) -> None:
        # A socket that is closing (its client vanished, on_close not run yet) cannot take
        # the message: keep it for the reconnect instead of losing it.
        delivered = [connection.send(message) for connection in self.connections]
        if any(delivered):
            return
        if not self.ever_connected:
            return
        size = message.nbytes
        # Frames from ZMQ are views on its buffers; keep a copy that outlives them.
        self.buffer.append(
            RelayedMessage(message.channel, message.msg_id, message.msg_type, [bytes(part) for part in message.parts])
        )
        self.buffered_bytes += size
        while self.buffered_bytes > self.limit_bytes:
            # Drop the oldest output, never a reply or a status: they are small, two or three
            # per request, and without them a notebook shows the cell as running forever.
            index = next((i for i, kept in enumerate(self.buffer) if _droppable(kept)), None)
            if index is None:
                break
            dropped = self.buffer[index]
            del self.buffer[index]
            self.buffered_bytes -= dropped.nbytes
            self.lost_messages += 1
            self.lost_bytes += dropped.nbytes
            self.lost_parent = dropped.parts[1]

    def attach(self, connection: ClientConnection, gateway_session: str) -> None:
        self.ever_connected = True
        if self.lost_messages:
            # Sizes through _size: whole MB alone said "keeps at most 0 MB" for small buffers.
            count = self.lost_messages
            text = (
                f"jupyter-gpu: {count} message{'' if count == 1 else 's'} ({_size(self.lost_bytes)}) of output "
                f"were lost while this client was disconnected: the gateway keeps at most {_size(self.limit_bytes)} "
                "per session (GatewayApp.replay_buffer_bytes).\n"
            )
            connection.send(
                make_message("iopub", "stream", {"name": "stderr", "text": text}, self.lost_parent, gateway_session)
            )
            self.lost_messages = self.lost_bytes = 0
        while self.buffer:
            connection.send(self.buffer.popleft())
        self.buffered_bytes = 0
        self.connections.append(connection)

    def detach(self, connection: ClientConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)


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
    ) -> None:
        self.kernel_id = kernel_id
        self.info = connection_info
        self.context = context
        self.replay_limit_bytes = replay_limit_bytes
        self.on_activity = on_activity
        key = connection_info.get("key", b"")
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        # The gateway's own session: kernel_info nudges and notices; never routed to clients.
        self.session = uuid.uuid4().hex
        self.sessions: dict[str, ClientSession] = {}
        self.sockets: dict[str, KernelSocket] = {}
        self.execution_state = "idle"
        self.in_flight: dict[str, tuple[str, bytes]] = {}  # execute msg_id -> (session, header)
        self.messages_relayed = 0
        self._iopub_seen = asyncio.Event()
        self.closed = False

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
            self._send_own("shell", "kernel_info_request", {})
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"kernel {self.kernel_id} did not answer on IOPub within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._iopub_seen.wait(), min(0.005, remaining))
            except TimeoutError:
                continue

    def _send_own(self, channel: str, msg_type: str, content: dict[str, Any]) -> None:
        message = make_message(channel, msg_type, content, b"{}", self.session)
        self._send_frames(channel, list(message.parts))

    # --- clients --------------------------------------------------------------------------

    def attach(self, session_id: str, connection: ClientConnection) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = ClientSession(session_id, self.replay_limit_bytes)
        session.attach(connection, self.session)

    def route(self, header_session: str, session_id: str) -> None:
        """Deliver replies to requests sent under ``header_session`` to client session ``session_id``.

        Clients built on jupyter_client's Session put their own session id in headers, and
        the kernel routes replies by it; it need not be the websocket's ``session_id``. An
        alias (not a second attachment) keeps IOPub to one copy per connection and lets a
        reconnect under ``session_id`` replay the missed replies too.
        """
        current, target = self.sessions.get(header_session), self.sessions.get(session_id)
        if target is None or current is target:
            return
        if current is not None and current.session_id == header_session:
            return  # another client's own session id: its messages stay with it
        self.sessions[header_session] = target

    def send_from_client(self, channel: str, header: dict[str, Any], parts: Sequence[Part]) -> None:
        """Sign and forward a client's message (already validated) to the kernel."""
        # Only a shell execute_request is sure to be answered by busy/idle statuses; marking
        # the lease busy for one sent elsewhere would hold the GPU forever.
        if channel == "shell" and header.get("msg_type") == "execute_request":
            self.in_flight[str(header["msg_id"])] = (str(header.get("session", "")), bytes(parts[0]))
            self.on_activity(True)
        self._send_frames(channel, parts)

    def _send_frames(self, channel: str, parts: Sequence[Part]) -> None:
        signer = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts[:4]:
            signer.update(part)
        signature = signer.hexdigest().encode() if self.key else b""
        self.sockets[channel].send([DELIMITER, signature, *parts])

    # --- from the kernel ------------------------------------------------------------------

    def _receive(self, channel: str, frames: list[zmq.Frame]) -> None:
        try:
            self._dispatch(channel, frames)
        except Exception:  # one odd message must not stop the relay
            log.exception("could not relay a %s message from kernel %s", channel, self.kernel_id)

    def _dispatch(self, channel: str, frames: list[zmq.Frame]) -> None:
        start = next(i for i, frame in enumerate(frames) if len(frame) == len(DELIMITER) and frame.bytes == DELIMITER)
        # Kernel -> gateway signatures are not checked: these sockets are connected only
        # to this kernel's own ports, so nobody else can write into them.
        header_bytes, parent_bytes = frames[start + 2].bytes, frames[start + 3].bytes
        parts: list[Part] = [header_bytes, parent_bytes]
        parts.extend(frame.buffer for frame in frames[start + 4 :])
        header = json.loads(header_bytes)
        parent = json.loads(parent_bytes) if len(parent_bytes) > 2 else {}
        msg_type = header.get("msg_type", "")
        parent_session = parent.get("session")
        if channel == "iopub" and msg_type == "status":
            self._track_state(json.loads(bytes(parts[3])).get("execution_state", ""), parent)
        if parent_session == self.session:
            if channel == "iopub":
                self._iopub_seen.set()
            return
        if msg_type == "execute_reply":
            self.in_flight.pop(parent.get("msg_id", ""), None)
        self.messages_relayed += 1
        message = RelayedMessage(channel, header.get("msg_id", ""), msg_type, parts)
        if channel == "iopub":
            self._broadcast(message, parent_session)
        else:
            session = self.sessions.get(parent_session or "")
            if session is not None:
                session.deliver(message)

    def _broadcast(self, message: RelayedMessage, parent_session: str | None) -> None:
        # IOPub goes to every client of the kernel, as in jupyter_server; a disconnected
        # session keeps what belongs to its own requests. A session listed under two ids
        # (see route) gets one copy.
        reached: set[int] = set()
        for session_id, session in self.sessions.items():
            if (session.connections or session_id == parent_session) and id(session) not in reached:
                reached.add(id(session))
                session.deliver(message)

    def _track_state(self, state: str, parent: dict[str, Any]) -> None:
        if not state:
            return
        if parent.get("session") != self.session:
            self.execution_state = state
        if parent.get("msg_type") == "execute_request" and state in ("busy", "idle"):
            self.on_activity(state == "busy")

    # --- the end --------------------------------------------------------------------------

    def kernel_died(self, explanation: str) -> None:
        """Tell every waiting client that its cell will never finish, and why."""
        for msg_id, (session_id, header) in list(self.in_flight.items()):
            error = {"ename": "KernelDied", "evalue": explanation, "traceback": [f"KernelDied: {explanation}"]}
            self._broadcast(make_message("iopub", "error", error, header, self.session), session_id)
            reply = {"status": "error", "execution_count": None, **error}
            target = self.sessions.get(session_id)
            if target is not None:
                target.deliver(make_message("shell", "execute_reply", reply, header, self.session))
            # nbclient and JupyterLab consider a cell finished at its idle status
            idle = make_message("iopub", "status", {"execution_state": "idle"}, header, self.session)
            self._broadcast(idle, session_id)
            self.in_flight.pop(msg_id, None)
        self.execution_state = "dead"
        self._broadcast(make_message("iopub", "status", {"execution_state": "dead"}, b"{}", self.session), None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        for session in self.sessions.values():
            for connection in list(session.connections):
                connection.close_connection(code, reason)
        for socket in self.sockets.values():
            socket.close()


def _events(socket: zmq.Socket[bytes]) -> int:
    # getsockopt, not the EVENTS attribute: that goes through pyzmq's __getattr__
    return cast(int, socket.getsockopt(zmq.EVENTS))


def _droppable(message: RelayedMessage) -> bool:
    return message.channel == "iopub" and message.msg_type != "status"


def _size(nbytes: int) -> str:
    """A byte count for people: ``840 bytes``, ``2.0 kB``, ``67.1 MB``."""
    if nbytes < 1000:
        return f"{nbytes} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if nbytes < scale * 1000:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e9:.1f} GB"
