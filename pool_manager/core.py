"""The pool's policy as a sans-I/O state machine.

Events go in as method calls (a lease request, a kernel that became warm, a tick of the
clock); what must happen comes out of :meth:`PoolCore.pop_actions` (start or kill a kernel,
a lease granted or ended). Nothing here touches a process, a socket or the real clock, so
the same core runs the asyncio service, the trace simulator and millisecond tests.

Every event costs about the same however big the pool and its queue are: the core keeps
indexes (free GPUs per type, spare kernels per type, usable GPUs per node, waiting leases
per set of wanted types, a heap of lease deadlines) instead of rescanning all GPUs, slots
and queued leases per event. The policy they serve is written once, in the methods below;
the indexes only answer its questions faster (benchmarks/pool_sim.py: a month of a
recorded workload, 100,000 requests over 1,000 GPUs).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
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


#: Deadlines in the tick heap: a lease's maximum duration, or its idle timeout.
_MAX, _IDLE = 0, 1


class PoolCore:
    def __init__(
        self,
        devices: Iterable[Device],
        policy: PoolPolicy,
        clock: Callable[[], float],
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        # The devices are fixed for the life of the core: the indexes below are built once.
        self.devices: dict[str, Device] = {device.key: device for device in devices}
        self.policy = policy
        self.clock = clock
        self.new_id = new_id
        self.slots: dict[str, Slot] = {}
        self.leases: dict[str, Lease] = {}  # active ones only: queued or granted
        self._bound: dict[str, str] = {}  # device key -> slot id
        self._actions: list[Action] = []
        self._backoff_until: dict[str, float] = {}
        self._start_seconds = 2.0  # moving estimate of a kernel start, for expected waits
        self.types = sorted({device.gpu_type for device in self.devices.values()})

        # The queue: every queued lease has a place (a number; lower is earlier). All queued
        # leases in order, and per set of wanted types those still waiting for a slot.
        self._place_of: dict[str, int] = {}  # lease id -> place
        self._at_place: dict[int, str] = {}  # place -> lease id
        self._queue: list[int] = []  # places of queued leases, sorted
        self._waiting: dict[frozenset[str], list[int]] = {}  # wanted types -> sorted places, no slot yet
        self._next_place = 0
        self._front_place = -1  # a failed start puts its lease back in front of everyone
        self._wanted: dict[tuple[GpuChoice, ...], frozenset[str]] = {}
        self._offered: dict[str, list[str]] = {}
        self._request_order: dict[str, int] = {}  # lease id -> n-th request (tick ends leases in this order)
        self._requests = 0

        # Devices: position in inventory order, free (healthy, unbound) positions per type.
        self._position: dict[str, int] = {}
        self._key_at: list[str] = []
        self._free: dict[str, list[int]] = {t: [] for t in self.types}
        # Per (type, node): devices in inventory order, and how many a multi-GPU lease could
        # take (unbound, or held by a spare kernel that may be preempted).
        self._node_devices: dict[tuple[str, str], list[str]] = {}
        self._usable: dict[tuple[str, str], int] = {}
        for position, device in enumerate(self.devices.values()):
            self._position[device.key] = position
            self._key_at.append(device.key)
            if device.healthy:
                self._free[device.gpu_type].append(position)
                node = (device.gpu_type, device.node)
                self._node_devices.setdefault(node, []).append(device.key)
                self._usable[node] = self._usable.get(node, 0) + 1
        self._nodes_of: dict[str, list[tuple[str, str]]] = {t: [] for t in self.types}
        # per type: how many nodes have exactly k usable GPUs (a failing request looks no further)
        self._nodes_with: dict[str, list[int]] = {t: [0] for t in self.types}
        for node, keys in self._node_devices.items():
            self._nodes_of[node[0]].append(node)
            histogram = self._nodes_with[node[0]]
            histogram.extend([0] * (len(keys) + 1 - len(histogram)))
            histogram[len(keys)] += 1
        # What summaries() says of each type that never changes: healthy GPUs, memory, emulated.
        self._type_facts: dict[str, tuple[int, int, bool]] = {}
        for gpu_type in self.types:
            healthy = [d for d in self.devices.values() if d.gpu_type == gpu_type and d.healthy]
            self._type_facts[gpu_type] = (len(healthy), max((d.memory_mb for d in healthy), default=0),
                                          any(d.emulated for d in healthy))

        # Slots: creation order, whether their GPUs may be preempted, single-GPU spares per
        # (type, state) as heaps of (creation number, slot id) checked lazily against _spare_of.
        self._slot_number: dict[str, int] = {}
        self._slots_created = 0
        self._preemptible: dict[str, bool] = {}
        self._spare_of: dict[str, tuple[str, SlotState]] = {}
        self._spares: dict[tuple[str, SlotState], list[tuple[int, str]]] = {}
        self._spare_count: dict[tuple[str, SlotState], int] = {}
        self._waiters: dict[str, list[str]] = {}  # slot id -> slots waiting for it to stop

        # Deadlines: (when, kind, lease id), checked against the lease when they come due.
        self._deadlines: list[tuple[float, int, str]] = []
        self._idle_armed: set[str] = set()

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
        self._request_order[lease.id] = self._requests
        self._requests += 1
        self._enqueue(lease, front=False)
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
            if not busy:
                self._arm_idle(lease)

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
        if slot.state == SlotState.STARTING:
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

    def tick(self) -> None:
        """Apply the deadlines that passed: idle timeouts, maximum durations, backoffs."""
        now = self.clock()
        due: dict[str, Lease] = {}
        again: list[tuple[float, int, str]] = []
        # A little slack: `now - start >= timeout` can hold while `start + timeout` rounds above now.
        horizon = now + 1e-9 * max(1.0, abs(now))
        while self._deadlines and self._deadlines[0][0] <= horizon:
            entry = heapq.heappop(self._deadlines)
            _, kind, lease_id = entry
            lease = self.leases.get(lease_id)
            if lease is None or lease.state != GRANTED or lease.granted_at is None:
                self._idle_armed.discard(lease_id)
                continue
            if self._expired(lease, now) is not None:
                due[lease.id] = lease
                if kind == _IDLE:
                    self._idle_armed.discard(lease_id)
            elif kind == _MAX:
                again.append(entry)  # within the slack, not yet due: look again next tick
            elif lease.busy:
                self._idle_armed.discard(lease_id)  # re-armed when the kernel goes idle
            else:
                deadline = lease.last_activity + lease.idle_timeout
                if deadline <= horizon:
                    again.append((deadline, _IDLE, lease_id))
                else:
                    heapq.heappush(self._deadlines, (deadline, _IDLE, lease_id))
        for entry in again:
            heapq.heappush(self._deadlines, entry)
        # The same order as a scan of all leases would end them in: the order of the requests.
        for lease in sorted(due.values(), key=lambda lease: self._request_order[lease.id]):
            reason = self._expired(lease, now)
            if reason is not None:
                self._end(lease, reason)
        for gpu_type, until in list(self._backoff_until.items()):
            if until <= now:
                del self._backoff_until[gpu_type]
        self._schedule()

    def _expired(self, lease: Lease, now: float) -> str | None:
        assert lease.granted_at is not None
        if self.policy.max_lease_duration and now - lease.granted_at >= self.policy.max_lease_duration:
            return REASON_MAX_DURATION
        if not lease.busy and now - lease.last_activity >= lease.idle_timeout:
            return REASON_IDLE
        return None

    def _arm_idle(self, lease: Lease) -> None:
        """Make sure the lease's idle deadline is in the heap (one entry per lease is enough:
        an entry that comes due early is moved to the lease's deadline of that moment)."""
        if lease.id not in self._idle_armed:
            self._idle_armed.add(lease.id)
            heapq.heappush(self._deadlines, (lease.last_activity + lease.idle_timeout, _IDLE, lease.id))

    def shutdown(self, reason: str) -> None:
        """End every lease and kill every kernel (the gateway is stopping)."""
        for lease in list(self.leases.values()):
            self._end(lease, reason)
        for slot in list(self.slots.values()):
            if not slot.start_requested:
                self._forget_slot(slot, requeue=False)
            elif slot.state != SlotState.DRAINING:
                slot.state = SlotState.DRAINING
                self._touch(slot)
                self._actions.append(KillKernel(slot.id))
        self.policy = PoolPolicy(**{**self.policy.__dict__, "min_warm": 0})

    # --- queries ------------------------------------------------------------------------

    def queued_ids(self) -> list[str]:
        """Queued lease ids, first in line first."""
        return [self._at_place[place] for place in self._queue]

    def queue_position(self, lease: Lease) -> int:
        """1-based place among queued leases that compete for the same types; 0 if not queued."""
        if lease.state != QUEUED:
            return 0
        wanted = self._matching_types(lease.choices)
        position = 1
        for other_id in self.queued_ids():
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
        queued_ids = self.queued_ids()
        for gpu_type in self.types:
            total, memory_mb, emulated = self._type_facts[gpu_type]
            leased = warm = 0
            for slot in self.slots.values():
                if slot.gpu_type != gpu_type:
                    continue
                if slot.lease_id is not None or slot.state == SlotState.DRAINING:
                    leased += len(slot.devices)
                elif slot.state == SlotState.WARM:
                    warm += 1
            queued = sum(
                1 for lease_id in queued_ids if gpu_type in self._matching_types(self.leases[lease_id].choices)
            )
            rows.append(
                TypeSummary(
                    gpu_type=gpu_type,
                    total=total,
                    free=max(0, total - leased),
                    warm=warm,
                    queued=queued,
                    leased=leased,
                    memory_mb=memory_mb,
                    emulated=emulated,
                )
            )
        return rows

    def user_gpus(self, user: str) -> int:
        return sum(lease.count for lease in self.leases.values() if lease.user == user and lease.state == GRANTED)

    # --- internals: the policy -----------------------------------------------------------

    def _matching_types(self, choices: Iterable[GpuChoice]) -> frozenset[str]:
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
        offered = ", ".join(self.types) or "none"
        problems = []
        for choice in choices:
            types = self._offered_for(choice.gpu_type)
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
        # The per-node histogram of usable GPUs is as long as the largest node's count, plus one.
        return len(self._nodes_with[gpu_type]) - 1

    def _schedule(self) -> None:
        """Place queued leases in order, then top up the warm kernels.

        First come, first served per type: a lease that cannot be placed blocks the types it
        wants for everyone behind it. A lease that wants only blocked types (or waits for its
        starting kernel) can change nothing, so the walk visits, per set of wanted types, only
        the leases up to the first one that blocks them: the same decisions as a walk of the
        whole queue, without its cost when the queue is long.
        """
        blocked: set[str] = set()
        heads = [(places[0], wanted) for wanted, places in self._waiting.items() if places]
        heapq.heapify(heads)
        everything = len(self.types)
        while heads and len(blocked) < everything:
            place, wanted = heapq.heappop(heads)
            if wanted <= blocked:
                continue  # this lease and every later one that wants these types: no-ops
            lease = self.leases[self._at_place[place]]
            cap = self.policy.max_gpus_per_user
            room = cap - self.user_gpus(lease.user) - self._user_pending(lease.user) if cap else None
            if room is not None and min(c.count for c in lease.choices) > room:
                pass  # waits for its own user's leases, without holding up anyone else
            elif not self._place(lease, room, wanted - blocked):
                # A fallback may still take a type nobody ahead waits for ("h100|a100"
                # takes the a100 that frees while an earlier lease waits for the h100).
                blocked |= wanted
            places = self._waiting.get(wanted, [])
            index = bisect.bisect_right(places, place)
            if index < len(places):
                heapq.heappush(heads, (places[index], wanted))
        self._top_up_warm(blocked)

    def _user_pending(self, user: str) -> int:
        return sum(
            lease.count
            for lease in self.leases.values()
            if lease.user == user and lease.state == QUEUED and lease.slot_id is not None
        )

    def _place(self, lease: Lease, room: int | None, allowed: AbstractSet[str]) -> bool:
        """Place the first choice that fits, on the ``allowed`` types only.

        ``room`` is what the user's cap still allows (None: no cap).
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
            warm = self._first_spare(gpu_type, SlotState.WARM)
            if warm is not None:
                self._assign(lease, warm, 1)
                self._grant(lease, warm)
                return True
        for gpu_type in types:
            starting = self._first_spare(gpu_type, SlotState.STARTING)
            if starting is not None:
                self._assign(lease, starting, 1)
                return True
        for gpu_type in types:
            free = self._free_devices(gpu_type, 1)
            if free and gpu_type not in self._backoff_until:
                slot = self._new_slot(gpu_type, [free[0]])
                self._assign(lease, slot, 1)
                return True
        return False

    def _place_multi(self, lease: Lease, gpu_type: str, count: int) -> bool:
        """All GPUs on one node: unbound ones first, then those of spare kernels, preempted."""
        if gpu_type in self._backoff_until or not any(self._nodes_with[gpu_type][count:]):
            return False
        # The node whose first usable GPU comes first in the inventory, among those with enough
        # (nodes are listed by their first GPU, so none after the best so far can beat it).
        best: tuple[str, str] | None = None
        best_position = -1
        for node in self._nodes_of[gpu_type]:
            keys = self._node_devices[node]
            if best is not None and self._position[keys[0]] > best_position:
                break
            if self._usable[node] < count:
                continue
            position = next(self._position[key] for key in keys if self._can_take(key))
            if best is None or position < best_position:
                best, best_position = node, position
        if best is None:
            return False
        usable = [self.devices[key] for key in self._node_devices[best] if self._can_take(key)]
        # Prefer unbound GPUs; preempt warm kernels only for what is missing.
        usable.sort(key=lambda d: d.key in self._bound)
        chosen = usable[:count]
        displaced = {self._bound[d.key] for d in chosen if d.key in self._bound}
        for slot_id in displaced:
            old = self.slots[slot_id]
            for key in old.devices:
                self._unbind(key)
            old.devices = ()
            old.state = SlotState.DRAINING
            self._touch(old)
            self._actions.append(KillKernel(slot_id))
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
        )
        self.slots[slot.id] = slot
        self._slot_number[slot.id] = self._slots_created
        self._slots_created += 1
        self._preemptible[slot.id] = True  # no lease, not draining: what _touch would say
        for device in devices:
            self._bind(device.key, slot.id)
        for other in slot.waiting_for:
            self._waiters.setdefault(other, []).append(slot.id)
        self._touch(slot)
        self._request_start(slot)
        return slot

    def _request_start(self, slot: Slot) -> None:
        if slot.waiting_for or slot.start_requested:
            return
        slot.start_requested = True
        self._actions.append(StartKernel(slot.id, slot.gpu_type, self._indices(slot), slot.node))

    def _assign(self, lease: Lease, slot: Slot, count: int) -> None:
        slot.lease_id = lease.id
        lease.slot_id = slot.id
        lease.gpu_type = slot.gpu_type
        lease.count = count
        lease.gpu_indices = self._indices(slot)
        self._touch(slot)
        self._stop_waiting(lease)

    def _indices(self, slot: Slot) -> tuple[int, ...]:
        """The slot's GPU indices (what CUDA_VISIBLE_DEVICES lists); CPU slots have none."""
        return tuple(i for i in (self.devices[k].index for k in slot.devices) if i is not None)

    def _grant(self, lease: Lease, slot: Slot) -> None:
        now = self.clock()
        slot.state = SlotState.LEASED
        self._touch(slot)
        lease.state = GRANTED
        lease.granted_at = now
        lease.last_activity = now
        self._dequeue(lease)
        if self.policy.max_lease_duration:
            heapq.heappush(self._deadlines, (now + self.policy.max_lease_duration, _MAX, lease.id))
        self._arm_idle(lease)
        log.info("lease %s granted to %s: %s on %s", lease.id, lease.user, lease.gpu_type, lease.gpu_indices)
        self._actions.append(LeaseGranted(lease))

    def _end(self, lease: Lease, reason: str) -> None:
        lease.state = RELEASED
        lease.reason = reason
        lease.released_at = self.clock()
        lease.busy = False
        self.leases.pop(lease.id, None)
        self._request_order.pop(lease.id, None)
        self._idle_armed.discard(lease.id)  # its heap entries are dropped when they come due
        self._dequeue(lease)
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
            self._touch(slot)
        if lease.granted_at is None:
            lease.count = 0  # never held a GPU: nothing to meter
        log.info("lease %s of %s ended: %s", lease.id, lease.user, reason)
        self._actions.append(LeaseEnded(lease))

    def _forget_slot(self, slot: Slot, requeue: bool) -> None:
        for key in slot.devices:
            if self._bound.get(key) == slot.id:
                self._unbind(key)
        self.slots.pop(slot.id, None)
        self._untrack(slot)
        waiters = sorted(self._waiters.pop(slot.id, ()), key=lambda sid: self._slot_number.get(sid, -1))
        for other_id in waiters:
            other = self.slots.get(other_id)
            if other is None or slot.id not in other.waiting_for:
                continue
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
            if lease.id in self._place_of:
                self._start_waiting(lease)
            else:
                self._enqueue(lease, front=True)

    def _top_up_warm(self, blocked: set[str]) -> None:
        for gpu_type in self.types:
            if gpu_type in blocked or gpu_type in self._backoff_until:
                continue
            spare = self._spare_count.get((gpu_type, SlotState.WARM), 0) + self._spare_count.get(
                (gpu_type, SlotState.STARTING), 0
            )
            missing = self.policy.min_warm - spare
            if missing > 0:
                for device in self._free_devices(gpu_type, missing):
                    self._new_slot(gpu_type, [device])

    # --- internals: the indexes ----------------------------------------------------------

    def _enqueue(self, lease: Lease, front: bool) -> None:
        if front:
            place, self._front_place = self._front_place, self._front_place - 1
            self._queue.insert(0, place)
        else:
            place, self._next_place = self._next_place, self._next_place + 1
            self._queue.append(place)
        self._place_of[lease.id] = place
        self._at_place[place] = lease.id
        if lease.slot_id is None:
            self._start_waiting(lease)

    def _dequeue(self, lease: Lease) -> None:
        place = self._place_of.pop(lease.id, None)
        if place is None:
            return
        del self._at_place[place]
        _remove_sorted(self._queue, place)
        self._stop_waiting(lease, place)

    def _start_waiting(self, lease: Lease) -> None:
        """A queued lease without a slot: the scheduler looks at it."""
        places = self._waiting.setdefault(self._matching_types(lease.choices), [])
        place = self._place_of[lease.id]
        index = bisect.bisect_left(places, place)
        if index == len(places) or places[index] != place:
            places.insert(index, place)

    def _stop_waiting(self, lease: Lease, place: int | None = None) -> None:
        place = self._place_of.get(lease.id) if place is None else place
        if place is not None:
            places = self._waiting.get(self._matching_types(lease.choices))
            if places:
                _remove_sorted(places, place)

    def _free_devices(self, gpu_type: str, limit: int) -> list[Device]:
        """The first ``limit`` healthy, unbound devices of the type, in inventory order."""
        return [self.devices[self._key_at[p]] for p in self._free.get(gpu_type, [])[:limit]]

    def _bind(self, key: str, slot_id: str) -> None:
        self._bound[key] = slot_id
        device = self.devices[key]
        _remove_sorted(self._free[device.gpu_type], self._position[key])
        if not self._preemptible[slot_id]:
            self._add_usable(device, -1)

    def _unbind(self, key: str) -> None:
        slot_id = self._bound.pop(key)
        device = self.devices[key]
        if device.healthy:
            bisect.insort(self._free[device.gpu_type], self._position[key])
            if not self._preemptible.get(slot_id, True):
                self._add_usable(device, 1)

    def _add_usable(self, device: Device, step: int) -> None:
        node = (device.gpu_type, device.node)
        histogram = self._nodes_with[device.gpu_type]
        histogram[self._usable[node]] -= 1
        self._usable[node] += step
        histogram[self._usable[node]] += 1

    def _can_take(self, key: str) -> bool:
        """What a multi-GPU lease may use: an unbound GPU, or one held by a spare kernel."""
        holder = self._bound.get(key)
        return holder is None or self._preemptible.get(holder, True)

    def _touch(self, slot: Slot) -> None:
        """Re-file a slot whose state, lease or devices changed."""
        preemptible = slot.lease_id is None and slot.state != SlotState.DRAINING
        if preemptible != self._preemptible.get(slot.id):
            step = 1 if preemptible else -1
            for key in slot.devices:
                if self._bound.get(key) == slot.id:
                    self._add_usable(self.devices[key], step)
            self._preemptible[slot.id] = preemptible
        spare = (
            (slot.gpu_type, slot.state)
            if slot.lease_id is None and len(slot.devices) == 1 and slot.state in (SlotState.WARM, SlotState.STARTING)
            else None
        )
        current = self._spare_of.get(slot.id)
        if spare == current:
            return
        if current is not None:
            self._spare_count[current] -= 1
            del self._spare_of[slot.id]
        if spare is not None:
            self._spare_count[spare] = self._spare_count.get(spare, 0) + 1
            self._spare_of[slot.id] = spare
            heapq.heappush(self._spares.setdefault(spare, []), (self._slot_number[slot.id], slot.id))

    def _untrack(self, slot: Slot) -> None:
        current = self._spare_of.pop(slot.id, None)
        if current is not None:
            self._spare_count[current] -= 1
        self._preemptible.pop(slot.id, None)
        self._slot_number.pop(slot.id, None)

    def _first_spare(self, gpu_type: str, state: SlotState) -> Slot | None:
        """The oldest unleased single-GPU slot of the type in that state."""
        key = (gpu_type, state)
        heap = self._spares.get(key)
        while heap:
            number, slot_id = heap[0]
            if self._spare_of.get(slot_id) == key and self._slot_number.get(slot_id) == number:
                return self.slots[slot_id]
            heapq.heappop(heap)  # no longer a spare of this kind (or filed again later)
        return None


def _remove_sorted(values: list[int], value: int) -> None:
    index = bisect.bisect_left(values, value)
    if index < len(values) and values[index] == value:
        del values[index]
