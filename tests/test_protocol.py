"""Wire definitions: the kernel websocket framings as jupyter_server lays them out, GPU specs."""

from __future__ import annotations

import json
import struct

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from jupyter_gpu.client import masked_frame
from jupyter_gpu.protocol import (
    GpuChoice,
    Reason,
    SpecError,
    deserialize_ws_legacy_binary,
    deserialize_ws_v1,
    error_body,
    format_gpu_spec,
    parse_gpu_spec,
    serialize_ws_legacy_binary,
    serialize_ws_v1,
    type_matches,
)

# --- reference framings ----------------------------------------------------------------
# Written from jupyter_server's services/kernels/connection/base.py (serialize_msg_to_ws_v1,
# deserialize_msg_from_ws_v1, serialize_binary_message): stock JupyterLab speaks these, so ours
# must produce and accept the same bytes.


def reference_v1(channel: str, parts: list[bytes]) -> bytes:
    """v1: offset count (8 bytes LE), that many offsets (8 bytes LE each), channel, parts."""
    channel_bytes = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1), 8 * (1 + 1 + len(parts) + 1) + len(channel_bytes)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + channel_bytes + b"".join(parts)


def reference_v1_parse(data: bytes) -> tuple[str, list[bytes]]:
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    return data[offsets[0] : offsets[1]].decode(), [data[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


def reference_legacy(msg: dict[str, object], buffers: list[bytes]) -> bytes:
    """Legacy: part count (4 bytes BE), each part's start (4 bytes BE), JSON message, buffers."""
    parts = [json.dumps(msg).encode(), *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack("!" + "I" * (len(parts) + 1), len(parts), *offsets) + b"".join(parts)


HEADER = json.dumps({"msg_id": "m", "msg_type": "execute_request", "session": "s"}).encode()
PARTS = [HEADER, b"{}", b'{"k": 1}', json.dumps({"code": "print('h\u00e9')"}).encode()]


# --- v1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("buffers", [[], [b"abc"], [b"", bytes(range(256)), b"x" * 70_000]], ids=["none", "1", "3"])
@pytest.mark.parametrize("channel", ["shell", "iopub", "stdin", "control"])
def test_v1_matches_jupyter_server_byte_for_byte(channel: str, buffers: list[bytes]) -> None:
    data = serialize_ws_v1(channel, PARTS + buffers)
    assert data == reference_v1(channel, PARTS + buffers)
    parsed_channel, views = deserialize_ws_v1(data)
    assert (parsed_channel, [bytes(v) for v in views]) == (channel, PARTS + buffers)
    assert reference_v1_parse(data) == (channel, PARTS + buffers)
    # Frames jupyter_server (or JupyterLab) builds parse the same way.
    parsed_channel, views = deserialize_ws_v1(reference_v1(channel, PARTS + buffers))
    assert (parsed_channel, [bytes(v) for v in views]) == (channel, PARTS + buffers)


@pytest.mark.parametrize("buffers", [[], [b"abc"], [b"x" * 70_001, b"yz", bytes(range(256)) * 300]],
                         ids=["short", "medium", "long"])
def test_the_clients_frames_are_what_a_websocket_server_reads(buffers: list[bytes]) -> None:
    # Parts of odd lengths: the mask has to run on across them, large ones masked on their own.
    parts = [b"x" * 5, *PARTS, *buffers]
    reader = StreamReader()
    reader.feed_data(b"".join(masked_frame(parts)))
    parser = Frame.parse(reader.read_exact, mask=True)  # the server side: it insists on a mask
    with pytest.raises(StopIteration) as parsed:
        next(parser)
    frame = parsed.value.value
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, b"".join(parts))


def test_v1_layout_spelled_out() -> None:
    parts = [b"{}", b"{}", b"{}", b"{}", b"BUF"]
    data = serialize_ws_v1("shell", parts)
    count = struct.unpack_from("<Q", data, 0)[0]
    assert count == len(parts) + 2  # channel start, one start per part, the end
    offsets = struct.unpack_from(f"<{count}Q", data, 8)
    assert offsets[0] == 8 * (count + 1)  # right after the count and the offsets
    assert data[offsets[0] : offsets[1]] == b"shell"
    assert offsets == (64, 69, 71, 73, 75, 77, 80) and offsets[-1] == len(data)
    assert data[offsets[-2] :] == b"BUF"


def test_v1_parts_are_views_without_copies() -> None:
    data = serialize_ws_v1("shell", PARTS)
    _, views = deserialize_ws_v1(memoryview(data))
    assert all(isinstance(view, memoryview) and view.obj is data for view in views)


def v1_with_offsets(offsets: list[int], tail: bytes) -> bytes:
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + tail


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (b"\x00\x01garbage that is no frame", "not a v1 kernel message"),
        (struct.pack("<Q", 0), "not a v1 kernel message"),
        (struct.pack("<Q", 2**63), "not a v1 kernel message"),
        # Fewer than header, parent header, metadata and content.
        (serialize_ws_v1("shell", [b"{}", b"{}", b"{}"]), "not a v1 kernel message"),
        # Announces more offsets than the frame holds.
        (struct.pack("<Q", 6) + b"\x00" * 16, "not a v1 kernel message"),
        # The last offset is past the end, or short of it.
        (serialize_ws_v1("shell", PARTS)[:-1], "do not match its length"),
        (serialize_ws_v1("shell", PARTS) + b"!", "do not match its length"),
        # The first offset is not where the offsets end.
        (v1_with_offsets([64, 70, 71, 72, 73, 74], b"x" * 10), "do not match its length"),
        # Offsets going backwards.
        (v1_with_offsets([56, 62, 60, 63, 64, 66], b"shell!" + b"{}" * 2), "do not match its length"),
    ],
    ids=[
        "empty", "three-bytes", "garbage", "zero-offsets", "huge-count", "three-parts", "truncated-offsets",
        "truncated", "trailing-byte", "bad-first-offset", "unsorted",
    ],
)
def test_v1_malformed_raises_value_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deserialize_ws_v1(data)


# --- legacy binary (plain-JSON clients with buffers) ----------------------------------------


@pytest.mark.parametrize("buffers", [[], [b"abc"], [b"", bytes(range(256))]], ids=["none", "1", "2"])
def test_legacy_binary_matches_jupyter_server_and_round_trips(buffers: list[bytes]) -> None:
    msg = {"channel": "iopub", "header": {"msg_id": "m"}, "parent_header": {}, "metadata": {},
           "content": {"data": {"a": 1}, "text": "h\u00e9"}}
    data = serialize_ws_legacy_binary(msg, buffers)
    assert data == reference_legacy(msg, buffers)
    assert deserialize_ws_legacy_binary(data) == (msg, buffers)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (struct.pack("!I", 0), "announces 0 parts"),
        (struct.pack("!I", 5000) + b"\x00" * 100, "announces 5000 parts"),
        (struct.pack("!I", 3) + b"\x00" * 4, "announces 3 parts"),
        (struct.pack("!3I", 2, 12, 8) + b"{}abcd", "out of order"),
        (struct.pack("!2I", 1, 8) + b"[1, 2]", "does not start with a JSON object"),
        (struct.pack("!2I", 1, 8) + b"{not json", "Expecting property name"),
        (b"\x00\x00\x00\x09xx", "announces 9 parts"),
    ],
    ids=["empty", "zero-parts", "too-many-parts", "truncated", "unsorted", "array", "not-json", "short-offsets"],
)
def test_legacy_binary_malformed_raises_value_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deserialize_ws_legacy_binary(data)


# --- GPU specs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a100", (GpuChoice("a100"),)),
        ("A100", (GpuChoice("a100"),)),
        ("  a100-80gb ", (GpuChoice("a100-80gb"),)),
        ("a100:2", (GpuChoice("a100", 2),)),
        ("a100 : 2", (GpuChoice("a100", 2),)),
        ("h100|a100", (GpuChoice("h100"), GpuChoice("a100"))),
        ("h100:8 | a100:4 | any", (GpuChoice("h100", 8), GpuChoice("a100", 4), GpuChoice("any"))),
        ("any", (GpuChoice("any"),)),
        ("cpu", (GpuChoice("cpu"),)),
        ("rtx.4090_x", (GpuChoice("rtx.4090_x"),)),
        ("a100:64", (GpuChoice("a100", 64),)),
    ],
)
def test_good_specs_parse_in_order(spec: str, expected: tuple[GpuChoice, ...]) -> None:
    assert parse_gpu_spec(spec) == expected
    assert parse_gpu_spec(format_gpu_spec(expected)) == expected


def test_format_writes_count_only_when_not_one() -> None:
    assert format_gpu_spec((GpuChoice("h100", 2), GpuChoice("a100"))) == "h100:2|a100"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty GPU spec: give a type such as 'a100'"),
        ("   ", "empty GPU spec"),
        ("a 100", "bad GPU type 'a 100' in spec 'a 100'"),
        ("h100|", "bad GPU type '' in spec 'h100|'"),
        ("|a100", "bad GPU type '' in spec '|a100'"),
        ("-a100", "bad GPU type '-a100'"),
        ("a100!", "bad GPU type 'a100!'"),
        ("a100:", "bad GPU count '' in spec 'a100:': use a whole number"),
        ("a100:two", "bad GPU count 'two'"),
        ("a100:-1", "bad GPU count '-1'"),
        ("a100:1.5", "bad GPU count '1.5'"),
        ("a100:0", r"GPU count 0 in spec 'a100:0' is outside 1\.\.64"),
        ("a100:65", r"GPU count 65 in spec 'a100:65' is outside 1\.\.64"),
        ("h100|a100:x", "bad GPU count 'x' in spec 'h100|a100:x'"),
    ],
)
def test_bad_specs_name_the_bad_part(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_gpu_spec(spec)
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize(
    ("wanted", "offered", "matches"),
    [
        ("a100", "a100", True),
        ("a100", "a100-80gb", True),
        ("a100", "a100-40gb", True),
        ("a100-80gb", "a100-80gb", True),
        ("a100-80gb", "a100", False),
        ("a100-80gb", "a100-40gb", False),
        ("a100", "a10g", False),
        ("a100", "a1000", False),
        ("a10", "a100", False),
        ("h100", "a100", False),
        ("any", "a100", True),
        ("any", "h100-80gb", True),
        ("any", "cpu", False),  # asking for a GPU must not land on a CPU kernel
        ("cpu", "cpu", True),
    ],
)
def test_type_matches(wanted: str, offered: str, matches: bool) -> None:
    assert type_matches(wanted, offered) is matches


def test_reasons_are_one_vocabulary_that_travels_as_plain_words() -> None:
    from jupyter_gpu import protocol

    # The pool imports the old constants; they are the members themselves.
    assert protocol.REASON_IDLE is Reason.IDLE and protocol.REASON_KERNEL_DIED is Reason.KERNEL_DIED
    # On the wire and in SQLite a member is its word, and a word read back compares equal to it.
    assert json.dumps(error_body("gone", Reason.NOT_FOUND)) == '{"message": "gone", "reason": "not_found"}'
    assert Reason(json.loads('"node_lost"')) is Reason.NODE_LOST and Reason.NODE_LOST == "node_lost"
    assert f"{Reason.GATEWAY_RESTART}" == "gateway_restart"
    assert len({reason.value for reason in Reason}) == len(Reason)


def _server_frame(opcode: int, payload: bytes) -> bytes:
    """A frame as the gateway sends it: final, unmasked."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, length)
    elif length <= 0xFFFF:
        head = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return head + payload


def test_the_client_reads_large_payloads_in_any_pieces_into_writable_buffers() -> None:
    """A pulled megabyte is received straight into its own buffer: whatever pieces TCP cuts the
    frames into (a header split in two, the next frame in the same read as a payload's end, a
    ping between messages), every message arrives whole, its buffers writable, and the ping
    is answered."""
    import socket
    import threading

    from websockets.protocol import State

    from jupyter_gpu.client import KernelChannel, client_protocol

    big = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit, with a recognisable pattern
    parts = [json.dumps(p).encode() for p in ({"msg_type": "comm_msg"}, {}, {}, {"n": 1})]
    pulled = _server_frame(2, serialize_ws_v1("iopub", [*parts, big]))
    small = _server_frame(2, serialize_ws_v1("shell", [json.dumps({"msg_type": "execute_reply"}).encode(),
                                                       b"{}", b"{}", b"{}", b"x" * 70_000]))
    ping = _server_frame(0x9, b"still there?")
    stream = small + ping + pulled + small
    cuts = [len(small) + len(ping) + 1, len(small) + len(ping) + 5, len(small) + len(ping) + 300_000, len(stream) - 3]
    ours, theirs = socket.socketpair()

    def send_in_pieces() -> None:
        start = 0
        for cut in [*cuts, len(stream)]:
            theirs.sendall(stream[start:cut])
            start = cut

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    channel = KernelChannel(ours, client_protocol("ws://gateway/api/kernels/k/channels", state=State.OPEN), "s")
    try:
        messages = [channel.recv(timeout=10) for _ in range(3)]
        sender.join()
        assert [m["header"]["msg_type"] for m in messages if m] == ["execute_reply", "comm_msg", "execute_reply"]
        first, pulled_msg, last = messages
        assert first is not None and pulled_msg is not None and last is not None
        buffer = pulled_msg["buffers"][0]
        assert bytes(buffer) == big and not buffer.readonly
        assert bytes(first["buffers"][0]) == bytes(last["buffers"][0]) == b"x" * 70_000
        # the ping was answered with a masked pong carrying its payload
        reader = StreamReader()
        theirs.settimeout(5)
        reader.feed_data(theirs.recv(1024))
        parser = Frame.parse(reader.read_exact, mask=True)
        with pytest.raises(StopIteration) as done:
            next(parser)
        assert done.value.value.opcode is Opcode.PONG and done.value.value.data == b"still there?"
    finally:
        channel.close()
        theirs.close()
