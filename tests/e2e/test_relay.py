"""The message relay as a notebook user sees it: every byte of output, in order, in both
framings, across a reconnect, with stdin, interrupts, bad input and two users at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from jupyter_gpu.protocol import KERNEL_WS_PROTOCOL_V1, serialize_ws_v1

from .conftest import make_gateway
from .gateway_process import GatewayProcess, KernelSocket, apoll, stdout_text, stream_text

#: The second gateway's limits: a replay buffer that a 2 s cell overflows, a 1 MB message cap.
SMALL_REPLAY_BYTES = 2000
SMALL_MAX_MESSAGE = 1_000_000

# Prints 0..19, 0.1 s apart, with a pause after 4 in which the client hangs up: the pause
# makes "everything up to 4 was read before the close" exact rather than a race.
COUNT_TO_19 = (
    "import time\n"
    "for i in range(20):\n"
    "    print(i, flush=True)\n"
    "    time.sleep(0.6 if i == 4 else 0.1)\n"
)


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with a tiny replay buffer and a 1 MB websocket message limit, CPU kernels only."""
    process = make_gateway(
        tmp_path_factory.mktemp("small-gateway"),
        "--cpu-slots",
        "2",
        "--min-warm",
        "1",
        "--max-message-size",
        str(SMALL_MAX_MESSAGE),
        f"--GatewayApp.replay_buffer_bytes={SMALL_REPLAY_BYTES}",
    ).start()
    yield process
    process.stop()


def granted(gateway: GatewayProcess, user: str, gpu: str = "cpu") -> dict[str, Any]:
    """A granted lease (waiting, bounded, while the pool warms a replacement kernel)."""
    lease = gateway.lease(user, gpu)
    if lease["state"] == "queued":
        lease = gateway.get(user, f"/api/gpu/leases/{lease['id']}?wait=30").body
    assert lease["state"] == "granted", lease
    return lease


def kernel_idle(gateway: GatewayProcess, kernel_id: str) -> bool:
    return bool(gateway.get("alice", f"/api/kernels/{kernel_id}").body["execution_state"] == "idle")


def integers(text: str) -> list[int]:
    return [int(line) for line in text.split()]


def is_stdout_of(msg_id: str, line: str) -> Any:
    def check(msg: dict[str, Any]) -> bool:
        return (
            msg["msg_type"] == "stream"
            and msg["parent_header"].get("msg_id") == msg_id
            and line in msg["content"]["text"].splitlines()
        )

    return check


# --- nothing dropped ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_50_mb_printed_in_one_cell_all_arrives(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"])
    reply, outputs = await socket.run("import sys; sys.stdout.write('x' * 50_000_000)", timeout=60)
    assert reply["content"]["status"] == "ok"
    text = stdout_text(outputs)
    assert len(text) == 50_000_000 and text.count("x") == 50_000_000
    # No rate limiter's "IOPub data rate exceeded" notice, nor any other complaint.
    assert stream_text(outputs, "stderr") == ""
    socket.close()


@pytest.mark.asyncio
async def test_10000_flushed_prints_all_arrive_in_order(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"])
    reply, outputs = await socket.run("for i in range(10000): print(i, flush=True)", timeout=60)
    assert reply["content"]["status"] == "ok"
    assert integers(stdout_text(outputs)) == list(range(10000))
    assert stream_text(outputs, "stderr") == ""
    socket.close()


# --- both framings ------------------------------------------------------------------------

COMM_CELL = """
from comm import get_comm_manager
from ipykernel.comm import Comm

def echo(comm, msg):  # a target the client opens: print what it sent, buffers included
    print('echo', msg['content']['data'], [bytes(b) for b in msg['buffers']], flush=True)

get_comm_manager().register_target('echo', echo)
print('héllo ✓ "quoted" \\\\ back', flush=True)
c = Comm(target_name='t', data={})
c.send({'a': 1}, buffers=[b'abc', bytes(range(256))])
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [True, False], ids=["v1-binary", "json"])
async def test_both_framings_carry_text_and_binary_buffers(gateway: GatewayProcess, binary: bool) -> None:
    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"], binary=binary)
    assert socket.ws.selected_subprotocol == (KERNEL_WS_PROTOCOL_V1 if binary else None)
    reply, outputs = await socket.run(COMM_CELL)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert stdout_text(outputs) == 'héllo ✓ "quoted" \\ back\n'
    comm_msgs = [m for m in outputs if m["msg_type"] == "comm_msg"]
    assert len(comm_msgs) == 1
    assert comm_msgs[0]["content"]["data"] == {"a": 1}
    # v1 carries buffers as parts of its frame; plain JSON as the legacy binary frame.
    assert comm_msgs[0]["buffers"] == [b"abc", bytes(range(256))]
    assert comm_msgs[0]["channel"] == "iopub"
    # Messages without buffers: v1 binary frames, or JSON text frames, with no buffers.
    assert all(m["buffers"] == [] for m in outputs if m["msg_type"] != "comm_msg")

    # And client -> kernel: a comm_open whose buffers the kernel prints back.
    msg_id = socket.send(
        "shell", "comm_open", {"comm_id": "c1", "target_name": "echo", "data": {"k": "v"}}, buffers=[b"\x00\xffz"]
    )
    echoed, _ = await socket.recv_until(is_stdout_of(msg_id, "echo {'k': 'v'} [b'\\x00\\xffz']"), timeout=10)
    assert echoed["channel"] == "iopub"
    socket.close()


# --- reconnect ----------------------------------------------------------------------------


async def run_and_hang_up(
    gateway: GatewayProcess, kernel_id: str, until_done: bool, header_session: str | None = None
) -> tuple[str, str, str]:
    """Start COUNT_TO_19, read through "4", hang up; return (session, msg_id, stdout read).

    Stays away for 1 s (reconnecting mid-cell), or ``until_done`` until the cell has ended.
    """
    socket = await gateway.connect("alice", kernel_id)
    msg_id = socket.execute(COUNT_TO_19, session=header_session)
    last, seen = await socket.recv_until(is_stdout_of(msg_id, "4"), timeout=15)
    before = stdout_text([*seen, last])
    assert before.split() == ["0", "1", "2", "3", "4"]
    socket.close()
    await asyncio.sleep(1.0)  # the cell goes on printing into the replay buffer
    if until_done:
        await apoll(lambda: kernel_idle(gateway, kernel_id), 15, "the cell to finish")
    return socket.session_id, msg_id, before


@pytest.mark.asyncio
async def test_reconnect_with_same_session_replays_what_was_missed(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    session_id, msg_id, before = await run_and_hang_up(gateway, lease["kernel_id"], until_done=False)
    socket = await gateway.connect("alice", lease["kernel_id"], session_id=session_id)
    reply, outputs = await socket.collect(msg_id, timeout=15)
    assert reply["content"]["status"] == "ok"
    assert integers(before + stdout_text(outputs)) == list(range(20))  # no gap, nothing twice
    assert "lost" not in stream_text(outputs, "stderr")
    # The same connection goes on working.
    reply, outputs = await socket.run("print('after')")
    assert stdout_text(outputs) == "after\n"
    socket.close()


@pytest.mark.asyncio
async def test_reconnect_past_the_replay_buffer_is_told_output_was_lost(small_gateway: GatewayProcess) -> None:
    lease = granted(small_gateway, "alice")
    try:
        session_id, msg_id, _ = await run_and_hang_up(small_gateway, lease["kernel_id"], until_done=True)
        socket = await small_gateway.connect("alice", lease["kernel_id"], session_id=session_id)
        reply, outputs = await socket.collect(msg_id, timeout=15)
        assert reply["content"]["status"] == "ok"
        # The notice belongs to the cell (its parent is the cell's request) and comes first.
        assert outputs[0]["msg_type"] == "stream" and outputs[0]["content"]["name"] == "stderr"
        notice = outputs[0]["content"]["text"]
        assert "lost" in notice and "replay_buffer_bytes" in notice, notice
        assert "at most 2.0 kB" in notice, notice
        # What survived is the end of the cell's output; the middle is gone.
        tail = integers(stdout_text(outputs))
        assert tail and tail == list(range(tail[0], 20)) and tail[0] > 5
        socket.close()
    finally:
        small_gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


@pytest.mark.asyncio
async def test_header_session_other_than_url_session_sees_output_once_and_reconnects(
    gateway: GatewayProcess,
) -> None:
    # Clients built on jupyter_client's Session put their own session id in message headers,
    # which need not be the websocket's session_id; the kernel's replies carry the header's.
    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"])
    reply, outputs = await socket.run("print('once')", timeout=15, session="header-session")
    assert reply["content"]["status"] == "ok"
    assert stdout_text(outputs) == "once\n"  # not once per session id the socket is known under
    socket.close()
    # Hang up mid-cell and come back: the missed output and reply are replayed, and new
    # requests under the same header session get their replies on the new socket.
    session_id, msg_id, before = await run_and_hang_up(
        gateway, lease["kernel_id"], until_done=False, header_session="header-session"
    )
    socket = await gateway.connect("alice", lease["kernel_id"], session_id=session_id)
    reply, outputs = await socket.collect(msg_id, timeout=15)
    assert reply["content"]["status"] == "ok"
    assert integers(before + stdout_text(outputs)) == list(range(20))
    reply, outputs = await socket.run("print('again')", timeout=15, session="header-session")
    assert reply["content"]["status"] == "ok"
    assert stdout_text(outputs) == "again\n"
    socket.close()


@pytest.mark.asyncio
async def test_replies_survive_an_overflowing_replay_buffer(small_gateway: GatewayProcess) -> None:
    # Two cells queued, then the client hangs up; the second cell's output overflows the
    # buffer. The first cell's reply and idle status must survive: without them a notebook
    # shows that cell as running forever.
    lease = granted(small_gateway, "alice")
    try:
        socket = await small_gateway.connect("alice", lease["kernel_id"])
        first = socket.execute("import time; time.sleep(0.3); print('first')")
        second = socket.execute("for i in range(30): print(i, flush=True)")
        socket.close()  # frames are ordered: the gateway has both requests before the close
        await asyncio.sleep(1.0)
        await apoll(lambda: kernel_idle(small_gateway, lease["kernel_id"]), 15, "the cells to finish")
        socket = await small_gateway.connect("alice", lease["kernel_id"], session_id=socket.session_id)
        seen: list[dict[str, Any]] = []
        replies: dict[str, dict[str, Any]] = {}
        idle: set[str] = set()
        while len(replies) < 2 or len(idle) < 2:
            msg = await socket.recv(timeout=10)
            assert msg is not None
            seen.append(msg)
            parent = msg["parent_header"].get("msg_id", "")
            if msg["channel"] == "shell":
                replies[parent] = msg
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle.add(parent)
        assert set(replies) == idle == {first, second}
        assert all(reply["content"]["status"] == "ok" for reply in replies.values())
        assert "lost" in stream_text(seen, "stderr")
        tail = integers(stdout_text([m for m in seen if m["parent_header"].get("msg_id") == second]))
        # What output survived (the replies and statuses alone nearly fill 2 kB) is its end.
        assert tail == list(range(30 - len(tail), 30))
        socket.close()
    finally:
        small_gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


# --- stdin and interrupt ------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [True, False], ids=["v1-binary", "json"])
async def test_input_prompts_the_client_and_gets_its_answer(gateway: GatewayProcess, binary: bool) -> None:
    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"], binary=binary)
    msg_id = socket.execute("name = input('name? '); print('hello', name)", allow_stdin=True)
    request, _ = await socket.recv_until(lambda m: m["msg_type"] == "input_request", timeout=15)
    assert request["channel"] == "stdin"
    assert request["parent_header"]["msg_id"] == msg_id
    assert request["content"]["prompt"] == "name? "
    socket.send("stdin", "input_reply", {"value": "Ada"}, parent=request["header"])
    reply, outputs = await socket.collect(msg_id, timeout=15)
    assert reply["content"]["status"] == "ok"
    assert stdout_text(outputs).endswith("hello Ada\n")
    socket.close()


@pytest.mark.asyncio
async def test_interrupt_ends_a_sleeping_cell_and_the_kernel_stays_usable(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    kernel_id = lease["kernel_id"]
    socket = await gateway.connect("alice", kernel_id)
    msg_id = socket.execute("import time; print('sleeping', flush=True); time.sleep(30)")
    await socket.recv_until(is_stdout_of(msg_id, "sleeping"), timeout=15)
    started = time.monotonic()
    assert gateway.post("alice", f"/api/kernels/{kernel_id}/interrupt").status == 204
    reply, outputs = await socket.collect(msg_id, timeout=10)
    assert time.monotonic() - started < 5
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert [m["content"]["ename"] for m in outputs if m["msg_type"] == "error"] == ["KeyboardInterrupt"]
    reply, outputs = await socket.run("print(6 * 7)")
    assert reply["content"]["status"] == "ok" and stdout_text(outputs) == "42\n"
    assert gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body["state"] == "granted"
    socket.close()


# --- bad input ----------------------------------------------------------------------------


def good_header(**override: Any) -> dict[str, Any]:
    return {"msg_id": "m1", "msg_type": "execute_request", "session": "s", "username": "u", "version": "5.3",
            **override}


def json_message(channel: str, header: dict[str, Any]) -> str:
    return json.dumps({"channel": channel, "header": header, "parent_header": {}, "metadata": {},
                       "content": {"code": "print('should not run')"}})


MALFORMED: list[tuple[str, bool, str | bytes, str]] = [
    # (case, binary connection?, what the client sends, what the notice must say)
    ("invalid JSON text", False, "{not json", "not JSON"),
    ("unknown channel", False, json_message("nope", good_header()), "channel 'nope' is not one of"),
    ("header without msg_id", False, json_message("shell", {k: v for k, v in good_header().items() if k != "msg_id"}),
     "header.msg_id must be a non-empty string"),
    ("content not an object", False, json.dumps({"channel": "shell", "header": good_header(), "content": [1]}),
     "'content' must be an object"),
    ("JSON nested too deeply", False, "[" * 100_000, "nested too deeply"),
    ("v1 header nested too deeply", True, serialize_ws_v1("shell", [b"[" * 100_000, b"{}", b"{}", b"{}"]),
     "nested too deeply"),
    ("v1 binary garbage", True, b"\x00\x01garbage that is no frame", "not a v1 kernel message"),
    ("v1 frame with non-JSON header", True, serialize_ws_v1("shell", [b"\xff{", b"{}", b"{}", b"{}"]),
     "header is not JSON"),
    ("v1 header without msg_id", True,
     serialize_ws_v1("shell", [json.dumps({**good_header(), "msg_id": ""}).encode(), b"{}", b"{}", b"{}"]),
     "header.msg_id must be a non-empty string"),
    ("legacy binary garbage on a JSON socket", False, b"\x00\x00\x00\x09xx", "not JSON"),
]


@pytest.mark.asyncio
async def test_malformed_messages_get_a_notice_and_the_connection_keeps_working(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    sockets = {
        binary: await gateway.connect("alice", lease["kernel_id"], binary=binary) for binary in (True, False)
    }
    for case, binary, payload, expected in MALFORMED:
        socket = sockets[binary]
        socket.ws.write_message(payload, binary=isinstance(payload, bytes))
        notice, _ = await socket.recv_until(
            lambda m: m["msg_type"] == "stream" and m["content"]["name"] == "stderr", timeout=10
        )
        assert "malformed" in notice["content"]["text"] and expected in notice["content"]["text"], (case, notice)
        reply, outputs = await socket.run(f"print({case!r})", timeout=15)
        assert reply["content"]["status"] == "ok" and stdout_text(outputs) == case + "\n", case
        assert "should not run" not in stdout_text(outputs)
    for socket in sockets.values():
        socket.close()


@pytest.mark.asyncio
async def test_oversized_message_closes_with_the_limit_and_the_gateway_is_unharmed(
    small_gateway: GatewayProcess,
) -> None:
    lease = granted(small_gateway, "alice")
    kernel_id = lease["kernel_id"]
    try:
        socket = await small_gateway.connect("alice", kernel_id)
        socket.execute("x = '" + "a" * 2_000_000 + "'")
        msg = await socket.recv(timeout=10)
        while msg is not None:  # anything already on its way, then the close
            msg = await socket.recv(timeout=10)
        assert socket.ws.close_code == 1009
        reason = socket.ws.close_reason or ""
        assert "1,000,000 bytes" in reason and "max_message_size" in reason, reason
        # REST still answers and a new websocket on the same kernel works.
        kernels = small_gateway.get("alice", "/api/kernels").body
        assert [k["id"] for k in kernels] == [kernel_id]
        socket = await small_gateway.connect("alice", kernel_id)
        reply, outputs = await socket.run("print('x' in dir())")
        assert reply["content"]["status"] == "ok" and stdout_text(outputs) == "False\n"
        socket.close()
    finally:
        small_gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


# --- two users ----------------------------------------------------------------------------

TWO_USERS_CELL = """
import time
start = time.time()
for i in range(10):
    print('{name}', i, flush=True)
    time.sleep(0.1)
print('span', start, time.time())
"""


@pytest.mark.asyncio
async def test_two_users_run_at_once_and_each_sees_only_their_own_output(gateway: GatewayProcess) -> None:
    sockets: dict[str, KernelSocket] = {}
    for user, gpu in (("alice", "a100"), ("bob", "h100")):
        sockets[user] = await gateway.connect(user, granted(gateway, user, gpu)["kernel_id"])
    results = await asyncio.gather(
        *(socket.run(TWO_USERS_CELL.format(name=user), timeout=20) for user, socket in sockets.items())
    )
    spans = []
    for user, (reply, outputs) in zip(sockets, results, strict=True):
        assert reply["content"]["status"] == "ok"
        lines = stdout_text(outputs).splitlines()
        assert lines[:10] == [f"{user} {i}" for i in range(10)]
        _, start, end = lines[10].split()
        spans.append((float(start), float(end)))
        assert len(lines) == 11
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, "the two cells did not run at the same time"
    # And bob cannot even open alice's kernel.
    alice_kernel = gateway.get("alice", "/api/kernels").body[0]["id"]
    url = gateway.url.replace("http", "ws") + f"/api/kernels/{alice_kernel}/channels?token={gateway.tokens['bob']}"
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(url)
    assert refused.value.code == 404
    for socket in sockets.values():
        socket.close()


# --- what the kernel helper sends back ------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("in_reply", [True, False], ids=["in-the-reply", "older-client"])
async def test_pulled_values_ride_in_the_reply_only_for_a_client_that_asks(gateway: GatewayProcess,
                                                                           in_reply: bool) -> None:
    """A client that asks (``in_reply``) gets a cell's values inside its execute_reply, with no
    comm message for them; a client that does not (an older magic) gets them as before."""
    import pickle

    from jupyter_gpu.protocol import HELPER_COMM_TARGET, PULL_METADATA_KEY, PULLED_METADATA_KEY

    lease = granted(gateway, "alice")
    socket = await gateway.connect("alice", lease["kernel_id"])
    socket.send("shell", "comm_open", {"comm_id": "helper", "target_name": HELPER_COMM_TARGET, "data": {}})
    pull = {"names": ["x"], "limit": 10**6, **({"in_reply": True} if in_reply else {})}
    msg_id = socket.send("shell", "execute_request", {"code": "x = bytearray(b'pulled') * 20000", "silent": False,
                                                      "store_history": True, "user_expressions": {},
                                                      "allow_stdin": False, "stop_on_error": True},
                         metadata={PULL_METADATA_KEY: pull})
    reply, outputs = await socket.collect(msg_id, timeout=30)
    assert reply["content"]["status"] == "ok", reply["content"]
    comm_pulls = [m for m in outputs if m["msg_type"] == "comm_msg" and m["content"]["data"].get("op") == "pulled"]
    if in_reply:
        assert comm_pulls == []
        data, buffers = reply["metadata"][PULLED_METADATA_KEY], reply["buffers"]
    else:
        assert PULLED_METADATA_KEY not in reply["metadata"] and reply["buffers"] == []
        assert len(comm_pulls) == 1
        data, buffers = comm_pulls[0]["content"]["data"], comm_pulls[0]["buffers"]
    (item,) = data["values"]
    assert item["name"] == "x" and item["kind"] == "pickle"
    first = item["blob"]
    value = pickle.loads(buffers[first], buffers=buffers[first + 1 : first + 1 + item["nbuf"]])
    assert value == bytearray(b"pulled") * 20000
    socket.close()
