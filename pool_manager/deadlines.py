"""When granted leases end by themselves: idle timeouts and the maximum duration.

All times are on the core's monotonic clock. One :class:`.lease_heap.LeaseHeap` of a lease's
maximum duration and its idle deadline; an idle entry that comes due early is moved to the
lease's deadline of that moment.
"""

from __future__ import annotations

from collections.abc import Mapping

from jupyter_gpu.protocol import GRANTED, REASON_IDLE, REASON_MAX_DURATION

from .lease_heap import LeaseHeap
from .model import Lease

#: kinds of heap entries: a lease's maximum duration, or its idle timeout
_MAX, _IDLE = 0, 1


class Deadlines:
    def __init__(self, max_lease_duration: float) -> None:
        #: 0 means leases have no maximum duration
        self.max_lease_duration = max_lease_duration
        self._heap = LeaseHeap()

    def granted(self, lease: Lease) -> None:
        assert lease.granted_mono is not None
        if self.max_lease_duration:
            self._heap.arm(lease.granted_mono + self.max_lease_duration, _MAX, lease.id)
        self.arm_idle(lease)

    def arm_idle(self, lease: Lease) -> None:
        """Make sure the lease's idle deadline is in the heap (one entry per lease is enough)."""
        self._heap.arm(lease.active_mono + lease.idle_timeout, _IDLE, lease.id)

    def forget(self, lease_id: str) -> None:
        for kind in (_MAX, _IDLE):
            self._heap.disarm(kind, lease_id)  # its heap entries are dropped when they come due

    def expired(self, lease: Lease, now: float) -> str | None:
        """Why the lease ends at ``now``, or None."""
        assert lease.granted_mono is not None
        if self.max_lease_duration and now - lease.granted_mono >= self.max_lease_duration:
            return REASON_MAX_DURATION
        if not lease.busy and now - lease.active_mono >= lease.idle_timeout:
            return REASON_IDLE
        return None

    def due(self, now: float, leases: Mapping[str, Lease]) -> list[Lease]:
        """The leases whose deadline passed at ``now`` (in no particular order)."""
        due: dict[str, Lease] = {}

        def check(when: float, kind: int, lease_id: str) -> float | None:
            lease = _granted(leases, lease_id)
            if lease is not None and self.expired(lease, now) is not None:
                due[lease.id] = lease
                return None
            # a maximum duration within the slack but not yet due is looked at again next tick
            return _standing(when, kind, lease)

        self._heap.pop_due(now, check)
        return list(due.values())

    def next(self, leases: Mapping[str, Lease]) -> float | None:
        """The earliest deadline still standing."""
        return self._heap.next(lambda when, kind, lease_id: _standing(when, kind, _granted(leases, lease_id)))


def _granted(leases: Mapping[str, Lease], lease_id: str) -> Lease | None:
    lease = leases.get(lease_id)
    return lease if lease is not None and lease.state == GRANTED and lease.granted_mono is not None else None


def _standing(when: float, kind: int, lease: Lease | None) -> float | None:
    """When an entry of a lease that has not expired is due now: None for a lease gone or busy
    (an idle deadline is re-armed when its kernel goes idle)."""
    if lease is None:
        return None
    if kind == _MAX:
        return when
    return None if lease.busy else lease.active_mono + lease.idle_timeout
