"""One notebook's GPU kernels: which lease serves which SPEC, reused across cells, and the
retry when a lease ended between two cells. The ``%%gpu`` magic is a thin wrapper over it.

Blocking on purpose: a cell runs on the kernel's main thread, where Ctrl-C arrives and where
displays find the cell they belong to. The REST calls it makes are the
:class:`~jupyter_gpu.client.GatewayClient`'s blocking methods (the server extension awaits
their async twins).
"""

from __future__ import annotations

from typing import Any, Protocol

from .analysis import CellNames
from .client import GatewayClient, GatewayConfig, GatewayError
from .kept_state import adopt_restored, ended_note, waits_for_restore
from .notices import ENDED, LeaseNews, NoticeBoard, format_notice
from .outputs import CellRelay, Frontend
from .protocol import GRANTED, KERNEL_DIED_ERROR, RELEASED
from .remote import CellOptions, LeaseGone, RemoteSession, acquire_lease, check_remote_refs


class LeaseWatcher(Protocol):
    """What a user is shown about leases: waiting in the queue, granted after a wait, ended."""

    def waiting(self, spec: str, lease: dict[str, Any]) -> None: ...

    def granted(self, spec: str, lease: dict[str, Any]) -> None:
        """Only after a wait (a lease granted at once says nothing)."""
        ...

    def ended(self, session: RemoteSession, lease: dict[str, Any]) -> None:
        """The lease as the gateway last described it (its reason, what its end kept)."""
        ...


class GpuClient:
    """The leases and kernel sessions of one notebook, one per SPEC (``a100``, ``h100|a100``)."""

    def __init__(self, gateway: GatewayClient, notebook: str = "") -> None:
        self.gateway = gateway
        self.notebook = notebook
        self.sessions: dict[str, RemoteSession] = {}
        self.notice_board = NoticeBoard()
        #: leases whose kernel died under a cell: the cell's error told it, and the next cell
        #: tells it again as it takes a fresh one; the watcher tells nothing in between
        self.died_in_cell: set[str] = set()

    @classmethod
    def from_env(cls, notebook: str = "") -> GpuClient:
        return cls(GatewayClient(GatewayConfig.from_env()), notebook)

    def session(self, spec: str, idle: float | None, new: bool, watcher: LeaseWatcher) -> RemoteSession:
        """This notebook's live session for ``spec``, else one on a new lease (waiting in the queue)."""
        session = self.sessions.get(spec)
        if session is not None and not session.alive:
            self._ended(spec, watcher)
            session = None
        elif session is not None and new:
            self.release(spec)
            session = None
        if session is None:
            waited = False

            def on_wait(lease: dict[str, Any]) -> None:
                nonlocal waited
                waited = True
                watcher.waiting(spec, lease)

            lease = acquire_lease(self.gateway, spec, idle, self.notebook, on_wait)
            if waited:
                watcher.granted(spec, lease)
            session = self.sessions[spec] = RemoteSession(self.gateway, lease)
        return session

    def run_cell(self, spec: str, code: str, names: CellNames, ns: dict[str, Any], options: CellOptions,
                 frontend: Frontend, idle: float | None, new: bool, watcher: LeaseWatcher) -> CellRelay:
        """Run a cell on ``spec``'s kernel. A lease that ended between cells (nothing ran) is
        replaced and the cell runs there; one lost during the cell is released, not retried."""
        # Before leasing anything: a cell reading another kernel's value cannot run.
        current = self.sessions.get(spec)
        live = current.lease_id if current is not None and current.alive and not new else None
        # A value of an ended lease may come back with the next one (its snapshot): checked once it is granted.
        held = {s.lease_id for s in self.sessions.values() if s.alive}
        waiting = [n for n in names.free if n not in options.no_push and waits_for_restore(ns.get(n), held)]
        check_remote_refs([n for n in names.free if n not in options.no_push and n not in waiting], ns, live)
        session = self.session(spec, idle, new, watcher)
        if waiting:
            # Asked now, not at the grant: the kernel's websocket opens only once its restore
            # is staged, and then the gateway knows which values it brings back.
            session.remote_only.update(adopt_restored(self.gateway.get_lease(session.lease_id), ns))
        try:
            return self._name_lost(session, session.run_cell(code, names.free, names.bound, ns, options, frontend))
        except LeaseGone as exc:
            if exc.executed:
                self.release(spec)  # don't leave a lease we lost track of billing
                raise RuntimeError(f"the connection to the GPU kernel was lost during the cell: {exc}") from None
        # It ended between cells (idle release raced us): nothing ran, so run it afresh.
        self._ended(spec, watcher)
        session = self.session(spec, idle, False, watcher)
        return self._name_lost(session, session.run_cell(code, names.free, names.bound, ns, options, frontend))

    @property
    def holds_lease(self) -> bool:
        """Whether a lease of this notebook may still have news: one whose end it has not heard of."""
        return any(not self._told(s.lease_id) for s in dict(self.sessions).values())

    def _told(self, lease_id: str) -> bool:
        return self.notice_board.ended(lease_id) or lease_id in self.died_in_cell

    def lease_news(self, timeout: float = 2.0, ends: bool = False) -> list[LeaseNews]:
        """What the gateway said about this notebook's leases since the last look: new notices,
        and with ``ends`` the end of a lease the notebook has not heard of yet (told here, so
        the next ``%%gpu`` cell does not tell it again). Safe from any thread.

        One GET per lease, bounded by ``timeout``: a gateway that does not answer only means
        nothing is shown now (the next look tries again)."""
        news: list[LeaseNews] = []
        for session in dict(self.sessions).values():  # a copy: the cell's thread may change them
            if self._told(session.lease_id) or not (ends or session.alive):
                continue
            try:
                lease = self.gateway.get_lease(session.lease_id, timeout=timeout)
            except GatewayError:
                continue
            if lease.get("state") == GRANTED:
                news += [LeaseNews(session.lease_id, str(notice["kind"]), format_notice(lease, notice))
                         for notice in self.notice_board.unseen(lease)]
            elif ends and lease.get("state") == RELEASED and self.notice_board.end(session.lease_id):
                news.append(LeaseNews(session.lease_id, ENDED, ended_note(_with_node(lease, session),
                                                                          session.remote_only, NEXT_CELL_GETS_ONE)))
        return news

    def new_notices(self, timeout: float = 2.0) -> list[str]:
        """Lines for the notices posted on this notebook's live leases since the last call."""
        return [news.text for news in self.lease_news(timeout)]

    def release(self, spec: str, forget: bool = False) -> RemoteSession:
        """Stop using this spec's session and end its lease (a no-op if it already ended);
        ``forget``: the gateway keeps none of its variables for the notebook's next lease."""
        session = self.sessions.pop(spec)
        session.close()
        self.notice_board.end(session.lease_id)  # ended here: nobody tells the notebook it did
        self.died_in_cell.discard(session.lease_id)
        try:
            self.gateway.delete_lease(session.lease_id, forget)
        except GatewayError:
            pass
        return session

    def release_all(self, forget: bool = False) -> list[RemoteSession]:
        return [self.release(spec, forget) for spec in list(self.sessions)]

    def _name_lost(self, session: RemoteSession, relay: CellRelay) -> CellRelay:
        """A cell whose kernel died under it (its machine lost, say) names the values that died with it."""
        if relay.error is not None and relay.error.ename == KERNEL_DIED_ERROR:
            relay.error.lost = sorted(session.remote_only)
            self.died_in_cell.add(session.lease_id)
        return relay

    def _ended(self, spec: str, watcher: LeaseWatcher) -> None:
        """``spec``'s lease ended on its own: release it here, and say why unless the notice
        watcher has said so already."""
        untold = self.notice_board.end(self.sessions[spec].lease_id)
        session = self.release(spec)
        if untold:
            self._tell_ended(session, watcher)

    def _tell_ended(self, session: RemoteSession, watcher: LeaseWatcher) -> None:
        try:
            lease = self.gateway.get_lease(session.lease_id)
        except GatewayError:
            lease = {"gpu_type": session.lease["gpu_type"]}
        watcher.ended(session, lease)


#: How the watcher's note on an ended lease ends (the next cell's own note says it is getting one).
NEXT_CELL_GETS_ONE = "The next %%gpu cell gets a fresh GPU kernel."


def _with_node(lease: dict[str, Any], session: RemoteSession) -> dict[str, Any]:
    """An ended lease no longer names its machine (a lost one took its slot along): the grant did."""
    return {**lease, "node": lease.get("node") or session.lease.get("node")}
