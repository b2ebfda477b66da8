"""Loaded into every pooled kernel at warm-up: receives pushed variables, sends bound ones back.

Talks to the ``%%gpu`` magic over a Jupyter comm (target ``jupyter_gpu``), whose messages
carry binary buffers. Pushed values ride in the cell's execute_request itself (its metadata
and buffers, bound by a ``pre_run_cell`` hook) once the helper has said it takes them there,
and arrive as comm messages just before the execute_request otherwise (a push in several
pieces, or a magic that has not heard the helper yet); the bound names go back from a
``post_run_cell`` hook, so they reach the client inside the same execution, before the
kernel reports idle.
"""

from __future__ import annotations

import ast
import importlib
import os
import time
import types
from typing import Any

from . import reaper, serialize, write_tracking
from .kernel_snapshot import KernelSnapshots
from .protocol import HELPER_COMM_TARGET, HELPER_HELLO_OP, PULL_METADATA_KEY, PULLED_METADATA_KEY, PUSH_METADATA_KEY
from .transfer import DOWNLOAD_MIN_BYTES, STAGING_DIR_ENV, Assembler, DownloadOffer, split

_ERROR_NAME = "__jupyter_gpu_push_error__"
ABANDONED_UPLOAD_SECONDS = 120.0
#: Seconds between two looks for abandoned uploads: a look lists and stats the staging
#: directory, which cProfile showed as ~2.5 ms of every push on a busy 2-core VM.
SWEEP_INTERVAL_SECONDS = 30.0


class PushError(RuntimeError):
    """A pushed variable could not be rebuilt on the GPU kernel; the cell did not run."""


class _FailPushedCell(ast.NodeTransformer):
    """Replaces the next cell with ``raise`` when its pushed variables failed to load."""

    def __init__(self, helper: KernelHelper) -> None:
        self.helper = helper

    def visit_Module(self, node: ast.Module) -> ast.Module:
        if self.helper.push_error is None:
            return node
        self.helper.shell.user_ns[_ERROR_NAME] = PushError(self.helper.push_error)
        self.helper.push_error = None
        return ast.fix_missing_locations(ast.Module(body=ast.parse(f"raise {_ERROR_NAME}").body, type_ignores=[]))


class KernelHelper:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.comm: Any = None
        self.push_error: str | None = None
        # Where the gateway puts uploaded buffers for this kernel (set by the kernel backend).
        self._staging_dir = os.environ.get(STAGING_DIR_ENV)
        # Its claimed uploads are mapped privately and deleted: only this kernel can write them.
        write_tracking.tracker.trust_deleted_files_in(self._staging_dir)
        self._incoming = Assembler(self._staging_dir)
        self._values: list[dict[str, Any]] = []
        #: the last pull's offers, withdrawn at the next one if the client never fetched them
        self._offers: list[DownloadOffer] = []
        self.snapshots = KernelSnapshots(shell, self._staging_dir)
        self._swept_at = -SWEEP_INTERVAL_SECONDS  # time.monotonic() of the last look for abandoned uploads
        #: the execute_request whose push was bound (a cell calling run_cell must not rebind it)
        self._push_taken_for: str | None = None
        #: what goes back inside the execute_reply of the request named: (msg_id, data, buffers)
        self._reply_pull: tuple[str, dict[str, Any], list[Any]] | None = None
        self._session_send: Any = None

    def register(self) -> None:
        self.shell.kernel.comm_manager.register_target(HELPER_COMM_TARGET, self._on_open)
        # ipykernel sleeps 0.5 ms before every execute_reply (its ``_execute_sleep``, a config
        # trait), a head start for output on IOPub over the reply, though it has flushed that
        # output already. The magic waits for idle, which follows all output, as Jupyter's
        # frontends do; on a busy machine the sleep gave the core away for milliseconds: a 1 MB
        # pull took 13.9 ms with it, 10.8 without (same run, load 8).
        if hasattr(self.shell.kernel, "_execute_sleep"):
            self.shell.kernel._execute_sleep = 0.0
        session = getattr(self.shell.kernel, "session", None)
        if session is not None:
            self._session_send = session.send
            session.send = self._send_with_pull
        self.shell.events.register("post_run_cell", self._post_run_cell)
        self.shell.ast_transformers.append(_FailPushedCell(self))
        self.snapshots.register()
        # After the snapshots' hook: a restore lands before the cell's push, whose values win.
        self.shell.events.register("pre_run_cell", self._pre_run_cell)

    def _on_open(self, comm: Any, open_msg: dict[str, Any]) -> None:
        self.comm = comm
        comm.on_msg(self._on_msg)
        self.snapshots.restore_pending()  # before the notebook's pushes: its own values win
        # The magic puts later pushes into the execute_request once it has read this (an
        # older magic ignores it: it is no reply to any of its cells).
        comm.send({"op": HELPER_HELLO_OP, "push_in_execute": True})

    # --- push -----------------------------------------------------------------------------

    def _on_msg(self, msg: dict[str, Any]) -> None:
        self._take_push(msg["content"]["data"], list(msg.get("buffers") or []))

    def _pre_run_cell(self, info: Any = None) -> None:
        """Bind the push that rode in this cell's execute_request, before the cell runs."""
        parent = self.shell.kernel.get_parent("shell") or {}
        push = (parent.get("metadata") or {}).get(PUSH_METADATA_KEY)
        msg_id = (parent.get("header") or {}).get("msg_id")
        if not isinstance(push, dict) or msg_id == self._push_taken_for:
            return
        self._push_taken_for = msg_id
        self._take_push(push, list(parent.get("buffers") or []))

    def _take_push(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """One message of a push (the first carries the manifest); binds the values when it is whole."""
        try:
            if data.get("seq", 0) == 0:
                # The first part of a transfer carries the manifest; later parts only pieces.
                self.push_error = None
                self._values = data.get("values", [])
                self._remove_abandoned_uploads()
            self._incoming.feed(data, buffers)
            if self._incoming.complete:
                self._bind(self._values)
                self._incoming = Assembler(self._staging_dir)
        except Exception as exc:
            self.push_error = f"the GPU kernel could not take the pushed variables: {type(exc).__name__}: {exc}"
            self._incoming = Assembler(self._staging_dir)

    def _remove_abandoned_uploads(self) -> None:
        """Uploads no push message ever named (the client failed in between) go after a while;
        one in progress is never this old (the gateway gives up on a stall after 30 s). One look
        per SWEEP_INTERVAL_SECONDS: an abandoned upload goes within 150 s instead of 120 s."""
        if self._staging_dir is None or time.monotonic() - self._swept_at < SWEEP_INTERVAL_SECONDS:
            return
        self._swept_at = time.monotonic()
        cutoff = time.time() - ABANDONED_UPLOAD_SECONDS
        try:
            entries = list(os.scandir(self._staging_dir))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    def _bind(self, values: list[dict[str, Any]]) -> None:
        ns = self.shell.user_ns
        for item in values:
            name, kind = item["name"], item["kind"]
            if name in ns:
                reaper.release_later(ns[name])  # a replaced gigabyte is unmapped off this thread
            try:
                if kind == "pickle":
                    first = item["blob"]
                    blobs = self._incoming.blobs
                    ns[name] = serialize.load(blobs[first], blobs[first + 1 : first + 1 + item["nbuf"]])
                    for index, digest in (item.get("buffer_digests") or {}).items():
                        # What the client hashed, this kernel need not read again after the cell.
                        view = memoryview(blobs[first + 1 + int(index)]).cast("B")
                        write_tracking.tracker.remember(view, bytes.fromhex(digest))
                elif kind == "module":
                    ns[name] = importlib.import_module(item["module"])
                elif kind == "alias":
                    ns[name] = ns[item["of"]]
            except Exception as exc:
                raise PushError(
                    f"variable {name!r} could not be rebuilt on the GPU kernel ({type(exc).__name__}: {exc}); "
                    f"if the GPU kernel lacks a package, push something simpler or use --no-push {name}"
                ) from exc

    # --- pull -----------------------------------------------------------------------------

    def _post_run_cell(self, result: Any) -> None:
        # The pull spec rides in the execute_request's metadata, so a cell with nothing to
        # push costs no extra message.
        parent = self.shell.kernel.get_parent("shell") or {}
        pull = (parent.get("metadata") or {}).get(PULL_METADATA_KEY)
        if pull is None or self.comm is None:
            return
        ns = self.shell.user_ns
        items: list[dict[str, Any]] = []
        buffers: list[Any] = []
        if getattr(result, "success", False):
            for name in pull.get("names", []):
                if name in ns:
                    items.append(self._pack(name, ns[name], pull, buffers))
        # What the kernel now holds under the names the client believes it knows: a cell
        # may have changed a pushed value in place (x.fill(0), model.fit(...)), and then
        # the client must send its own value again rather than trust its cache.
        # A value pulled just now was hashed as it was packed: not pickled a second time.
        packed = {item["name"]: item["hash"] for item in items if item["kind"] == "pickle"}
        hashes = {name: packed[name] if name in packed else self._fingerprint(ns[name]) if name in ns else None
                  for name in pull.get("verify", [])}
        messages = list(split(buffers, downloads=self._offer_downloads(buffers, pull)))
        messages[0][0].update(values=items, hashes=hashes)
        msg_id = (parent.get("header") or {}).get("msg_id")
        if pull.get("in_reply") and len(messages) == 1 and self._session_send is not None and msg_id:
            # Inside the execute_reply (see _send_with_pull): one kernel message fewer per
            # cell, and the bytes skip the IOPub thread.
            self._reply_pull = (msg_id, {"op": "pulled", **messages[0][0]}, messages[0][1])
            return
        for data, pieces in messages:
            self.comm.send({"op": "pulled", **data}, buffers=pieces)

    def _send_with_pull(self, stream: Any, msg_or_type: Any, content: Any = None, parent: Any = None,
                        *args: Any, **kwargs: Any) -> Any:
        """The kernel session's ``send``, which puts the cell's pull into its execute_reply: the
        manifest in the metadata (signed with the rest), the pieces as the reply's buffers."""
        taken = self._reply_pull
        if (taken is not None and msg_or_type == "execute_reply" and isinstance(parent, dict) and not args
                and not kwargs.get("buffers") and (parent.get("header") or {}).get("msg_id") == taken[0]):
            self._reply_pull = None
            kwargs["metadata"] = {**(kwargs.get("metadata") or {}), PULLED_METADATA_KEY: taken[1]}
            kwargs["buffers"] = taken[2]
        return self._session_send(stream, msg_or_type, content, parent, *args, **kwargs)

    def _offer_downloads(self, buffers: list[Any], pull: dict[str, Any]) -> dict[int, str]:
        """Large blobs are offered for the client to fetch through the gateway: index -> download id."""
        for offer in self._offers:  # the client fetches within its cell: these it never will
            offer.cancelled.set()
        self._offers = []
        if not pull.get("downloads") or self._staging_dir is None:
            return {}
        offered: dict[int, str] = {}
        for index, blob in enumerate(buffers):
            if memoryview(blob).nbytes >= DOWNLOAD_MIN_BYTES:
                try:
                    offer = DownloadOffer(self._staging_dir, blob)
                except OSError:
                    break  # no FIFO here (a file system without them): the websocket carries the rest
                offered[index] = offer.id
                self._offers.append(offer)
        return offered

    @staticmethod
    def _fingerprint(value: Any) -> str | None:
        try:
            return serialize.fingerprint(*serialize.dump(value))
        except Exception:  # unpicklable now: the client will have to resend
            return None

    def _pack(self, name: str, value: Any, pull: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        if isinstance(value, types.ModuleType):
            return {"name": name, "kind": "module", "module": value.__name__}
        if pull.get("keep_remote"):
            return self._remote(name, value, "the cell ran with --no-pull")
        root = type(value).__module__.split(".")[0]
        if root in pull.get("missing_modules", []):
            return self._remote(name, value, f"{root} is not installed in the notebook's kernel")
        limit = pull.get("limit", 0)
        estimate = serialize.estimated_nbytes(value)
        if estimate is not None and estimate > limit:
            # Known too big without pickling it (a model on the GPU would be copied to host
            # memory and pickled only to be thrown away).
            return self._remote(name, value, f"its {estimate / 1e6:.1f} MB exceed the pull limit", estimate)
        try:
            stream, oob = serialize.dump(value)
        except Exception as exc:
            return self._remote(name, value, f"it cannot be pickled ({type(exc).__name__}: {exc})")
        size = len(stream) + sum(len(b) for b in oob)
        if size > limit:
            return self._remote(name, value, f"its {size / 1e6:.1f} MB exceed the pull limit", size)
        item = {
            "name": name,
            "kind": "pickle",
            "blob": len(buffers),
            "nbuf": len(oob),
            "hash": serialize.fingerprint(stream, oob),
            "describe": serialize.describe(value, size),
        }
        buffers.append(stream)
        buffers.extend(oob)
        return item

    def _remote(self, name: str, value: Any, why: str, size: int | None = None) -> dict[str, Any]:
        return {"name": name, "kind": "remote", "why": why, "describe": serialize.describe(value, size)}


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext jupyter_gpu.kernel_helper``: what the pool runs in each kernel at warm-up."""
    if getattr(shell, "_jupyter_gpu_helper", None) is None:
        helper = KernelHelper(shell)
        helper.register()
        shell._jupyter_gpu_helper = helper
