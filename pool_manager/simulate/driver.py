"""Replays a workload through the real pool core with a fake clock.

Every number comes from the core: a cell starts when the core grants its lease
(``LeaseGranted``), GPU time held is each lease's ``granted_at`` to ``released_at``, idle
releases are the core's own ``tick()`` decisions. The driver only plays the parts around
it: the notebooks (sessions asking for leases, cells running on them) and the backend
(a kernel is warm ``kernel_start_s`` after the core asks for it, gone ``kernel_stop_s``
after a kill).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpu.protocol import REASON_DELETED, REASON_IDLE, GpuChoice

from ..core import PoolCore, PoolPolicy
from ..model import Device, KillKernel, LeaseEnded, LeaseGranted, StartKernel
from .policies import DEDICATED, PER_CELL, Policy
from .workload import Session, Workload

#: an idle timeout that never comes (dedicated GPUs and per-cell leases are ended by the notebook)
NEVER = 1e12
#: idle ticks come this much after the deadline, so ``now - last_activity >= timeout`` holds in floats
TICK_SLACK = 1e-6


@dataclass(frozen=True)
class Timing:
    """How long the backend takes; a GPU kernel's start includes its warm-up code
    (``import torch; torch.cuda.init()``), tens of seconds on a fresh process."""

    kernel_start_s: float = 30.0
    kernel_stop_s: float = 2.0


def pool_devices(pool: Mapping[str, int], gpus_per_node: int = 8) -> list[Device]:
    """``{"a100": 20}`` as devices: nodes of ``gpus_per_node`` GPUs, the last one smaller."""
    devices = []
    for gpu_type, count in pool.items():
        for number in range(count):
            node, index = divmod(number, gpus_per_node)
            devices.append(Device(f"{gpu_type}-{node}-{index}", gpu_type, index, f"NVIDIA {gpu_type.upper()}",
                                  81920, True, f"{gpu_type}-{node}"))
    return devices


@dataclass
class Outcome:
    policy: Policy
    pool: dict[str, int]
    #: seconds each cell waited before it started, per GPU type it ran on
    waits: dict[str, list[float]] = field(default_factory=dict)
    held_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    busy_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: idle releases of a lease whose notebook still had cells for it: remote variables lost
    lost_state: int = 0
    #: (time, GPUs held by leases from then on); (time, +/- GPUs of cells starting/ending)
    held_steps: list[tuple[float, int]] = field(default_factory=list)
    busy_changes: list[tuple[float, int]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    core_calls: int = 0
    grants: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    finished: bool = True
    wall_s: float = 0.0
    #: the replay's CPU time: what it costs, whatever else the machine runs meanwhile
    cpu_s: float = 0.0

    def all_waits(self) -> list[float]:
        return [wait for waits in self.waits.values() for wait in waits]

    def busy_steps(self) -> list[tuple[float, int]]:
        steps, level = [], 0
        for when, change in sorted(self.busy_changes):
            level += change
            steps.append((when, level))
        return steps


class _Notebook:
    """One session being replayed."""

    __slots__ = ("dedicated", "index", "leases", "session", "waiting")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.index = 0  # the next cell to run (or the one running)
        self.leases: dict[tuple[GpuChoice, ...], str] = {}
        self.waiting: tuple[float, tuple[GpuChoice, ...]] | None = None  # (asked at, for what)
        self.dedicated = session.dedicated_choices()


class _Replay:
    def __init__(self, workload: Workload, policy: Policy, pool: Mapping[str, int], timing: Timing,
                 warm: int | None, gpus_per_node: int) -> None:
        self.policy = policy
        self.timing = timing
        self.now = min((s.start for s in workload.sessions), default=0.0) - timing.kernel_start_s
        ids = itertools.count()
        idle = policy.idle_s if policy.kind not in (DEDICATED, PER_CELL) else NEVER
        self.core = PoolCore(
            pool_devices(pool, gpus_per_node),
            PoolPolicy(min_warm=max(pool.values(), default=0) if warm is None else warm, idle_timeout=idle,
                       max_idle_timeout=NEVER),
            clock=lambda: self.now, new_id=lambda: f"i{next(ids)}",
        )
        self.out = Outcome(policy, dict(pool), start=self.now)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.owner: dict[str, tuple[_Notebook, tuple[GpuChoice, ...]]] = {}
        self.granted: dict[str, tuple[str, int, str]] = {}  # lease id -> (slot id, GPUs, type)
        self.ticks_at: set[float] = set()
        self.held = 0
        # Sessions open in order of their start, fed to the loop one at a time: the event heap
        # holds only what is under way, not every session of the trace (heap steps and objects
        # the garbage collector walks would grow with the trace's length and the pool's size).
        self.sessions = sorted(workload.sessions, key=lambda session: session.start)
        self.next_session = 0

    def push(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, payload))

    def run(self, time_limit: float | None, settle_gc: bool = False) -> Outcome:
        if settle_gc:
            gc.collect()  # the pool just built is moved to the oldest generation before the clocks start
        started, cpu_started = time.perf_counter(), time.process_time()
        self.core.tick()
        self.carry_out()
        handlers: dict[str, Callable[[Any], None]] = {
            "ask": self.ask, "done": self.done, "close": self.close,
            "ready": self.ready, "stopped": self.stopped, "tick": self.tick,
        }
        steps = 0
        events, sessions = self.events, self.sessions
        while True:
            # A session opens before any event of its time (as if it had been queued first).
            opening = sessions[self.next_session] if self.next_session < len(sessions) else None
            if events and (opening is None or events[0][0] < opening.start):
                self.now, _, kind, payload = heapq.heappop(events)
                handlers[kind](payload)
            elif opening is not None:
                self.next_session += 1
                self.now = opening.start
                self.open(_Notebook(opening))
            else:
                break
            self.carry_out()
            steps += 1
            if time_limit is not None and steps % 1024 == 0 and time.perf_counter() - started > time_limit:
                self.out.finished = False
                break
        self.out.end = self.now
        self.out.wall_s = time.perf_counter() - started
        self.out.cpu_s = time.process_time() - cpu_started
        return self.out

    # --- the notebooks ----------------------------------------------------------------

    def open(self, notebook: _Notebook) -> None:
        session = notebook.session
        if self.policy.kind == DEDICATED and notebook.dedicated is not None:
            self.request(notebook, notebook.dedicated, NEVER)
        if session.cells and session.cells[0].start <= self.now:
            self.ask(notebook)  # the notebook opens with a cell: no event in between
        elif session.cells:
            self.push(session.cells[0].start, "ask", notebook)
        else:
            self.push(session.end, "close", notebook)

    def ask(self, notebook: _Notebook) -> None:
        """The user runs the next cell: on the lease it has, or on one it asks for now."""
        cell = notebook.session.cells[notebook.index]
        shape = notebook.dedicated if self.policy.kind == DEDICATED and notebook.dedicated else cell.choices
        notebook.waiting = (self.now, shape)
        lease_id = notebook.leases.get(shape)
        if lease_id is None:
            self.request(notebook, shape, self.policy.idle_s or NEVER)
        elif lease_id in self.granted:
            self.begin(notebook, lease_id)

    def request(self, notebook: _Notebook, shape: tuple[GpuChoice, ...], idle_timeout: float) -> None:
        self.out.core_calls += 1
        lease = self.core.request_lease(notebook.session.user, shape, idle_timeout=idle_timeout,
                                        notebook=notebook.session.name)
        notebook.leases[shape] = lease.id
        self.owner[lease.id] = (notebook, shape)

    def begin(self, notebook: _Notebook, lease_id: str) -> None:
        assert notebook.waiting is not None
        asked_at = notebook.waiting[0]
        notebook.waiting = None
        cell = notebook.session.cells[notebook.index]
        slot_id, _, gpu_type = self.granted[lease_id]
        # Per cell: the previous cell's variables come back from the snapshot first.
        restore = self.policy.restore_s if self.policy.kind == PER_CELL and notebook.index > 0 else 0.0
        starts = self.now + restore
        self.out.core_calls += 1
        self.core.kernel_activity(slot_id, busy=True)
        self.out.waits.setdefault(gpu_type, []).append(starts - asked_at)
        self.out.busy_s[gpu_type] += cell.duration * cell.gpus
        self.out.busy_changes.append((starts, cell.gpus))
        self.out.busy_changes.append((starts + cell.duration, -cell.gpus))
        self.push(starts + cell.duration, "done", (notebook, lease_id))

    def done(self, payload: tuple[_Notebook, str]) -> None:
        notebook, lease_id = payload
        slot_id = self.granted[lease_id][0]
        self.out.core_calls += 1
        self.core.kernel_activity(slot_id, busy=False)
        if self.policy.kind == PER_CELL:
            self.out.core_calls += 1
            self.core.end_lease(lease_id, REASON_DELETED)
        elif self.policy.kind != DEDICATED:
            deadline = self.now + self.policy.idle_s + TICK_SLACK
            if deadline not in self.ticks_at:
                self.ticks_at.add(deadline)
                self.push(deadline, "tick", deadline)
        cells = notebook.session.cells
        finished = cells[notebook.index]
        notebook.index += 1
        # The recorded think time follows the cell's actual end: a wait moves the rest later.
        recorded_end = finished.start + finished.duration
        if notebook.index < len(cells):
            self.push(self.now + max(0.0, cells[notebook.index].start - recorded_end), "ask", notebook)
        else:
            self.push(self.now + max(0.0, notebook.session.end - recorded_end), "close", notebook)

    def close(self, notebook: _Notebook) -> None:
        for lease_id in list(notebook.leases.values()):
            self.out.core_calls += 1
            self.core.end_lease(lease_id, REASON_DELETED)

    # --- the backend ------------------------------------------------------------------

    def ready(self, slot_id: str) -> None:
        self.out.core_calls += 1
        self.core.kernel_ready(slot_id, self.timing.kernel_start_s)

    def stopped(self, slot_id: str) -> None:
        self.out.core_calls += 1
        self.core.kernel_stopped(slot_id)

    def tick(self, deadline: float) -> None:
        self.ticks_at.discard(deadline)
        self.out.core_calls += 1
        self.core.tick()

    def carry_out(self) -> None:
        for action in self.core.pop_actions():
            if isinstance(action, StartKernel):
                self.push(self.now + self.timing.kernel_start_s, "ready", action.slot_id)
            elif isinstance(action, KillKernel):
                self.push(self.now + self.timing.kernel_stop_s, "stopped", action.slot_id)
            elif isinstance(action, LeaseGranted):
                self.granted_lease(action)
            elif isinstance(action, LeaseEnded):
                self.ended_lease(action)

    def granted_lease(self, action: LeaseGranted) -> None:
        lease = action.lease  # the lease as it was when granted
        assert lease.slot_id is not None and lease.gpu_type is not None
        self.granted[lease.id] = (lease.slot_id, lease.count, lease.gpu_type)
        self.out.grants += 1
        self.set_held(self.held + lease.count)
        notebook, shape = self.owner[lease.id]
        if notebook.waiting is not None and notebook.waiting[1] == shape:
            self.begin(notebook, lease.id)

    def ended_lease(self, action: LeaseEnded) -> None:
        lease = action.lease
        self.out.ended[lease.reason or "?"] += 1
        notebook, shape = self.owner.pop(lease.id)
        if notebook.leases.get(shape) == lease.id:
            del notebook.leases[shape]
        holding = self.granted.pop(lease.id, None)
        if holding is None:
            return
        _, count, gpu_type = holding
        assert lease.granted_at is not None and lease.released_at is not None
        self.out.held_s[gpu_type] += (lease.released_at - lease.granted_at) * count
        self.set_held(self.held - count)
        if lease.reason == REASON_IDLE:
            later = notebook.session.cells[notebook.index:]
            if any((notebook.dedicated if self.policy.kind == DEDICATED else c.choices) == shape for c in later):
                self.out.lost_state += 1

    def set_held(self, held: int) -> None:
        self.held = held
        steps = self.out.held_steps
        if steps and steps[-1][0] == self.now:
            steps[-1] = (self.now, held)
        else:
            steps.append((self.now, held))


def simulate(workload: Workload, policy: Policy, pool: Mapping[str, int], timing: Timing | None = None,
             warm: int | None = None, gpus_per_node: int = 8, time_limit: float | None = None,
             settle_gc: bool = False) -> Outcome:
    """Replay ``workload`` under ``policy`` on a pool of ``pool[type]`` GPUs per type.

    ``warm``: kernels kept warm per type (the core's ``min_warm``); None keeps every free
    GPU warm, which is what a fixed pool would do (its GPUs are paid for anyway).
    ``settle_gc``: collect garbage between building the pool and starting the clocks, so the
    times measured do not include the collector's first walks over the new inventory (what a
    benchmark comparing pool sizes wants; a full collection per replay is not worth it in a
    sizing sweep).
    """
    return _Replay(workload, policy, pool, timing or Timing(), warm, gpus_per_node).run(time_limit, settle_gc)
