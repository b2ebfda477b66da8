"""When a granted lease ends for GPU idleness, and when the notebook is warned before.

A lease is GPU-idle from the later of its kernel's last cell (``active_mono``) and the last
time its GPUs showed any utilization (``gpu_active_mono``; on emulated GPUs nothing reports
it, so the kernel's busy/idle status stands in alone), for as long as no cell runs. After
``timeout`` of that it is released; ``warning`` seconds before, the notebook gets a notice.

All times are on the core's monotonic clock. As in :mod:`.deadlines`, one heap entry per
lease, checked against the lease when it comes due (activity since moves it, a running cell
drops it until the kernel is idle again), so every event costs O(log n).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from jupyter_gpu.protocol import GRANTED

from .model import Lease


@dataclass(frozen=True)
class GpuIdleDue:
    """What is due for a lease now: its warning (``release`` is when it would end) or its end."""

    lease: Lease
    release_at: float
    warn: bool


class GpuIdleness:
    def __init__(self, timeout: float, warning: float) -> None:
        #: 0 means leases never end for GPU idleness
        self.timeout = timeout
        # A warning as long as the timeout would go out the moment every cell ends: half of it instead.
        self.warning = max(0.0, warning) if warning < timeout else timeout / 2
        self._heap: list[tuple[float, str]] = []
        self._armed: set[str] = set()
        #: lease id -> the idle start its warning was posted for (a later idle period warns again)
        self._warned: dict[str, float] = {}

    def arm(self, lease: Lease) -> None:
        """Make sure an idle (not busy) granted lease has its entry in the heap."""
        if self.timeout > 0 and not lease.busy and lease.id not in self._armed:
            self._armed.add(lease.id)
            heapq.heappush(self._heap, (self._next_time(lease), lease.id))

    def forget(self, lease_id: str) -> None:
        self._armed.discard(lease_id)  # its heap entry is dropped when it comes due
        self._warned.pop(lease_id, None)

    def due(self, now: float, leases: Mapping[str, Lease]) -> list[GpuIdleDue]:
        """Warnings and releases that came due at ``now``."""
        out: list[GpuIdleDue] = []
        heap = self._heap
        horizon = now + 1e-9 * max(1.0, abs(now))
        while heap and heap[0][0] <= horizon:
            _, lease_id = heapq.heappop(heap)
            lease = leases.get(lease_id)
            if lease is None or lease.state != GRANTED or lease.busy:
                self._armed.discard(lease_id)  # re-armed when its kernel is idle again
                continue
            since = _idle_since(lease)
            release_at = since + self.timeout
            if release_at <= horizon:
                self._armed.discard(lease_id)
                out.append(GpuIdleDue(lease, release_at, warn=False))
                continue
            if self.warning and self._warned.get(lease_id) != since and release_at - self.warning <= horizon:
                self._warned[lease_id] = since
                out.append(GpuIdleDue(lease, release_at, warn=True))
            heapq.heappush(heap, (self._next_time(lease), lease_id))
        return out

    def next(self, leases: Mapping[str, Lease]) -> float | None:
        """The earliest time a warning or release may come due (entries of leases gone or busy
        are dropped, as :meth:`due` would)."""
        heap = self._heap
        while heap:
            when, lease_id = heap[0]
            lease = leases.get(lease_id)
            if lease is None or lease.state != GRANTED or lease.busy:
                heapq.heappop(heap)
                self._armed.discard(lease_id)
            elif self._next_time(lease) > when:
                heapq.heapreplace(heap, (self._next_time(lease), lease_id))  # activity moved it on
            else:
                return when
        return None

    def _next_time(self, lease: Lease) -> float:
        since = _idle_since(lease)
        release_at = since + self.timeout
        if self.warning and self._warned.get(lease.id) != since:
            return release_at - self.warning
        return release_at


def _idle_since(lease: Lease) -> float:
    return max(lease.active_mono, lease.gpu_active_mono)
