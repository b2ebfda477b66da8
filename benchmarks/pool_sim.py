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
The replay is ``jupyter-gpu simulate``'s (``pool_manager.simulate``): each request is a
one-cell session under the ``idle:10m`` policy; one that releases explicitly closes its
session a minute after its cell, one that does not keeps it open past the idle timeout.
``decisions`` are the calls into the core (request, kernel ready, kernel stopped, activity,
release, tick): each one updates the pool and places what it can. Idle timeouts are applied
by a ``tick()`` at each lease's idle deadline, as the service does (it sleeps until
``core.next_deadline()``; ticking between deadlines changes nothing).

``scaling`` is the same replay at 100, 1,000, 10,000 and 100,000 GPUs: the pool's nodes
and the trace's users grow together (copies of the trace in proportion to the GPUs, 4 per
1,000), so every pool sees the same shape of demand per GPU. To keep the largest pool's run
short, each scale replays one window of the trace (``WINDOW_HOURS`` from the start of its
busiest day), repeated with new draws until at least ``min_decisions`` decisions were
timed, the scales taking turns; the figure is CPU time per decision, so pools of any size
compare directly, and so do scales measured while the machine's load changed. Setup is
outside the timed run: making the trace's sessions and building the pool's inventory; the
garbage collector is left on but walks only the core's objects (the trace is set aside with
``gc.freeze`` and the new pool collected once before the clocks start), since the trace
grows with the scale and at 100,000 GPUs its walks cost 6-9 us of a decision's 46.

``listing`` measures what the sidebar polls, on the same 1,000 GPUs after 3,000 requests
arrived at once (50 users, 60 leases each): one user's leases described as the API does
(queue position and expected wait of each) and the per-type summary.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jupyter_gpu.protocol import QUEUED, GpuChoice, parse_gpu_spec  # noqa: E402
from pool_manager.core import PoolCore, PoolPolicy  # noqa: E402
from pool_manager.model import StartKernel  # noqa: E402
from pool_manager.simulate import (  # noqa: E402
    Cell,
    Session,
    Timing,
    Workload,
    parse_policy,
    pool_devices,
)
from pool_manager.simulate import simulate as replay  # noqa: E402
from pool_manager.simulate.metrics import percentile  # noqa: E402
from pool_manager.simulate.traces import read_training_events  # noqa: E402

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


def requests(count: int, seed: int = 0) -> Workload:
    """``count`` one-cell sessions drawn from the superimposed copies of the month."""
    events = read_training_events(find_trace())
    rng = random.Random(seed)
    pool = [(copy, event) for copy in range(COPIES) for event in events]
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} requests from {COPIES} copies of the trace")
    sessions = []
    for number, (copy, event) in enumerate(rng.sample(pool, count)):
        types = ("any",) if event.job_id % 10 == 0 else SPEC_BY_MODEL[event.model_name]
        choices = tuple(GpuChoice(t, event.gpus) for t in types)
        arrival = event.submit + rng.random() * 60
        # Half release explicitly a minute after the cell; the others leave it to the idle timeout.
        after = RELEASE_AFTER_S if event.job_id % 2 == 0 else IDLE_S + RELEASE_AFTER_S
        cell = Cell(arrival, event.duration, choices)
        sessions.append(Session(str(number), f"user{copy}-{event.job_id % 300}", arrival,
                                arrival + event.duration + after, (cell,)))
    sessions.sort(key=lambda session: session.start)
    return Workload("pool-sim", tuple(sessions), f"{count} requests from {COPIES} copies of {find_trace().name}")


#: The month's busiest day (most GPU-time submitted), where the scaling windows start.
BUSIEST_DAY_S = 22 * 86400
SCALES = (100, 1_000, 10_000, 100_000)
_events: list[Any] = []


def scaled_pool(gpus: int) -> dict[str, int]:
    """The 1,000-GPU pool's mix of types, in nodes of 8, grown or shrunk to about ``gpus``."""
    return {gpu_type: max(1, round(nodes * gpus / 1000)) * GPUS_PER_NODE for gpu_type, nodes in NODES.items()}


def window_requests(gpus: int, hours: float, seed: int) -> Workload:
    """The sessions of ``hours`` of the busiest day for a pool of ``gpus``: COPIES copies of
    the trace per 1,000 GPUs (users of different copies are different people)."""
    if not _events:
        _events.extend(read_training_events(find_trace()))
    window = [e for e in _events if BUSIEST_DAY_S <= e.submit < BUSIEST_DAY_S + hours * 3600]
    copies = COPIES * gpus / 1000
    rng = random.Random(seed)
    pool = [(copy, event) for copy in range(max(1, int(copies + 0.999))) for event in window]
    sessions = []
    for number, (copy, event) in enumerate(rng.sample(pool, round(len(window) * copies))):
        types = ("any",) if event.job_id % 10 == 0 else SPEC_BY_MODEL[event.model_name]
        arrival = event.submit + rng.random() * 60
        after = RELEASE_AFTER_S if event.job_id % 2 == 0 else IDLE_S + RELEASE_AFTER_S
        cell = Cell(arrival, event.duration, tuple(GpuChoice(t, event.gpus) for t in types))
        sessions.append(Session(str(number), f"user{copy}-{event.job_id % 300}", arrival,
                                arrival + event.duration + after, (cell,)))
    sessions.sort(key=lambda session: session.start)
    return Workload("pool-scaling", tuple(sessions), f"{len(sessions)} requests, {hours:g} h of day 22")


def scaling(scales: tuple[int, ...] = SCALES, hours: float = 6.0, min_decisions: int = 200_000,
            rounds: int = 4, time_limit: float = 300.0) -> dict[str, Any]:
    """CPU time per core decision at each pool size, under the same demand per GPU.

    CPU time, not wall time, and the scales taken in turn over ``rounds`` rounds: on a shared
    machine the load changes during the run, and neither may favour one scale.
    """
    totals = {gpus: {"runs": 0, "requests": 0, "decisions": 0, "cpu_s": 0.0, "wall_s": 0.0} for gpus in scales}
    waits: dict[int, list[float]] = {gpus: [] for gpus in scales}
    for _ in range(rounds):
        for gpus in scales:
            total = totals[gpus]
            goal = total["decisions"] + min_decisions / rounds
            while total["decisions"] < goal:
                workload = window_requests(gpus, hours, seed=total["runs"])
                # The garbage collector sees the core's objects only: the last replay's garbage
                # is collected now, and the trace and its sessions (the benchmark's input, which
                # grows with the scale) are set aside, else every collection in the timed run
                # walks them, charging the largest pool for its input. The pool is built, then
                # collected once before the clocks start (building it is setup; a pool that has
                # run a while has its inventory in the oldest generation); what the core makes
                # while it runs, and the inventory in full collections, are collected as usual.
                gc.collect()
                gc.freeze()
                try:
                    outcome = replay(workload, parse_policy(f"idle:{IDLE_S:g}s", 0.0), scaled_pool(gpus),
                                     Timing(START_S, STOP_S), warm=1, gpus_per_node=GPUS_PER_NODE,
                                     time_limit=time_limit, settle_gc=True)
                finally:
                    gc.unfreeze()
                total["runs"] += 1
                total["requests"] += len(workload.sessions)
                total["decisions"] += outcome.core_calls
                total["cpu_s"] += outcome.cpu_s
                total["wall_s"] += outcome.wall_s
                waits[gpus] += outcome.all_waits()
    out = [{"gpus": sum(scaled_pool(gpus).values()), **total,
            "us_per_decision": total["cpu_s"] / total["decisions"] * 1e6,
            "wall_us_per_decision": total["wall_s"] / total["decisions"] * 1e6,
            "queue_wait_median_s": percentile(waits[gpus], 0.5) if waits[gpus] else None,
            "queue_wait_p99_s": percentile(waits[gpus], 0.99) if waits[gpus] else None}
           for gpus, total in totals.items()]
    return {"hours": hours, "rounds": rounds, "scales": out,
            "largest_vs_smallest": out[-1]["us_per_decision"] / out[0]["us_per_decision"]}


def listing(requests_count: int = 3000, users: int = 50, repeats: int = 20) -> dict[str, Any]:
    """Milliseconds to describe one user's leases and to summarise the types, mid-rush."""
    ids = iter(range(10**9))
    now = [0.0]
    devices = pool_devices({gpu_type: nodes * GPUS_PER_NODE for gpu_type, nodes in NODES.items()}, GPUS_PER_NODE)
    core = PoolCore(devices, PoolPolicy(min_warm=1), clock=lambda: now[0], new_id=lambda: f"l{next(ids)}")
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
    outcome = replay(workload, parse_policy(f"idle:{IDLE_S:g}s", 0.0),
                       {gpu_type: nodes * GPUS_PER_NODE for gpu_type, nodes in NODES.items()},
                       Timing(START_S, STOP_S), warm=1, gpus_per_node=GPUS_PER_NODE, time_limit=time_limit)
    waits = outcome.all_waits()
    return {
        "requests": count,
        "gpus": sum(outcome.pool.values()),
        "types": len(NODES),
        "finished": outcome.finished,
        "wall_s": outcome.wall_s,
        "decisions": outcome.core_calls,
        "decisions_per_s": outcome.core_calls / outcome.wall_s,
        "granted": outcome.grants,
        "ended": dict(outcome.ended),
        "simulated_days": (outcome.end - outcome.start) / 86400,
        "queue_wait_median_s": percentile(waits, 0.5) if waits else None,
        "queue_wait_p99_s": percentile(waits, 0.99) if waits else None,
        "trace_load_s": load_seconds,
        "listing": listing(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(simulate(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000,
                              float(sys.argv[2]) if len(sys.argv) > 2 else 300.0), indent=1))
