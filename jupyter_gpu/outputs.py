"""Replaying a remote cell's messages in the local notebook, one message at a time.

Like nbclient's ``process_message``: :class:`CellRelay` takes Jupyter messages as they
arrive and drives a :class:`Frontend` (the local kernel's stdout, display publisher and
input); it needs no socket, so it is tested by feeding it scripted messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .protocol import PULLED_METADATA_KEY
from .transfer import Assembler


class Frontend(Protocol):
    def stream(self, name: str, text: str) -> None: ...

    def display(self, data: dict[str, Any], metadata: dict[str, Any], transient: dict[str, Any], update: bool) -> None:
        ...

    def clear_output(self, wait: bool) -> None: ...

    def input(self, prompt: str, password: bool) -> str: ...

    def comm(self, msg_type: str, content: dict[str, Any], metadata: dict[str, Any], buffers: list[Any]) -> None: ...


class RemoteError(Exception):
    """An exception raised by the remote cell; shows the remote traceback, keeps its type name.

    ``engine_info`` says where it happened (``lease_id``, ``gpu_type``, ``node``), as
    ipyparallel's does: with several leases in one notebook, which kernel failed matters.
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info: dict[str, str] = {}
        #: names whose values lived only on a kernel that died under this cell: gone with it
        self.lost: list[str] = []

    def where(self) -> str:
        """``the a100 kernel of lease 1a2b3c4d on node gpu-7``, or '' when unknown."""
        info = self.engine_info
        if not info:
            return ""
        text = f"the {info.get('gpu_type') or 'GPU'} kernel of lease {info.get('lease_id', '?')[:8]}"
        return text + (f" on node {info['node']}" if info.get("node") else "")

    def _render_traceback_(self) -> list[str]:
        lines = self.traceback or [f"{self.ename}: {self.evalue}"]
        if self.lost:
            lines = [*lines, f"These lived only on that kernel and are gone: {', '.join(self.lost)}"]
        return [f"[{self.where()}]", *lines] if self.engine_info else lines


_ERROR_TYPES: dict[str, type[RemoteError]] = {}


def remote_error(ename: str, evalue: str, traceback: list[str]) -> RemoteError:
    """A RemoteError whose class is named like the remote one (``except`` by name still reads well)."""
    cls = _ERROR_TYPES.get(ename)
    if cls is None:
        safe = ename if ename.isidentifier() else "RemoteError"
        cls = _ERROR_TYPES[ename] = type(safe, (RemoteError,), {"__module__": "jupyter_gpu.remote"})
    return cls(ename, evalue, traceback)


@dataclass
class RemoteResult:
    """The remote cell's ``execute_result``, displayed locally as the cell's own result."""

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote result>"))


def error_from(content: dict[str, Any]) -> RemoteError:
    """The remote exception of an ``error`` message or an error ``execute_reply``."""
    return remote_error(content.get("ename", "Error"), content.get("evalue", ""), content.get("traceback", []))


@dataclass
class CellRelay:
    """Follows one execute request: its outputs, its reply, and the values pulled with it."""

    frontend: Frontend
    msg_id: str
    #: the kernel helper's own comm: its messages carry pulled values, not output
    helper_comm_id: str = ""
    reply: dict[str, Any] | None = None
    idle: bool = False
    result: RemoteResult | None = None
    error: RemoteError | None = None
    #: values the helper sent back (their data arrives in pieces, put together as they come)
    pulled: list[dict[str, Any]] = field(default_factory=list)
    pulled_blobs: Assembler = field(default_factory=Assembler)
    #: what the kernel holds under the names the client's cache vouched for (None: nothing usable)
    remote_hashes: dict[str, str | None] = field(default_factory=dict)
    input_replies: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def done(self) -> bool:
        return self.reply is not None and self.idle

    def _take_pulled(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """One message of what the helper sent back (in a comm message, or in the reply)."""
        self.pulled.extend(data.get("values", []))
        self.remote_hashes.update(data.get("hashes", {}))
        self.pulled_blobs.feed(data, buffers)

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        channel, msg_type, content = msg.get("channel"), msg["header"]["msg_type"], msg["content"]
        if channel == "shell":
            if msg_type == "execute_reply":
                self.reply = content
                pulled = (msg.get("metadata") or {}).get(PULLED_METADATA_KEY)
                if isinstance(pulled, dict) and self.helper_comm_id:
                    self._take_pulled(pulled, msg.get("buffers", []))
                if content.get("status") == "error" and self.error is None:
                    self.error = error_from(content)
            return
        if channel == "stdin":
            if msg_type == "input_request":
                prompt, password = content.get("prompt", ""), bool(content.get("password", False))
                self.input_replies.append(self.frontend.input(prompt, password))
            return
        if msg_type == "status":
            self.idle = content.get("execution_state") == "idle"
        elif msg_type == "stream":
            self.frontend.stream(content.get("name", "stdout"), content.get("text", ""))
        elif msg_type in ("display_data", "update_display_data"):
            self.frontend.display(content.get("data", {}), content.get("metadata", {}),
                                  content.get("transient", {}), msg_type == "update_display_data")
        elif msg_type == "execute_result":
            self.result = RemoteResult(content.get("data", {}), content.get("metadata", {}))
        elif msg_type == "clear_output":
            self.frontend.clear_output(bool(content.get("wait", False)))
        elif msg_type == "error":
            self.error = error_from(content)
        elif msg_type in ("comm_open", "comm_msg", "comm_close"):
            if content.get("comm_id") == self.helper_comm_id:
                data = content.get("data", {})
                if data.get("op") == "pulled":
                    self._take_pulled(data, msg.get("buffers", []))
            else:
                # Widgets the remote cell displays (tqdm.notebook's bar, ipywidgets) live on
                # comms: forwarding their IOPub side lets the local frontend draw and update
                # them in place. Frontend-to-kernel widget messages stay local (one-way). The
                # metadata carries the widget protocol version JupyterLab checks on comm_open.
                self.frontend.comm(msg_type, content, msg.get("metadata") or {}, list(msg.get("buffers", [])))
