"""What a replay means for an operator: GPU-hours, waits, lost state and money."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .driver import Outcome
from .prices import Price, price_for
from .workload import Workload


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(outcome: Outcome, workload: Workload, prices: dict[str, Price]) -> dict[str, Any]:
    waits = outcome.all_waits()
    held = sum(outcome.held_s.values()) / 3600
    busy = sum(outcome.busy_s.values()) / 3600
    pool_gpus = sum(outcome.pool.values())
    opened = min((s.start for s in workload.sessions), default=outcome.start)
    hours = max(0.0, (outcome.held_steps[-1][0] if outcome.held_steps else opened) - opened) / 3600
    cost_held = _cost({t: s / 3600 for t, s in outcome.held_s.items()}, prices)
    cost_pool = _cost({t: n * hours for t, n in outcome.pool.items()}, prices)
    return {
        "policy": outcome.policy.name,
        "pool": dict(outcome.pool),
        "pool_gpus": pool_gpus,
        "gpus_per_user": pool_gpus / workload.users if workload.users else None,
        "cells": len(waits),
        "gpu_hours_held": held,
        "gpu_hours_busy": busy,
        "held_busy_ratio": held / busy if busy else None,
        "wait_p50_s": percentile(waits, 0.50),
        "wait_p99_s": percentile(waits, 0.99),
        "wait_max_s": max(waits, default=0.0),
        "lost_state_releases": outcome.lost_state,
        "peak_gpus_held": max((held_now for _, held_now in outcome.held_steps), default=0),
        "hours_simulated": hours,
        "cost_held_usd": cost_held,
        "cost_pool_usd": cost_pool,
        "core_calls": outcome.core_calls,
        "finished": outcome.finished,
        "wall_s": outcome.wall_s,
    }


def _cost(hours_by_type: dict[str, float], prices: dict[str, Price]) -> float | None:
    """None when a type has no price: a partial sum would look like a whole one."""
    total = 0.0
    for gpu_type, hours in hours_by_type.items():
        price = price_for(prices, gpu_type)
        if price is None:
            return None
        total += hours * price.usd_per_gpu_hour
    return total
