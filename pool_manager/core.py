"""The pool's policy as a sans-I/O state machine.

Events go in as method calls (a lease request, a kernel that became warm, a node that joined
or was lost, a tick of the clock); what must happen comes out of :meth:`PoolCore.pop_actions`
(start or kill a kernel, a lease granted or ended). Nothing here touches a process, a socket
or the real clock, so the same core runs the asyncio service, the trace simulator and
millisecond tests.

The policy is written once, in the methods below. What it asks of the pool is answered by
indexes kept in their own modules, so every event costs about the same however big the pool
and its queue are: :mod:`.placement` (devices, free GPUs per type, usable GPUs per node),
:mod:`.queue` (the order of queued leases), :mod:`.slot_index` (spare kernels),
:mod:`.lease_index` (leases per user and type), :mod:`.deadlines` (idle timeouts and maximum
durations on the monotonic clock), and :mod:`.admission` (per-user limits)
(benchmarks/pool_sim.py: a month of a recorded workload, 100,000 requests over 1,000 GPUs).
"""

from __future__ import annotations

import heapq
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from jupyter_gpu.protocol import (
    ANY_TYPE,
    CPU_TYPE,
    GRANTED,
    QUEUED,
    REASON_BUDGET,
    REASON_CANCELLED,
    REASON_GPU_IDLE,
    REASON_KERNEL_DIED,
    REASON_NODE_LOST,
    RELEASED,
    GpuChoice,
    type_matches,
)

from .admission import Admission
from .budgets import BudgetConfig
from .deadlines import Deadlines
from .gpu_idleness import GpuIdleness
from .lease_index import LeaseIndex
from .model import (
    Action,
    Device,
    KillKernel,
    Lease,
    LeaseEnded,
    LeaseGranted,
    LeaseNoticed,
    LeaseView,
    Notice,
    Slot,
    SlotState,
    StartKernel,
)
from .placement import NodeUse, PlacementIndex
from .queue import LeaseQueue, Wanted
from .slot_index import SlotIndex

# Enum members read through their class cost ~0.3 us each (an EnumType attribute lookup);
# the hot paths below read them from module constants instead.
_STARTING, _WARM, _LEASED, _DRAINING = SlotState.STARTING, SlotState.WARM, SlotState.LEASED, SlotState.DRAINING

log = logging.getLogger(__name__)

#: LeaseRequestError.reason when the pool has no device at all (nothing found, none declared, no
#: node joined yet): unlike a bad request, waiting for capacity may help.
NO_CAPACITY = "no_capacity"


class LeaseRequestError(ValueError):
    """A request that can never be granted; ``reason`` is a short machine-readable word."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PoolPolicy:
    """The operator's knobs (the traitlets config maps onto this)."""

    min_warm: int = 1
    idle_timeout: float = 600.0
    max_idle_timeout: float = 3600.0
    #: 0 means leases have no maximum duration
    max_lease_duration: float = 0.0
    #: 0 means no per-user cap (the default :class:`Admission` enforces it)
    max_gpus_per_user: int = 0
    #: after a kernel fails to start, wait this long before starting another of its type
    start_failure_backoff: float = 5.0
    #: a lease whose GPUs did no work and whose kernel ran no cell for this long ends; 0: never
    gpu_idle_timeout: float = 0.0
    #: the notebook is told this long before such an end
    gpu_idle_warning: float = 0.0


@dataclass(frozen=True)
class TypeSummary:
    gpu_type: str
    total: int
    free: int
    warm: int
    queued: int
    leased: int
    memory_mb: int
    emulated: bool


class PoolCore:
    def __init__(
        self,
        devices: Iterable[Device],
        policy: PoolPolicy,
        clock: Callable[[], float],
        # dashed UUIDs: stock Jupyter servers route /api/kernels/{id}/channels only for ids of that
        # shape (a hex id made their gateway client's websocket answer 404)
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        wall_clock: Callable[[], float] | None = None,
        admission: Admission | None = None,
        launchable: Mapping[str, int] | None = None,
    ) -> None:
        """``devices``: the pool at start (more join with :meth:`add_devices`). ``clock`` is
        monotonic: every deadline counts on it. ``wall_clock`` (default: the same clock, as a
        fake one in tests) stamps what is shown and metered. ``admission`` defaults to the
        policy's per-user cap. ``launchable``: GPU types whose nodes an autoscaler starts on demand,
        with the GPUs of their largest node: offered (leases queue) while none is up."""
        self.policy = policy
        self.clock = clock
        self.wall_clock = clock if wall_clock is None else wall_clock
        self.new_id = new_id
        self.admission = Admission(policy.max_gpus_per_user) if admission is None else admission
        self.slots: dict[str, Slot] = {}
        self._placement = PlacementIndex()
        self._queue = LeaseQueue()
        self._slot_index = SlotIndex()
        self._leases = LeaseIndex(policy.max_lease_duration)
        self._deadlines = Deadlines(policy.max_lease_duration)
        self._gpu_idleness = GpuIdleness(policy.gpu_idle_timeout, policy.gpu_idle_warning)
        self.devices: dict[str, Device] = self._placement.devices
        self.leases: dict[str, Lease] = self._leases.active  # active ones only: queued or granted
        self._actions: list[Action] = []
        self._backoff_until: dict[str, float] = {}  # type -> no kernel starts before (monotonic)
        self._start_seconds = 2.0  # moving estimate of a kernel start, for expected waits
        self._waiters: dict[str, list[str]] = {}  # slot id -> slots waiting for it to stop
        self._slot_of_kernel: dict[str, str] = {}  # kernel id -> slot id
        self._wanted: dict[tuple[GpuChoice, ...], Wanted] = {}
        self._offered: dict[str, list[str]] = {}
        self._placement.add(devices)
        self.launchable = dict(launchable or {})
        for gpu_type in self.launchable:
            self._placement.declare(gpu_type)

    @property
    def types(self) -> list[str]:
        """Every GPU type the pool has had a device of, sorted (a type whose nodes all left stays)."""
        return self._placement.types

    # --- outbox ------------------------------------------------------------------------

    def pop_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # --- events: leases ------------------------------------------------------------------

    def request_lease(
        self,
        user: str,
        choices: Sequence[GpuChoice],
        idle_timeout: float | None = None,
        notebook: str = "",
        groups: Iterable[str] = (),
    ) -> Lease:
        """Queue a lease request and place it at once if capacity allows.

        Raises :class:`LeaseRequestError` for a request no amount of waiting could satisfy, or
        one past a budget of the user or of one of their ``groups`` (reason ``budget``).
        """
        self._check_satisfiable(choices)
        idle = self.policy.idle_timeout if idle_timeout is None else float(idle_timeout)
        # `not idle > 0` rather than `idle <= 0`: NaN (json.loads accepts it) compares false both
        # ways, and a NaN idle timeout would never expire, holding the GPU forever.
        if not idle > 0:
            raise LeaseRequestError(f"idle_timeout must be positive, got {idle_timeout!r}", "bad_idle_timeout")
        idle = min(idle, self.policy.max_idle_timeout)
        groups = frozenset(groups)
        budgets = self.admission.budgets
        if budgets is not None:
            refusal = budgets.refusal(user, groups, choices, self.wall_clock())
            if refusal is not None:
                raise LeaseRequestError(refusal, REASON_BUDGET)
        lease = Lease(
            id=self.new_id(),
            user=user,
            choices=tuple(choices),
            idle_timeout=idle,
            queued_at=self.wall_clock(),
            notebook=notebook,
            groups=groups,
        )
        self._leases.add(lease)
        if budgets is not None:
            budgets.requested(lease.id, user, choices, groups)
        self._queue.enqueue(lease.id, self._matching_types(lease.choices), front=False, waiting=True)
        self._schedule()
        return lease

    def end_lease(self, lease_id: str, reason: str) -> Lease | None:
        """Release a granted lease or cancel a queued one; returns it, or None if unknown."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        if lease.state == QUEUED and reason != NO_CAPACITY:
            reason = REASON_CANCELLED  # it never held a GPU: nothing was released (no_capacity: why it stopped waiting)
        self._end(lease, reason)
        self._schedule()
        return lease

    def kernel_activity(self, slot_id: str, busy: bool) -> None:
        """The slot's kernel started or finished executing (idle time counts from the end)."""
        slot = self.slots.get(slot_id)
        if slot is None or slot.lease_id is None:
            return
        lease = self.leases.get(slot.lease_id)
        if lease is not None and lease.state == GRANTED:
            lease.busy = busy
            lease.active_mono = now = self.clock()
            # one clock call where both clocks are one (tests, the simulator): this is hot
            lease.last_activity = now if self.wall_clock is self.clock else self.wall_clock()
            self._leases.activity()
            if not busy:
                self._deadlines.arm_idle(lease)
                self._gpu_idleness.arm(lease)

    def gpu_used(self, lease_id: str) -> None:
        """The lease's GPUs showed some utilization just now (the service samples NVML where
        GPUs are real): its GPU idleness starts again from now."""
        lease = self.leases.get(lease_id)
        if lease is not None and lease.state == GRANTED:
            lease.gpu_active_mono = self.clock()

    def notify(self, lease_id: str, kind: str, text: str, when: float | None = None) -> Notice | None:
        """Tell the notebook something about its granted lease before it ends (a LeaseNoticed
        action goes out); ``when``: the wall time of what it announces. None if the lease is
        not granted (a queued or ended one has no notebook listening)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.state != GRANTED:
            return None
        notice = Notice(len(lease.notices) + 1, kind, text, self.wall_clock(), when)
        lease.notices = (*lease.notices, notice)
        self._actions.append(LeaseNoticed(lease.snapshot(), notice))
        return notice

    # --- events: kernels ----------------------------------------------------------------

    def kernel_ready(self, slot_id: str, start_seconds: float | None = None) -> None:
        slot = self.slots.get(slot_id)
        if slot is None or slot.state != _STARTING:
            return
        if start_seconds is not None:
            self._start_seconds = 0.8 * self._start_seconds + 0.2 * start_seconds
        self._backoff_until.pop(slot.gpu_type, None)
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None:
            self._grant(lease, slot)
        else:
            slot.state = _WARM
            self._touch(slot)
        self._schedule()

    def kernel_failed(self, slot_id: str) -> None:
        """A kernel did not start (or died before it was warm)."""
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        self._backoff_until[slot.gpu_type] = self.clock() + self.policy.start_failure_backoff
        self._forget_slot(slot, requeue=True)
        self._schedule()

    def kernel_died(self, slot_id: str, reason: str | None = None) -> None:
        """A kernel ended by itself; ``reason`` where the backend knows why (``oom``)."""
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        if slot.state == _STARTING:
            self.kernel_failed(slot_id)
            return
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None:
            slot.lease_id = None
            self._touch(slot)
            self._end(lease, reason or REASON_KERNEL_DIED)
        self._forget_slot(slot, requeue=False)
        self._schedule()

    def kernel_stopped(self, slot_id: str) -> None:
        """A kill finished: the devices are free for the next kernel."""
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        self._forget_slot(slot, requeue=False)
        self._schedule()

    # --- events: membership -----------------------------------------------------------------

    def add_devices(self, devices: Iterable[Device]) -> None:
        """A node joined: its devices take leases at once, new types are offered, and warm
        kernels start there as ``min_warm`` asks."""
        if self._placement.add(devices):
            self._types_changed()
        self._schedule()

    def remove_node(self, node: str, reason: str = REASON_NODE_LOST) -> list[Lease]:
        """Every device of ``node`` leaves the pool; returns the leases that ended with ``reason``.

        Leases granted there end. A queued lease whose kernel was starting there goes back to
        its place in the queue (ahead of later requests) and may be placed elsewhere. The
        node's slots are forgotten at once, without waiting for a kill; a KillKernel still goes
        out for every kernel that was started, so the backend drops its handle and kills what
        may still run (a node cut off by the network is not necessarily dead).
        """
        on_node = [slot for slot in self.slots.values() if slot.node == node]
        # Those that wait for another to stop go first: forgetting the other would start them.
        on_node.sort(key=lambda slot: not slot.waiting_for)
        ended = []
        for slot in on_node:
            lease = self.leases.get(slot.lease_id) if slot.lease_id else None
            if lease is not None and lease.state == GRANTED:
                self._end(lease, reason)  # the slot drains: its KillKernel goes out here
                ended.append(lease)
            elif slot.start_requested and slot.state != _DRAINING:
                self._kill(slot)
        for slot in on_node:
            if slot.id in self.slots:
                self._forget_slot(slot, requeue=True)
        self._placement.remove(node)  # its types stay offered: nodes of them may join again
        self._schedule()
        return ended

    def set_device_health(self, key: str, healthy: bool) -> None:
        """A device turned unhealthy (no new kernel goes there) or healthy again.

        A kernel that holds it for a lease keeps running (the lease's work goes on; if the GPU
        is really gone the kernel dies and says so). Spare kernels on it are killed, and a
        queued lease whose kernel was starting there goes back to its place in the queue.
        """
        if key not in self.devices:
            raise KeyError(f"no device {key!r} in the pool")
        self._placement.set_health(key, healthy)
        holder = self.slots.get(self._placement.holder(key) or "")
        if not healthy and holder is not None and holder.state != _DRAINING:
            lease = self.leases.get(holder.lease_id) if holder.lease_id else None
            if lease is None or lease.state != GRANTED:
                self._evict(holder)
        self._schedule()

    def _evict(self, slot: Slot) -> None:
        """Take back a slot no lease holds yet; its queued lease (if any) waits again."""
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None:
            slot.lease_id = None
            self._unassign(lease)
        if slot.start_requested:
            slot.state = _DRAINING
            self._touch(slot)
            self._kill(slot)
        else:
            self._forget_slot(slot, requeue=False)

    def _types_changed(self) -> None:
        self._wanted.clear()
        self._offered.clear()
        self._queue.rekey(lambda lease_id: self._matching_types(self.leases[lease_id].choices))

    # --- events: time -------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply the deadlines that passed: idle timeouts, maximum durations, backoffs."""
        now = self.clock()
        due = self._deadlines.due(now, self.leases)
        # The same order as a scan of all leases would end them in: the order of the requests.
        for lease in sorted(due, key=lambda lease: self._leases.order(lease.id)):
            reason = self._deadlines.expired(lease, now)
            if reason is not None:
                self._end(lease, reason)
        for item in self._gpu_idleness.due(now, self.leases):
            if item.lease.state != GRANTED:
                continue  # ended above
            if item.warn:
                self._warn_gpu_idle(item.lease, item.release_at - now)
            else:
                self._end(item.lease, REASON_GPU_IDLE)
        self._apply_budgets()
        for gpu_type, until in list(self._backoff_until.items()):
            if until <= now:
                del self._backoff_until[gpu_type]
        self._schedule()

    def next_deadline(self) -> float | None:
        """The earliest time (on :attr:`clock`) at which :meth:`tick` would change anything."""
        lease_deadline = self._deadlines.next(self.leases)
        gpu_idle = self._gpu_idleness.next(self.leases)
        budgets = self.admission.budgets
        budget_due = budgets.next_due(self.wall_clock()) if budgets is not None else None
        if budget_due is not None:  # budgets count on the wall clock (days, months): on ours from now
            budget_due = self.clock() + max(0.0, budget_due - self.wall_clock())
        return min((lease_deadline, gpu_idle, budget_due, *self._backoff_until.values()), key=_or_inf, default=None)

    def _warn_gpu_idle(self, lease: Lease, seconds_left: float) -> None:
        idle_for = duration_text(self.policy.gpu_idle_timeout - seconds_left)
        self.notify(
            lease.id,
            REASON_GPU_IDLE,
            f"its GPUs did no work and no cell ran for {idle_for}: it will be released for GPU idleness; "
            "run a cell on it to keep it",
            when=self.wall_clock() + seconds_left,
        )

    def configure_budgets(self, config: BudgetConfig) -> None:
        """New budgets in force at once: running leases are warned or ended against them now."""
        if self.admission.budgets is None:
            raise ValueError("this pool was built without budgets")
        self.admission.budgets.configure(config)
        self._apply_budgets()
        self._schedule()

    def _apply_budgets(self) -> None:
        """Warn the running leases whose budget reached 90% (a lease notice); end those whose budget is used up."""
        budgets = self.admission.budgets
        if budgets is None:
            return
        warnings, overruns = budgets.due(self.wall_clock())
        for overrun in overruns:
            lease = self.leases.get(overrun.lease_id)
            if lease is not None:
                lease.reason_message = overrun.message
                self._end(lease, REASON_BUDGET)
        for warning in warnings:
            lease = self.leases.get(warning.lease_id)
            if lease is not None:
                log.info("lease %s of %s: %s", lease.id, lease.user, warning.message)
                self.notify(lease.id, REASON_BUDGET, warning.message, when=warning.when)

    def shutdown(self, reason: str) -> None:
        """End every lease and kill every kernel (the gateway is stopping)."""
        for lease in list(self.leases.values()):
            self._end(lease, reason)
        for slot in list(self.slots.values()):
            if not slot.start_requested:
                self._forget_slot(slot, requeue=False)
            elif slot.state != _DRAINING:
                slot.state = _DRAINING
                self._touch(slot)
                self._kill(slot)
        self.policy = PoolPolicy(**{**self.policy.__dict__, "min_warm": 0})

    # --- queries ------------------------------------------------------------------------

    def queued_ids(self) -> list[str]:
        """Queued lease ids, first in line first."""
        return self._queue.ids()

    def queue_position(self, lease: LeaseView) -> int:
        """1-based place among queued leases that compete for the same types; 0 if not queued."""
        return self._queue.position(lease.id) if lease.state == QUEUED else 0

    def expected_wait(self, lease: LeaseView) -> float:
        """Seconds until the lease is likely granted, assuming today's holders go idle now.

        An estimate, not a promise: a holder that keeps executing keeps its GPU.
        """
        if lease.state != QUEUED:
            return 0.0
        now = self.clock()
        if lease.slot_id is not None:
            slot = self.slots[lease.slot_id]
            return max(0.0, slot.created_at + self._start_seconds - now)
        frees = self._leases.frees(self._matching_types(lease.choices), now)
        if not frees:
            return self._start_seconds
        position = max(1, self.queue_position(lease))
        index = min(len(frees), position * max(c.count for c in lease.choices)) - 1
        return frees[index] - now + self._start_seconds

    def idle_remaining(self, lease: LeaseView) -> float | None:
        """Seconds until a granted lease ends for idleness (its full timeout while busy)."""
        if lease.state != GRANTED:
            return None
        if lease.busy:
            return lease.idle_timeout
        return max(0.0, lease.active_mono + lease.idle_timeout - self.clock())

    def summaries(self) -> list[TypeSummary]:
        rows = []
        queued_of = self._queue.queued_per_type()
        for gpu_type in self.types:
            total, memory_mb, emulated = self._placement.facts[gpu_type]
            leased = self._slot_index.leased_gpus.get(gpu_type, 0)
            rows.append(
                TypeSummary(
                    gpu_type=gpu_type,
                    total=total,
                    free=max(0, total - leased),
                    warm=self._slot_index.warm.get(gpu_type, 0),
                    queued=queued_of.get(gpu_type, 0),
                    leased=leased,
                    memory_mb=memory_mb,
                    emulated=emulated,
                )
            )
        return rows

    def leases_on_local_gpus(self) -> dict[str, tuple[int, ...]]:
        """Granted leases on real GPUs of this machine (what NVML here can read): lease id ->
        GPU indices. Empty unless leases can end for GPU idleness (nothing needs the readings)."""
        if not self.policy.gpu_idle_timeout:
            return {}
        found = {}
        for lease in self.leases.values():
            slot = self.slots.get(lease.slot_id or "") if lease.state == GRANTED else None
            if slot is None or not lease.gpu_indices:
                continue
            devices = [self.devices[key] for key in slot.devices]
            if all(d.node == "local" and not d.emulated and d.index is not None for d in devices):
                found[lease.id] = lease.gpu_indices
        return found

    def leases_of(self, user: str) -> list[Lease]:
        """The user's active (queued or granted) leases, in the order they were requested."""
        return self._leases.of_user(user)

    def slot_for_kernel(self, kernel_id: str) -> str | None:
        """The slot a live kernel runs in (None once it is gone)."""
        return self._slot_of_kernel.get(kernel_id)

    def lease_for_kernel(self, kernel_id: str) -> Lease | None:
        """The active lease that holds the kernel, if any."""
        slot = self.slots.get(self._slot_of_kernel.get(kernel_id, ""))
        return self.leases.get(slot.lease_id) if slot is not None and slot.lease_id else None

    def unmet_demand(self) -> dict[str, int]:
        """GPUs per type that queued leases wait for with no kernel starting for them: what more
        nodes would serve (what a :class:`~pool_manager.scaler.Scaler` reads).

        A lease counts towards the first offered type of its first choice that names one and
        that admission allows; one held back only by its own user's limit is no demand (more
        nodes would not help).
        """
        demand: dict[str, int] = {}
        for _, lease_ids in self._queue.waiting():
            for lease_id in lease_ids:
                lease = self.leases[lease_id]
                room = self._room(lease.user)
                for choice in lease.choices:
                    types = self._offered_for(choice.gpu_type)
                    if types and (room is None or choice.count <= room):
                        demand[types[0]] = demand.get(types[0], 0) + choice.count
                        break
        return demand

    def node_use(self) -> dict[str, list[NodeUse]]:
        """Per type, its nodes in the order they joined and how much of each is in use."""
        return {gpu_type: self._placement.node_use(gpu_type) for gpu_type in self.types}

    # --- internals: the policy -----------------------------------------------------------

    def _matching_types(self, choices: Iterable[GpuChoice]) -> Wanted:
        key = tuple(choices)
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = self._wanted[key] = frozenset(t for choice in key for t in self._offered_for(choice.gpu_type))
        return wanted

    def _offered_for(self, wanted: str) -> list[str]:
        """The offered types a requested name covers, in the order they are tried."""
        offered = self._offered.get(wanted)
        if offered is None:
            offered = self._offered[wanted] = [t for t in self.types if self._type_ok(wanted, t)]
        return offered

    def _type_ok(self, wanted: str, offered: str) -> bool:
        # With no GPU at all, "any" means the CPU kernels, so a notebook still runs.
        if wanted == ANY_TYPE and self.types == [CPU_TYPE]:
            return True
        return type_matches(wanted, offered)

    def _check_satisfiable(self, choices: Sequence[GpuChoice]) -> None:
        if not choices:
            raise LeaseRequestError("no GPU type requested", "bad_spec")
        types_offered = self._placement.types
        if not types_offered:
            raise LeaseRequestError(
                "this gateway offers no GPU type at the moment (no GPU found, no CPU slots, no node joined): "
                "its operator can declare some (--inventory a100=2, --cpu-slots 2) or add a node",
                NO_CAPACITY,
            )
        problems: list[tuple[str, str]] = []  # (message, reason)
        for choice in choices:
            types = self._offered_for(choice.gpu_type)
            if not types:
                offered = ", ".join(types_offered)
                problems.append((f"unknown GPU type {choice.gpu_type!r}: this gateway offers {offered}",
                                 "unknown_type"))
                continue
            most = max(max(self._placement.largest_node(t), self.launchable.get(t, 0)) for t in types)
            if most == 0:
                problems.append((
                    f"no node with {choice.gpu_type} GPUs is in the pool right now (all left): "
                    "try again later or ask for another type",
                    NO_CAPACITY,
                ))
            elif choice.count > most:
                problems.append((
                    f"{choice} asks for {choice.count} GPUs but no node has more than {most} of type "
                    f"{choice.gpu_type}: ask for at most {most}",
                    "too_many_gpus",
                ))
            elif (refusal := self.admission.refusal(choice)) is not None:
                problems.append((refusal, "too_many_gpus"))
        if len(problems) == len(choices):
            raise LeaseRequestError("; ".join(message for message, _ in problems), problems[0][1])

    def _schedule(self) -> None:
        """Place queued leases in order, then top up the warm kernels.

        First come, first served per type: a lease that cannot be placed blocks the types it
        wants for everyone behind it. A lease that wants only blocked types (or waits for its
        starting kernel) can change nothing, so the walk visits, per set of wanted types, only
        the leases up to the first one that blocks them: the same decisions as a walk of the
        whole queue, without its cost when the queue is long.
        """
        blocked: set[str] = set()
        queue = self._queue
        heads = queue.heads()
        heapq.heapify(heads)
        everything = len(self._placement.types)
        limited = self.admission.limits
        while heads and len(blocked) < everything:
            place, wanted = heapq.heappop(heads)
            if wanted <= blocked:
                continue  # this lease and every later one that wants these types: no-ops
            lease = self.leases[queue.lease_at(place)]
            room = self._room(lease.user) if limited else None
            if room is not None and min(c.count for c in lease.choices) > room:
                pass  # waits for its own user's leases, without holding up anyone else
            elif not self._place(lease, room, wanted - blocked):
                # A fallback may still take a type nobody ahead waits for ("h100|a100"
                # takes the a100 that frees while an earlier lease waits for the h100).
                blocked |= wanted
            following = queue.waiting_after(wanted, place)
            if following is not None:
                heapq.heappush(heads, (following, wanted))
        self._top_up_warm(blocked)

    def _room(self, user: str) -> int | None:
        """GPUs admission still allows the user (None: no limit); kernels starting for their
        queued leases count as held."""
        if not self.admission.limits:
            return None
        return self.admission.room(user, self._leases.held_by(user) + self._leases.starting_for(user))

    def _place(self, lease: Lease, room: int | None, allowed: AbstractSet[str]) -> bool:
        """Place the first choice that fits, on the ``allowed`` types only.

        ``room`` is what admission still allows the user (None: no limit).
        """
        for choice in lease.choices:
            if room is not None and choice.count > room:
                continue  # e.g. "a100:2|h100" under a cap of 1: only the h100 may be placed
            types = [t for t in self._offered_for(choice.gpu_type) if t in allowed]
            if choice.count == 1 and self._place_single(lease, types):
                return True
            if choice.count > 1 and any(self._place_multi(lease, t, choice.count) for t in types):
                return True
        return False

    def _place_single(self, lease: Lease, types: list[str]) -> bool:
        """A warm kernel of any matching type first ("a100" takes a warm a100-80gb rather than
        wait for an a100-40gb still starting), then a starting one, then a free GPU."""
        for gpu_type in types:
            warm = self._slot_index.first_spare(gpu_type, _WARM)
            if warm is not None:
                slot = self.slots[warm]
                self._assign(lease, slot, 1)
                self._grant(lease, slot)
                return True
        for gpu_type in types:
            starting = self._slot_index.first_spare(gpu_type, _STARTING)
            if starting is not None:
                self._assign(lease, self.slots[starting], 1)
                return True
        for gpu_type in types:
            free = self._placement.free_devices(gpu_type, 1)
            if free and gpu_type not in self._backoff_until:
                slot = self._new_slot(gpu_type, [free[0]])
                self._assign(lease, slot, 1)
                return True
        return False

    def _place_multi(self, lease: Lease, gpu_type: str, count: int) -> bool:
        """All GPUs on one node: unbound ones first, then those of spare kernels, preempted."""
        # Asked on every event while a multi-GPU lease waits: the histogram answers "no node
        # has room" here, without a call into the placement index.
        if gpu_type in self._backoff_until or not any(self._placement.nodes_with[gpu_type][count:]):
            return False
        chosen = self._placement.best_node(gpu_type, count)
        if chosen is None:
            return False
        displaced = {holder for d in chosen if (holder := self._placement.holder(d.key)) is not None}
        for slot_id in displaced:
            old = self.slots[slot_id]
            for key in old.devices:
                self._placement.unbind(key)
            old.devices = old.gpu_indices = ()
            old.state = _DRAINING
            self._touch(old)
            self._kill(old)
        slot = self._new_slot(gpu_type, chosen, waiting_for=displaced)
        self._assign(lease, slot, count)
        return True

    def _new_slot(self, gpu_type: str, devices: list[Device], waiting_for: set[str] | None = None) -> Slot:
        slot = Slot(
            id=self.new_id(),
            gpu_type=gpu_type,
            devices=tuple(d.key for d in devices),
            node=devices[0].node,
            created_at=self.clock(),
            waiting_for=set(waiting_for or ()),
            gpu_indices=tuple(d.index for d in devices if d.index is not None),
        )
        self.slots[slot.id] = slot
        self._slot_index.add(slot)
        self._placement.new_slot(slot.id)
        for device in devices:
            self._placement.bind(device.key, slot.id)
        for other in slot.waiting_for:
            self._waiters.setdefault(other, []).append(slot.id)
        self._touch(slot)
        self._request_start(slot)
        return slot

    def _request_start(self, slot: Slot) -> None:
        if slot.waiting_for or slot.start_requested:
            return
        slot.start_requested = True
        slot.kernel_id = self.new_id()
        self._slot_of_kernel[slot.kernel_id] = slot.id
        self._actions.append(StartKernel(slot.id, slot.gpu_type, slot.gpu_indices, slot.node, slot.kernel_id))

    def _assign(self, lease: Lease, slot: Slot, count: int) -> None:
        slot.lease_id = lease.id
        lease.slot_id = slot.id
        lease.gpu_type = slot.gpu_type
        lease.count = count
        lease.gpu_indices = slot.gpu_indices
        self._touch(slot)
        self._queue.stop_waiting(lease.id)

    def _unassign(self, lease: Lease) -> None:
        """The queued lease's starting kernel is gone: it waits again, at its place."""
        lease.slot_id = None
        lease.gpu_type = None
        lease.count = 0
        lease.gpu_indices = ()
        if lease.id in self._queue:
            self._queue.start_waiting(lease.id)
        else:
            self._queue.enqueue(lease.id, self._matching_types(lease.choices), front=True, waiting=True)

    def _kill(self, slot: Slot) -> None:
        assert slot.kernel_id is not None, f"slot {slot.id} has no kernel to kill"  # only started ones
        self._actions.append(KillKernel(slot.id, slot.kernel_id))

    def _grant(self, lease: Lease, slot: Slot) -> None:
        slot.state = _LEASED
        self._touch(slot)
        lease.state = GRANTED
        lease.kernel_id = slot.kernel_id
        lease.granted_mono = lease.active_mono = now = self.clock()
        lease.granted_at = lease.last_activity = now if self.wall_clock is self.clock else self.wall_clock()
        self._queue.dequeue(lease.id)
        self._leases.granted(lease)
        self._deadlines.granted(lease)
        if self.admission.budgets is not None:
            self.admission.budgets.granted(lease.id, lease.count, lease.gpu_type or "", lease.last_activity)
        self._gpu_idleness.arm(lease)
        log.info("lease %s granted to %s: %s on %s", lease.id, lease.user, lease.gpu_type, lease.gpu_indices)
        self._actions.append(LeaseGranted(lease.snapshot()))

    def _end(self, lease: Lease, reason: str) -> None:
        lease.state = RELEASED
        lease.reason = reason
        lease.released_at = released = self.wall_clock()
        lease.busy = False
        self._leases.remove(lease)
        if lease.granted_mono is None:
            self._queue.dequeue(lease.id)
        else:
            self._deadlines.forget(lease.id)
            self._gpu_idleness.forget(lease.id)
        slot = self.slots.get(lease.slot_id) if lease.slot_id else None
        if slot is not None and slot.lease_id == lease.id:
            slot.lease_id = None
            # Single-use kernels: whoever held it, it is never handed on. A kernel still
            # starting for a cancelled single-GPU request becomes an ordinary warm spare.
            if not slot.start_requested:
                # Still waiting for the kernels it preempted: their GPUs stay taken until those
                # stopped, then the slot is dropped instead of started (see _forget_slot).
                slot.state = _DRAINING
            elif slot.state == _STARTING and len(slot.devices) == 1 and lease.granted_at is None:
                pass
            elif slot.state != _DRAINING:
                slot.state = _DRAINING
                self._kill(slot)
            self._touch(slot)
        if lease.granted_at is None:
            lease.count = 0  # never held a GPU: nothing to meter
        if self.admission.budgets is not None:
            self.admission.budgets.ended(lease.id, released)
        log.info("lease %s of %s ended: %s", lease.id, lease.user, reason)
        self._actions.append(LeaseEnded(lease.snapshot()))

    def _forget_slot(self, slot: Slot, requeue: bool) -> None:
        for key in slot.devices:
            if self._placement.holder(key) == slot.id:
                self._placement.unbind(key)
        self.slots.pop(slot.id, None)
        self._slot_of_kernel.pop(slot.kernel_id or "", None)
        self._slot_index.forget(slot)
        self._placement.forget_slot(slot.id)
        waiters = sorted(self._waiters.pop(slot.id, ()), key=self._slot_index.number)
        for other_id in waiters:
            other = self.slots.get(other_id)
            if other is None or slot.id not in other.waiting_for:
                continue
            other.waiting_for.discard(slot.id)
            if other.state == _DRAINING and not other.waiting_for:
                self._forget_slot(other, requeue=False)  # its lease ended while it waited
            else:
                self._request_start(other)
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None and requeue:
            # Its kernel failed to start: back to its place in the queue, not to the end.
            self._unassign(lease)

    def _top_up_warm(self, blocked: set[str]) -> None:
        spares = self._slot_index.spare_total  # read on every event: no method call per type
        for gpu_type in self._placement.types:
            if gpu_type in blocked or gpu_type in self._backoff_until:
                continue
            missing = self.policy.min_warm - spares.get(gpu_type, 0)
            if missing > 0:
                for device in self._placement.free_devices(gpu_type, missing):
                    self._new_slot(gpu_type, [device])

    def _touch(self, slot: Slot) -> None:
        """Re-file a slot whose state, lease or devices changed."""
        preemptible = slot.lease_id is None and slot.state != _DRAINING
        if preemptible != self._placement.preemptible.get(slot.id):
            self._placement.set_preemptible(slot.id, slot.devices, preemptible)
        self._slot_index.touch(slot)


def duration_text(seconds: float) -> str:
    """``45 s`` or ``12 min``: how long, as messages to users say it."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value
