"""Sorted lists of ints as the indexes keep them (places in the queue, device positions)."""

from __future__ import annotations

import bisect


def remove_sorted(values: list[int], value: int) -> None:
    """Remove ``value`` from the sorted list if it is there."""
    index = bisect.bisect_left(values, value)
    if index < len(values) and values[index] == value:
        del values[index]


class SortedInts:
    """A sorted list of distinct ints kept in blocks of at most 2 * BLOCK: adding and removing
    move at most a block's worth, however long the list (a plain list moves everything after
    the place: 40,000 free GPUs of a type made every bind a 300 KB memmove)."""

    BLOCK = 256

    def __init__(self) -> None:
        self._blocks: list[list[int]] = []
        self._maxes: list[int] = []  # the last value of each block

    def add(self, value: int) -> None:
        if not self._blocks:
            self._blocks.append([value])
            self._maxes.append(value)
            return
        index = min(bisect.bisect_left(self._maxes, value), len(self._maxes) - 1)
        block = self._blocks[index]
        bisect.insort(block, value)
        self._maxes[index] = block[-1]
        if len(block) > 2 * self.BLOCK:
            self._blocks[index : index + 1] = [block[: self.BLOCK], block[self.BLOCK :]]
            self._maxes[index : index + 1] = [block[self.BLOCK - 1], block[-1]]

    def discard(self, value: int) -> None:
        index = bisect.bisect_left(self._maxes, value)
        if index == len(self._maxes):
            return
        block = self._blocks[index]
        remove_sorted(block, value)
        if not block:
            del self._blocks[index], self._maxes[index]
        else:
            self._maxes[index] = block[-1]

    def first(self, count: int) -> list[int]:
        """The ``count`` smallest values (fewer if there are fewer)."""
        out: list[int] = []
        for block in self._blocks:
            if len(out) >= count:
                break
            out.extend(block[: count - len(out)])
        return out

    def __len__(self) -> int:
        return sum(len(block) for block in self._blocks)
