"""When a granted lease ends for GPU idleness, and when the notebook is warned before.

A lease is GPU-idle from the later of its kernel's last cell (``active_mono``) and the last
time its GPUs showed any utilization (``gpu_active_mono``; on emulated GPUs nothing reports
it, so the kernel's busy/idle status stands in alone), for as long as no cell runs. After
``timeout`` of that it is released; ``warning`` seconds before, the notebook gets a notice.

All times are on the core's monotonic clock. As in :mod:`.deadlines`, one
:class:`.lease_heap.LeaseHeap` entry per lease (activity since moves it, a running cell drops
it until the kernel is idle again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jupyter_gpu.protocol import GRANTED

from .lease_heap import LeaseHeap, horizon
from .model import Lease

_IDLE = 0  # the one kind of entry here


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
        self._heap = LeaseHeap()
        #: lease id -> the idle start its warning was posted for (a later idle period warns again)
        self._warned: dict[str, float] = {}

    def arm(self, lease: Lease) -> None:
        """Make sure an idle (not busy) granted lease has its entry in the heap."""
        if self.timeout > 0 and not lease.busy and not self._heap.armed(_IDLE, lease.id):
            self._heap.arm(self._next_time(lease), _IDLE, lease.id)

    def forget(self, lease_id: str) -> None:
        self._heap.disarm(_IDLE, lease_id)  # its heap entry is dropped when it comes due
        self._warned.pop(lease_id, None)

    def due(self, now: float, leases: Mapping[str, Lease]) -> list[GpuIdleDue]:
        """Warnings and releases that came due at ``now``."""
        out: list[GpuIdleDue] = []
        until = horizon(now)

        def check(when: float, kind: int, lease_id: str) -> float | None:
            lease = _idle(leases, lease_id)
            if lease is None:
                return None  # re-armed when its kernel is idle again
            since = _idle_since(lease)
            release_at = since + self.timeout
            if release_at <= until:
                out.append(GpuIdleDue(lease, release_at, warn=False))
                return None
            if self.warning and self._warned.get(lease_id) != since and release_at - self.warning <= until:
                self._warned[lease_id] = since
                out.append(GpuIdleDue(lease, release_at, warn=True))
            return self._next_time(lease)

        self._heap.pop_due(now, check)
        return out

    def next(self, leases: Mapping[str, Lease]) -> float | None:
        """The earliest time a warning or release may come due (entries of leases gone or busy
        are dropped, activity since moves an entry on)."""
        def check(when: float, kind: int, lease_id: str) -> float | None:
            lease = _idle(leases, lease_id)
            return None if lease is None else self._next_time(lease)

        return self._heap.next(check)

    def _next_time(self, lease: Lease) -> float:
        since = _idle_since(lease)
        release_at = since + self.timeout
        if self.warning and self._warned.get(lease.id) != since:
            return release_at - self.warning
        return release_at


def _idle(leases: Mapping[str, Lease], lease_id: str) -> Lease | None:
    """The lease, if it is granted and its kernel idle."""
    lease = leases.get(lease_id)
    return lease if lease is not None and lease.state == GRANTED and not lease.busy else None


def _idle_since(lease: Lease) -> float:
    return max(lease.active_mono, lease.gpu_active_mono)
