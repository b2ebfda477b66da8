"""``/api/kernels/{id}/channels``: the Jupyter kernel websocket, in both of its framings.

Clients that offer ``v1.kernel.websocket.jupyter.org`` get binary frames (header, parent,
metadata and content as raw bytes, forwarded without re-encoding); others get the plain
JSON protocol. Either way the frames go to the kernel's :class:`KernelRelay`.
"""

from __future__ import annotations

import json
import logging
import struct
import uuid
from collections.abc import Sequence
from typing import Any

from tornado import ioloop, websocket
from tornado.iostream import StreamClosedError

from jupyter_gpu.protocol import (
    KERNEL_WS_PROTOCOL_V1,
    deserialize_ws_legacy_binary,
    deserialize_ws_v1,
    serialize_ws_legacy_binary,
    ws_v1_prefix,
)

from .errors import ApiError
from .handlers import GatewayHandlerMixin
from .identity import User
from .relay import KernelRelay
from .relay_state import TO_KERNEL_CHANNELS, Part, RelayedMessage, make_message

log = logging.getLogger(__name__)


class MalformedMessage(ValueError):
    pass


#: parts at least this large are written as views rather than copied into one buffer
LARGE_PART = 64 * 1024
#: Seconds between looks at whether an open websocket's token still works (app setting
#: ``identity_recheck_interval``): with the Hub's 30 s cache, a revoked token's socket closes within 40 s.
IDENTITY_RECHECK_SECONDS = 10.0
#: The close code for a socket whose token stopped working (policy violation, as RFC 6455 names it).
REVOKED = 1008


class _GatewayProtocol(websocket.WebSocketProtocol13):
    """Tornado's protocol, saying the limit when it closes an oversized message (its own
    reason is a bare "message too big"), and writing binary messages without copies."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if code == 1009:
            limit = self.params.max_message_size
            # exact bytes: a limit such as 1,000,000 is not "1 MiB"
            reason = f"message over the gateway limit of {limit:,} bytes (GatewayApp.max_message_size)"
        super().close(code, reason)

    def write_binary_parts(self, parts: Sequence[Part]) -> None:
        """One binary message written as its parts: tornado's write_message would need them
        joined and then copies them once more behind the frame header, two copies of every
        byte of output; the stream keeps large parts as views instead."""
        length = sum(len(part) for part in parts)
        if length < 126:
            head = struct.pack("!BB", self.FIN | 0x2, length)
        elif length <= 0xFFFF:
            head = struct.pack("!BBH", self.FIN | 0x2, 126, length)
        else:
            head = struct.pack("!BBQ", self.FIN | 0x2, 127, length)
        self._message_bytes_out += length
        self._wire_bytes_out += len(head) + length
        # Small parts are gathered into one write (each write is a send() when the socket is
        # idle); large ones go as views, uncopied.
        pending = bytearray(head)
        try:
            for part in parts:
                if len(part) < LARGE_PART:
                    pending += part
                    continue
                if pending:
                    self.stream.write(memoryview(pending))
                    pending = bytearray()
                self.stream.write(part)
            if pending:
                self.stream.write(memoryview(pending))
        except StreamClosedError:
            raise websocket.WebSocketClosedError() from None


class ChannelsHandler(GatewayHandlerMixin, websocket.WebSocketHandler):
    auth_resource = "kernels"
    auth_action = "execute"  # code goes to the kernel
    relay: KernelRelay
    session_id: str
    _recheck: ioloop.PeriodicCallback | None = None

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return KERNEL_WS_PROTOCOL_V1 if KERNEL_WS_PROTOCOL_V1 in subprotocols else None

    def get_websocket_protocol(self) -> websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if isinstance(protocol, websocket.WebSocketProtocol13):
            return _GatewayProtocol(self, False, protocol.params)
        return protocol

    async def get(self, kernel_id: str) -> None:
        await self.identify()
        self.session_id = self.get_argument("session_id", "") or uuid.uuid4().hex
        self.relay = await self.gateway.open_relay(self.user, kernel_id)
        await super().get(kernel_id)

    def open(self, kernel_id: str) -> None:
        self.set_nodelay(True)  # stock jupyter_server leaves Nagle on: ~40 ms per execute
        self.binary = self.selected_subprotocol == KERNEL_WS_PROTOCOL_V1
        if self.relay.closed:  # the lease ended during the handshake
            self.close(1000, "lease ended")
            return
        self.relay.attach(self.session_id, self)
        # The token was checked once, at the handshake; a socket lives for hours. Without a
        # look now and then, a revoked token (or a user removed) kept running code here.
        interval = float(self.settings.get("identity_recheck_interval", IDENTITY_RECHECK_SECONDS))
        if interval > 0:
            self._recheck = ioloop.PeriodicCallback(self._close_if_no_longer_allowed, interval * 1000)
            self._recheck.start()

    async def _close_if_no_longer_allowed(self) -> None:
        """The handshake's check again (the Hub's answer is cached): close the socket when the
        token no longer names the user who opened it, or that user may no longer execute code."""
        try:
            user: User | None = await self.identify()
        except ApiError as exc:
            if exc.status_code >= 500:
                return  # the Hub did not answer: no proof of revocation, so look again next time
            user = None
        if user is None or user.name != self.user:
            log.info("closing %s's websocket to kernel %s: its token no longer works", self.user, self.relay.kernel_id)
            self.close(REVOKED, "the token of this connection no longer works (revoked?): reconnect with a valid one")

    def on_message(self, message: str | bytes) -> None:
        if self.relay.closed:  # its lease just ended; the close frame is on its way
            return
        try:
            channel, header, parts = self._parse(message)
        except (MalformedMessage, RecursionError) as exc:
            # json raises RecursionError, not ValueError, on input such as "[" * 100000;
            # escaping on_message it made tornado drop the whole connection.
            problem = exc if isinstance(exc, MalformedMessage) else "JSON nested too deeply"
            log.info("malformed message from %s on kernel %s: %s", self.user, self.relay.kernel_id, problem)
            text = f"jupyter-gpu gateway: ignored a malformed message: {problem}\n"
            self.send(make_message("iopub", "stream", {"name": "stderr", "text": text}, b"{}", self.relay.session))
            return
        session = header.get("session")
        if isinstance(session, str) and session and session != self.session_id:
            # Replies are routed by the session in the header: make it an alias of ours, so
            # they reach this socket (and its replay buffer) without doubling its IOPub.
            self.relay.route(session, self.session_id)
        self.relay.send_from_client(channel, header, parts)

    def _parse(self, message: str | bytes) -> tuple[str, dict[str, Any], list[Part]]:
        if isinstance(message, bytes) and self.binary:
            try:
                channel, views = deserialize_ws_v1(message)
            except ValueError as exc:
                raise MalformedMessage(str(exc)) from None
            if len(views) < 4:
                raise MalformedMessage("a kernel message needs header, parent header, metadata and content")
            header = _json_object(views[0], "header")
            for index, name in ((1, "parent_header"), (2, "metadata"), (3, "content")):
                _json_object(views[index], name)
            parts: list[Part] = list(views)
        else:
            try:
                if isinstance(message, bytes):
                    msg, buffers = deserialize_ws_legacy_binary(message)
                else:
                    msg, buffers = json.loads(message), []
            except ValueError as exc:
                raise MalformedMessage(f"not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise MalformedMessage("a kernel message must be a JSON object")
            # as in jupyter_server: no channel means shell (its own gateway kernel client sends none)
            channel = str(msg.get("channel") or "shell")
            given_header = msg.get("header")
            if not isinstance(given_header, dict):
                raise MalformedMessage("'header' must be an object")
            header = given_header
            pieces = [header]
            for name in ("parent_header", "metadata", "content"):
                value = msg.get(name) or {}
                if not isinstance(value, dict):
                    raise MalformedMessage(f"'{name}' must be an object")
                pieces.append(value)
            parts = [json.dumps(piece).encode() for piece in pieces]
            parts.extend(buffers)
        if channel not in TO_KERNEL_CHANNELS:
            raise MalformedMessage(f"channel {channel!r} is not one of {', '.join(TO_KERNEL_CHANNELS)}")
        for key in ("msg_id", "msg_type"):
            if not isinstance(header.get(key), str) or not header[key]:
                raise MalformedMessage(f"header.{key} must be a non-empty string")
        return channel, header, parts

    # --- ClientConnection -----------------------------------------------------------------

    def send(self, message: RelayedMessage) -> bool:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return False
        try:
            if self.binary and isinstance(self.ws_connection, _GatewayProtocol):
                parts = message.parts
                self.ws_connection.write_binary_parts([ws_v1_prefix(message.channel, parts), *parts])
            elif len(message.parts) > 4:
                msg = _message_dict(message)
                buffers = [bytes(b) for b in message.parts[4:]]
                self.write_message(serialize_ws_legacy_binary(msg, buffers), binary=True)
            else:
                self.write_message(_json_frame(message))
        except websocket.WebSocketClosedError:
            return False
        return True

    def close_connection(self, code: int, reason: str) -> None:
        self.close(code, reason[:120])

    def on_close(self) -> None:
        if self._recheck is not None:
            self._recheck.stop()
        relay = getattr(self, "relay", None)
        if relay is not None:
            relay.detach(self)

    def check_origin(self, origin: str) -> bool:
        # Token auth, not cookies, guards this socket (the Hub identity takes no login cookie
        # here), so a foreign page gains nothing.
        return True


def _json_object(view: Part, name: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(view))
    except ValueError as exc:
        raise MalformedMessage(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{name} must be a JSON object")
    return value


def _message_dict(message: RelayedMessage) -> dict[str, Any]:
    header, parent, metadata, content = (json.loads(bytes(part)) for part in message.parts[:4])
    return {
        "channel": message.channel,
        "msg_id": message.msg_id,
        "msg_type": message.msg_type,
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
    }


def _json_frame(message: RelayedMessage) -> bytes:
    """Build the JSON text frame around the kernel's own JSON bytes, without re-encoding them."""
    header, parent, metadata, content = message.parts[:4]
    head = json.dumps({"channel": message.channel, "msg_id": message.msg_id, "msg_type": message.msg_type})
    return b"".join(
        [
            head[:-1].encode(),
            b', "header": ',
            header,
            b', "parent_header": ',
            parent,
            b', "metadata": ',
            metadata,
            b', "content": ',
            content,
            b', "buffers": []}',
        ]
    )
