"""The asyncio service that carries out what the pool core decides.

The core says "start a kernel on GPU 1", "kill kernel k", "lease l granted"; this module
does it with a :class:`~pool_manager.backend.KernelBackend`, feeds the outcome back into
the core as events, and tells its listeners (the gateway's metering and relays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from jupyter_gpu.protocol import GRANTED, QUEUED, REASON_NODE_LOST, GpuChoice

from .backend import KernelBackend, KernelInfo
from .budgets import BudgetConfig
from .core import PoolCore
from .gpu_use import GpuUseSampler
from .model import Action, Device, KillKernel, Lease, LeaseEnded, LeaseGranted, Notice, StartKernel
from .spot_notice import SpotWatch

log = logging.getLogger(__name__)
#: the scaling decisions, in the gateway's log under their own name
decision_log = logging.getLogger("pool_manager.autoscale")
#: how many decisions the gateway keeps for operators to read (the log file has them all)
DECISIONS_KEPT = 1000

Listener = Callable[[Action], None]


#: Seconds between two looks at the utilization of leased GPUs (at most; a quarter of the GPU
#: idle timeout when that is shorter): NVML's sample buffer covers the time in between.
GPU_USE_INTERVAL = 10.0


class PoolService:
    def __init__(self, core: PoolCore, backend: KernelBackend, gpu_use: GpuUseSampler | None = None) -> None:
        self.core = core
        self.backend = backend
        #: reads real GPUs' utilization for GPU idleness (emulated ones have none to read)
        self.gpu_use = gpu_use or GpuUseSampler()
        self._gpu_use_task: asyncio.Task[None] | None = None
        self.kernels: dict[str, KernelInfo] = {}  # by kernel id
        self.listeners: list[Listener] = []
        #: awaited before a kernel is killed, with its kernel id (the gateway saves the lease's variables there)
        self.before_kill: Callable[[str], Awaitable[None]] | None = None
        #: awaited when a kernel has started, before it counts as warm, with its kernel id: the
        #: gateway connects to it there, so that a lease gets an already-connected kernel
        self.after_start: Callable[[str], Awaitable[None]] | None = None
        #: told, with its kernel id, when a started kernel is gone (killed, or died by itself)
        self.kernel_gone: Callable[[str], None] | None = None
        self._starting: dict[str, asyncio.Task[None]] = {}  # kernel id -> its start
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._ticker: asyncio.Task[None] | None = None
        # The ticker sleeps until the core's next deadline; an event that brings a deadline
        # closer (a grant, a kernel going idle) wakes it to sleep again for the shorter time.
        self._wake = asyncio.Event()
        self._sleeping_until: float | None = None
        self.kernel_starts = 0
        self.ticks = 0
        #: watches the nodes' metadata service for spot interruption notices (None: not on spot)
        self.spot_watch: SpotWatch | None = None
        #: (wall time, what was decided and why): demand, launches, drains, terminations, interruptions
        self.decisions: deque[tuple[float, str]] = deque(maxlen=DECISIONS_KEPT)

    async def start(self) -> None:
        self.backend.watch(self._on_kernel_death)
        if self.spot_watch is not None:
            self.spot_watch.start()
        self.core.tick()  # emits the first warm starts
        self._run_actions()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        if self.core.policy.gpu_idle_timeout > 0:
            self._gpu_use_task = asyncio.get_running_loop().create_task(self._sample_gpu_use_forever())

    async def stop(self, reason: str) -> None:
        """End all leases with ``reason``, kill every kernel, and wait until they are gone."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self.spot_watch is not None:
            self.spot_watch.stop()
        if self._gpu_use_task is not None:
            self._gpu_use_task.cancel()
            await asyncio.gather(self._gpu_use_task, return_exceptions=True)
            self.gpu_use.close()
        self.core.shutdown(reason)
        self._run_actions()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.backend.close()

    # --- requests from the gateway -------------------------------------------------------

    def request_lease(
        self, user: str, choices: Sequence[GpuChoice], idle_timeout: float | None = None, notebook: str = "",
        groups: Iterable[str] = (),
    ) -> Lease:
        lease = self.core.request_lease(user, choices, idle_timeout, notebook, groups)
        self._run_actions()
        return lease

    def configure_budgets(self, config: BudgetConfig) -> None:
        """New budgets, in force at once (running leases past them are warned or end now)."""
        self.core.configure_budgets(config)
        self._run_actions()

    def end_lease(self, lease_id: str, reason: str) -> Lease | None:
        lease = self.core.end_lease(lease_id, reason)
        self._run_actions()
        return lease

    def notify(self, lease_id: str, kind: str, text: str, when: float | None = None) -> Notice | None:
        """Post a notice on a granted lease (see :meth:`PoolCore.notify`); listeners hear it."""
        notice = self.core.notify(lease_id, kind, text, when)
        self._run_actions()
        return notice

    def capacity_note(self, lease_id: str) -> str | None:
        """What a queued lease waits for beyond free GPUs (a node being launched), or why it stopped
        waiting; None here: a fixed pool has nothing to add to the queue position."""
        return None

    def kernel_activity(self, kernel_id: str, busy: bool) -> None:
        slot_id = self.core.slot_for_kernel(kernel_id)
        if slot_id is not None:
            self.core.kernel_activity(slot_id, busy)
        self._deadline_may_have_moved()

    # --- membership, from the backend that sees nodes come and go ----------------------------

    def add_devices(self, devices: Iterable[Device]) -> None:
        self.core.add_devices(devices)
        self._run_actions()

    def remove_node(self, node: str, reason: str = REASON_NODE_LOST) -> list[Lease]:
        """The node is gone: its leases end (listeners hear LeaseEnded), its kernels are
        forgotten, and the kills the backend still gets may raise (they are logged)."""
        ended = self.core.remove_node(node, reason)
        self._run_actions()
        return ended

    def set_device_health(self, key: str, healthy: bool) -> None:
        self.core.set_device_health(key, healthy)
        self._run_actions()

    def interrupt_node(self, node: str, reason: str, message: str) -> list[Lease]:
        """The node goes away soon but its kernels still run (a spot interruption notice): it is
        drained (no new kernel goes there, its spare kernels stop) and its leases end
        with ``reason`` and ``message``, their kernels killed after ``before_kill`` kept their state."""
        # free GPUs first: a spare kernel stopped on a held one would else start again on a free one
        held = {key for slot in self.core.slots.values() for key in slot.devices}
        for key in sorted((d.key for d in self.core.devices.values() if d.node == node), key=lambda k: k in held):
            self.core.set_device_health(key, False)
        on_node = {slot.lease_id for slot in self.core.slots.values() if slot.node == node and slot.lease_id}
        ended = []
        for lease in [self.core.leases[lease_id] for lease_id in on_node if lease_id in self.core.leases]:
            if lease.state == GRANTED:
                lease.reason_message = message
                self.core.end_lease(lease.id, reason)
                ended.append(lease)
        self.decide(f"{message}: node drained, {len(ended)} lease(s) ended ({reason})")
        self._run_actions()
        return ended

    def decide(self, text: str, at: float | None = None) -> None:
        """Keep a decision about the pool's machines for operators (``jupyter-gpu aws log``) and log it."""
        self.decisions.append((time.time() if at is None else at, text))
        decision_log.info("autoscale: %s", text)

    async def interrupt(self, kernel_id: str) -> None:
        await self.backend.interrupt_kernel(kernel_id)

    async def wait_while_queued(self, lease: Lease, timeout: float) -> None:
        """Return when the lease leaves the queue or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while lease.state == QUEUED:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Shared by every waiter on this lease and dropped only when the lease leaves the
            # queue (see _run_actions): a waiter that times out must not take the event away
            # from another one still waiting, which would then miss the grant.
            event = self._changed.setdefault(lease.id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return

    def lease_for_kernel(self, kernel_id: str) -> Lease | None:
        return self.core.lease_for_kernel(kernel_id)

    # --- carrying out actions ------------------------------------------------------------

    def _run_actions(self) -> None:
        for action in self.core.pop_actions():
            if isinstance(action, StartKernel):
                self._spawn(self._start_kernel(action), action.kernel_id)
            elif isinstance(action, KillKernel):
                self._spawn(self._kill_kernel(action))
            elif isinstance(action, LeaseGranted | LeaseEnded):
                event = self._changed.pop(action.lease.id, None)
                if event is not None:
                    event.set()
            for listener in self.listeners:
                try:
                    listener(action)
                except Exception:  # one listener's bug must not stop the pool
                    log.exception("pool listener failed on %s", action)
        self._deadline_may_have_moved()

    def _deadline_may_have_moved(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is not None and (self._sleeping_until is None or deadline < self._sleeping_until):
            self._wake.set()

    def _spawn(self, coro: object, starting_kernel: str | None = None) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if starting_kernel is not None:
            self._starting[starting_kernel] = task
            task.add_done_callback(lambda _: self._starting.pop(starting_kernel, None))

    async def _start_kernel(self, action: StartKernel) -> None:
        began = time.monotonic()
        self.kernel_starts += 1
        try:
            info = await self.backend.start_kernel(action)
        except Exception as exc:
            log.error("%s", exc)
            self.core.kernel_failed(action.slot_id)
        else:
            self.kernels[action.kernel_id] = info
            if self.after_start is not None:
                try:
                    await self.after_start(action.kernel_id)
                except Exception:  # the kernel serves anyway; the gateway connects at its lease
                    log.exception("after_start of kernel %s failed", action.kernel_id)
            self.core.kernel_ready(action.slot_id, time.monotonic() - began)
        self._run_actions()

    async def _kill_kernel(self, action: KillKernel) -> None:
        starting = self._starting.get(action.kernel_id)
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)  # kill what it started
        if self.before_kill is not None:
            try:
                await self.before_kill(action.kernel_id)
            except Exception:  # the kernel goes either way
                log.exception("before_kill of kernel %s failed", action.kernel_id)
        try:
            await self.backend.kill_kernel(action.kernel_id)
        except Exception:
            # A departed node raises here. Its kernel is as gone as it will ever be: the slot
            # must still leave DRAINING, or its GPUs never return to the pool.
            log.exception("kill of kernel %s failed; its GPUs return to the pool anyway", action.kernel_id)
        self._forget_kernel(action.kernel_id)
        self.core.kernel_stopped(action.slot_id)
        self._run_actions()

    def _forget_kernel(self, kernel_id: str) -> None:
        if self.kernels.pop(kernel_id, None) is not None and self.kernel_gone is not None:
            self.kernel_gone(kernel_id)

    def _on_kernel_death(self, kernel_id: str, reason: str | None = None) -> None:
        self._forget_kernel(kernel_id)
        slot_id = self.core.slot_for_kernel(kernel_id)
        if slot_id is not None:
            self.core.kernel_died(slot_id, reason)
        self._run_actions()

    async def _sample_gpu_use_forever(self) -> None:
        """Tell the core which leases' real GPUs did some work, every GPU_USE_INTERVAL."""
        interval = min(GPU_USE_INTERVAL, self.core.policy.gpu_idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            leases = self.core.leases_on_local_gpus()
            if not leases:
                continue
            try:
                used = await asyncio.to_thread(self.gpu_use.used, sorted({i for ix in leases.values() for i in ix}))
            except Exception:  # a broken reading must not stop the next one
                log.exception("reading GPU utilization failed")
                continue
            for lease_id, indices in leases.items():
                if used.intersection(indices):
                    self.core.gpu_used(lease_id)

    async def _tick_forever(self) -> None:
        """Tick when the core's next deadline comes, and not in between."""
        while True:
            self._wake.clear()
            self._sleeping_until = self.core.next_deadline()
            if self._sleeping_until is None:
                await self._wake.wait()
                continue  # a deadline appeared: sleep until it
            try:
                # at least a millisecond: a deadline within rounding of now must not spin the loop
                await asyncio.wait_for(self._wake.wait(), max(0.001, self._sleeping_until - self.core.clock()))
                continue  # woken by a nearer deadline: sleep again, for less
            except TimeoutError:
                pass
            self._sleeping_until = None
            try:
                self.ticks += 1
                self.core.tick()
                self._run_actions()
            except Exception:  # the clock must keep ticking whatever one tick hit
                log.exception("pool tick failed")
