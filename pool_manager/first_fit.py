"""The first of a row of counters holding at least k: a max-tree over the row, so finding it
and changing one counter cost log(n) steps, where a scan costs n.

The placement index asks it for the first node (in joining order) with room for a
multi-GPU lease; with 100,000 GPUs a type has thousands of nodes, and in a busy pool the
first ones are the full ones.
"""

from __future__ import annotations


class FirstFit:
    def __init__(self, values: list[int]) -> None:
        self._size = 1
        while self._size < max(1, len(values)):
            self._size *= 2
        self._tree = [0] * (2 * self._size)
        self._tree[self._size : self._size + len(values)] = values
        for node in range(self._size - 1, 0, -1):
            self._tree[node] = max(self._tree[2 * node], self._tree[2 * node + 1])

    def set(self, index: int, value: int) -> None:
        tree = self._tree
        node = self._size + index
        tree[node] = value
        # Up the tree only while the maxima change: a node's room moves by one GPU at a time,
        # and most often the node above still holds the same maximum (a sibling has as much).
        while node > 1:
            larger = value if value >= tree[node ^ 1] else tree[node ^ 1]
            node >>= 1
            if tree[node] == larger:
                return
            tree[node] = value = larger

    def first_at_least(self, minimum: int) -> int | None:
        """The lowest index whose value is at least ``minimum``; None where none is."""
        if self._tree[1] < minimum:
            return None
        node = 1
        while node < self._size:
            node = 2 * node if self._tree[2 * node] >= minimum else 2 * node + 1
        return node - self._size
