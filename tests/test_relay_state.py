"""The relay's decisions, fed messages and checked for what it wants sent: no sockets, no kernel.

In the style of python-websockets' ``tests/test_protocol.py``: each test feeds the state what
would arrive (a kernel message as ``(channel, parts)``, a client attaching, a request) and
checks the deliveries and activity it answers with.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from kernel_gateway.relay_state import (
    Activity,
    Delivery,
    Output,
    RelayedMessage,
    RelayState,
    RelayTotals,
)


class Socket:
    """A websocket as the state sees it: a handle. (The I/O layer calls send; the state never does.)"""

    def __init__(self, name: str) -> None:
        self.name = name

    def send(self, message: RelayedMessage) -> bool:
        raise AssertionError("the state must not send")

    def close_connection(self, code: int, reason: str) -> None:
        raise AssertionError("the state must not close")

    def __repr__(self) -> str:
        return self.name


def header(msg_type: str, session: str, msg_id: str | None = None) -> dict[str, Any]:
    return {"msg_id": msg_id or uuid.uuid4().hex, "msg_type": msg_type, "session": session}


def kernel_message(msg_type: str, parent: dict[str, Any], content: dict[str, Any], size: int = 0) -> list[bytes]:
    """A message from the kernel as the ZMQ layer hands it over: header, parent, metadata, content, buffers."""
    parts = [json.dumps(header(msg_type, "kernel")).encode(), json.dumps(parent).encode(), b"{}",
             json.dumps(content).encode()]
    return parts + ([b"x" * size] if size else [])


def request(state: RelayState, session: str, msg_type: str = "execute_request",
            channel: str = "shell") -> tuple[dict[str, Any], list[Output]]:
    sent = header(msg_type, session)
    parts = [json.dumps(sent).encode(), b"{}", b"{}", b"{}"]
    return sent, state.from_client(channel, sent, parts)


def stream(parent: dict[str, Any], text: str, size: int = 0) -> list[bytes]:
    return kernel_message("stream", parent, {"name": "stdout", "text": text}, size)


def status(parent: dict[str, Any], state: str) -> list[bytes]:
    return kernel_message("status", parent, {"execution_state": state})


def sent(outputs: list[Output]) -> list[tuple[str, str, str]]:
    """(connection, msg_type, text or state) of each delivery, in order."""
    rows = []
    for output in outputs:
        assert isinstance(output, Delivery), output
        content = json.loads(bytes(output.message.parts[3]))
        detail = content.get("text") or content.get("execution_state") or content.get("status") or ""
        rows.append((repr(output.connection), output.message.msg_type, detail))
    return rows


def new_state(limit: int = 10_000) -> RelayState:
    """The state of a leased kernel's relay."""
    state = RelayState(limit, RelayTotals())
    state.begin_lease()
    return state


def test_nothing_the_kernel_said_for_others_before_its_lease_reaches_the_leases_clients() -> None:
    state = RelayState(10_000, RelayTotals())  # connected while the kernel waits warm
    warm_up = header("execute_request", "warm-up")
    assert state.receive("iopub", status(warm_up, "busy")) == []
    assert state.receive("iopub", stream(warm_up, "warm-up output\n")) == []
    nudge = state.own_request("shell", "kernel_info_request", {})
    state.receive("iopub", status(json.loads(bytes(nudge.parts[0])), "idle"))
    assert state.iopub_seen  # the gateway's own handshake still completes before the lease

    state.begin_lease()
    user = Socket("user")
    assert state.attach("s", user) == []  # nothing kept from before the lease
    # the warm-up's late output (a thread it started prints) is still not the user's
    assert state.receive("iopub", stream(warm_up, "late warm-up output\n")) == []
    assert state.receive("iopub", status(warm_up, "idle")) == [] and state.execution_state == "idle"
    execute, _ = request(state, "s")
    assert sent(state.receive("iopub", stream(execute, "mine\n"))) == [("user", "stream", "mine\n")]


def test_output_goes_to_every_attached_client_once_and_a_reply_only_to_its_requester() -> None:
    state = new_state()
    a, b = Socket("a"), Socket("b")
    assert state.attach("session-a", a) == [] and state.attach("session-b", b) == []
    # a's client puts its own jupyter_client session in headers: an alias, not a second copy
    state.route("client-a", "session-a")
    execute, activity = request(state, "client-a")
    assert activity == [Activity(True)]

    assert sent(state.receive("iopub", stream(execute, "hello\n"))) == [("a", "stream", "hello\n"),
                                                                       ("b", "stream", "hello\n")]
    reply = kernel_message("execute_reply", execute, {"status": "ok"})
    assert sent(state.receive("shell", reply)) == [("a", "execute_reply", "ok")]
    assert execute["msg_id"] not in state.in_flight
    assert state.totals.messages_relayed == 2


def test_busy_and_idle_of_a_clients_execute_are_the_leases_activity() -> None:
    state = new_state()
    state.attach("s", Socket("a"))
    execute, _ = request(state, "s")
    busy = state.receive("iopub", status(execute, "busy"))
    assert busy[0] == Activity(True) and state.execution_state == "busy"
    idle = state.receive("iopub", status(execute, "idle"))
    assert idle[0] == Activity(False) and state.execution_state == "idle"
    # a kernel_info's statuses change the state shown, never the lease's idle clock
    info, activity = request(state, "s", "kernel_info_request")
    assert activity == []
    assert not any(isinstance(o, Activity) for o in state.receive("iopub", status(info, "busy")))


def test_the_gateways_own_requests_are_never_relayed_and_prove_iopub_is_subscribed() -> None:
    state = new_state()
    state.attach("s", Socket("a"))
    nudge = state.own_request("shell", "kernel_info_request", {})
    own = json.loads(bytes(nudge.parts[0]))
    assert not state.iopub_seen
    assert state.receive("iopub", status(own, "busy")) == []
    assert state.iopub_seen
    assert state.receive("shell", kernel_message("kernel_info_reply", own, {"status": "ok"})) == []
    assert state.execution_state == "idle"  # the gateway's own traffic does not show as the kernel's


def test_a_disconnected_session_keeps_its_own_output_and_gets_it_on_reconnect_in_order() -> None:
    state = new_state()
    first, other = Socket("first"), Socket("other")
    state.attach("mine", first)
    state.attach("theirs", other)
    execute, _ = request(state, "mine")
    theirs, _ = request(state, "theirs")
    state.detach(first)

    # IOPub reaches every connected client, and the disconnected session keeps its own
    assert sent(state.receive("iopub", stream(execute, "1\n"))) == [("other", "stream", "1\n")]
    assert sent(state.receive("iopub", stream(theirs, "not mine\n"))) == [("other", "stream", "not mine\n")]
    state.receive("iopub", stream(execute, "2\n"))
    state.receive("shell", kernel_message("execute_reply", execute, {"status": "ok"}))

    again = Socket("again")
    assert sent(state.attach("mine", again)) == [("again", "stream", "1\n"), ("again", "stream", "2\n"),
                                                 ("again", "execute_reply", "ok")]
    assert sent(state.receive("iopub", stream(execute, "3\n")))[0] == ("again", "stream", "3\n")


def test_an_overflowing_replay_drops_the_oldest_output_never_replies_and_says_so() -> None:
    state = new_state(limit=2000)
    client = Socket("a")
    state.attach("s", client)
    execute, _ = request(state, "s")
    state.detach(client)
    for i in range(5):
        state.receive("iopub", stream(execute, f"{i}\n", size=600))
    state.receive("iopub", status(execute, "idle"))
    state.receive("shell", kernel_message("execute_reply", execute, {"status": "ok"}))

    replay = sent(state.attach("s", Socket("b")))
    notice = replay[0]
    # ~830 bytes per output: 2,000 bytes hold the newest one beside the status and the reply
    assert notice[1] == "stream" and "4 messages" in notice[2] and "at most 2.0 kB" in notice[2]
    assert "GatewayApp.replay_buffer_bytes" in notice[2]
    assert [row[2] for row in replay[1:]] == ["4\n", "idle", "ok"]


def test_a_message_a_closing_socket_could_not_take_is_kept_unless_another_socket_of_the_session_took_it() -> None:
    state = new_state()
    closing, other = Socket("closing"), Socket("other")
    state.attach("s", closing)
    execute, _ = request(state, "s")
    (delivery,) = state.receive("iopub", stream(execute, "lost?\n"))
    assert isinstance(delivery, Delivery)
    state.undelivered(delivery.connection, delivery.message)  # its client vanished, on_close not run yet
    assert sent(state.attach("s", Socket("back"))) == [("back", "stream", "lost?\n")]

    state2 = new_state()
    state2.attach("s", closing)
    state2.attach("s", other)
    execute, _ = request(state2, "s")
    deliveries = state2.receive("iopub", stream(execute, "once\n"))
    assert sent(deliveries) == [("closing", "stream", "once\n"), ("other", "stream", "once\n")]
    first = deliveries[0]
    assert isinstance(first, Delivery)
    state2.undelivered(first.connection, first.message)  # "other" took it
    state2.detach(other)
    assert sent(state2.attach("s", Socket("back"))) == []


def test_another_clients_own_session_id_cannot_be_taken_over_by_routing() -> None:
    state = new_state()
    state.attach("alice", Socket("alice"))
    state.attach("bob", Socket("bob"))
    state.route("alice", "bob")  # bob's header claims alice's session
    execute, _ = request(state, "alice")
    reply = kernel_message("execute_reply", execute, {"status": "ok"})
    assert sent(state.receive("shell", reply)) == [("alice", "execute_reply", "ok")]


def test_a_dead_kernel_ends_every_waiting_cell_with_an_error_a_reply_and_idle_then_says_dead() -> None:
    state = new_state()
    waiting, watching = Socket("waiting"), Socket("watching")
    state.attach("s", waiting)
    state.attach("t", watching)
    request(state, "s")
    out = sent(state.kernel_died("the kernel of lease L died"))
    assert out == [
        ("waiting", "error", ""), ("watching", "error", ""),
        ("waiting", "execute_reply", "error"),
        ("waiting", "status", "idle"), ("watching", "status", "idle"),
        ("waiting", "status", "dead"), ("watching", "status", "dead"),
    ]
    died = state.kernel_died("again")
    assert [row for row in sent(died) if row[1] != "status"] == []  # nothing was in flight any more
    assert state.execution_state == "dead" and state.in_flight == {}


def test_the_error_of_a_dead_kernel_names_the_request_it_answers() -> None:
    state = new_state()
    state.attach("s", Socket("a"))
    execute, _ = request(state, "s")
    error = next(o for o in state.kernel_died("gone") if isinstance(o, Delivery) and o.message.msg_type == "error")
    assert json.loads(bytes(error.message.parts[1]))["msg_id"] == execute["msg_id"]
    assert json.loads(bytes(error.message.parts[3]))["evalue"] == "gone"
