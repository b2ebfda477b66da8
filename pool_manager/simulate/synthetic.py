"""A synthetic notebook workload for any number of users, seeded and reproducible.

The shapes come from the Adobe notebook sessions trace published with the NotebookOS paper
(Xiong et al., "NotebookOS: A Notebook Operating System for Interactive Training with
On-Demand GPUs", ASPLOS 2026, arXiv 2503.20591; figures in shared/data/traces/README.md):
GPU cells last a median of 6 min and a mean of 27 min; the pause between cells has a median
of 3 min and a mean of 29 min. Cell durations are lognormal with that median and mean; the
pauses are a mix of short ones (lognormal) and long ones (exponential) whose median and mean
match. The working day is an assumption, not a measurement: each user opens one notebook a
day, between 08:00 and 11:00, and keeps it open 8 hours (longer if a cell is still running).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from jupyter_gpu.protocol import GpuChoice

from .workload import Cell, Session, Workload

DAY = 86400.0
MINUTE = 60.0


@dataclass(frozen=True)
class SyntheticShape:
    cell_median_s: float = 6 * MINUTE
    cell_mean_s: float = 27 * MINUTE
    #: short pauses: lognormal, median 2 min, sigma 1; long pauses: exponential, mean 110 min.
    #: Together: median ~3 min and mean ~29 min, as in the Adobe trace.
    short_pause_share: float = 0.76
    short_pause_median_s: float = 2 * MINUTE
    short_pause_sigma: float = 1.0
    long_pause_mean_s: float = 110 * MINUTE
    day_opens_s: tuple[float, float] = (8 * 3600.0, 11 * 3600.0)
    session_s: float = 8 * 3600.0
    gpus_per_cell: int = 1

    @property
    def cell_sigma(self) -> float:
        # lognormal: mean = median * exp(sigma^2 / 2)
        return math.sqrt(2 * math.log(self.cell_mean_s / self.cell_median_s))

    def describe(self) -> str:
        return (
            f"cells lognormal (median {self.cell_median_s / MINUTE:g} min, mean {self.cell_mean_s / MINUTE:g} min, "
            f"sigma {self.cell_sigma:.2f}); pauses {self.short_pause_share:.0%} lognormal (median "
            f"{self.short_pause_median_s / MINUTE:g} min, sigma {self.short_pause_sigma:g}) and "
            f"{1 - self.short_pause_share:.0%} exponential (mean {self.long_pause_mean_s / MINUTE:g} min); "
            f"one {self.session_s / 3600:g} h notebook per user per day opened between "
            f"{self.day_opens_s[0] / 3600:02.0f}:00 and {self.day_opens_s[1] / 3600:02.0f}:00; "
            f"{self.gpus_per_cell} GPU per cell"
        )


def synthetic_workload(users: int, days: float, gpu_type: str, seed: int = 0,
                       shape: SyntheticShape = SyntheticShape()) -> Workload:
    if users < 1:
        raise ValueError(f"--users must be at least 1, got {users}")
    if not days > 0:
        raise ValueError(f"--days must be positive, got {days}")
    rng = random.Random(seed)
    choices = (GpuChoice(gpu_type, shape.gpus_per_cell),)
    sessions = []
    for day in range(math.ceil(days)):
        for user in range(users):
            opens = day * DAY + rng.uniform(*shape.day_opens_s)
            closes = opens + shape.session_s
            cells = []
            now = opens + _pause(rng, shape)
            while now < closes:
                duration = max(1.0, rng.lognormvariate(math.log(shape.cell_median_s), shape.cell_sigma))
                cells.append(Cell(now, duration, choices))
                now += duration + _pause(rng, shape)
            end = max([closes] + [c.start + c.duration for c in cells])
            sessions.append(Session(f"user{user}/day{day}", f"user{user}", opens, end, tuple(cells)))
    sessions.sort(key=lambda s: s.start)
    return Workload(
        "synthetic", tuple(sessions),
        f"synthetic, {users} users, {days:g} day(s), seed {seed}: {shape.describe()}",
    )


def _pause(rng: random.Random, shape: SyntheticShape) -> float:
    if rng.random() < shape.short_pause_share:
        return rng.lognormvariate(math.log(shape.short_pause_median_s), shape.short_pause_sigma)
    return rng.expovariate(1 / shape.long_pause_mean_s)
