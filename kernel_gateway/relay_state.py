"""What the relay between one kernel and its websocket clients decides, without any I/O.

Sessions, routing, requests in flight, busy/idle and the death of a kernel live here as a
state object, after python-websockets' ``Protocol``: it is fed what arrives (a kernel
message as ``(channel, parts)``, a client's request, a client attaching or leaving) and
answers with what to do: :class:`Delivery` (send this message on that connection) and
:class:`Activity` (the kernel started or finished a client's execute). It never touches a
socket, so it is tested by feeding it messages (``tests/test_relay_state.py``) and the
same state can sit behind another transport to a kernel (a Ray actor, a restored kernel).
:mod:`kernel_gateway.relay` is the thin layer that moves the bytes over ZMQ.

Frames from the kernel are forwarded without decoding their content: only the small header
and parent header are parsed, to route replies to the client session that asked and to see
when the kernel starts and stops executing. Nothing is rate limited or dropped; a session
whose websocket is gone gets its messages kept in a bounded buffer and replayed when it
reconnects with the same session id.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from jupyter_gpu.protocol import KERNEL_DIED_ERROR

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
    """What the relay's I/O layer needs of a websocket; to the state it is only a handle."""

    def send(self, message: RelayedMessage) -> bool:
        """Hand the message to the socket; False when it is closing and cannot take it."""
        ...

    def close_connection(self, code: int, reason: str) -> None: ...


@dataclass(slots=True)
class Delivery:
    """Send ``message`` on ``connection``; if it cannot take it, tell :meth:`RelayState.undelivered`."""

    connection: ClientConnection
    message: RelayedMessage


@dataclass(slots=True)
class Activity:
    """The kernel started (``busy``) or finished a client's execute_request: the lease's idle clock."""

    busy: bool


Output = Delivery | Activity


@dataclass(slots=True)
class RelayTotals:
    """Counts shared by all of a gateway's relays, so that they outlive each relay: a
    Prometheus counter summed over the open relays alone fell when a lease ended."""

    messages_relayed: int = 0


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

    def deliver(self, message: RelayedMessage, out: list[Output]) -> None:
        if self.connections:
            out.extend(Delivery(connection, message) for connection in self.connections)
        elif self.ever_connected:
            self.keep(message)

    def keep(self, message: RelayedMessage) -> None:
        """Buffer the message for a reconnect, dropping the oldest output past the limit."""
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

    def attach(self, connection: ClientConnection, gateway_session: str, out: list[Output]) -> None:
        self.ever_connected = True
        if self.lost_messages:
            # Sizes through _size: whole MB alone said "keeps at most 0 MB" for small buffers.
            count = self.lost_messages
            text = (
                f"jupyter-gpu: {count} message{'' if count == 1 else 's'} ({_size(self.lost_bytes)}) of output "
                f"were lost while this client was disconnected: the gateway keeps at most {_size(self.limit_bytes)} "
                "per session (GatewayApp.replay_buffer_bytes).\n"
            )
            notice = make_message("iopub", "stream", {"name": "stderr", "text": text}, self.lost_parent,
                                  gateway_session)
            out.append(Delivery(connection, notice))
            self.lost_messages = self.lost_bytes = 0
        out.extend(Delivery(connection, kept) for kept in self.buffer)
        self.buffer.clear()
        self.buffered_bytes = 0
        self.connections.append(connection)

    def detach(self, connection: ClientConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)


class RelayState:
    """Sessions, routing and in-flight requests of one kernel's relay (see the module docstring)."""

    def __init__(self, replay_limit_bytes: int, totals: RelayTotals) -> None:
        self.replay_limit_bytes = replay_limit_bytes
        self.totals = totals
        # The gateway's own session: kernel_info nudges and notices; never routed to clients.
        self.session = uuid.uuid4().hex
        #: client session id (or an alias, see route) -> its session
        self.sessions: dict[str, ClientSession] = {}
        self.execution_state = "idle"
        #: execute msg_id -> (client session, the request's header), until its reply
        self.in_flight: dict[str, tuple[str, bytes]] = {}
        #: the kernel answered one of the gateway's own requests on IOPub: its subscription is live
        self.iopub_seen = False
        #: False while the kernel waits warm for a lease (the gateway connected ahead of it)
        self.leased = False
        #: parent sessions the kernel spoke for before its lease (its warm-up, for one): what
        #: comes of them later, even after the lease began, belongs to no user of it
        self.before_lease: set[str] = set()

    def begin_lease(self) -> None:
        """The kernel is leased: from now on its messages go to the lease's clients."""
        self.leased = True
        self.execution_state = "idle"

    # --- clients --------------------------------------------------------------------------

    def attach(self, session_id: str, connection: ClientConnection) -> list[Output]:
        """A websocket joins ``session_id``: it gets what that session missed, then everything new."""
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = ClientSession(session_id, self.replay_limit_bytes)
        out: list[Output] = []
        session.attach(connection, self.session, out)
        return out

    def detach(self, connection: ClientConnection) -> None:
        """A websocket closed: its sessions keep their messages for a reconnect."""
        for session in self.sessions.values():
            session.detach(connection)

    def undelivered(self, connection: ClientConnection, message: RelayedMessage) -> None:
        """A delivery's socket was closing (its client vanished, the close not seen yet): keep the
        message for the reconnect unless another connection of the same session took it."""
        for session in {id(s): s for s in self.sessions.values() if connection in s.connections}.values():
            session.detach(connection)
            if not session.connections:
                session.keep(message)

    def connections(self) -> list[ClientConnection]:
        """Every attached websocket, once each."""
        unique: dict[int, ClientConnection] = {}
        for session in self.sessions.values():
            unique.update((id(connection), connection) for connection in session.connections)
        return list(unique.values())

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

    def from_client(self, channel: str, header: dict[str, Any], parts: Sequence[Part]) -> list[Output]:
        """A client's (validated) request on its way to the kernel."""
        # Only a shell execute_request is sure to be answered by busy/idle statuses; marking
        # the lease busy for one sent elsewhere would hold the GPU forever.
        if channel == "shell" and header.get("msg_type") == "execute_request":
            self.in_flight[str(header["msg_id"])] = (str(header.get("session", "")), bytes(parts[0]))
            return [Activity(True)]
        return []

    def own_request(self, channel: str, msg_type: str, content: dict[str, Any]) -> RelayedMessage:
        """A request of the gateway's own (a kernel_info nudge): its replies are never relayed."""
        return make_message(channel, msg_type, content, b"{}", self.session)

    # --- from the kernel ------------------------------------------------------------------

    def receive(self, channel: str, parts: Sequence[Part]) -> list[Output]:
        """A kernel message: header, parent header, metadata, content, buffers (no signature)."""
        header = json.loads(bytes(parts[0]))  # bytes(bytes) is the object itself: no copy
        parent = json.loads(bytes(parts[1])) if len(parts[1]) > 2 else {}
        msg_type = header.get("msg_type", "")
        parent_session = parent.get("session")
        out: list[Output] = []
        if parent_session != self.session and (not self.leased or parent_session in self.before_lease):
            if not self.leased and parent_session:
                self.before_lease.add(parent_session)
            return out
        if channel == "iopub" and msg_type == "status":
            self._track_state(json.loads(bytes(parts[3])).get("execution_state", ""), parent, out)
        if parent_session == self.session:
            if channel == "iopub":
                self.iopub_seen = True
            return out
        if msg_type == "execute_reply":
            self.in_flight.pop(parent.get("msg_id", ""), None)
        self.totals.messages_relayed += 1
        message = RelayedMessage(channel, header.get("msg_id", ""), msg_type, parts)
        if channel == "iopub":
            self._broadcast(message, parent_session, out)
        else:
            session = self.sessions.get(parent_session or "")
            if session is not None:
                session.deliver(message, out)
        return out

    def _broadcast(self, message: RelayedMessage, parent_session: str | None, out: list[Output]) -> None:
        # IOPub goes to every client of the kernel, as in jupyter_server; a disconnected
        # session keeps what belongs to its own requests. A session listed under two ids
        # (see route) gets one copy.
        reached: set[int] = set()
        for session_id, session in self.sessions.items():
            if (session.connections or session_id == parent_session) and id(session) not in reached:
                reached.add(id(session))
                session.deliver(message, out)

    def _track_state(self, state: str, parent: dict[str, Any], out: list[Output]) -> None:
        if not state:
            return
        if parent.get("session") != self.session:
            self.execution_state = state
        if parent.get("msg_type") == "execute_request" and state in ("busy", "idle"):
            out.append(Activity(state == "busy"))

    # --- the end --------------------------------------------------------------------------

    def kernel_died(self, explanation: str) -> list[Output]:
        """Tell every waiting client that its cell will never finish, and why."""
        out: list[Output] = []
        for msg_id, (session_id, header) in list(self.in_flight.items()):
            error = {"ename": KERNEL_DIED_ERROR, "evalue": explanation,
                     "traceback": [f"{KERNEL_DIED_ERROR}: {explanation}"]}
            self._broadcast(make_message("iopub", "error", error, header, self.session), session_id, out)
            reply = {"status": "error", "execution_count": None, **error}
            target = self.sessions.get(session_id)
            if target is not None:
                target.deliver(make_message("shell", "execute_reply", reply, header, self.session), out)
            # nbclient and JupyterLab consider a cell finished at its idle status
            idle = make_message("iopub", "status", {"execution_state": "idle"}, header, self.session)
            self._broadcast(idle, session_id, out)
            self.in_flight.pop(msg_id, None)
        self.execution_state = "dead"
        dead = make_message("iopub", "status", {"execution_state": "dead"}, b"{}", self.session)
        self._broadcast(dead, None, out)
        return out


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
