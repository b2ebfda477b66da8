"""When granted leases end by themselves: idle timeouts and the maximum duration.

All times are on the core's monotonic clock. One heap of (when, kind, lease id); entries are
checked against the lease when they come due rather than removed when a lease changes
(an idle entry that comes due early is moved to the lease's deadline of that moment), so
every lease event costs O(log n) however many leases there are.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from jupyter_gpu.protocol import GRANTED, REASON_IDLE, REASON_MAX_DURATION

from .model import Lease

#: kinds of heap entries: a lease's maximum duration, or its idle timeout
_MAX, _IDLE = 0, 1


class Deadlines:
    def __init__(self, max_lease_duration: float) -> None:
        #: 0 means leases have no maximum duration
        self.max_lease_duration = max_lease_duration
        self._heap: list[tuple[float, int, str]] = []
        self._idle_armed: set[str] = set()

    def granted(self, lease: Lease) -> None:
        assert lease.granted_mono is not None
        if self.max_lease_duration:
            heapq.heappush(self._heap, (lease.granted_mono + self.max_lease_duration, _MAX, lease.id))
        self.arm_idle(lease)

    def arm_idle(self, lease: Lease) -> None:
        """Make sure the lease's idle deadline is in the heap (one entry per lease is enough)."""
        if lease.id not in self._idle_armed:
            self._idle_armed.add(lease.id)
            heapq.heappush(self._heap, (lease.active_mono + lease.idle_timeout, _IDLE, lease.id))

    def forget(self, lease_id: str) -> None:
        self._idle_armed.discard(lease_id)  # its heap entries are dropped when they come due

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
        again: list[tuple[float, int, str]] = []
        # A little slack: `now - start >= timeout` can hold while `start + timeout` rounds above now.
        horizon = now + 1e-9 * max(1.0, abs(now))
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            _, kind, lease_id = entry
            lease = leases.get(lease_id)
            if lease is None or lease.state != GRANTED or lease.granted_mono is None:
                self._idle_armed.discard(lease_id)
                continue
            if self.expired(lease, now) is not None:
                due[lease.id] = lease
                if kind == _IDLE:
                    self._idle_armed.discard(lease_id)
            elif kind == _MAX:
                again.append(entry)  # within the slack, not yet due: look again next tick
            elif lease.busy:
                self._idle_armed.discard(lease_id)  # re-armed when the kernel goes idle
            else:
                deadline = lease.active_mono + lease.idle_timeout
                if deadline <= horizon:
                    again.append((deadline, _IDLE, lease_id))
                else:
                    heapq.heappush(heap, (deadline, _IDLE, lease_id))
        for entry in again:
            heapq.heappush(heap, entry)
        return list(due.values())

    def next(self, leases: Mapping[str, Lease]) -> float | None:
        """The earliest deadline still standing; entries that could change nothing are dropped
        (or moved, for an idle deadline pushed back by later activity) as :meth:`due` would."""
        heap = self._heap
        while heap:
            when, kind, lease_id = heap[0]
            lease = leases.get(lease_id)
            if lease is None or lease.state != GRANTED or lease.granted_mono is None:
                heapq.heappop(heap)
                self._idle_armed.discard(lease_id)
            elif kind == _IDLE and lease.busy:
                heapq.heappop(heap)
                self._idle_armed.discard(lease_id)  # re-armed when the kernel goes idle
            elif kind == _IDLE and lease.active_mono + lease.idle_timeout > when:
                heapq.heapreplace(heap, (lease.active_mono + lease.idle_timeout, _IDLE, lease_id))
            else:
                return when
        return None
