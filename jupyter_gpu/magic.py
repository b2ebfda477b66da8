"""``%%gpu`` and ``%gpu``: thin IPython wrappers over :mod:`jupyter_gpu.remote`."""

from __future__ import annotations

import atexit
import getpass
import os
import re
import sys
import time
from typing import Any

from IPython.core.display_functions import DisplayHandle, display, publish_display_data
from IPython.core.error import UsageError
from IPython.core.getipython import get_ipython
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import clear_output

from .analysis import analyse_cell
from .client import GatewayClient, GatewayConfig, GatewayError
from .defaults import read_default_type
from .outputs import RemoteResult
from .protocol import SpecError, format_gpu_spec, parse_gpu_spec
from .remote import CellOptions, LeaseGone, PushRefused, RemoteSession, acquire_lease, check_remote_refs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"--pull-limit {text!r} is not a size: use e.g. 100MB, 2GB or 500000")
    return int(float(match.group(1)) * _UNITS[unit])


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


class IPythonFrontend:
    """Shows remote output in the local cell, through the local kernel's own channels."""

    def stream(self, name: str, text: str) -> None:
        # No flush per message: the kernel's streams flush every 0.2 s (and before any
        # display or input prompt), where a flush per message waits on its IOPub thread.
        (sys.stderr if name == "stderr" else sys.stdout).write(text)

    def display(self, data: dict[str, Any], metadata: dict[str, Any], transient: dict[str, Any], update: bool) -> None:
        publish_display_data(data, metadata, transient=transient, update=update)

    def clear_output(self, wait: bool) -> None:
        clear_output(wait=wait)

    def input(self, prompt: str, password: bool) -> str:
        return getpass.getpass(prompt) if password else input(prompt)

    def comm(self, msg_type: str, content: dict[str, Any], metadata: dict[str, Any], buffers: list[Any]) -> None:
        kernel = getattr(get_ipython(), "kernel", None)
        if kernel is None:  # plain IPython terminal: nothing can draw a widget
            return
        kernel.session.send(kernel.iopub_socket, msg_type, content, parent=kernel.get_parent(), metadata=metadata,
                            ident=f"comm-{content.get('comm_id', '')}".encode(), buffers=[bytes(b) for b in buffers])


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: GatewayClient | None = None
        self.sessions: dict[str, RemoteSession] = {}
        atexit.register(self.release_all)

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def user_ns(self) -> dict[str, Any]:
        assert self.shell is not None  # magics are only ever registered on a shell
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    def _client(self) -> GatewayClient:
        if self.client is None:
            try:
                self.client = GatewayClient(GatewayConfig.from_env())
            except GatewayError as exc:
                raise UsageError(str(exc)) from None
        return self.client

    def _offered(self) -> str:
        try:
            return ", ".join(t["name"] for t in self._client().types())
        except GatewayError:
            return "(the gateway did not answer)"

    def _session(self, spec: str, idle: float | None, new: bool) -> RemoteSession:
        session = self.sessions.get(spec)
        if session is not None and not session.alive:
            self._tell_ended(self._release(spec))
            session = None
        elif session is not None and new:
            self._release(spec)
            session = None
        if session is None:
            client = self._client()
            handle: list[DisplayHandle | None] = [None]

            def show_wait(lease: dict[str, Any]) -> None:
                text = (f"jupyter-gpu: waiting for {spec}: position {lease['queue_position']} in the queue, "
                        f"about {lease['expected_wait']:.0f} s (interrupt to cancel)")
                if handle[0] is None:
                    handle[0] = display({"text/plain": text}, raw=True, display_id=True)
                else:
                    handle[0].update({"text/plain": text}, raw=True)

            notebook = os.environ.get("JPY_SESSION_NAME", "")
            lease = acquire_lease(client, spec, idle, notebook, show_wait)
            if handle[0] is not None:
                handle[0].update({"text/plain": f"jupyter-gpu: got {lease['gpu_type']} after waiting"}, raw=True)
            session = self.sessions[spec] = RemoteSession(client, lease)
        return session

    def _release(self, spec: str) -> RemoteSession:
        """Stop using this spec's session and end its lease (a no-op if it already ended)."""
        session = self.sessions.pop(spec)
        session.close()
        try:
            self._client().delete_lease(session.lease_id)
        except (GatewayError, UsageError):
            pass
        return session

    def _tell_ended(self, session: RemoteSession) -> None:
        """Say why the GPU kernel went away and which values went with it."""
        try:
            reason = self._client().get_lease(session.lease_id).get("reason") or "closed"
        except GatewayError:
            reason = "closed"
        note = f"jupyter-gpu: the {session.lease['gpu_type']} lease ended ({reason})"
        if session.remote_only:
            note += f"; these lived only there and are gone: {', '.join(sorted(session.remote_only))}"
        print(note + ". Getting a fresh GPU kernel.", file=sys.stderr)

    def release_all(self) -> None:
        for spec in list(self.sessions):
            self._release(spec)

    # --- the magic --------------------------------------------------------------------------

    @magic_arguments()
    @argument("spec", nargs="?", default=None,
              help="GPU type: a100, a100:2 (count), h100|a100 (fallbacks), any. As a line magic: "
              "status, types, release or usage.")
    @argument("--timeout", type=float, default=None, help="Interrupt the cell after this many seconds.")
    @argument("--idle", type=float, default=None, help="Release the GPU after this many idle seconds.")
    @argument("--push", default=None, help="Extra names to send, comma-separated.")
    @argument("--pull", default=None, help="Extra names to bring back, comma-separated.")
    @argument("--no-push", default=None, help="Names never to send, comma-separated.")
    @argument("--no-pull", action="store_true", help="Bring nothing back; values stay on the GPU kernel.")
    @argument("--pull-limit", default="100MB", help="Values larger than this stay remote (RemoteRef).")
    @argument("--new", action="store_true", help="Take a fresh lease instead of reusing this notebook's.")
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on a pooled GPU kernel: %%gpu a100."""
        args = parse_argstring(self.gpu, line)
        if cell is None:
            return self._line(args.spec or "status")
        spec = self._spec(args.spec)
        options = CellOptions(push=_names(args.push), pull=_names(args.pull), no_push=set(_names(args.no_push)),
                              no_pull=args.no_pull, pull_limit=parse_size(args.pull_limit), timeout=args.timeout)
        assert self.shell is not None
        # !shell lines and %magics are not Python: analyse what IPython will actually run
        names = analyse_cell(self.shell.input_transformer_manager.transform_cell(cell))
        frontend = IPythonFrontend()
        ns = self.user_ns
        try:
            # Before leasing anything: a cell reading another kernel's value cannot run.
            current = self.sessions.get(spec)
            live = current.lease_id if current is not None and current.alive and not args.new else None
            check_remote_refs([n for n in names.free if n not in options.no_push], ns, live)
            session = self._session(spec, args.idle, args.new)
            try:
                relay = session.run_cell(cell, names.free, names.bound, ns, options, frontend)
            except LeaseGone as exc:
                if exc.executed:
                    self._release(spec)  # don't leave a lease we lost track of billing
                    raise RuntimeError(f"the connection to the GPU kernel was lost during the cell: {exc}") from None
                # It ended between cells (idle release raced us): nothing ran, so run it afresh.
                self._tell_ended(self._release(spec))
                session = self._session(spec, args.idle, False)
                relay = session.run_cell(cell, names.free, names.bound, ns, options, frontend)
        except (PushRefused, LeaseGone, GatewayError) as exc:
            raise UsageError(str(exc)) from None
        if relay.timed_out:
            raise TimeoutError(f"the cell ran past --timeout {args.timeout:g} s; the GPU kernel was interrupted and "
                               "the lease is still yours")
        if relay.error is not None:
            raise relay.error
        return relay.result if isinstance(relay.result, RemoteResult) else None

    def _spec(self, given: str | None) -> str:
        spec = given or read_default_type()
        try:
            return format_gpu_spec(parse_gpu_spec(spec))
        except SpecError as exc:
            raise UsageError(f"{exc}. This gateway offers: {self._offered()}") from None

    # --- line commands ----------------------------------------------------------------------

    def _line(self, command: str) -> None:
        client = self._client()
        try:
            if command == "types":
                for t in client.types():
                    badge = " (emulated)" if t["emulated"] else ""
                    print(f"{t['name']:<12} {t['free']}/{t['total']} free  {t['warm']} warm  {t['queued']} queued  "
                          f"${t['price_per_gpu_hour']:.2f}/GPU-hour{badge}")
            elif command == "status":
                if not self.sessions:
                    print("jupyter-gpu: this notebook holds no GPU")
                for spec, session in self.sessions.items():
                    lease = client.get_lease(session.lease_id)
                    age = time.time() - (lease["granted_at"] or time.time())
                    idle = lease.get("idle_remaining")
                    print(f"{spec}: {lease['gpu_type']} GPU {lease['gpu_indices']} ({lease['state']}), held "
                          f"{age:.0f} s, idle release in {idle if idle is None else round(idle)} s, "
                          f"{lease['gpu_seconds']:.1f} GPU-s, ${lease['cost']:.4f}")
            elif command == "release":
                lost = sorted({n for s in self.sessions.values() for n in s.remote_only})
                count = len(self.sessions)
                self.release_all()
                print(f"jupyter-gpu: released {count} lease(s)" + (f"; gone with them: {', '.join(lost)}" if lost
                                                                   else ""))
            elif command == "usage":
                usage = client.usage()
                print(f"{usage['total_gpu_seconds']:.1f} GPU-seconds, ${usage['total_cost']:.4f} in total")
                for gpu_type, row in sorted(usage.get("by_type", {}).items()):
                    print(f"  {gpu_type:<12} {row['gpu_seconds']:.1f} GPU-s  ${row['cost']:.4f}")
            else:
                raise UsageError(f"unknown %gpu command {command!r}: use status, types, release or usage "
                                 "(%%gpu SPEC runs a cell)")
        except GatewayError as exc:
            raise UsageError(str(exc)) from None
