"""Wire definitions shared by the client, the gateway and the kernel-side helper.

Standard library only: the gateway must not import IPython and the kernel-side helper
must load in any kernel, so nothing here may pull in more than ``json`` and ``struct``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: Environment variables the client reads to find its gateway.
URL_ENV = "JUPYTER_GPU_URL"
TOKEN_ENV = "JUPYTER_GPU_TOKEN"

#: The Jupyter kernel websocket subprotocol with binary framing (jupyter_server 2).
KERNEL_WS_PROTOCOL_V1 = "v1.kernel.websocket.jupyter.org"

#: Prefix of the kernelspec names the gateway offers, one per GPU type (``gpu-a100``).
KERNELSPEC_PREFIX = "gpu-"

#: Lease states.
QUEUED = "queued"
GRANTED = "granted"
RELEASED = "released"


class Reason(StrEnum):
    """Every short, machine-readable word the system puts in a ``reason``: why a lease ended,
    and why a request was refused (the ``reason`` of a ``{"message", "reason"}`` error).

    One vocabulary for the gateway, the pool, uploads, the magic and the sidebar, so that code
    on either side of the wire compares against the same names. Members are strings: they
    go into JSON and SQLite as their value.
    """

    # why a lease ended
    IDLE = "idle"
    DELETED = "deleted"
    CANCELLED = "cancelled"
    KERNEL_DIED = "kernel_died"
    GATEWAY_RESTART = "gateway_restart"
    MAX_DURATION = "max_duration"
    NODE_LOST = "node_lost"
    RESTARTED = "restarted"  # a stock client restarted the kernel: a new lease behind the same kernel id
    OOM = "oom"  # the kernel went past its memory limit
    OPERATOR = "operator"  # an operator released another user's lease
    BUDGET = "budget"  # a budget of its user or group was used up (also: a request refused for one)
    GPU_IDLE = "gpu_idle"  # its GPUs did no work and its kernel ran no cell for the operator's gpu_idle_timeout
    SPOT_INTERRUPTED = "spot_interrupted"  # AWS announced it takes the node's spot instance back (state kept)
    # why the gateway refused a request
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    BAD_JSON = "bad_json"
    BAD_SPEC = "bad_spec"
    BAD_IDLE_TIMEOUT = "bad_idle_timeout"
    BAD_NOTEBOOK = "bad_notebook"
    BAD_WAIT = "bad_wait"
    UNKNOWN_TYPE = "unknown_type"
    TOO_MANY_GPUS = "too_many_gpus"
    NO_CAPACITY = "no_capacity"
    LEASE_ENDED = "lease_ended"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    NO_SPACE = "no_space"
    METERING_UNAVAILABLE = "metering_unavailable"  # the usage database cannot be written (disk full)
    BUSY = "busy"
    UPLOAD_FAILED = "upload_failed"
    INTERNAL_ERROR = "internal_error"
    SNAPSHOTS_OFF = "snapshots_off"  # this gateway keeps no variables between leases
    # seen only by clients: an upload cut after the gateway accepted it, and the sidebar's
    # server extension when the gateway is not set up or does not answer
    LOST = "lost"
    NOT_CONFIGURED = "not_configured"
    GATEWAY_UNREACHABLE = "gateway_unreachable"
    BAD_GATEWAY = "bad_gateway"
    GATEWAY_ERROR = "gateway_error"


# The names the pool and older code import; the same objects as the members.
REASON_IDLE = Reason.IDLE
REASON_DELETED = Reason.DELETED
REASON_CANCELLED = Reason.CANCELLED
REASON_KERNEL_DIED = Reason.KERNEL_DIED
REASON_GATEWAY_RESTART = Reason.GATEWAY_RESTART
REASON_MAX_DURATION = Reason.MAX_DURATION
REASON_NODE_LOST = Reason.NODE_LOST
REASON_OOM = Reason.OOM
REASON_BUDGET = Reason.BUDGET
REASON_GPU_IDLE = Reason.GPU_IDLE

#: ``ename`` of the error a cell gets when its kernel dies under it (died, OOM, its machine lost)
KERNEL_DIED_ERROR = "KernelDied"

#: The comm target of the kernel-side helper, and the line that loads it at warm-up.
HELPER_COMM_TARGET = "jupyter_gpu"
HELPER_BOOT = "%load_ext jupyter_gpu.kernel_helper"
#: key in an execute_request's metadata naming what the helper sends back after the cell
PULL_METADATA_KEY = "jupyter_gpu_pull"
#: key in an execute_request's metadata carrying the cell's push (the message's buffers are its
#: pieces), sent only to a helper that said it takes them: one kernel message per cell, not two
PUSH_METADATA_KEY = "jupyter_gpu_push"
#: key in an execute_reply's metadata carrying what the helper sent back after the cell (the
#: reply's buffers are its pieces), where the pull spec asked for it there (``in_reply``)
PULLED_METADATA_KEY = "jupyter_gpu_pulled"
#: the helper's first message on its comm: what it takes (an older helper sends none)
HELPER_HELLO_OP = "hello"

ANY_TYPE = "any"
CPU_TYPE = "cpu"

_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_GPU_COUNT = 64
MAX_ALTERNATIVES = 8


class SpecError(ValueError):
    """A GPU spec that cannot be parsed; the message names the bad part."""


@dataclass(frozen=True)
class GpuChoice:
    """One alternative of a spec: a type (or ``any``) and how many GPUs of it."""

    gpu_type: str
    count: int = 1

    def __str__(self) -> str:
        return self.gpu_type if self.count == 1 else f"{self.gpu_type}:{self.count}"


def parse_gpu_spec(spec: str) -> tuple[GpuChoice, ...]:
    """Parse ``a100``, ``a100:2``, ``h100|a100`` or ``any`` into ordered choices.

    Type names are not checked against an inventory here: only the gateway knows which
    types exist, so it reports unknown ones with the list it offers.
    """
    text = spec.strip().lower()
    if not text:
        raise SpecError("empty GPU spec: give a type such as 'a100', 'a100:2', 'h100|a100' or 'any'")
    parts = text.split("|")
    if len(parts) > MAX_ALTERNATIVES:
        raise SpecError(f"spec {spec!r} lists {len(parts)} alternatives; at most {MAX_ALTERNATIVES} are allowed")
    choices = []
    for part in parts:
        name, sep, count_text = part.strip().partition(":")
        name = name.strip()
        if not _TYPE_RE.match(name):
            raise SpecError(
                f"bad GPU type {name!r} in spec {spec!r}: use lower-case letters, digits and '-' "
                "(for example 'a100', 'a100-80gb')"
            )
        count = 1
        if sep:
            if not count_text.strip().isdigit():
                raise SpecError(f"bad GPU count {count_text!r} in spec {spec!r}: use a whole number, e.g. 'a100:2'")
            count = int(count_text)
            if not 1 <= count <= MAX_GPU_COUNT:
                raise SpecError(f"GPU count {count} in spec {spec!r} is outside 1..{MAX_GPU_COUNT}")
        choices.append(GpuChoice(name, count))
    return tuple(choices)


def format_gpu_spec(choices: tuple[GpuChoice, ...]) -> str:
    return "|".join(str(choice) for choice in choices)


def type_matches(wanted: str, offered: str) -> bool:
    """True when a requested type name covers an offered one.

    ``a100`` covers ``a100``, ``a100-40gb`` and ``a100-80gb``; ``any`` covers every GPU type
    (not ``cpu``: asking for a GPU and getting a CPU kernel would be a silent surprise).
    """
    if wanted == ANY_TYPE:
        return offered != CPU_TYPE
    return offered == wanted or offered.startswith(wanted + "-")


def error_body(message: str, reason: str) -> dict[str, str]:
    """The JSON error shape used by jupyter_server: a sentence for people, a word for code."""
    return {"message": message, "reason": reason}


# --- Jupyter kernel websocket framing -------------------------------------------------

_V1_PARTS = ("header", "parent_header", "metadata", "content")


def serialize_ws_v1(channel: str, parts: Sequence[bytes | memoryview]) -> bytes:
    """Frame one message for ``v1.kernel.websocket.jupyter.org``.

    ``parts`` are the already-encoded header, parent header, metadata and content, then any
    buffers. Layout: n, n little-endian uint64 offsets, channel, parts.
    """
    return b"".join([ws_v1_prefix(channel, parts), *parts])


def ws_v1_prefix(channel: str, parts: Sequence[bytes | memoryview]) -> bytes:
    """The offsets and channel that precede the parts in a v1 frame (to write parts unjoined)."""
    channel_bytes = channel.encode("utf-8")
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel_bytes))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + channel_bytes


def deserialize_ws_v1(data: bytes | memoryview) -> tuple[str, list[memoryview]]:
    """Split a v1 frame into its channel and parts; raises ValueError when malformed."""
    view = memoryview(data)
    if len(view) < 8:
        raise ValueError(f"binary message of {len(view)} bytes is too short for the v1 framing")
    (count,) = struct.unpack_from("<Q", view, 0)
    if not 2 + len(_V1_PARTS) <= count <= 1 + 4096 or len(view) < 8 * (count + 1):
        raise ValueError(f"binary message announces {count} offsets: not a v1 kernel message")
    offsets = struct.unpack_from(f"<{count}Q", view, 8)
    if offsets[0] != 8 * (count + 1) or offsets[-1] != len(view) or list(offsets) != sorted(offsets):
        raise ValueError("binary message offsets do not match its length")
    channel = bytes(view[offsets[0] : offsets[1]]).decode("utf-8", "replace")
    parts = [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
    return channel, parts


def serialize_ws_legacy_binary(msg: dict[str, Any], buffers: list[bytes]) -> bytes:
    """The pre-v1 binary frame for a JSON message that carries buffers (jupyter_server 1)."""
    parts = [json.dumps(msg).encode("utf-8"), *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{len(parts) + 1}I", len(parts), *offsets) + b"".join(parts)


def deserialize_ws_legacy_binary(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Inverse of :func:`serialize_ws_legacy_binary`; raises ValueError when malformed."""
    if len(data) < 4:
        raise ValueError("binary message too short")
    (count,) = struct.unpack_from("!I", data, 0)
    if not 1 <= count <= 4096 or len(data) < 4 * (count + 1):
        raise ValueError(f"binary message announces {count} parts: not a kernel message")
    offsets = [*struct.unpack_from(f"!{count}I", data, 4), len(data)]
    if list(offsets) != sorted(offsets):
        raise ValueError("binary message offsets are out of order")
    msg = json.loads(data[offsets[0] : offsets[1]])
    if not isinstance(msg, dict):
        raise ValueError("binary message does not start with a JSON object")
    return msg, [data[offsets[i] : offsets[i + 1]] for i in range(1, count)]
