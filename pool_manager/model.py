"""Plain data shared by the pool core, its service and the backends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jupyter_gpu.protocol import QUEUED, GpuChoice


@dataclass(frozen=True)
class Device:
    """One unit of capacity: a GPU (or a CPU slot) that a kernel can be pinned to.

    ``index`` is what goes into CUDA_VISIBLE_DEVICES; CPU slots have none.
    """

    key: str
    gpu_type: str
    index: int | None
    name: str
    memory_mb: int = 0
    emulated: bool = False
    node: str = "local"
    healthy: bool = True


@dataclass(frozen=True)
class Notice:
    """Something the notebook should be told about a lease before it ends (a budget nearly
    spent, a release for GPU idleness coming). ``kind`` is a short word code can compare
    (``gpu_idle``, ``budget``); ``text`` is the sentence a user reads; ``at`` is when it was
    posted and ``when`` (or None) when what it announces happens, both wall time (epoch
    seconds). ``seq`` numbers a lease's notices from 1, so a client shows each one once."""

    seq: int
    kind: str
    text: str
    at: float
    when: float | None = None


class SlotState(enum.Enum):
    STARTING = "starting"
    WARM = "warm"
    LEASED = "leased"
    DRAINING = "draining"


@dataclass
class Slot:
    """Devices set aside for one kernel process, and that kernel.

    Kernels are single-use, so a slot has at most one kernel; ``kernel_id`` (the process's
    identity, what the API and the backend name it by) is given when its start is asked for.
    The slot id stays internal to the pool.
    """

    id: str
    gpu_type: str
    devices: tuple[str, ...]
    node: str
    state: SlotState = SlotState.STARTING
    lease_id: str | None = None
    #: on the core's monotonic clock
    created_at: float = 0.0
    #: slots that must finish stopping before this one may start (their GPUs move to it)
    waiting_for: set[str] = field(default_factory=set)
    start_requested: bool = False
    kernel_id: str | None = None
    #: what CUDA_VISIBLE_DEVICES lists for ``devices`` (CPU slots: none), kept with them: asked
    #: at every start and grant, it would otherwise look up each device in the whole inventory
    gpu_indices: tuple[int, ...] = ()


class _LeaseFacts:
    """What a lease and a snapshot of it both answer."""

    choices: tuple[GpuChoice, ...]
    count: int
    granted_at: float | None
    released_at: float | None

    @property
    def spec(self) -> str:
        return "|".join(str(choice) for choice in self.choices)

    def gpu_seconds(self, now: float) -> float:
        if self.granted_at is None:
            return 0.0
        end = self.released_at if self.released_at is not None else now
        return max(0.0, end - self.granted_at) * self.count


@dataclass
class Lease(_LeaseFacts):
    """A user's claim on GPUs, from its request until it ends.

    Two clocks: ``queued_at``, ``granted_at``, ``released_at`` and ``last_activity`` are wall
    time (epoch seconds: shown and metered); ``granted_mono`` and ``active_mono`` are the
    core's monotonic clock, which the deadlines count on, so a step of the wall clock (NTP, a
    resumed VM) neither expires nor stretches a lease.
    """

    id: str
    user: str
    choices: tuple[GpuChoice, ...]
    idle_timeout: float
    queued_at: float
    state: str = QUEUED
    reason: str | None = None
    gpu_type: str | None = None
    count: int = 0
    slot_id: str | None = None
    #: the kernel it holds, once granted
    kernel_id: str | None = None
    gpu_indices: tuple[int, ...] = ()
    granted_at: float | None = None
    released_at: float | None = None
    last_activity: float = 0.0
    granted_mono: float | None = None
    active_mono: float = 0.0
    #: the last time its GPUs showed any utilization (monotonic; 0: never seen)
    gpu_active_mono: float = 0.0
    busy: bool = False
    notebook: str = ""
    #: the user's groups when they asked (group budgets count the lease for these)
    groups: frozenset[str] = frozenset()
    #: why it ended, in words, where ``reason`` alone does not say (which budget was used up)
    reason_message: str = ""
    #: what the notebook has been told about this lease, oldest first (a tuple: snapshots share it)
    notices: tuple[Notice, ...] = ()

    def snapshot(self) -> LeaseSnapshot:
        # A copy of the field values in one step (the core takes two per lease, on its hot
        # path): a frozen dataclass's __init__ would set each field through object.__setattr__.
        # LeaseSnapshot declares exactly Lease's fields (tests/test_pool_core.py checks).
        snapshot = object.__new__(LeaseSnapshot)
        snapshot.__dict__.update(self.__dict__)
        return snapshot


@dataclass(frozen=True)
class LeaseSnapshot(_LeaseFacts):
    """A lease as it stood at one event: listeners read this, not the lease that moves on."""

    id: str
    user: str
    choices: tuple[GpuChoice, ...]
    idle_timeout: float
    queued_at: float
    state: str
    reason: str | None
    gpu_type: str | None
    count: int
    slot_id: str | None
    kernel_id: str | None
    gpu_indices: tuple[int, ...]
    granted_at: float | None
    released_at: float | None
    last_activity: float
    granted_mono: float | None
    active_mono: float
    gpu_active_mono: float
    busy: bool
    notebook: str
    groups: frozenset[str]
    reason_message: str
    notices: tuple[Notice, ...]


#: A live lease or one as it stood at an event: what read-only queries accept.
LeaseView = Lease | LeaseSnapshot


# --- actions: what the core asks its service to do -------------------------------------


@dataclass(frozen=True)
class StartKernel:
    slot_id: str
    gpu_type: str
    gpu_indices: tuple[int, ...]
    node: str
    #: the new kernel's identity: the backend keys the process by it
    kernel_id: str


@dataclass(frozen=True)
class KillKernel:
    slot_id: str
    kernel_id: str


@dataclass(frozen=True)
class LeaseGranted:
    lease: LeaseSnapshot


@dataclass(frozen=True)
class LeaseEnded:
    lease: LeaseSnapshot


@dataclass(frozen=True)
class LeaseNoticed:
    """A notice was posted on a granted lease (the gateway may push it to the notebook)."""

    lease: LeaseSnapshot
    notice: Notice


Action = StartKernel | KillKernel | LeaseGranted | LeaseEnded | LeaseNoticed
