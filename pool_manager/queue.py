"""The lease queue: who is first in line, and per set of wanted types who still waits.

Every queued lease has a place (a number; lower is earlier). A lease asks for a set of
offered types (``wanted``, what its choices match); the queue keeps, per wanted set, the
places of all its queued leases (for queue positions and the per-type counts) and of those
still waiting for a slot (what the scheduler walks). A failed start puts its lease back in
front of everyone.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator

from .sorted_list import remove_sorted

Wanted = frozenset[str]


class LeaseQueue:
    def __init__(self) -> None:
        self._place_of: dict[str, int] = {}  # lease id -> place
        self._at_place: dict[int, str] = {}  # place -> lease id
        self._wanted_of: dict[str, Wanted] = {}  # lease id -> the types it matches
        # wanted -> sorted places; the whole queue in order is their merge (asked for rarely,
        # while one sorted list of every place would cost a move of its tail per grant)
        self._queued: dict[Wanted, list[int]] = {}
        self._waiting: dict[Wanted, list[int]] = {}  # wanted -> sorted places of those without a slot
        self._next_place = 0
        self._front_place = -1

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._place_of

    def __len__(self) -> int:
        return len(self._place_of)

    def ids(self) -> list[str]:
        """Queued lease ids, first in line first."""
        return [self._at_place[place] for place in heapq.merge(*self._queued.values())]

    def enqueue(self, lease_id: str, wanted: Wanted, front: bool, waiting: bool) -> None:
        if front:
            place, self._front_place = self._front_place, self._front_place - 1
        else:
            place, self._next_place = self._next_place, self._next_place + 1
        self._place_of[lease_id] = place
        self._at_place[place] = lease_id
        self._wanted_of[lease_id] = wanted
        bisect.insort(self._queued.setdefault(wanted, []), place)
        if waiting:
            self.start_waiting(lease_id)

    def dequeue(self, lease_id: str) -> None:
        place = self._place_of.pop(lease_id, None)
        if place is None:
            return
        wanted = self._wanted_of.pop(lease_id)
        del self._at_place[place]
        remove_sorted(self._queued[wanted], place)
        remove_sorted(self._waiting.get(wanted, []), place)

    def start_waiting(self, lease_id: str) -> None:
        """A queued lease without a slot: the scheduler looks at it."""
        place = self._place_of[lease_id]
        places = self._waiting.setdefault(self._wanted_of[lease_id], [])
        index = bisect.bisect_left(places, place)
        if index == len(places) or places[index] != place:
            places.insert(index, place)

    def stop_waiting(self, lease_id: str) -> None:
        place = self._place_of.get(lease_id)
        if place is not None:
            remove_sorted(self._waiting.get(self._wanted_of[lease_id], []), place)

    def position(self, lease_id: str) -> int:
        """1-based place among queued leases that compete for the same types; 0 if not queued."""
        place = self._place_of.get(lease_id)
        if place is None:
            return 0
        wanted = self._wanted_of[lease_id]
        return 1 + sum(bisect.bisect_left(places, place) for other, places in self._queued.items() if wanted & other)

    def queued_per_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for wanted, places in self._queued.items():
            for gpu_type in wanted:
                counts[gpu_type] = counts.get(gpu_type, 0) + len(places)
        return counts

    def waiting(self) -> Iterator[tuple[Wanted, list[str]]]:
        """Per wanted set, the leases that have no slot yet, first in line first."""
        for wanted, places in self._waiting.items():
            if places:
                yield wanted, [self._at_place[place] for place in places]

    # --- the scheduler's walk -------------------------------------------------------------

    def heads(self) -> list[tuple[int, Wanted]]:
        """Per wanted set, the place of its first waiting lease."""
        return [(places[0], wanted) for wanted, places in self._waiting.items() if places]

    def lease_at(self, place: int) -> str:
        return self._at_place[place]

    def waiting_after(self, wanted: Wanted, place: int) -> int | None:
        """The next waiting place of the wanted set after ``place`` (one :meth:`heads` named)."""
        places = self._waiting[wanted]
        index = bisect.bisect_right(places, place)
        return places[index] if index < len(places) else None

    def rekey(self, wanted_of: Callable[[str], Wanted]) -> None:
        """The offered types changed: file every queued lease under what it matches now."""
        waiting = {self._at_place[place] for places in self._waiting.values() for place in places}
        order = list(heapq.merge(*self._queued.values()))
        self._queued.clear()
        self._waiting.clear()
        for place in order:
            lease_id = self._at_place[place]
            wanted = self._wanted_of[lease_id] = wanted_of(lease_id)
            self._queued.setdefault(wanted, []).append(place)
            if lease_id in waiting:
                self._waiting.setdefault(wanted, []).append(place)

