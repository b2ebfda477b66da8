"""The gateway's state: the pool service, metering, and one relay per leased kernel.

Handlers stay thin: they authenticate, call one method here and write its JSON.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import zmq

from jupyter_gpu.protocol import (
    GRANTED,
    KERNELSPEC_PREFIX,
    QUEUED,
    REASON_CANCELLED,
    REASON_DELETED,
    REASON_GATEWAY_RESTART,
    REASON_IDLE,
    REASON_KERNEL_DIED,
    REASON_MAX_DURATION,
    REASON_RESTARTED,
    RELEASED,
    GpuChoice,
)
from pool_manager.inventory import gpu_status
from pool_manager.manager import PoolManager
from pool_manager.model import Action, Lease, LeaseEnded, LeaseGranted
from pool_manager.service import PoolService

from .kernel_ids import KernelIds
from .metering import MeteringStore
from .relay import KernelRelay

log = logging.getLogger(__name__)

CLOSE_REASONS = {
    REASON_IDLE: "lease ended: no execution for its idle timeout",
    REASON_DELETED: "lease ended: released by its owner",
    REASON_KERNEL_DIED: "lease ended: the kernel died",
    REASON_GATEWAY_RESTART: "lease ended: the gateway is stopping",
    REASON_MAX_DURATION: "lease ended: it reached the operator's maximum duration",
    REASON_RESTARTED: "lease ended: the kernel was restarted, a new lease took its place",
}


class NotFound(LookupError):
    """A lease or kernel that does not exist for this user (others' look the same)."""


class MeteringFull(RuntimeError):
    """The usage database cannot be written (its disk is full): no new lease can be billed."""


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
    ) -> None:
        self.pool = pool
        self.service = service
        self.metering = metering
        self.replay_limit_bytes = replay_limit_bytes
        self.heartbeat_interval = heartbeat_interval
        self.relays: dict[str, KernelRelay] = {}
        self.kernel_ids = KernelIds()
        self._relay_ready: dict[str, asyncio.Task[KernelRelay]] = {}
        self.zmq_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # relays being closed after their lease
        self._preconnecting: set[asyncio.Task[None]] = set()
        # Leases whose newest state could not be written (disk full), written at the next heartbeat.
        self._unwritten: dict[str, Lease] = {}
        self.started_at = time.time()
        service.listeners.append(self._on_pool_action)

    async def start(self) -> None:
        closed = self.metering.close_abandoned(time.time())
        if closed:
            log.info("closed %d lease(s) left open by an earlier gateway (reason gateway_restart)", closed)
        await self.service.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self, reason: str) -> None:
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
        self.zmq_context.destroy(linger=0)
        self._write_unwritten()
        if self._unwritten:
            log.error("%d lease record(s) could not be written to %s (disk full?): they will be closed at their "
                      "last heartbeat when the gateway starts again", len(self._unwritten), self.metering.path)
        self.metering.close()

    # --- leases ---------------------------------------------------------------------------

    def request_lease(
        self, user: str, choices: tuple[GpuChoice, ...], idle_timeout: float | None, notebook: str
    ) -> Lease:
        lease = self.service.request_lease(user, choices, idle_timeout, notebook)
        try:
            self.metering.record(lease, self.pool.price(lease.gpu_type))
        except sqlite3.OperationalError as exc:
            # A GPU nobody can bill for is not handed out; leases already running carry on.
            self.service.end_lease(lease.id, REASON_CANCELLED)
            self._unwritten.pop(lease.id, None)
            raise MeteringFull(
                f"no new leases for now: the usage database {self.metering.path} cannot be written ({exc}). "
                "The operator must free space on its disk; running leases carry on and are billed once it can be "
                "written. Try again later"
            ) from None
        return lease

    def active_lease(self, user: str, lease_id: str) -> Lease:
        lease = self.service.core.leases.get(lease_id)
        if lease is None or lease.user != user:
            raise NotFound(lease_id)
        return lease

    def lease_json(self, user: str, lease_id: str) -> dict[str, Any]:
        lease = self.service.core.leases.get(lease_id) or self._unwritten.get(lease_id)
        if lease is not None and lease.user == user:
            return self.describe(lease)
        row = self.metering.get(lease_id)
        if row is None or row["user"] != user:
            raise NotFound(lease_id)
        return row

    def leases_json(self, user: str, include_released: bool = False) -> list[dict[str, Any]]:
        mine = [lease for lease in self.service.core.leases.values() if lease.user == user]
        # One NVML session for all of them (the sidebar polls this), not one per lease.
        indices = sorted({i for lease in mine if self._real_gpus(lease) for i in lease.gpu_indices})
        readings = gpu_status(indices) if indices else {}
        active = [self.describe(lease, readings) for lease in mine]
        active.sort(key=lambda item: item["queued_at"])
        if include_released:
            active_ids = {item["id"] for item in active}
            active += [row for row in self.metering.list_for_user(user) if row["id"] not in active_ids]
        return active

    def end_lease(self, user: str, lease_id: str, reason: str) -> dict[str, Any]:
        lease = self.active_lease(user, lease_id)
        self.service.end_lease(lease.id, reason)
        return self.describe(lease)

    def _emulated(self, lease: Lease) -> bool:
        core = self.service.core
        slot = core.slots.get(lease.slot_id or "")
        return slot is not None and any(core.devices[key].emulated for key in slot.devices)

    def _real_gpus(self, lease: Lease) -> bool:
        """Whether the lease holds real GPUs that NVML can report on."""
        return bool(lease.state == GRANTED and lease.gpu_indices and lease.gpu_type != "cpu"
                    and not self._emulated(lease))

    def describe(self, lease: Lease, readings: dict[int, Any] | None = None) -> dict[str, Any]:
        """The lease as the API shows it; ``readings``: NVML readings already taken, if any."""
        now = time.time()
        core = self.service.core
        price = self.pool.price(lease.gpu_type)
        gpu_seconds = lease.gpu_seconds(now)
        emulated = self._emulated(lease)
        info: dict[str, Any] = {
            "id": lease.id,
            "state": lease.state,
            "reason": lease.reason,
            "gpu": lease.spec,
            "gpu_type": lease.gpu_type,
            "count": lease.count,
            "gpu_indices": list(lease.gpu_indices),
            "kernel_id": self.kernel_ids.shown(lease.slot_id or "") if lease.state == GRANTED else None,
            "queue_position": core.queue_position(lease),
            "expected_wait": round(core.expected_wait(lease), 1) if lease.state == QUEUED else 0.0,
            "idle_timeout": lease.idle_timeout,
            "idle_remaining": None,
            "busy": lease.busy,
            "notebook": lease.notebook,
            "queued_at": lease.queued_at,
            "granted_at": lease.granted_at,
            "released_at": lease.released_at,
            "gpu_seconds": round(gpu_seconds, 3),
            "price_per_gpu_hour": price,
            "cost": round(gpu_seconds / 3600 * price, 6),
            "emulated": emulated,
            # live NVML readings of the lease's GPUs; None where there is nothing real to read
            "gpu_status": None,
        }
        if self._real_gpus(lease):
            if readings is None:
                readings = gpu_status(list(lease.gpu_indices))
            info["gpu_status"] = [dict(readings[i], index=i) for i in lease.gpu_indices if i in readings] or None
        if lease.state == GRANTED:
            info["idle_remaining"] = (
                lease.idle_timeout if lease.busy else max(0.0, lease.last_activity + lease.idle_timeout - now)
            )
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

    def kernel_json(self, lease: Lease) -> dict[str, Any]:
        kernel_id = lease.slot_id or ""
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
            for lease in self.service.core.leases.values()
            if lease.user == user and lease.state == GRANTED
        ]

    async def relay_for(self, kernel_id: str) -> KernelRelay:
        """The kernel's relay, connected on first use (IOPub subscribed before it returns)."""
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
            # Connect to the kernel now, while the client reads the grant: its first
            # websocket then finds IOPub already subscribed.
            task = asyncio.get_running_loop().create_task(self._preconnect(action.lease.slot_id or ""))
            self._preconnecting.add(task)
            task.add_done_callback(self._preconnecting.discard)
        elif isinstance(action, LeaseEnded):
            lease = action.lease
            self._record(lease)
            relay = self.relays.pop(lease.slot_id or "", None) if lease.granted_at is not None else None
            self.kernel_ids.forget(lease.slot_id or "")
            if relay is not None:
                if lease.reason == REASON_KERNEL_DIED:
                    relay.kernel_died(
                        f"the kernel of lease {lease.id} ({lease.gpu_type}) died; the lease has ended. "
                        "Run the cell again for a fresh kernel."
                    )
                code = 1011 if lease.reason == REASON_KERNEL_DIED else 1000
                why = CLOSE_REASONS.get(lease.reason or "", "")
                task = asyncio.get_running_loop().create_task(relay.close(code, why))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _record(self, lease: Lease) -> None:
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
