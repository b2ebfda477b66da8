"""The pool's kernels by what the scheduler and the listings ask of them.

Per (type, warm or starting) the single-GPU spare kernels (no lease) as heaps of (creation
number, slot id), checked lazily against what each slot is filed as now; and per type the
GPUs leased or draining and the warm spares, for the summaries. Keys are (type, is warm)
rather than (type, state): a tuple of str and bool hashes in C, one with an enum does not,
and the scheduler asks these on every event.
"""

from __future__ import annotations

import heapq

from .model import Slot, SlotState

# Enum members read through their class cost ~0.3 us each (an EnumType attribute lookup);
# the hot paths below read them from module constants instead.
_STARTING, _WARM, _DRAINING = SlotState.STARTING, SlotState.WARM, SlotState.DRAINING

SpareKind = tuple[str, bool]  # (GPU type, warm: else starting)


class SlotIndex:
    def __init__(self) -> None:
        self._number: dict[str, int] = {}  # slot id -> creation number (older first)
        self._created = 0
        self._spare_of: dict[str, SpareKind] = {}
        self._spares: dict[SpareKind, list[tuple[int, str]]] = {}
        #: type -> single-GPU kernels of the type without a lease, warm or starting
        self.spare_total: dict[str, int] = {}
        self._counted: dict[str, tuple[int, int]] = {}  # slot id -> (GPUs leased, warm spare) counted
        self.leased_gpus: dict[str, int] = {}
        self.warm: dict[str, int] = {}

    def add(self, slot: Slot) -> None:
        self._number[slot.id] = self._created
        self._created += 1

    def number(self, slot_id: str) -> int:
        return self._number.get(slot_id, -1)

    def touch(self, slot: Slot) -> None:
        """Re-file a slot whose state, lease or devices changed."""
        taken = slot.lease_id is not None or slot.state == _DRAINING
        counted = (len(slot.devices) if taken else 0, 1 if not taken and slot.state == _WARM else 0)
        before = self._counted.get(slot.id, (0, 0))
        if counted != before:
            self._count(slot.gpu_type, counted[0] - before[0], counted[1] - before[1])
            self._counted[slot.id] = counted
        state = slot.state
        spare = (
            (slot.gpu_type, state is _WARM)
            if not taken and len(slot.devices) == 1 and (state is _WARM or state is _STARTING)
            else None
        )
        current = self._spare_of.get(slot.id)
        if spare == current:
            return
        if current is not None:
            self.spare_total[current[0]] -= 1
            del self._spare_of[slot.id]
        if spare is not None:
            self.spare_total[spare[0]] = self.spare_total.get(spare[0], 0) + 1
            self._spare_of[slot.id] = spare
            heapq.heappush(self._spares.setdefault(spare, []), (self._number[slot.id], slot.id))

    def forget(self, slot: Slot) -> None:
        leased, warm = self._counted.pop(slot.id, (0, 0))
        if leased or warm:
            self._count(slot.gpu_type, -leased, -warm)
        current = self._spare_of.pop(slot.id, None)
        if current is not None:
            self.spare_total[current[0]] -= 1
        self._number.pop(slot.id, None)

    def first_spare(self, gpu_type: str, state: SlotState) -> str | None:
        """The oldest unleased single-GPU slot of the type in that state."""
        key = (gpu_type, state is _WARM)
        heap = self._spares.get(key)
        while heap:
            number, slot_id = heap[0]
            if self._spare_of.get(slot_id) == key and self._number.get(slot_id) == number:
                return slot_id
            heapq.heappop(heap)  # no longer a spare of this kind (or filed again later)
        return None

    def _count(self, gpu_type: str, leased: int, warm: int) -> None:
        self.leased_gpus[gpu_type] = self.leased_gpus.get(gpu_type, 0) + leased
        self.warm[gpu_type] = self.warm.get(gpu_type, 0) + warm
