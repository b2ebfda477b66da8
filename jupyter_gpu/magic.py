"""``%%gpu`` and ``%gpu``: thin IPython wrappers over :class:`jupyter_gpu.gpu_client.GpuClient`."""

from __future__ import annotations

import atexit
import getpass
import os
import re
import sys
import time
import uuid
from typing import Any

from IPython.core.display_functions import DisplayHandle, display, publish_display_data
from IPython.core.error import UsageError
from IPython.core.getipython import get_ipython
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import clear_output

from .analysis import analyse_cell
from .client import GatewayError
from .defaults import read_default_type
from .gpu_client import GpuClient
from .kept_state import ended_note, format_snapshots
from .notices import ENDED, LeaseNews, NoticeWatcher
from .outputs import RemoteResult
from .protocol import Reason, SpecError, format_gpu_spec, parse_gpu_spec
from .remote import CellOptions, LeaseGone, PushRefused, RemoteSession
from .usage_report import format_mine

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"--pull-limit {text!r} is not a size: use e.g. 100MB, 2GB or 500000")
    return int(float(match.group(1)) * _UNITS[unit])


#: Seconds between two looks for new lease notices: a cell that starts sooner shows none, so
#: a notebook that runs many short cells does not pay a gateway round trip for each.
NOTICE_CHECK_INTERVAL = 2.0

#: Seconds between two looks of the notice watcher, the thread that shows lease notices (and a
#: lease's end) while the notebook runs no cell; None: no watcher, notices wait for the next cell.
#: Read when the notebook's first lease is granted.
NOTICE_WATCH_INTERVAL: float | None = 3.0


def _notebook() -> str:
    """The notebook's path, as Jupyter tells its kernel: what kept variables are filed under."""
    return os.environ.get("JPY_SESSION_NAME", "")


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


class NotebookLeaseWatcher:
    """Shows the queue position in place while waiting, and why a GPU kernel went away."""

    def __init__(self) -> None:
        self.handle: DisplayHandle | None = None

    def waiting(self, spec: str, lease: dict[str, Any]) -> None:
        text = (f"jupyter-gpu: waiting for {spec}: position {lease['queue_position']} in the queue, "
                f"about {lease['expected_wait']:.0f} s (interrupt to cancel)")
        if lease.get("capacity_note"):  # a node is being launched for it: its own estimate
            text = f"jupyter-gpu: waiting for {spec}: {lease['capacity_note']} (interrupt to cancel)"
        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def granted(self, spec: str, lease: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": f"jupyter-gpu: got {lease['gpu_type']} after waiting"}, raw=True)
        self.handle = None

    def ended(self, session: RemoteSession, lease: dict[str, Any]) -> None:
        # An ended lease no longer names its machine (a lost one took its slot along): the grant did.
        lease = {**lease, "node": lease.get("node") or session.lease.get("node")}
        print(ended_note(lease, session.remote_only), file=sys.stderr)


class NotebookNoticeDisplay:
    """Shows lease news in the notebook from the watcher's thread, in the output of the cell
    that ran last: where a notebook shows output that comes after its cell finished (JupyterLab
    keeps only the last cell's request listening), and where its user looks. Addressed to that
    cell's execute_request explicitly: the kernel's own default is its last shell request,
    which may be a completion or an inspection that no cell shows.

    One line per lease and cell, updated in place (a display id): a notice of another kind
    joins it, a newer one of the same kind replaces it, the lease's end replaces them all.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.cell: dict[str, Any] | None = None  # the execute_request of the cell that ran last
        self._lines: dict[str, tuple[str, str, dict[str, str]]] = {}  # lease -> (cell msg id, display id, texts)

    def cell_started(self) -> None:
        """On the cell's own thread, as it starts (its request is the kernel's parent then)."""
        self.cell = self.kernel.get_parent("shell")

    def show(self, news: LeaseNews) -> None:
        cell = self.cell
        if not cell:
            return
        cell_id = str(cell["header"]["msg_id"])
        shown = self._lines.get(news.lease_id)
        if shown is not None and shown[0] == cell_id:
            _, display_id, texts = shown
            update = True
        else:  # the first news of this lease since this cell ran: a line of its own
            display_id, texts, update = f"jupyter-gpu-{uuid.uuid4().hex}", {}, False
        if news.kind == ENDED:
            texts.clear()
        texts[news.kind] = news.text
        self._lines[news.lease_id] = (cell_id, display_id, texts)
        content = {"data": {"text/plain": "\n".join(texts.values())}, "metadata": {},
                   "transient": {"display_id": display_id}}
        self.kernel.session.send(self.kernel.iopub_socket, "update_display_data" if update else "display_data",
                                 content, parent=cell)


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: GpuClient | None = None
        # A local kernel that shuts down or restarts starts clean: nothing kept for it either.
        atexit.register(self._exit)
        self._notices_checked = 0.0
        # In a kernel, a thread shows lease news while no cell runs (a terminal has no place
        # to show them between prompts: there they wait for the next cell).
        kernel = getattr(shell, "kernel", None)
        self._notice_display = NotebookNoticeDisplay(kernel) if kernel is not None else None
        self._notice_watcher: NoticeWatcher | None = None
        # Every cell, local or %%gpu, shows what the gateway said about the notebook's leases
        # since (a release for GPU idleness coming): the notebook hears it while it works.
        shell.events.register("pre_run_cell", self._before_cell)

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def user_ns(self) -> dict[str, Any]:
        assert self.shell is not None  # magics are only ever registered on a shell
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    @property
    def sessions(self) -> dict[str, RemoteSession]:
        """This notebook's sessions by SPEC (none before the first %%gpu cell)."""
        return self.client.sessions if self.client is not None else {}

    def _client(self) -> GpuClient:
        if self.client is None:
            try:
                self.client = GpuClient.from_env(_notebook())
            except GatewayError as exc:
                raise UsageError(str(exc)) from None
        return self.client

    def _offered(self) -> str:
        try:
            return ", ".join(t["name"] for t in self._client().gateway.types())
        except GatewayError:
            return "(the gateway did not answer)"

    def _before_cell(self, info: Any = None) -> None:
        if self._notice_display is not None:
            self._notice_display.cell_started()
        self.show_notices()

    def _watch_notices(self) -> None:
        """After a %%gpu cell: watch for lease news while a lease is held (a thread already
        watching goes on; one that found no lease left has ended)."""
        if self._notice_display is None or self.client is None or NOTICE_WATCH_INTERVAL is None:
            return
        if self._notice_watcher is None:
            client = self.client
            self._notice_watcher = NoticeWatcher(lambda: client.lease_news(ends=True), lambda: client.holds_lease,
                                                 self._notice_display.show, NOTICE_WATCH_INTERVAL)
        self._notice_watcher.start()

    def close(self) -> None:
        """``%unload_ext jupyter_gpu``: no thread, no hook and no lease left behind; the leases'
        variables are kept for the notebook's next lease, as with ``%gpu release``."""
        assert self.shell is not None
        self.shell.events.unregister("pre_run_cell", self._before_cell)
        atexit.unregister(self._exit)
        if self._notice_watcher is not None:
            self._notice_watcher.stop()
        self.release_all()

    def _exit(self) -> None:
        if self._notice_watcher is not None:  # not in the middle of a look while the kernel goes
            self._notice_watcher.stop()
        self.release_all(True)

    def show_notices(self, info: Any = None) -> None:
        """Print the lease notices posted since the last look (at most one look per
        NOTICE_CHECK_INTERVAL, and none while the notebook holds no lease or while the watcher
        thread looks: it shows them in this cell by itself, so the cell pays no round trip)."""
        if self.client is None or not self.client.sessions:
            return
        if self._notice_watcher is not None and self._notice_watcher.running:
            return
        now = time.monotonic()
        if now - self._notices_checked < NOTICE_CHECK_INTERVAL:
            return
        self._notices_checked = now
        for line in self.client.new_notices():
            print(line, file=sys.stderr)

    def release_all(self, forget: bool = False) -> None:
        if self.client is not None:
            self.client.release_all(forget)

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
    @argument("--forget", action="store_true",
              help="With %%gpu release: keep none of the variables for this notebook's next lease.")
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on a pooled GPU kernel: %%gpu a100."""
        args = parse_argstring(self.gpu, line)
        if cell is None:
            return self._line(args.spec or "status", args.forget)
        spec = self._spec(args.spec)
        options = CellOptions(push=_names(args.push), pull=_names(args.pull), no_push=set(_names(args.no_push)),
                              no_pull=args.no_pull, pull_limit=parse_size(args.pull_limit), timeout=args.timeout)
        assert self.shell is not None
        # !shell lines and %magics are not Python: analyse what IPython will actually run
        names = analyse_cell(self.shell.input_transformer_manager.transform_cell(cell))
        try:
            relay = self._client().run_cell(spec, cell, names, self.user_ns, options, IPythonFrontend(), args.idle,
                                            args.new, NotebookLeaseWatcher())
        except (PushRefused, LeaseGone, GatewayError) as exc:
            raise UsageError(str(exc)) from None
        finally:
            self._watch_notices()
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

    def _line(self, command: str, forget: bool = False) -> None:
        client = self._client().gateway
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
                    # on a cluster, which machine: the lease's variables live only there
                    node = lease.get("node")
                    where = f" on {node}" if node and node != "local" else ""
                    print(f"{spec}: {lease['gpu_type']} GPU {lease['gpu_indices']}{where} ({lease['state']}), held "
                          f"{age:.0f} s, idle release in {idle if idle is None else round(idle)} s, "
                          f"{lease['gpu_seconds']:.1f} GPU-s, ${lease['cost']:.4f}")
            elif command == "release":
                released = self._client().release_all(forget)
                lost = sorted({n for s in released for n in s.remote_only})
                count = len(released)
                if forget:
                    try:
                        client.forget_snapshots(self._client().notebook)
                    except GatewayError as exc:
                        if exc.reason != Reason.SNAPSHOTS_OFF:  # a gateway that keeps nothing: nothing to forget
                            raise
                    print(f"jupyter-gpu: released {count} lease(s), keeping nothing"
                          + (f"; gone with them: {', '.join(lost)}" if lost else ""))
                elif self._client().notebook:
                    print(f"jupyter-gpu: released {count} lease(s); their variables are kept for this notebook's "
                          "next %%gpu cell (%gpu release --forget keeps nothing)")
                else:  # outside a notebook server no path names the notebook: nothing to file them under
                    print(f"jupyter-gpu: released {count} lease(s)" + (f"; gone with them: {', '.join(lost)}"
                                                                       if lost else ""))
            elif command == "snapshots":
                print(format_snapshots(client.snapshots(), self._client().notebook))
            elif command == "usage":
                print(format_mine(client.usage()))
            else:
                raise UsageError(f"unknown %gpu command {command!r}: use status, types, release [--forget], "
                                 "snapshots or usage (%%gpu SPEC runs a cell)")
        except GatewayError as exc:
            raise UsageError(str(exc)) from None
