"""The pool's policy as a sans-I/O state machine.

Events go in as method calls (a lease request, a kernel that became warm, a tick of the
clock); what must happen comes out of :meth:`PoolCore.pop_actions` (start or kill a kernel,
a lease granted or ended). Nothing here touches a process, a socket or the real clock, so
the same core runs the asyncio service, the trace simulator and millisecond tests.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from jupyter_gpu.protocol import (
    ANY_TYPE,
    CPU_TYPE,
    GRANTED,
    QUEUED,
    REASON_CANCELLED,
    REASON_IDLE,
    REASON_KERNEL_DIED,
    REASON_MAX_DURATION,
    RELEASED,
    GpuChoice,
    type_matches,
)

from .model import (
    Action,
    Device,
    KillKernel,
    Lease,
    LeaseEnded,
    LeaseGranted,
    Slot,
    SlotState,
    StartKernel,
)

log = logging.getLogger(__name__)


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
    #: 0 means no per-user cap
    max_gpus_per_user: int = 0
    #: after a kernel fails to start, wait this long before starting another of its type
    start_failure_backoff: float = 5.0


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
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.devices: dict[str, Device] = {device.key: device for device in devices}
        self.policy = policy
        self.clock = clock
        self.new_id = new_id
        self.slots: dict[str, Slot] = {}
        self.leases: dict[str, Lease] = {}  # active ones only: queued or granted
        self._queue: list[str] = []  # queued lease ids, oldest first
        self._bound: dict[str, str] = {}  # device key -> slot id
        self._actions: list[Action] = []
        self._backoff_until: dict[str, float] = {}
        self._start_seconds = 2.0  # moving estimate of a kernel start, for expected waits
        self.decisions = 0
        self.types = sorted({device.gpu_type for device in self.devices.values()})

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
    ) -> Lease:
        """Queue a lease request and place it at once if capacity allows.

        Raises :class:`LeaseRequestError` for a request no amount of waiting could satisfy.
        """
        self._check_satisfiable(choices)
        idle = self.policy.idle_timeout if idle_timeout is None else float(idle_timeout)
        # `not idle > 0` rather than `idle <= 0`: NaN (json.loads accepts it) compares false both
        # ways, and a NaN idle timeout would never expire, holding the GPU forever.
        if not idle > 0:
            raise LeaseRequestError(f"idle_timeout must be positive, got {idle_timeout!r}", "bad_idle_timeout")
        idle = min(idle, self.policy.max_idle_timeout)
        now = self.clock()
        lease = Lease(
            id=self.new_id(), user=user, choices=tuple(choices), idle_timeout=idle, queued_at=now, notebook=notebook
        )
        self.leases[lease.id] = lease
        self._queue.append(lease.id)
        self._schedule()
        return lease

    def end_lease(self, lease_id: str, reason: str) -> Lease | None:
        """Release a granted lease or cancel a queued one; returns it, or None if unknown."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        if lease.state == QUEUED:
            reason = REASON_CANCELLED  # it never held a GPU: nothing was released
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
            lease.last_activity = self.clock()

    # --- events: kernels ----------------------------------------------------------------

    def kernel_ready(self, slot_id: str, start_seconds: float | None = None) -> None:
        slot = self.slots.get(slot_id)
        if slot is None or slot.state != SlotState.STARTING:
            return
        if start_seconds is not None:
            self._start_seconds = 0.8 * self._start_seconds + 0.2 * start_seconds
        self._backoff_until.pop(slot.gpu_type, None)
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None:
            self._grant(lease, slot)
        else:
            slot.state = SlotState.WARM
        self._schedule()

    def kernel_failed(self, slot_id: str) -> None:
        """A kernel did not start (or died before it was warm)."""
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        self._backoff_until[slot.gpu_type] = self.clock() + self.policy.start_failure_backoff
        self._forget_slot(slot, requeue=True)
        self._schedule()

    def kernel_died(self, slot_id: str) -> None:
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        if slot.state == SlotState.STARTING:
            self.kernel_failed(slot_id)
            return
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None:
            slot.lease_id = None
            self._end(lease, REASON_KERNEL_DIED)
        self._forget_slot(slot, requeue=False)
        self._schedule()

    def kernel_stopped(self, slot_id: str) -> None:
        """A kill finished: the devices are free for the next kernel."""
        slot = self.slots.get(slot_id)
        if slot is None:
            return
        self._forget_slot(slot, requeue=False)
        self._schedule()

    def tick(self) -> None:
        """Apply the deadlines that passed: idle timeouts, maximum durations, backoffs."""
        now = self.clock()
        for lease in list(self.leases.values()):
            if lease.state != GRANTED or lease.granted_at is None:
                continue
            if self.policy.max_lease_duration and now - lease.granted_at >= self.policy.max_lease_duration:
                self._end(lease, REASON_MAX_DURATION)
            elif not lease.busy and now - lease.last_activity >= lease.idle_timeout:
                self._end(lease, REASON_IDLE)
        for gpu_type, until in list(self._backoff_until.items()):
            if until <= now:
                del self._backoff_until[gpu_type]
        self._schedule()

    def shutdown(self, reason: str) -> None:
        """End every lease and kill every kernel (the gateway is stopping)."""
        for lease in list(self.leases.values()):
            self._end(lease, reason)
        for slot in list(self.slots.values()):
            if not slot.start_requested:
                self._forget_slot(slot, requeue=False)
            elif slot.state != SlotState.DRAINING:
                slot.state = SlotState.DRAINING
                self._actions.append(KillKernel(slot.id))
        self._queue.clear()
        self.policy = PoolPolicy(**{**self.policy.__dict__, "min_warm": 0})

    # --- queries ------------------------------------------------------------------------

    def queue_position(self, lease: Lease) -> int:
        """1-based place among queued leases that compete for the same types; 0 if not queued."""
        if lease.state != QUEUED:
            return 0
        wanted = self._matching_types(lease.choices)
        position = 1
        for other_id in self._queue:
            if other_id == lease.id:
                return position
            if wanted & self._matching_types(self.leases[other_id].choices):
                position += 1
        return 0

    def expected_wait(self, lease: Lease) -> float:
        """Seconds until the lease is likely granted, assuming today's holders go idle now.

        An estimate, not a promise: a holder that keeps executing keeps its GPU.
        """
        if lease.state != QUEUED:
            return 0.0
        now = self.clock()
        if lease.slot_id is not None:
            slot = self.slots[lease.slot_id]
            return max(0.0, slot.created_at + self._start_seconds - now)
        wanted = self._matching_types(lease.choices)
        frees: list[float] = []
        for other in self.leases.values():
            if other.state == GRANTED and other.gpu_type in wanted and other.granted_at is not None:
                end = (now if other.busy else other.last_activity) + other.idle_timeout
                if self.policy.max_lease_duration:
                    end = min(end, other.granted_at + self.policy.max_lease_duration)
                frees.extend([max(now, end)] * other.count)
        frees.sort()
        if not frees:
            return self._start_seconds
        position = max(1, self.queue_position(lease))
        index = min(len(frees), position * max(c.count for c in lease.choices)) - 1
        return frees[index] - now + self._start_seconds

    def summaries(self) -> list[TypeSummary]:
        rows = []
        for gpu_type in self.types:
            devices = [d for d in self.devices.values() if d.gpu_type == gpu_type and d.healthy]
            leased = warm = 0
            for slot in self.slots.values():
                if slot.gpu_type != gpu_type:
                    continue
                if slot.lease_id is not None or slot.state == SlotState.DRAINING:
                    leased += len(slot.devices)
                elif slot.state == SlotState.WARM:
                    warm += 1
            queued = sum(
                1 for lease_id in self._queue if gpu_type in self._matching_types(self.leases[lease_id].choices)
            )
            rows.append(
                TypeSummary(
                    gpu_type=gpu_type,
                    total=len(devices),
                    free=max(0, len(devices) - leased),
                    warm=warm,
                    queued=queued,
                    leased=leased,
                    memory_mb=max((d.memory_mb for d in devices), default=0),
                    emulated=any(d.emulated for d in devices),
                )
            )
        return rows

    def user_gpus(self, user: str) -> int:
        return sum(lease.count for lease in self.leases.values() if lease.user == user and lease.state == GRANTED)

    # --- internals ----------------------------------------------------------------------

    def _matching_types(self, choices: Iterable[GpuChoice]) -> set[str]:
        return {t for choice in choices for t in self.types if self._type_ok(choice.gpu_type, t)}

    def _type_ok(self, wanted: str, offered: str) -> bool:
        # With no GPU at all, "any" means the CPU kernels, so a notebook still runs.
        if wanted == ANY_TYPE and self.types == [CPU_TYPE]:
            return True
        return type_matches(wanted, offered)

    def _check_satisfiable(self, choices: Sequence[GpuChoice]) -> None:
        if not choices:
            raise LeaseRequestError("no GPU type requested", "bad_spec")
        offered = ", ".join(self.types) or "none"
        problems = []
        for choice in choices:
            types = [t for t in self.types if self._type_ok(choice.gpu_type, t)]
            if not types:
                problems.append(f"unknown GPU type {choice.gpu_type!r}: this gateway offers {offered}")
                continue
            most = max(self._largest_node(t) for t in types)
            if choice.count > most:
                problems.append(
                    f"{choice} asks for {choice.count} GPUs but no node has more than {most} of type "
                    f"{choice.gpu_type}: ask for at most {most}"
                )
            elif self.policy.max_gpus_per_user and choice.count > self.policy.max_gpus_per_user:
                problems.append(
                    f"{choice} asks for {choice.count} GPUs but each user may hold at most "
                    f"{self.policy.max_gpus_per_user} (max_gpus_per_user)"
                )
        if len(problems) == len(choices):
            reason = "unknown_type" if problems[0].startswith("unknown") else "too_many_gpus"
            raise LeaseRequestError("; ".join(problems), reason)

    def _largest_node(self, gpu_type: str) -> int:
        counts: dict[str, int] = {}
        for device in self.devices.values():
            if device.gpu_type == gpu_type and device.healthy:
                counts[device.node] = counts.get(device.node, 0) + 1
        return max(counts.values(), default=0)

    def _schedule(self) -> None:
        """Place queued leases in order, then top up the warm kernels."""
        blocked: set[str] = set()
        for lease_id in list(self._queue):
            lease = self.leases[lease_id]
            if lease.slot_id is not None:
                continue  # its kernel is starting
            self.decisions += 1
            cap = self.policy.max_gpus_per_user
            room = cap - self.user_gpus(lease.user) - self._user_pending(lease.user) if cap else None
            if room is not None and min(c.count for c in lease.choices) > room:
                continue  # waits for its own user's leases, without holding up anyone else
            wanted = self._matching_types(lease.choices)
            if wanted & blocked or not self._place(lease, room):
                blocked |= wanted  # first come, first served per type
        self._top_up_warm(blocked)

    def _user_pending(self, user: str) -> int:
        return sum(
            lease.count
            for lease in self.leases.values()
            if lease.user == user and lease.state == QUEUED and lease.slot_id is not None
        )

    def _place(self, lease: Lease, room: int | None) -> bool:
        """Place the first choice that fits; ``room`` is what the user's cap still allows (None: no cap)."""
        for choice in lease.choices:
            if room is not None and choice.count > room:
                continue  # e.g. "a100:2|h100" under a cap of 1: only the h100 may be placed
            for gpu_type in self.types:
                if not self._type_ok(choice.gpu_type, gpu_type):
                    continue
                if choice.count == 1 and self._place_single(lease, gpu_type):
                    return True
                if choice.count > 1 and self._place_multi(lease, gpu_type, choice.count):
                    return True
        return False

    def _unleased_slots(self, gpu_type: str, state: SlotState) -> list[Slot]:
        return [
            s
            for s in self.slots.values()
            if s.gpu_type == gpu_type and s.state == state and s.lease_id is None and len(s.devices) == 1
        ]

    def _free_devices(self, gpu_type: str) -> list[Device]:
        return [d for d in self.devices.values() if d.gpu_type == gpu_type and d.healthy and d.key not in self._bound]

    def _place_single(self, lease: Lease, gpu_type: str) -> bool:
        warm = self._unleased_slots(gpu_type, SlotState.WARM)
        if warm:
            self._assign(lease, warm[0], 1)
            self._grant(lease, warm[0])
            return True
        starting = self._unleased_slots(gpu_type, SlotState.STARTING)
        if starting:
            self._assign(lease, starting[0], 1)
            return True
        free = self._free_devices(gpu_type)
        if free and gpu_type not in self._backoff_until:
            slot = self._new_slot(gpu_type, [free[0]])
            self._assign(lease, slot, 1)
            return True
        return False

    def _place_multi(self, lease: Lease, gpu_type: str, count: int) -> bool:
        by_node: dict[str, list[Device]] = {}
        for device in self.devices.values():
            if device.gpu_type != gpu_type or not device.healthy:
                continue
            holder = self.slots.get(self._bound.get(device.key, ""))
            usable = holder is None or (holder.lease_id is None and holder.state != SlotState.DRAINING)
            if usable:
                by_node.setdefault(device.node, []).append(device)
        for devices in by_node.values():
            if len(devices) < count or gpu_type in self._backoff_until:
                continue
            # Prefer unbound GPUs; preempt warm kernels only for what is missing.
            devices.sort(key=lambda d: d.key in self._bound)
            chosen = devices[:count]
            displaced = {self._bound[d.key] for d in chosen if d.key in self._bound}
            for slot_id in displaced:
                old = self.slots[slot_id]
                for key in old.devices:
                    self._bound.pop(key, None)
                old.devices = ()
                old.state = SlotState.DRAINING
                self._actions.append(KillKernel(slot_id))
            slot = self._new_slot(gpu_type, chosen, waiting_for=displaced)
            self._assign(lease, slot, count)
            return True
        return False

    def _new_slot(self, gpu_type: str, devices: list[Device], waiting_for: set[str] | None = None) -> Slot:
        slot = Slot(
            id=self.new_id(),
            gpu_type=gpu_type,
            devices=tuple(d.key for d in devices),
            node=devices[0].node,
            created_at=self.clock(),
            waiting_for=set(waiting_for or ()),
        )
        self.slots[slot.id] = slot
        for device in devices:
            self._bound[device.key] = slot.id
        self._request_start(slot)
        return slot

    def _request_start(self, slot: Slot) -> None:
        if slot.waiting_for or slot.start_requested:
            return
        slot.start_requested = True
        indices = tuple(i for i in (self.devices[k].index for k in slot.devices) if i is not None)
        self._actions.append(StartKernel(slot.id, slot.gpu_type, indices, slot.node))

    def _assign(self, lease: Lease, slot: Slot, count: int) -> None:
        slot.lease_id = lease.id
        lease.slot_id = slot.id
        lease.gpu_type = slot.gpu_type
        lease.count = count
        lease.gpu_indices = tuple(i for i in (self.devices[k].index for k in slot.devices) if i is not None)

    def _grant(self, lease: Lease, slot: Slot) -> None:
        now = self.clock()
        slot.state = SlotState.LEASED
        lease.state = GRANTED
        lease.granted_at = now
        lease.last_activity = now
        if lease.id in self._queue:
            self._queue.remove(lease.id)
        log.info("lease %s granted to %s: %s on %s", lease.id, lease.user, lease.gpu_type, lease.gpu_indices)
        self._actions.append(LeaseGranted(lease))

    def _end(self, lease: Lease, reason: str) -> None:
        lease.state = RELEASED
        lease.reason = reason
        lease.released_at = self.clock()
        lease.busy = False
        self.leases.pop(lease.id, None)
        if lease.id in self._queue:
            self._queue.remove(lease.id)
        slot = self.slots.get(lease.slot_id) if lease.slot_id else None
        if slot is not None and slot.lease_id == lease.id:
            slot.lease_id = None
            # Single-use kernels: whoever held it, it is never handed on. A kernel still
            # starting for a cancelled single-GPU request becomes an ordinary warm spare.
            if not slot.start_requested:
                # Still waiting for the kernels it preempted: their GPUs stay taken until those
                # stopped, then the slot is dropped instead of started (see _forget_slot).
                slot.state = SlotState.DRAINING
            elif slot.state == SlotState.STARTING and len(slot.devices) == 1 and lease.granted_at is None:
                pass
            elif slot.state != SlotState.DRAINING:
                slot.state = SlotState.DRAINING
                self._actions.append(KillKernel(slot.id))
        if lease.granted_at is None:
            lease.count = 0  # never held a GPU: nothing to meter
        log.info("lease %s of %s ended: %s", lease.id, lease.user, reason)
        self._actions.append(LeaseEnded(lease))

    def _forget_slot(self, slot: Slot, requeue: bool) -> None:
        self.slots.pop(slot.id, None)
        for key in slot.devices:
            if self._bound.get(key) == slot.id:
                del self._bound[key]
        for other in list(self.slots.values()):
            if slot.id in other.waiting_for:
                other.waiting_for.discard(slot.id)
                if other.state == SlotState.DRAINING and not other.waiting_for:
                    self._forget_slot(other, requeue=False)  # its lease ended while it waited
                else:
                    self._request_start(other)
        lease = self.leases.get(slot.lease_id) if slot.lease_id else None
        if lease is not None and requeue:
            # Its kernel failed to start: back to the front of the queue, not to the end.
            lease.slot_id = None
            lease.gpu_type = None
            lease.count = 0
            lease.gpu_indices = ()
            if lease.id not in self._queue:
                self._queue.insert(0, lease.id)

    def _top_up_warm(self, blocked: set[str]) -> None:
        for gpu_type in self.types:
            if gpu_type in blocked or gpu_type in self._backoff_until:
                continue
            spare = len(self._unleased_slots(gpu_type, SlotState.WARM)) + len(
                self._unleased_slots(gpu_type, SlotState.STARTING)
            )
            free = self._free_devices(gpu_type)
            for device in itertools.islice(free, max(0, self.policy.min_warm - spare)):
                self._new_slot(gpu_type, [device])
