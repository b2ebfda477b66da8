"""The placement index's two structures against the plain answers they stand for."""

from __future__ import annotations

import random

from pool_manager.first_fit import FirstFit
from pool_manager.sorted_list import SortedInts


def test_sorted_ints_keep_the_order_a_sorted_list_would_through_adds_and_removals() -> None:
    rng = random.Random(5)
    blocked, plain = SortedInts(), set()
    for _ in range(20_000):  # enough to split blocks and empty some again
        value = rng.randrange(3_000)
        if rng.random() < 0.55:
            if value not in plain:
                blocked.add(value)
                plain.add(value)
        else:
            blocked.discard(value)
            plain.discard(value)
        if rng.random() < 0.01:
            assert blocked.first(40) == sorted(plain)[:40]
    assert blocked.first(len(plain) + 5) == sorted(plain) and len(blocked) == len(plain)
    blocked.discard(10**6)  # absent: nothing happens
    assert len(blocked) == len(plain)


def test_first_fit_finds_the_first_counter_with_room_as_a_scan_would() -> None:
    rng = random.Random(7)
    values = [rng.randrange(9) for _ in range(1_000)]
    room = FirstFit(values)
    for _ in range(5_000):
        index, value = rng.randrange(len(values)), rng.randrange(9)
        values[index] = value
        room.set(index, value)
        wanted = rng.randrange(1, 10)
        assert room.first_at_least(wanted) == next((i for i, v in enumerate(values) if v >= wanted), None)
    assert FirstFit([]).first_at_least(1) is None


def test_first_fit_stays_right_when_counters_move_one_at_a_time() -> None:
    # The placement index moves a node's room by one GPU per bind or unbind: the updates that
    # stop climbing early (the maximum above did not change) are the common ones there.
    rng = random.Random(11)
    values = [8] * 37 + [0] * 30  # a size that is no power of two
    room = FirstFit(values)
    for _ in range(20_000):
        index = rng.randrange(len(values))
        step = rng.choice((-1, 1))
        if 0 <= values[index] + step <= 8:
            values[index] += step
            room.set(index, values[index])
        for wanted in range(1, 10):
            assert room.first_at_least(wanted) == next((i for i, v in enumerate(values) if v >= wanted), None)
