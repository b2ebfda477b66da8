"""One notebook's hold on one GPU kernel: its lease, websocket, and what each side holds.

``RemoteSession.run_cell`` is the whole round trip of a ``%%gpu`` cell: push the values
the cell reads (skipping those the kernel already has), execute, relay outputs as they
arrive, and bind the values the cell made, all over one websocket and one execution.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import types
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from . import reaper, serialize, write_tracking
from .client import GatewayClient, GatewayError
from .outputs import CellRelay, Frontend
from .protocol import HELPER_COMM_TARGET, HELPER_HELLO_OP, PULL_METADATA_KEY, PUSH_METADATA_KEY, Reason
from .transfer import UPLOAD_MIN_BYTES, Assembler, split

#: Libraries often present on GPU kernels but not in a notebook's CPU environment.
_HEAVY_MODULES = ("torch", "tensorflow", "jax", "jaxlib", "cupy", "transformers", "tensorrt", "triton")


class PushRefused(ValueError):
    """A value that cannot be sent; nothing ran remotely."""


class StaleRemoteRef(PushRefused):
    """A RemoteRef that points at another lease's kernel; nothing ran."""


class LeaseGone(RuntimeError):
    """The lease behind this session ended (idle timeout, kernel death, release).

    ``executed`` says whether the cell may have started remotely (then it must not be re-run).
    """

    def __init__(self, message: str, executed: bool = False) -> None:
        super().__init__(message)
        self.executed = executed


@dataclass
class RemoteRef:
    """A value that stayed on the GPU kernel; a later ``%%gpu`` cell uses the remote object."""

    name: str
    lease_id: str
    gpu_type: str
    info: dict[str, Any]
    why: str

    def __repr__(self) -> str:
        details = [self.info.get("type", "?")]
        if "shape" in self.info:
            details.append(f"shape={tuple(self.info['shape'])}")
        if "dtype" in self.info:
            details.append(f"dtype={self.info['dtype']}")
        if "device" in self.info:
            details.append(f"device={self.info['device']}")
        if "nbytes" in self.info:
            details.append(f"{self.info['nbytes'] / 1e6:.1f} MB")
        return (f"RemoteRef({self.name!r}: {', '.join(details)}; on the {self.gpu_type} kernel of lease "
                f"{self.lease_id[:8]}, kept there because {self.why})")


@dataclass
class CellOptions:
    push: list[str] = field(default_factory=list)
    pull: list[str] = field(default_factory=list)
    no_push: set[str] = field(default_factory=set)
    no_pull: bool = False
    pull_limit: int = 100 * 10**6
    timeout: float | None = None


def check_remote_refs(names: Iterable[str], ns: dict[str, Any], lease_id: str | None) -> None:
    """Refuse a cell that reads a RemoteRef living on another kernel than ``lease_id``'s."""
    for name in names:
        value = ns.get(name)
        if isinstance(value, RemoteRef) and value.lease_id != lease_id:
            raise StaleRemoteRef(
                f"{name!r} lives only on the {value.gpu_type} kernel of lease {value.lease_id[:8]}, not on this "
                "cell's: run this cell with the same SPEC as the cell that made it, or, if that lease has ended, "
                "re-run the cell that made it"
            )


def missing_local_modules() -> set[str]:
    return {name for name in _HEAVY_MODULES if importlib.util.find_spec(name) is None}


#: Upload failures that fail the cell (too large for the operator's limit, a bad token, a
#: connection lost mid-way). Anything else (a gateway or proxy that does not do uploads, a
#: full staging area, all upload slots busy) sends the values over the websocket instead.
UPLOAD_REFUSALS = frozenset({Reason.TOO_LARGE, Reason.UNAUTHORIZED, Reason.UPLOAD_FAILED, Reason.LOST})


class RemoteSession:
    def __init__(self, client: GatewayClient, lease: dict[str, Any]) -> None:
        self.client = client
        self.lease = lease
        self.channel = client.open_channel(lease["kernel_id"])
        self.comm_id = uuid.uuid4().hex
        self.channel.send("shell", "comm_open", {"comm_id": self.comm_id, "target_name": HELPER_COMM_TARGET,
                                                 "data": {}})
        #: content hash of what the kernel holds under each name (sent or pulled)
        self.remote_hashes: dict[str, str] = {}
        self.uploads = True  # until the gateway says it cannot stage uploads for this kernel
        #: the kernel's helper said it takes a push inside the execute_request (its hello)
        self.push_in_execute = False
        #: names whose value lives only on the kernel (RemoteRefs handed out)
        self.remote_only: set[str] = set()
        self.missing_modules = missing_local_modules()
        self.bytes_pushed = 0
        #: bytes of pulled values fetched as downloads (past the websocket)
        self.bytes_downloaded = 0

    @property
    def lease_id(self) -> str:
        return str(self.lease["id"])

    @property
    def engine_info(self) -> dict[str, str]:
        """Where this session's cells run, for labelling their errors."""
        # A lease names its node where the pool spans several; the local pool ("local") runs
        # its kernels on the gateway's own machine, which the gateway's address names better.
        node = self.lease.get("node")
        if not node or node == "local":
            node = urllib.parse.urlsplit(self.client.config.url).hostname or ""
        return {"lease_id": self.lease_id, "gpu_type": str(self.lease.get("gpu_type") or ""), "node": str(node)}

    @property
    def alive(self) -> bool:
        return not self.channel.closed

    def close(self) -> None:
        self.channel.close()

    # --- push -------------------------------------------------------------------------------

    def _pack_values(self, names: Iterable[str], ns: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
        items: list[dict[str, Any]] = []
        blobs: list[Any] = []
        for name in names:
            value = ns[name]
            if isinstance(value, RemoteRef):
                check_remote_refs([name], ns, self.lease_id)
                if value.name != name:
                    items.append({"name": name, "kind": "alias", "of": value.name})
                continue
            if isinstance(value, types.ModuleType):
                items.append({"name": name, "kind": "module", "module": value.__name__})
                continue
            try:
                stream, buffers = serialize.dump(value)
            except Exception as exc:
                raise PushRefused(
                    f"variable {name!r} (a {type(value).__module__}.{type(value).__qualname__}) cannot be sent to "
                    f"the GPU kernel: {type(exc).__name__}: {exc}. If the cell does not need it, add "
                    f"--no-push {name}"
                ) from None
            parts: list[bytes] = []
            digest = serialize.fingerprint(stream, buffers, parts)
            if self.remote_hashes.get(name) == digest:
                continue  # the kernel already holds exactly this value under this name
            # Digests of the large buffers: the kernel remembers them instead of reading a
            # gigabyte again to report what it holds after the cell.
            large = {str(i): part.hex() for i, (buffer, part) in enumerate(zip(buffers, parts, strict=True))
                     if memoryview(buffer).nbytes >= write_tracking.TRACK_MIN_BYTES}
            items.append({"name": name, "kind": "pickle", "blob": len(blobs), "nbuf": len(buffers),
                          "hash": digest, "buffer_digests": large})
            blobs.append(stream)
            blobs.extend(buffers)
        return items, blobs

    def _send_push(self, items: list[dict[str, Any]], blobs: list[Any]) -> tuple[dict[str, Any], list[memoryview]]:
        """Send the push; a push of one message is returned instead, for the execute_request to
        carry where the helper takes it there (one kernel message, one busy/idle, no wait in
        between), else ``({}, [])``."""
        staged = self._upload_large(blobs)
        messages = [({"op": "push", **data}, pieces) for data, pieces in split(blobs, staged=staged)]
        messages[0][0]["values"] = items
        self.bytes_pushed += sum(messages[0][0]["sizes"])
        for item in items:
            if item["kind"] == "pickle":
                self.remote_hashes[item["name"]] = item["hash"]
        if self.push_in_execute and len(messages) == 1:
            return messages[0]
        for data, pieces in messages:
            self.channel.send("shell", "comm_msg", {"comm_id": self.comm_id, "data": data}, buffers=pieces)
        return {}, []

    def _upload_large(self, blobs: list[Any]) -> dict[int, str]:
        """Large blobs go to the kernel's staging area, off the websocket: index -> upload id."""
        staged: dict[int, str] = {}
        if not self.uploads:
            return staged
        for index, blob in enumerate(blobs):
            if memoryview(blob).nbytes < UPLOAD_MIN_BYTES:
                continue
            try:
                staged[index] = self.client.upload(self.lease["kernel_id"], blob)
            except GatewayError as exc:
                if exc.status == 404 and exc.reason == Reason.NOT_FOUND:  # the lease ended between cells
                    raise LeaseGone(str(exc)) from None
                if exc.reason in UPLOAD_REFUSALS:
                    raise
                # The gateway cannot stage now or at all, or something between us (a proxy
                # without Upgrade support) would not let the upload through: the websocket
                # carries the rest (and, for an unsupported gateway, everything from now on).
                if exc.reason in (Reason.UNSUPPORTED, ""):
                    self.uploads = False
                break
        return staged

    # --- the cell ---------------------------------------------------------------------------

    def run_cell(self, code: str, free: list[str], bound: list[str], ns: dict[str, Any], options: CellOptions,
                 frontend: Frontend) -> CellRelay:
        """Push, execute, relay, pull. Raises PushRefused before anything is sent."""
        push_names = [n for n in dict.fromkeys([*free, *options.push]) if n in ns and n not in options.no_push]
        items, blobs = self._pack_values(push_names, ns)  # may refuse: nothing sent yet
        pull: dict[str, Any] = {
            "names": list(dict.fromkeys([*bound, *options.pull])),
            "keep_remote": options.no_pull,
            "limit": options.pull_limit,
            "missing_modules": sorted(self.missing_modules),
            # large values may come back as staged files fetched past the websocket
            "downloads": self.uploads,
            # what comes back rides in the execute_reply (a helper that does not know this
            # key sends it as comm messages, which the relay takes as well)
            "in_reply": True,
            # names whose remote value the cache vouches for: the kernel reports what it
            # holds after the cell, in case the cell changed them in place
            "verify": [n for n in push_names if n in self.remote_hashes or any(i["name"] == n for i in items)],
        }
        try:
            push, pieces = self._send_push(items, blobs) if items else ({}, [])
            metadata: dict[str, Any] = {PULL_METADATA_KEY: pull}
            if push:
                metadata[PUSH_METADATA_KEY] = push
            msg_id = self.channel.send("shell", "execute_request", {
                # a comment line stands for the %%gpu line (IPython drops blank leading lines),
                # so remote tracebacks point at the line numbers the user sees in the cell
                "code": "# %%gpu\n" + code, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": True, "stop_on_error": True}, buffers=pieces, metadata=metadata)
        except ConnectionClosed:
            raise LeaseGone(self.channel.close_reason() or "the connection to the GPU kernel closed") from None
        relay = CellRelay(frontend, msg_id, helper_comm_id=self.comm_id)
        self._follow(relay, options.timeout)
        if relay.error is not None:
            relay.error.engine_info = self.engine_info
        if relay.error is not None or relay.timed_out:
            # Names the cell binds may or may not have been rebound before it stopped.
            for name in pull["names"]:
                self.remote_hashes.pop(name, None)
        for name, digest in relay.remote_hashes.items():
            if digest is None:
                self.remote_hashes.pop(name, None)
            else:
                self.remote_hashes[name] = digest
        if relay.pulled:
            failed = self._fetch_downloads(relay.pulled_blobs)
            ended = self._lease_end_reason() if failed else None
            lost = self._bind_pulled(relay.pulled, relay.pulled_blobs.blobs, ns, failed, ended is None)
            if ended is not None and lost:
                listed = ", ".join(repr(name) for name in lost)
                raise LeaseGone(f"the GPU kernel's lease ended ({ended}) before {listed} came back "
                                f"({next(iter(failed.values()))}); those values are lost: re-run the cell",
                                executed=True)
        return relay

    def _fetch_downloads(self, blobs: Assembler) -> dict[int, str]:
        """The blobs the kernel staged for download, fetched in place; index -> why, for those not fetched."""
        failed: dict[int, str] = {}
        for index, download in blobs.downloads.items():
            try:
                blobs.blobs[index] = self.client.download(self.lease["kernel_id"], download, blobs.sizes[index])
                self.bytes_downloaded += blobs.sizes[index]
            except GatewayError as exc:
                failed[index] = str(exc)
        return failed

    def _lease_end_reason(self) -> str | None:
        """Why this session's lease ended, or None while it is granted."""
        try:
            lease = self.client.get_lease(self.lease_id)
        except GatewayError as exc:
            return str(exc)
        return None if lease.get("state") == "granted" else str(lease.get("reason") or lease.get("state"))

    def _follow(self, relay: CellRelay, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted_for: str | None = None
        answered = 0
        while not relay.done:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                msg = self.channel.recv(timeout=wait if wait is None else min(wait, 1.0))
                if msg is None:
                    if deadline is not None and time.monotonic() >= deadline and interrupted_for is None:
                        interrupted_for = "timeout"
                        self.client.interrupt(self.lease["kernel_id"])
                        deadline = time.monotonic() + 10  # the interrupted cell gets 10 s to finish
                    elif interrupted_for == "timeout" and deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError("the GPU kernel did not stop after an interrupt")
                    continue
                self._note_hello(msg)
                relay.process_message(msg)
                while answered < len(relay.input_replies):
                    self.channel.send("stdin", "input_reply", {"value": relay.input_replies[answered]},
                                      parent=msg["header"])
                    answered += 1
            except KeyboardInterrupt:
                if interrupted_for is not None:
                    raise
                interrupted_for = "keyboard"
                self.client.interrupt(self.lease["kernel_id"])
                deadline = time.monotonic() + 10
            except ConnectionClosed:
                if not self._reconnect():
                    raise LeaseGone(self.channel.close_reason() or "the connection to the GPU kernel closed",
                                    executed=True) from None
        if interrupted_for == "keyboard":
            raise KeyboardInterrupt
        if interrupted_for == "timeout":
            relay.timed_out = True

    def _note_hello(self, msg: dict[str, Any]) -> None:
        """The helper's first comm message says what it takes (it comes during the first cell)."""
        content = msg.get("content") or {}
        if (msg.get("header", {}).get("msg_type") == "comm_msg" and content.get("comm_id") == self.comm_id
                and (content.get("data") or {}).get("op") == HELPER_HELLO_OP):
            self.push_in_execute = bool(content["data"].get("push_in_execute"))

    def _reconnect(self, patience: float = 10.0) -> bool:
        """After a lost connection, come back under the same session id: the gateway kept
        what the kernel sent meanwhile and replays it. False when the lease is over."""
        if self.channel.closed_by_gateway:
            return False
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                if self.client.get_lease(self.lease_id).get("state") != "granted":
                    return False
                self.channel = self.client.open_channel(self.lease["kernel_id"], self.channel.session_id)
                return True
            except GatewayError:
                time.sleep(0.5)
        return False

    def _bind_pulled(self, values: list[dict[str, Any]], buffers: list[Any], ns: dict[str, Any],
                     failed: dict[int, str], remote_alive: bool = True) -> list[str]:
        """Bind what came back; returns the names whose data could not be fetched, which become
        RemoteRefs while the kernel lives (else they are left as they were)."""
        lost: list[str] = []
        for item in values:
            name = item["name"]
            kind = item["kind"]
            unfetched = [failed[i] for i in range(item.get("blob", 0), item.get("blob", 0) + 1 + item.get("nbuf", 0))
                         if i in failed] if kind == "pickle" else []
            if unfetched:
                lost.append(name)
                if not remote_alive:
                    continue
                item = {**item, "kind": "remote", "why": f"it could not be fetched ({unfetched[0]})"}
                kind = "remote"
            if name in ns:
                reaper.release_later(ns[name])  # a replaced gigabyte is unmapped off the cell's thread
            if kind == "module":
                try:
                    ns[name] = importlib.import_module(item["module"])
                    continue
                except ImportError:
                    item = {**item, "kind": "remote", "why": f"module {item['module']} is not installed here",
                            "describe": {"type": "module"}}
                    kind = "remote"
            if kind == "pickle":
                first = item["blob"]
                try:
                    ns[name] = serialize.load(buffers[first], list(buffers[first + 1 : first + 1 + item["nbuf"]]))
                    self.remote_hashes[name] = item["hash"]
                    self.remote_only.discard(name)
                    continue
                except ModuleNotFoundError as exc:
                    root = (exc.name or "").split(".")[0]
                    if root:
                        self.missing_modules.add(root)
                    item = {**item, "why": f"{root or 'a module'} is not installed in this notebook's kernel"}
                except Exception as exc:
                    item = {**item, "why": f"it could not be rebuilt here ({type(exc).__name__}: {exc})"}
            ns[name] = RemoteRef(name, self.lease_id, str(self.lease.get("gpu_type")), item.get("describe", {}),
                                 item.get("why", "it stays remote"))
            self.remote_only.add(name)
            self.remote_hashes.pop(name, None)
        return lost


def acquire_lease(client: GatewayClient, spec: str, idle_timeout: float | None, notebook: str,
                  on_wait: Any) -> dict[str, Any]:
    """Create a lease and wait for it; ``on_wait(lease)`` shows progress. Ctrl-C cancels it."""
    lease = client.create_lease(spec, idle_timeout, notebook)
    try:
        while lease["state"] == "queued":
            on_wait(lease)
            lease = client.get_lease(lease["id"], wait=2)
    except BaseException:
        try:
            client.delete_lease(lease["id"])
        except GatewayError:
            pass
        raise
    if lease["state"] != "granted":
        why = f"{lease.get('reason')}: {lease['capacity_note']}" if lease.get("capacity_note") else lease.get("reason")
        raise GatewayError(f"lease {lease['id'][:8]} ended before it was granted: {why}")
    return lease
