"""Row 8: the pool core alone, driven by a recorded GPU workload with a fake clock.

The trace is ``adobe-training-events-2021-06.csv`` (see shared/data/traces/README.md),
made by the source's ``scripts/tiresias_generator/generate_workload.py``. Reading that
generator: ``submit_time`` = whole minutes from the first training of June 2021
(``(start - lowest_start) // 60``), ``duration`` = whole minutes (``(stop - start) // 60``,
at least 1), ``num_gpu`` = the most GPUs the training used (1, 4 or 8), ``model_name`` =
drawn at random per session by the generator (not from the trace), ``iterations`` and
``interval`` = always 0.

How it becomes 100,000 lease requests over 1,000 GPUs of 4 types:

- the 30,909 trainings are replayed as 4 superimposed copies (users of different copies
  are different people) and 100,000 of those 123,636 are drawn without replacement (seeded):
  about 3.2x the month's recorded demand, enough to keep queues at the busy hours;
- each request arrives at ``submit_time`` minutes plus a uniform jitter inside that minute
  (the generator floored it), holds its kernel busy for ``duration`` minutes, then half of
  the users release at once (``%gpu release`` a minute later) and half let the 10 minute
  idle timeout release it;
- the GPU type comes from the model name (4 groups, some with fallbacks like
  ``h100|a100``), one request in ten asks for ``any``, the count is ``num_gpu``;
- 1,000 GPUs: 16 h100, 50 a100, 40 a10g and 19 l4 nodes of 8 GPUs; one warm kernel per
  type; a kernel takes 30 s to start and 2 s to stop.

The clock is fake: the core runs as fast as it can; the simulated month takes seconds.
``decisions`` are the events fed to the core (request, kernel ready, kernel stopped,
activity, release, tick): each one is a call that updates the pool and places what it can.
Idle timeouts are applied by a ``tick()`` at each lease's idle deadline, as the service does
(it sleeps until ``core.next_deadline()``; ticking between deadlines changes nothing).

``listing`` measures what the sidebar polls, on the same 1,000 GPUs after 3,000 requests
arrived at once (50 users, 60 leases each): one user's leases described as the API does
(queue position and expected wait of each) and the per-type summary.
"""

from __future__ import annotations

import csv
import heapq
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jupyter_gpu.protocol import QUEUED, GpuChoice, parse_gpu_spec  # noqa: E402
from pool_manager.core import PoolCore, PoolPolicy  # noqa: E402
from pool_manager.model import Device, KillKernel, LeaseEnded, LeaseGranted, StartKernel  # noqa: E402

TRACE = REPO.parent / "shared" / "data" / "traces" / "adobe-training-events-2021-06.csv"
NODES = {"h100": 16, "a100": 50, "a10g": 40, "l4": 19}
GPUS_PER_NODE = 8
SPEC_BY_MODEL = {
    "resnet152": ("a100",), "resnet101": ("a100",), "inception4": ("a100",),
    "vgg19": ("h100", "a100"), "vgg16": ("h100", "a100"),
    "resnet50": ("a10g", "l4"), "inception3": ("a10g", "l4"),
    "vgg11": ("l4", "a10g"), "alexnet": ("l4", "a10g"),
}
START_S, STOP_S, IDLE_S, RELEASE_AFTER_S = 30.0, 2.0, 600.0, 60.0
COPIES = 4


def find_trace() -> Path:
    for candidate in (TRACE, Path("/work/shared/data/traces/adobe-training-events-2021-06.csv")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"trace not found at {TRACE}")


def inventory() -> list[Device]:
    return [
        Device(f"{gpu_type}-{node}-{index}", gpu_type, index, f"NVIDIA {gpu_type.upper()}", 81920, True,
               f"{gpu_type}-{node}")
        for gpu_type, nodes in NODES.items()
        for node in range(nodes)
        for index in range(GPUS_PER_NODE)
    ]


def requests(count: int, seed: int = 0) -> list[tuple[float, int, str, tuple[GpuChoice, ...], float, bool]]:
    """(arrival s, id, user, choices, busy s, releases explicitly), sorted by arrival."""
    with open(find_trace()) as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(seed)
    pool = [(copy, row) for copy in range(COPIES) for row in rows]
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} requests from {COPIES} copies of the trace")
    out = []
    for number, (copy, row) in enumerate(rng.sample(pool, count)):
        job = int(row["job_id"])
        gpus = int(row["num_gpu"])
        types = ("any",) if job % 10 == 0 else SPEC_BY_MODEL[row["model_name"]]
        choices = tuple(GpuChoice(t, gpus) for t in types)
        arrival = int(row["submit_time"]) * 60 + rng.random() * 60
        out.append((arrival, number, f"user{copy}-{job % 300}", choices, int(row["duration"]) * 60.0, job % 2 == 0))
    out.sort()
    return out


def listing(requests_count: int = 3000, users: int = 50, repeats: int = 20) -> dict[str, Any]:
    """Milliseconds to describe one user's leases and to summarise the types, mid-rush."""
    ids = iter(range(10**9))
    now = [0.0]
    core = PoolCore(inventory(), PoolPolicy(min_warm=1), clock=lambda: now[0], new_id=lambda: f"l{next(ids)}")
    specs = [parse_gpu_spec(s) for s in ("a100", "h100|a100", "l4|a10g", "a10g", "any", "a100:8", "l4:4")]
    for number in range(requests_count):
        core.request_lease(f"user{number % users}", specs[number % len(specs)])
        for action in core.pop_actions():
            if isinstance(action, StartKernel):
                core.kernel_ready(action.slot_id)

    def describe() -> int:
        now[0] += 1.0  # each poll at its own time: nothing carried over from the last one
        mine = core.leases_of("user7")
        for lease in mine:
            core.queue_position(lease)
            if lease.state == QUEUED:
                core.expected_wait(lease)
        return len(mine)

    started = time.perf_counter()
    counts = [describe() for _ in range(repeats)]
    describe_ms = (time.perf_counter() - started) / repeats * 1000
    started = time.perf_counter()
    for _ in range(repeats):
        core.summaries()
    summary_ms = (time.perf_counter() - started) / repeats * 1000
    return {"gpus": len(core.devices), "requests": requests_count, "queued": len(core.queued_ids()),
            "leases_described": counts[0], "describe_ms": describe_ms, "summaries_ms": summary_ms}


def simulate(count: int, time_limit: float = 300.0) -> dict[str, Any]:
    load_started = time.perf_counter()
    workload = requests(count)
    load_seconds = time.perf_counter() - load_started

    now = [0.0]
    ids = iter(range(10**9))
    core = PoolCore(inventory(), PoolPolicy(min_warm=1, idle_timeout=IDLE_S, max_idle_timeout=IDLE_S),
                    clock=lambda: now[0], new_id=lambda: f"i{next(ids)}")
    events: list[tuple[float, int, str, Any]] = []
    seq = iter(range(10**12))
    for arrival, number, user, choices, busy, explicit in workload:
        events.append((arrival, next(seq), "request", (number, user, choices, busy, explicit)))
    heapq.heapify(events)
    plans: dict[str, tuple[float, bool]] = {}  # lease id -> (busy seconds, releases explicitly)
    waits: list[float] = []
    ended: Counter[str] = Counter()
    decisions = granted = 0
    core_seconds = 0.0
    ticks_at: set[float] = set()
    started = time.perf_counter()
    finished = True

    def carry_out() -> None:
        nonlocal granted
        for action in core.pop_actions():
            if isinstance(action, StartKernel):
                heapq.heappush(events, (now[0] + START_S, next(seq), "ready", action.slot_id))
            elif isinstance(action, KillKernel):
                heapq.heappush(events, (now[0] + STOP_S, next(seq), "stopped", action.slot_id))
            elif isinstance(action, LeaseGranted):
                granted += 1
                lease = action.lease
                waits.append(now[0] - lease.queued_at)
                heapq.heappush(events, (now[0], next(seq), "busy", lease.id))
            elif isinstance(action, LeaseEnded):
                ended[action.lease.reason or "?"] += 1

    core.tick()
    carry_out()
    while events:
        when, _, kind, payload = heapq.heappop(events)
        now[0] = when
        t0 = time.perf_counter()
        if kind == "request":
            number, user, choices, busy, explicit = payload
            lease = core.request_lease(user, choices, idle_timeout=IDLE_S)
            plans[lease.id] = (busy, explicit)
        elif kind == "ready":
            core.kernel_ready(payload, START_S)
        elif kind == "stopped":
            core.kernel_stopped(payload)
        elif kind in ("busy", "done"):
            lease = core.leases.get(payload)
            if lease is None or lease.slot_id is None:
                continue
            core.kernel_activity(lease.slot_id, busy=kind == "busy")
        elif kind == "release":
            core.end_lease(payload, "deleted")
        elif kind == "tick":
            ticks_at.discard(when)
            core.tick()
        core_seconds += time.perf_counter() - t0
        decisions += 1
        if kind == "busy":
            busy, explicit = plans.pop(payload)
            heapq.heappush(events, (when + busy, next(seq), "done", payload))
            plans[payload] = (busy, explicit)
        elif kind == "done":
            _, explicit = plans.pop(payload)
            if explicit:
                heapq.heappush(events, (when + RELEASE_AFTER_S, next(seq), "release", payload))
            elif when + IDLE_S not in ticks_at:
                ticks_at.add(when + IDLE_S)
                heapq.heappush(events, (when + IDLE_S, next(seq), "tick", None))
        carry_out()
        if time.perf_counter() - started > time_limit:
            finished = False
            break
    wall = time.perf_counter() - started
    return {
        "requests": count,
        "gpus": len(core.devices),
        "types": len(NODES),
        "finished": finished,
        "wall_s": wall,
        "core_s": core_seconds,
        "decisions": decisions,
        "decisions_per_s": decisions / wall,
        "granted": granted,
        "ended": dict(ended),
        "simulated_days": now[0] / 86400,
        "queue_wait_median_s": sorted(waits)[len(waits) // 2] if waits else None,
        "queue_wait_p99_s": sorted(waits)[int(0.99 * (len(waits) - 1))] if waits else None,
        "trace_load_s": load_seconds,
        "listing": listing(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(simulate(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000,
                              float(sys.argv[2]) if len(sys.argv) > 2 else 300.0), indent=1))
