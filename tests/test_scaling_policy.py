"""The pool's policy objects, on a real core with a fake clock: admission (who may take how
many GPUs) and the scaler (which nodes to launch, which may go)."""

from __future__ import annotations

import itertools

from jupyter_gpu.protocol import GRANTED, QUEUED, REASON_DELETED, parse_gpu_spec
from pool_manager.admission import Admission
from pool_manager.core import PoolCore, PoolPolicy
from pool_manager.model import Device, Lease
from pool_manager.scaler import NodeGroup, NodeMayGo, Scaler, WantNodes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node(name: str, gpu_type: str, count: int) -> list[Device]:
    return [Device(f"{name}-{i}", gpu_type, i, gpu_type, 81920, True, name) for i in range(count)]


def make_pool(*nodes: list[Device], admission: Admission | None = None, **policy: int) -> tuple[PoolCore, FakeClock]:
    clock = FakeClock()
    ids = itertools.count(1)
    devices = [device for devices in nodes for device in devices]
    core = PoolCore(devices, PoolPolicy(min_warm=0, **policy), clock, new_id=lambda: f"id{next(ids)}",
                    admission=admission)
    return core, clock


def hold(core: PoolCore, user: str, spec: str) -> Lease:
    lease = core.request_lease(user, parse_gpu_spec(spec))
    assert lease.slot_id is not None
    core.kernel_ready(lease.slot_id)
    assert lease.state == GRANTED
    return lease


# --- admission ------------------------------------------------------------------------------


class NoGpusFor(Admission):
    """A budget-like policy: the listed users have spent theirs."""

    def __init__(self, broke: set[str]) -> None:
        super().__init__()
        self.broke = broke

    @property
    def limits(self) -> bool:
        return True

    def room(self, user: str, holding: int) -> int | None:
        return 0 if user in self.broke else None


def test_the_scheduler_consults_the_admission_policy_it_is_given() -> None:
    core, _ = make_pool(node("n1", "a100", 2), admission=NoGpusFor({"mallory"}))
    held_back = core.request_lease("mallory", parse_gpu_spec("a100"))
    served = core.request_lease("alice", parse_gpu_spec("a100"))
    assert held_back.slot_id is None and held_back.state == QUEUED  # waits, without blocking alice
    assert served.slot_id is not None
    assert core.unmet_demand() == {}  # more nodes would not help mallory


def test_the_default_admission_is_the_per_user_cap() -> None:
    admission = Admission(max_gpus_per_user=2)
    assert admission.room("alice", holding=1) == 1
    refusal = admission.refusal(parse_gpu_spec("a100:4")[0])
    assert refusal is not None and "at most 2" in refusal and "max_gpus_per_user" in refusal
    assert Admission().room("alice", holding=100) is None and not Admission().limits


# --- scaler -----------------------------------------------------------------------------------


def test_unmet_demand_asks_for_nodes_at_once_and_counts_those_booting() -> None:
    core, clock = make_pool(node("n1", "a100", 2))
    hold(core, "alice", "a100:2")
    for user in ("bob", "carol", "dave"):
        core.request_lease(user, parse_gpu_spec("a100"))
    core.request_lease("erin", parse_gpu_spec("h100|a100"))  # no h100 in the pool: counts as a100
    scaler = Scaler({"a100": NodeGroup(gpus_per_node=2)}, clock)

    assert core.unmet_demand() == {"a100": 4}
    clock.now = 7
    assert scaler.recommendations(core) == [WantNodes("a100", 2, 4)]
    assert scaler.log[-1] == (7, WantNodes("a100", 2, 4))
    # Two were launched and are still booting: nothing more to ask for.
    assert scaler.recommendations(core, planned={"a100": 3}) == []


def test_an_idle_node_may_go_only_after_wait_count_rounds_in_a_row() -> None:
    core, clock = make_pool(node("n1", "a100", 1), node("n2", "a100", 1), node("n3", "a100", 1))
    scaler = Scaler({"a100": NodeGroup(gpus_per_node=1, minimum=1)}, clock, wait_count=3)
    lease = hold(core, "alice", "a100")  # on n1
    assert scaler.recommendations(core) == []
    assert scaler.recommendations(core) == []
    # The third round in a row: both idle nodes may go, the last to join first; n1 is busy.
    assert scaler.recommendations(core) == [NodeMayGo("a100", "n3"), NodeMayGo("a100", "n2")]

    core.end_lease(lease.id, REASON_DELETED)  # n1 idle too now: minimum 1 keeps one of three
    core.kernel_stopped(lease.slot_id or "")
    assert scaler.recommendations(core) == [NodeMayGo("a100", "n3"), NodeMayGo("a100", "n2")]


def test_a_node_busy_again_starts_its_count_over() -> None:
    core, clock = make_pool(node("n1", "a100", 1), node("n2", "a100", 1))
    scaler = Scaler({"a100": NodeGroup(gpus_per_node=1)}, clock, wait_count=2)
    assert scaler.recommendations(core) == []  # both idle, first round
    lease = hold(core, "alice", "a100")  # n1 busy
    assert scaler.recommendations(core) == [NodeMayGo("a100", "n2")]  # n2: second round
    core.end_lease(lease.id, REASON_DELETED)
    core.kernel_stopped(lease.slot_id or "")
    assert scaler.recommendations(core) == [NodeMayGo("a100", "n2")]  # n1: first round only


def test_demand_keeps_idle_nodes_and_the_log_is_bounded() -> None:
    core, clock = make_pool(node("n1", "a100", 1), node("n2", "h100", 1))
    scaler = Scaler({"a100": NodeGroup(1), "h100": NodeGroup(1, maximum=2)}, clock, wait_count=1, log_size=2)
    hold(core, "alice", "h100")
    for user in ("bob", "carol", "dave"):
        core.request_lease(user, parse_gpu_spec("h100"))
    for second in range(3):
        clock.now = second
        made = scaler.recommendations(core)
        assert WantNodes("h100", 1, 3) in made  # up to the maximum of 2 nodes
    assert NodeMayGo("a100", "n1") in made  # nobody wants a100
    assert [when for when, _ in scaler.log] == [2, 2]  # the bounded log keeps the latest
