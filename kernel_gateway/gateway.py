"""The gateway's state: the pool service, metering, and one relay per leased kernel.

Handlers stay thin: they authenticate, call one method here and write its JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import zmq

from jupyter_gpu import __version__
from jupyter_gpu.protocol import (
    ANY_TYPE,
    GRANTED,
    KERNELSPEC_PREFIX,
    QUEUED,
    RELEASED,
    GpuChoice,
    Reason,
    SpecError,
    parse_gpu_spec,
)
from pool_manager.budgets import BudgetConfig, BudgetPolicy, month_start
from pool_manager.core import NO_CAPACITY, LeaseRequestError
from pool_manager.inventory import gpu_status
from pool_manager.manager import PoolManager
from pool_manager.model import Action, Lease, LeaseEnded, LeaseGranted, LeaseSnapshot, LeaseView, Notice
from pool_manager.node_bulk import BulkEndpoint
from pool_manager.service import PoolService

from .download_sender import DownloadSender
from .errors import ApiError
from .instance_metering import InstanceHours, paid_capacity
from .kernel_ids import KernelIds
from .metering import MeteringStore
from .metrics import render_metrics
from .relay import KernelRelay
from .relay_state import RelayTotals
from .snapshots import SnapshotKeeper
from .upload_receiver import UploadReceiver

log = logging.getLogger(__name__)

CLOSE_REASONS: dict[str, str] = {
    Reason.IDLE: "lease ended: no execution for its idle timeout",
    Reason.GPU_IDLE: "lease ended: its GPUs did no work and no cell ran for the GPU idle timeout",
    Reason.DELETED: "lease ended: released by its owner",
    Reason.KERNEL_DIED: "lease ended: the kernel died",
    Reason.GATEWAY_RESTART: "lease ended: the gateway is stopping",
    Reason.MAX_DURATION: "lease ended: it reached the operator's maximum duration",
    Reason.NODE_LOST: "lease ended: the machine its kernel ran on was lost",
    Reason.OOM: "lease ended: the kernel ran out of memory",
    Reason.RESTARTED: "lease ended: the kernel was restarted, a new lease took its place",
    Reason.OPERATOR: "lease ended: released by an operator of the pool",
    Reason.BUDGET: "lease ended: a budget of its user or group was used up",
    Reason.SPOT_INTERRUPTED: "lease ended: AWS takes its spot machine back (a spot interruption)",
}
#: Ends that kill the kernel under a running cell: its clients hear why.
DEATHS: dict[str, str] = {
    Reason.KERNEL_DIED: "died",
    Reason.OOM: "went past its memory limit and was killed",
    Reason.NODE_LOST: "ran on machine {node}, which was lost, with every variable that lived only there",
}


class NotFound(ApiError, LookupError):
    """A lease or kernel that does not exist for this user (others' look the same): 404."""

    def __init__(self, name: str, what: str = "kernel") -> None:
        super().__init__(404, f"no {what} {name}", Reason.NOT_FOUND)


class MeteringFull(RuntimeError):
    """The usage database cannot be written (its disk is full): no new lease can be billed."""


def notice_json(notice: Notice) -> dict[str, Any]:
    return {"seq": notice.seq, "kind": notice.kind, "text": notice.text, "at": notice.at, "when": notice.when}


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class Gateway:
    def __init__(
        self,
        pool: PoolManager,
        service: PoolService,
        metering: MeteringStore,
        replay_limit_bytes: int,
        heartbeat_interval: float = 5.0,
        snapshots: SnapshotKeeper | None = None,
    ) -> None:
        self.pool = pool
        self.service = service
        self.metering = metering
        self.replay_limit_bytes = replay_limit_bytes
        self.heartbeat_interval = heartbeat_interval
        self.snapshots = snapshots
        self.relays: dict[str, KernelRelay] = {}
        self.relay_totals = RelayTotals()
        self.uploads = UploadReceiver()
        self.downloads = DownloadSender()
        self.kernel_ids = KernelIds()
        self._relay_ready: dict[str, asyncio.Task[KernelRelay]] = {}
        #: lease id -> the machine its kernel runs on, kept past the slot (which a lost node takes along)
        self._lease_nodes: dict[str, str] = {}
        self.zmq_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # relays being closed after their lease
        self._preconnecting: set[asyncio.Task[None]] = set()
        # Leases whose newest state could not be written (disk full), written at the next heartbeat.
        self._unwritten: dict[str, Lease | LeaseSnapshot] = {}
        self.started_at = time.time()
        service.listeners.append(self._on_pool_action)
        #: an autoscaled pool's instance-hours, in the metering file next to the leases
        self.instance_hours: InstanceHours | None = None
        instance_listeners = getattr(service, "instance_listeners", None)
        if instance_listeners is not None:
            self.instance_hours = InstanceHours(metering)
            self.instance_hours.close_open(time.time())  # nodes still up join this gateway again
            instance_listeners.append(self.instance_hours.record)

    async def start(self) -> None:
        closed = self.metering.close_abandoned(time.time())
        if closed:
            log.info("closed %d lease(s) left open by an earlier gateway (reason gateway_restart)", closed)
        self._load_spending()
        if self.snapshots is not None:
            await self.snapshots.start()
        await self.service.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self, reason: str) -> None:
        self.uploads.abort()
        self.downloads.abort()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        # Relays still connecting: their kernels are about to die, so waiting for them helps
        # nobody; cancelled and awaited here, none fails later on the destroyed zmq context
        # ("Task exception was never retrieved ... ZMQError: Socket operation on non-socket").
        connecting = [*self._preconnecting, *self._relay_ready.values()]
        for task in connecting:
            task.cancel()
        await self.service.stop(reason)
        for relay in list(self.relays.values()):
            await relay.close(1001, CLOSE_REASONS.get(reason, reason))
        await asyncio.gather(*self._closing, *connecting, return_exceptions=True)
        if self.snapshots is not None:
            await self.snapshots.stop()
        self.zmq_context.destroy(linger=0)
        self._write_unwritten()
        if self._unwritten:
            log.error("%d lease record(s) could not be written to %s (disk full?): they will be closed at their "
                      "last heartbeat when the gateway starts again", len(self._unwritten), self.metering.path)
        self.metering.close()  # and with it instance_hours, which shares its connection

    # --- one call per API request -------------------------------------------------------
    # Handlers parse HTTP and call one of these; what they answer, or the ApiError that
    # says why not, is decided here.

    def api_json(self) -> dict[str, Any]:
        return {"version": __version__, "started": iso(self.started_at)}

    def types_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": s.gpu_type,
                "total": s.total,
                "free": s.free,
                "warm": s.warm,
                "queued": s.queued,
                "memory_mb": s.memory_mb,
                "price_per_gpu_hour": self.pool.price(s.gpu_type),
                "emulated": s.emulated,
                "isolation": self.pool.isolation.summary,
            }
            for s in self.service.core.summaries()
        ]

    def kernelspecs_json(self, name: str | None = None) -> dict[str, Any]:
        """All kernelspecs (one per type), or the one called ``name``."""
        specs = {}
        for summary in self.service.core.summaries():
            label = "CPU" if summary.gpu_type == "cpu" else f"{summary.gpu_type} GPU"
            spec_name = KERNELSPEC_PREFIX + summary.gpu_type
            specs[spec_name] = {
                "name": spec_name,
                "spec": {
                    "argv": [],
                    "display_name": f"Python 3 ({label}{', emulated' if summary.emulated else ''})",
                    "language": "python",
                    "metadata": {"jupyter_gpu": {"gpu_type": summary.gpu_type, "emulated": summary.emulated}},
                },
                "resources": {},
            }
        if name is None:
            return {"default": next(iter(specs), ""), "kernelspecs": specs}
        if name not in specs:
            raise ApiError(404, f"no kernelspec {name!r}: offered are {', '.join(specs)}", Reason.NOT_FOUND)
        return specs[name]

    def parse_spec(self, spec: Any) -> tuple[GpuChoice, ...]:
        if not isinstance(spec, str):
            raise ApiError(400, f"'gpu' must be a string such as 'a100', 'a100:2', 'h100|a100' or 'any', got "
                                f"{spec!r}", Reason.BAD_SPEC)
        try:
            return parse_gpu_spec(spec)
        except SpecError as exc:
            offered = ", ".join(self.service.core.types)
            raise ApiError(400, f"{exc}; this gateway offers {offered}", Reason.BAD_SPEC) from None

    def create_lease(self, user: str, gpu: Any, idle_timeout: Any, notebook: Any,
                     groups: Iterable[str] = ()) -> Lease:
        """A new lease for a request's fields, checked; granted or queued. ``groups``: the
        user's (their group budgets count it); a request past a budget is a 403."""
        choices = self.parse_spec(gpu)
        if not isinstance(notebook, str) or len(notebook) > 1024:
            raise ApiError(400, "'notebook' must be a string of at most 1024 characters", Reason.BAD_NOTEBOOK)
        if idle_timeout is not None and (isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int | float)):
            raise ApiError(400, f"'idle_timeout' must be a number of seconds, got {idle_timeout!r}",
                           Reason.BAD_IDLE_TIMEOUT)
        try:
            return self.request_lease(user, choices, idle_timeout, notebook, groups)
        except LeaseRequestError as exc:
            status = {NO_CAPACITY: 503, Reason.BUDGET: 403}.get(exc.reason, 400)
            raise ApiError(status, str(exc), exc.reason) from None
        except MeteringFull as exc:
            raise ApiError(507, str(exc), Reason.METERING_UNAVAILABLE) from None

    async def wait_for_lease(self, user: str, lease_id: str, seconds: float, operator: bool = False) -> dict[str, Any]:
        """The lease, once it leaves the queue or ``seconds`` pass (a long poll); an ``operator``'s
        question may be about anyone's."""
        if seconds > 0:
            with contextlib.suppress(NotFound):
                await self.service.wait_while_queued(self.active_lease(user, lease_id, operator), seconds)
        return self.lease_json(user, lease_id, operator)

    def release_lease(self, user: str, lease_id: str, forget: bool = False, operator: bool = False) -> dict[str, Any]:
        """End (or cancel) the lease; one that ended already is answered as it is. An ``operator``
        may end anyone's (reason ``operator`` where it is not their own).
        ``forget``: keep none of its variables for the notebook's next lease."""
        try:
            lease = self.active_lease(user, lease_id, operator)
        except NotFound:
            return self.lease_json(user, lease_id, operator)
        reason = Reason.DELETED if lease.user == user else Reason.OPERATOR
        return self.end_lease(lease.user, lease_id, reason, forget)

    async def start_kernel(self, user: str, name: Any, timeout: float, groups: Iterable[str] = ()) -> dict[str, Any]:
        """``POST /api/kernels`` of stock Jupyter clients: a kernelspec ``gpu-TYPE`` means a lease.

        Waits up to ``timeout`` for a GPU. Cancelled (the client went away), it cancels the
        lease: a GPU granted later would bill nobody's notebook.
        """
        if name is None or name == "":  # only a missing name means the default ({} is a bad one)
            # An empty pool has no first type: "any" then gets the core's clear refusal, not an IndexError.
            name = KERNELSPEC_PREFIX + next(iter(self.service.core.types), ANY_TYPE)
        if not isinstance(name, str) or not name.startswith(KERNELSPEC_PREFIX):
            raise ApiError(400, f"unknown kernel name {name!r}: use gpu-TYPE, see /api/kernelspecs", Reason.BAD_SPEC)
        lease = self.create_lease(user, name[len(KERNELSPEC_PREFIX) :], None, "", groups)
        return self.kernel_json(await self._kernel_when_granted(user, lease, timeout))

    async def _kernel_when_granted(self, user: str, lease: Lease, timeout: float) -> Lease:
        """The lease once its kernel is ready; 503 (and nothing held) when no GPU comes free in time."""
        try:
            await self.service.wait_while_queued(lease, timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(NotFound):
                self.end_lease(user, lease.id, Reason.CANCELLED)
            raise
        if lease.state == QUEUED:
            info = self.describe(lease)
            self.end_lease(user, lease.id, Reason.CANCELLED)
            raise ApiError(
                503,
                f"no {lease.spec} free within {timeout:.0f} s (queue position {info['queue_position']}, about "
                f"{info['expected_wait']:.0f} s): POST /api/gpu/leases to wait in the queue",
                Reason.NO_CAPACITY,
            )
        try:
            return self.owned_kernel(user, lease.kernel_id or "")
        except NotFound:
            why = f"the lease ended before its kernel was ready ({lease.reason})"
            raise ApiError(503, why, Reason.LEASE_ENDED) from None

    def user_kernel_json(self, user: str, kernel_id: str) -> dict[str, Any]:
        return self.kernel_json(self.owned_kernel(user, kernel_id))

    def shut_down_kernel(self, user: str, kernel_id: str) -> None:
        """``DELETE /api/kernels/ID``: the kernel goes with its lease."""
        self.end_lease(user, self.owned_kernel(user, kernel_id).id, Reason.DELETED)

    async def kernel_action(self, user: str, kernel_id: str, action: str, timeout: float) -> dict[str, Any] | None:
        """Interrupt the kernel, or restart it: pooled kernels are single-use, so a restart ends
        the lease and takes a new one of the same type and count, behind the same kernel id
        (stock clients keep the id they started with). A restart answers the new kernel."""
        lease = self.owned_kernel(user, kernel_id)
        if action == "interrupt":
            await self.service.interrupt(lease.kernel_id or "")
            return None
        self.end_lease(user, lease.id, Reason.RESTARTED)
        choices = (GpuChoice(lease.gpu_type or "", lease.count),)
        try:
            new_lease = self.request_lease(user, choices, lease.idle_timeout, lease.notebook, lease.groups)
        except LeaseRequestError as exc:  # a budget used up by the lease just ended
            raise ApiError(403 if exc.reason == Reason.BUDGET else 400, str(exc), exc.reason) from None
        kernel = await self._kernel_when_granted(user, new_lease, timeout)
        self.kernel_ids.replaced(kernel_id, kernel.kernel_id or "")
        return self.kernel_json(kernel)

    async def open_relay(self, user: str, kernel_id: str) -> KernelRelay:
        """The relay of the user's kernel, for a websocket about to attach to it."""
        lease = self.owned_kernel(user, kernel_id)
        return await self.relay_for(lease.kernel_id or "")

    def usage_json(self, user: str, groups: Iterable[str] = ()) -> dict[str, Any]:
        """The user's metered leases and totals, and what is left of each budget of theirs."""
        usage = self.metering.usage(user)
        usage["budgets"] = self.budgets_json(user, groups)
        return usage

    def budgets_json(self, user: str, groups: Iterable[str] = ()) -> list[dict[str, Any]]:
        budgets = self.budget_policy
        if budgets is None:
            return []
        rows = [standing.public() for standing in budgets.standings(user, groups, time.time())]
        for row in rows:
            row["resets_at"] = iso(row["resets_at"])
        return rows

    @property
    def budget_policy(self) -> BudgetPolicy | None:
        return self.service.core.admission.budgets

    def configure_budgets(self, config: BudgetConfig) -> None:
        """Budgets changed (the config file was edited): in force at once."""
        if self.budget_policy is not None:
            self.service.configure_budgets(config)

    # --- operators: every user's leases and usage -----------------------------------------

    def all_leases_json(self, include_released: bool = False) -> list[dict[str, Any]]:
        """Every user's active leases (``user`` says whose), oldest first; ended ones too on request."""
        active = [self.describe(lease) for lease in self.service.core.leases.values()]
        active.sort(key=lambda item: item["queued_at"])
        if include_released:
            active_ids = {item["id"] for item in active}
            active += [row for row in self.metering.list_all() if row["id"] not in active_ids]
        return active

    def all_usage_json(self) -> dict[str, Any]:
        usage = self.metering.usage_by_user_and_group()
        if self.instance_hours is not None:  # an autoscaled pool: what its machines cost, and how much was used
            usage["paid"] = paid_capacity(self.metering.totals(), self.instance_hours.totals())
        return usage

    def metrics_text(self) -> str:
        return render_metrics(self)

    def decisions_json(self) -> dict[str, Any]:
        """The pool's decisions about its machines, oldest first (the last DECISIONS_KEPT)."""
        decisions = self.service.decisions
        return {"decisions": [{"at": iso(at), "text": text} for at, text in decisions], "kept": decisions.maxlen}

    # --- leases ---------------------------------------------------------------------------

    def request_lease(
        self, user: str, choices: tuple[GpuChoice, ...], idle_timeout: float | None, notebook: str,
        groups: Iterable[str] = (),
    ) -> Lease:
        lease = self.service.request_lease(user, choices, idle_timeout, notebook, groups)
        try:
            self.metering.record(lease, self.pool.price(lease.gpu_type))
        except sqlite3.OperationalError as exc:
            # A GPU nobody can bill for is not handed out; leases already running carry on.
            self.service.end_lease(lease.id, Reason.CANCELLED)
            self._unwritten.pop(lease.id, None)
            raise MeteringFull(
                f"no new leases for now: the usage database {self.metering.path} cannot be written ({exc}). "
                "The operator must free space on its disk; running leases carry on and are billed once it can be "
                "written. Try again later"
            ) from None
        return lease

    def active_lease(self, user: str, lease_id: str, operator: bool = False) -> Lease:
        """The user's active lease (an ``operator``'s: anyone's)."""
        lease = self.service.core.leases.get(lease_id)
        if lease is None or not (operator or lease.user == user):
            raise NotFound(lease_id, "lease")
        return lease

    def lease_json(self, user: str, lease_id: str, operator: bool = False) -> dict[str, Any]:
        """The user's lease (an ``operator``'s: anyone's), active or ended: an ended one is read
        from the metering file once, whose it is and all."""
        lease = self.service.core.leases.get(lease_id) or self._unwritten.get(lease_id)
        if lease is not None and (operator or lease.user == user):
            return self.describe(lease)
        row = self.metering.get(lease_id)
        if row is None or not (operator or row["user"] == user):
            raise NotFound(lease_id, "lease")
        if self.snapshots is not None:
            row.update(self.snapshots.lease_info(lease_id))  # what its end kept
        row["capacity_note"] = self.service.capacity_note(lease_id)  # why a wait for a node ended
        return row

    def leases_json(self, user: str, include_released: bool = False) -> list[dict[str, Any]]:
        mine = self.service.core.leases_of(user)
        # One NVML session for all of them (the sidebar polls this), not one per lease.
        indices = sorted({i for lease in mine if self._real_gpus(lease) for i in lease.gpu_indices})
        readings = gpu_status(indices) if indices else {}
        active = [self.describe(lease, readings) for lease in mine]
        active.sort(key=lambda item: item["queued_at"])
        if include_released:
            active_ids = {item["id"] for item in active}
            active += [row for row in self.metering.list_for_user(user) if row["id"] not in active_ids]
        return active

    def end_lease(self, user: str, lease_id: str, reason: str, forget: bool = False) -> dict[str, Any]:
        """End the lease; ``forget``: keep none of its variables (and drop the notebook's kept ones)."""
        lease = self.active_lease(user, lease_id)
        if forget and self.snapshots is not None:
            self.snapshots.forget(lease)
        self.service.end_lease(lease.id, reason)
        return self.describe(lease)

    def _emulated(self, lease: LeaseView) -> bool:
        core = self.service.core
        slot = core.slots.get(lease.slot_id or "")
        return slot is not None and any(core.devices[key].emulated for key in slot.devices)

    def _node(self, lease: LeaseView) -> str | None:
        """The machine the lease's kernel runs on (``local`` on one machine; an address on Ray)."""
        slot = self.service.core.slots.get(lease.slot_id or "")
        return slot.node if slot is not None else None

    def _real_gpus(self, lease: LeaseView) -> bool:
        """Whether the lease holds real GPUs that NVML can report on."""
        return bool(lease.state == GRANTED and lease.gpu_indices and lease.gpu_type != "cpu"
                    and not self._emulated(lease))

    def describe(self, lease: LeaseView, readings: dict[int, Any] | None = None) -> dict[str, Any]:
        """The lease as the API shows it; ``readings``: NVML readings already taken, if any."""
        now = time.time()
        core = self.service.core
        price = self.pool.price(lease.gpu_type)
        gpu_seconds = lease.gpu_seconds(now)
        emulated = self._emulated(lease)
        info: dict[str, Any] = {
            "id": lease.id,
            "user": lease.user,
            "state": lease.state,
            "reason": lease.reason,
            "gpu": lease.spec,
            "gpu_type": lease.gpu_type,
            "count": lease.count,
            "gpu_indices": list(lease.gpu_indices),
            "kernel_id": self.kernel_ids.shown(lease.kernel_id or "") if lease.state == GRANTED else None,
            "queue_position": core.queue_position(lease),
            "expected_wait": round(core.expected_wait(lease), 1) if lease.state == QUEUED else 0.0,
            # what the wait is for when a node must be launched (or why it ended): shown in place
            "capacity_note": self.service.capacity_note(lease.id),
            "idle_timeout": lease.idle_timeout,
            "idle_remaining": core.idle_remaining(lease),
            "busy": lease.busy,
            "notebook": lease.notebook,
            "queued_at": lease.queued_at,
            "granted_at": lease.granted_at,
            "released_at": lease.released_at,
            "gpu_seconds": round(gpu_seconds, 3),
            "price_per_gpu_hour": price,
            "cost": round(gpu_seconds / 3600 * price, 6),
            "emulated": emulated,
            "node": self._node(lease),
            # live NVML readings of the lease's GPUs; None where there is nothing real to read
            "gpu_status": None,
            # why it ended, in words, where the reason alone does not say (which budget)
            "reason_message": lease.reason_message,
            # what the pool or gateway tells the notebook before the lease ends (the magic shows new ones)
            "notices": [notice_json(notice) for notice in lease.notices],
        }
        if self._real_gpus(lease):
            if readings is None:
                readings = gpu_status(list(lease.gpu_indices))
            info["gpu_status"] = [dict(readings[i], index=i) for i in lease.gpu_indices if i in readings] or None
        if self.snapshots is not None:
            info.update(self.snapshots.lease_info(lease.id))  # what it restores, what its end kept
        return info

    # --- kernels --------------------------------------------------------------------------

    def owned_kernel(self, user: str, kernel_id: str) -> Lease:
        lease = self.service.lease_for_kernel(self.kernel_ids.kernel(kernel_id))
        if lease is None or lease.user != user or lease.state != GRANTED:
            raise NotFound(kernel_id)
        return lease

    def staging_dir(self, kernel_id: str) -> str | None:
        """Where uploads for this kernel go (the kernel maps them from there), if anywhere."""
        return self.service.backend.staging_dir(kernel_id)

    def node_endpoint(self, kernel_id: str) -> BulkEndpoint | None:
        """Where this kernel's bulk bytes go when its staging directory is on another machine (a Ray node)."""
        return self.service.backend.bulk_endpoint(kernel_id)

    def upload_target(self, user: str, kernel_id: str, nbytes_text: str, limit: int
                      ) -> tuple[str | BulkEndpoint, int]:
        """Where an upload of ``nbytes_text`` bytes to the user's kernel goes (its staging directory
        here, or its node's receiving end), and its size, once it is allowed and fits (raises
        NotFound or the ApiError that says why not; the node checks its own free space)."""
        kernel = self.owned_kernel(user, kernel_id).kernel_id or ""
        endpoint = self.node_endpoint(kernel)
        if endpoint is not None:
            return endpoint, self.uploads.check_size(nbytes_text, limit)
        staging = self.staging_dir(kernel)
        nbytes = self.uploads.check(staging, nbytes_text, limit)
        assert staging is not None  # check() refuses uploads without a staging area
        return staging, nbytes

    def kernel_json(self, lease: Lease) -> dict[str, Any]:
        kernel_id = lease.kernel_id or ""
        relay = self.relays.get(kernel_id)
        connections = sum(len(s.connections) for s in relay.sessions.values()) if relay else 0
        return {
            "id": self.kernel_ids.shown(kernel_id),
            "name": KERNELSPEC_PREFIX + (lease.gpu_type or ""),
            "last_activity": iso(lease.last_activity),
            "execution_state": relay.execution_state if relay else "idle",
            "connections": connections,
            "lease_id": lease.id,
            "gpu_type": lease.gpu_type,
            "gpu_indices": list(lease.gpu_indices),
        }

    def kernels_json(self, user: str) -> list[dict[str, Any]]:
        return [
            self.kernel_json(lease)
            for lease in self.service.core.leases_of(user)
            if lease.state == GRANTED
        ]

    async def relay_for(self, kernel_id: str) -> KernelRelay:
        """The kernel's relay, connected on first use (IOPub subscribed before it returns).

        Not before the notebook's kept variables are in the kernel's staging area: nothing
        from the notebook may reach the kernel before it can restore them.
        """
        if self.snapshots is not None:
            await self.snapshots.ready(kernel_id)
        relay = self.relays.get(kernel_id)
        if relay is not None:
            return relay
        task = self._relay_ready.get(kernel_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect_relay(kernel_id))
            self._relay_ready[kernel_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._relay_ready.pop(kernel_id, None)

    async def _connect_relay(self, kernel_id: str) -> KernelRelay:
        info = self.service.kernels.get(kernel_id)
        if info is None:
            raise NotFound(kernel_id)
        relay = KernelRelay(
            kernel_id,
            info.connection_info,
            self.zmq_context,
            self.replay_limit_bytes,
            on_activity=lambda busy: self.service.kernel_activity(kernel_id, busy),
            totals=self.relay_totals,
        )
        try:
            await relay.connect()
        except BaseException:
            await relay.close()  # its sockets and streams must not outlive a failed connect
            raise
        if self.service.lease_for_kernel(kernel_id) is None:
            # The lease ended while we connected: nobody would ever close this relay.
            await relay.close()
            raise NotFound(kernel_id)
        self.relays[kernel_id] = relay
        return relay

    # --- pool events ----------------------------------------------------------------------

    def _on_pool_action(self, action: Action) -> None:
        if isinstance(action, LeaseGranted):
            self._record(action.lease)
            self._lease_nodes[action.lease.id] = self._node(action.lease) or "?"
            if self.snapshots is not None:
                self.snapshots.lease_granted(action.lease)
            # Connect to the kernel now, while the client reads the grant: its first
            # websocket then finds IOPub already subscribed.
            task = asyncio.get_running_loop().create_task(self._preconnect(action.lease.kernel_id or ""))
            self._preconnecting.add(task)
            task.add_done_callback(self._preconnecting.discard)
        elif isinstance(action, LeaseEnded):
            lease = action.lease
            self._record(lease)
            node = self._lease_nodes.pop(lease.id, "?")
            relay = self.relays.pop(lease.kernel_id or "", None) if lease.granted_at is not None else None
            self.kernel_ids.forget(lease.kernel_id or "")
            if self.snapshots is not None:
                self.snapshots.lease_ended(lease, busy=relay is not None and relay.execution_state == "busy")
            if relay is not None:
                death = DEATHS.get(lease.reason or "")
                if death is not None:
                    relay.kernel_died(
                        f"the kernel of lease {lease.id} ({lease.gpu_type}) {death.format(node=node)}; the lease has "
                        "ended. Run the cell again for a fresh kernel."
                    )
                code = 1011 if death is not None else 1000
                why = CLOSE_REASONS.get(lease.reason or "", "")
                task = asyncio.get_running_loop().create_task(relay.close(code, why))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _load_spending(self) -> None:
        """What leases of this month used before this gateway started counts against budgets."""
        budgets = self.budget_policy
        if budgets is None:
            return
        rows = self.metering.spent_since(month_start(time.time()))
        for row in rows:
            budgets.load(row["user"], row["groups"], row["gpu_type"], row["count"], row["price_per_gpu_hour"],
                         row["granted_at"], row["released_at"])
        log.info("budgets: %d lease(s) of this month counted from %s", len(rows), self.metering.path)

    def _record(self, lease: Lease | LeaseSnapshot) -> None:
        """Write the lease's row; while the database cannot be written (disk full) keep the lease
        here, so its grant or release is written at a later heartbeat instead of lost."""
        try:
            self.metering.record(lease, self.pool.price(lease.gpu_type))
        except sqlite3.OperationalError as exc:
            log.error("could not write lease %s to %s (%s): kept in memory until it can be", lease.id,
                      self.metering.path, exc)
            self._unwritten[lease.id] = lease
        else:
            self._unwritten.pop(lease.id, None)

    def _write_unwritten(self) -> None:
        for lease in list(self._unwritten.values()):
            try:
                self.metering.record(lease, self.pool.price(lease.gpu_type))
            except sqlite3.OperationalError:
                return  # still full: the next heartbeat tries again
            del self._unwritten[lease.id]

    async def _preconnect(self, kernel_id: str) -> None:
        try:
            await self.relay_for(kernel_id)
        except NotFound:
            pass  # the lease ended already
        except Exception:  # the client's own connect will retry and report
            log.warning("could not pre-connect to kernel %s", kernel_id, exc_info=True)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            held = [lease.id for lease in self.service.core.leases.values() if lease.state != RELEASED]
            self._write_unwritten()
            try:
                self.metering.heartbeat(held, time.time())
            except Exception:  # a full disk must not take the gateway down
                log.exception("metering heartbeat failed")
