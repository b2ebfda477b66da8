"""``--pool auto``: the smallest pool per GPU type whose p99 wait meets a target.

The workloads name one GPU type per cell, so each type's waits depend on its own pool
only and all types are searched together, one replay per step. Each step is a full replay
through the core. The search bisects between the largest single request (a smaller pool
could never place it) and a pool where nobody queues, so it assumes, as queues do, that
more GPUs never make the p99 wait worse.

Some waits no pool size removes: kernel starts the core cannot avoid (it keeps only
1-GPU kernels warm, so a multi-GPU lease always starts its kernel) and per-cell restores.
When doubling the pool no longer lowers a type's p99, that p99 is the floor: the type is
reported unreachable and sized for the floor instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .driver import Outcome, Timing, simulate
from .metrics import percentile
from .policies import Policy
from .workload import Workload

QUANTILE = 0.99
#: how many times the first upper bound may double while that still lowers the p99 wait
MAX_DOUBLINGS = 3


@dataclass
class Sizing:
    outcome: Outcome
    #: per type whose target no pool met: the lowest p99 wait any pool gave (what it was sized for)
    floors: dict[str, float]
    replays: int


def smallest_pool(workload: Workload, policy: Policy, target_wait_s: float, timing: Timing | None = None,
                  warm: int | None = None, gpus_per_node: int = 8) -> Sizing:
    types = sorted(workload.gpu_types())
    low = {t: max(1, workload.largest_request(t)) for t in types}
    high = {t: max(low[t], _peak_sessions(workload, t) + low[t]) for t in types}
    replays = 0

    def run(pool: dict[str, int]) -> Outcome:
        nonlocal replays
        replays += 1
        return simulate(workload, policy, pool, timing, warm, gpus_per_node)

    def p99(outcome: Outcome, gpu_type: str) -> float:
        return percentile(outcome.waits.get(gpu_type, []), QUANTILE)

    outcome = run(high)
    best = {t: p99(outcome, t) for t in types}
    floors: dict[str, float] = {}
    for _ in range(MAX_DOUBLINGS):
        missing = [t for t in types if t not in floors and best[t] > target_wait_s]
        if not missing:
            break
        trial = {t: high[t] * 2 if t in missing else high[t] for t in types}
        result = run(trial)
        for t in missing:
            if p99(result, t) < best[t]:
                low[t], high[t], best[t] = high[t] + 1, trial[t], p99(result, t)
            else:
                floors[t] = best[t]
    for t in types:
        if t not in floors and best[t] > target_wait_s:
            floors[t] = best[t]
    goal = {t: floors.get(t, target_wait_s) for t in types}

    last = outcome
    while any(low[t] < high[t] for t in types):
        trial = {t: (low[t] + high[t]) // 2 for t in types}
        last = run(trial)
        for t in types:
            if low[t] < high[t]:
                if p99(last, t) <= goal[t]:
                    high[t] = trial[t]
                else:
                    low[t] = trial[t] + 1
    final = last if last.pool == high else run(high)
    return Sizing(final, floors, replays)


def _peak_sessions(workload: Workload, gpu_type: str) -> int:
    """The most GPUs of the type that open sessions could want at once (each its largest cell)."""
    changes: Counter[float] = Counter()
    for session in workload.sessions:
        want = max((c.count for cell in session.cells for c in cell.choices if c.gpu_type == gpu_type), default=0)
        if want:
            changes[session.start] += want
            changes[session.end] -= want
    level = peak = 0
    for when in sorted(changes):
        level += changes[when]
        peak = max(peak, level)
    return peak
