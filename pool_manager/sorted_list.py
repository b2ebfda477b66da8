"""Sorted lists of ints as the indexes keep them (places in the queue, device positions)."""

from __future__ import annotations

import bisect


def remove_sorted(values: list[int], value: int) -> None:
    """Remove ``value`` from the sorted list if it is there."""
    index = bisect.bisect_left(values, value)
    if index < len(values) and values[index] == value:
        del values[index]
