"""The active leases (queued or granted) by what the API lists: per user, and granted ones
per type with when each GPU frees at the latest (for expected waits)."""

from __future__ import annotations

from .model import Lease


class LeaseIndex:
    def __init__(self, max_lease_duration: float) -> None:
        self.max_lease_duration = max_lease_duration
        self.active: dict[str, Lease] = {}
        self._order: dict[str, int] = {}  # lease id -> n-th request
        self._requests = 0
        self._of_user: dict[str, dict[str, Lease]] = {}  # in request order
        self._granted_of: dict[str, dict[str, Lease]] = {}  # type -> granted leases
        self._holder_changes = 0  # grants, ends and activity: what expected waits depend on
        self._frees_memo: dict[frozenset[str], list[float]] = {}
        self._frees_memo_key: tuple[float, int] = (float("nan"), 0)

    def add(self, lease: Lease) -> None:
        self.active[lease.id] = lease
        self._order[lease.id] = self._requests
        self._requests += 1
        self._of_user.setdefault(lease.user, {})[lease.id] = lease

    def granted(self, lease: Lease) -> None:
        assert lease.gpu_type is not None
        self._granted_of.setdefault(lease.gpu_type, {})[lease.id] = lease
        self._holder_changes += 1

    def activity(self) -> None:
        self._holder_changes += 1

    def remove(self, lease: Lease) -> None:
        self.active.pop(lease.id, None)
        self._order.pop(lease.id, None)
        mine = self._of_user.get(lease.user)
        if mine is not None:
            mine.pop(lease.id, None)
            if not mine:
                del self._of_user[lease.user]
        holders = self._granted_of.get(lease.gpu_type or "")
        if holders is not None and holders.pop(lease.id, None) is not None:
            self._holder_changes += 1

    def order(self, lease_id: str) -> int:
        return self._order[lease_id]

    def of_user(self, user: str) -> list[Lease]:
        return list(self._of_user.get(user, {}).values())

    def held_by(self, user: str) -> int:
        """GPUs the user holds now."""
        return sum(lease.count for lease in self._of_user.get(user, {}).values() if lease.granted_mono is not None)

    def starting_for(self, user: str) -> int:
        """GPUs of kernels starting for the user's queued leases (they count against a cap)."""
        return sum(
            lease.count
            for lease in self._of_user.get(user, {}).values()
            if lease.granted_mono is None and lease.slot_id is not None
        )

    def frees(self, wanted: frozenset[str], now: float) -> list[float]:
        """When each GPU of the wanted types frees at the latest, soonest first.

        Kept until a holder changes or the clock moves: a listing asks once per lease and
        the leases of one user mostly want the same types.
        """
        if self._frees_memo_key != (now, self._holder_changes):
            self._frees_memo.clear()
            self._frees_memo_key = (now, self._holder_changes)
        frees = self._frees_memo.get(wanted)
        if frees is None:
            frees = []
            for other in (lease for gpu_type in wanted for lease in self._granted_of.get(gpu_type, {}).values()):
                assert other.granted_mono is not None
                end = (now if other.busy else other.active_mono) + other.idle_timeout
                if self.max_lease_duration:
                    end = min(end, other.granted_mono + self.max_lease_duration)
                frees.extend([max(now, end)] * other.count)
            frees.sort()
            self._frees_memo[wanted] = frees
        return frees
