"""One heap of lease deadlines, checked against the lease when they come due.

Entries are (when, kind, lease id), at most one armed per kind and lease. A lease's activity
does not touch the heap: an entry is checked when it comes due (or reaches the top) and then
dropped, moved to the lease's time of that moment, or acted on, so every lease event costs
O(log n) however many leases there are. :mod:`.deadlines` (idle timeouts, maximum duration)
and :mod:`.gpu_idleness` (GPU-idle warning and release) say what an entry's time is now.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

#: ``(when, kind, lease id) -> the entry's time now``: None drops it (and disarms it)
Check = Callable[[float, int, str], float | None]


def horizon(now: float) -> float:
    """``now`` with a little slack: ``now - start >= timeout`` can hold while ``start + timeout``
    rounds above ``now``."""
    return now + 1e-9 * max(1.0, abs(now))


class LeaseHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._armed: set[tuple[int, str]] = set()

    def arm(self, when: float, kind: int, lease_id: str) -> None:
        """Put the lease's entry of this kind in the heap unless one is there already."""
        if (kind, lease_id) not in self._armed:
            self._armed.add((kind, lease_id))
            heapq.heappush(self._heap, (when, kind, lease_id))

    def armed(self, kind: int, lease_id: str) -> bool:
        return (kind, lease_id) in self._armed

    def disarm(self, kind: int, lease_id: str) -> None:
        """The entry no longer counts (it is dropped from the heap when it comes due)."""
        self._armed.discard((kind, lease_id))

    def pop_due(self, now: float, check: Check) -> None:
        """Hand each entry due at ``now`` to ``check`` (which acts on it): a time it returns keeps
        the entry armed until then (pushed after this pass, so one still due waits for the next
        pass), None drops it."""
        later: list[tuple[float, int, str]] = []
        heap, until = self._heap, horizon(now)
        while heap and heap[0][0] <= until:
            when, kind, lease_id = heapq.heappop(heap)
            again = check(when, kind, lease_id)
            if again is None:
                self._armed.discard((kind, lease_id))
            else:
                later.append((again, kind, lease_id))
        for entry in later:
            heapq.heappush(heap, entry)

    def next(self, check: Check) -> float | None:
        """The earliest entry still standing: on the way, entries ``check`` drops are dropped and
        entries whose time moved on are moved, as :meth:`pop_due` would."""
        heap = self._heap
        while heap:
            when, kind, lease_id = heap[0]
            now_when = check(when, kind, lease_id)
            if now_when is None:
                heapq.heappop(heap)
                self._armed.discard((kind, lease_id))
            elif now_when > when:
                heapq.heapreplace(heap, (now_when, kind, lease_id))
            else:
                return when
        return None
