"""What the pool asks Ray's autoscaler for, on a real core with a fake clock and no Ray: types
that nodes can be launched for, bundles per lease, notes for queued users, fallbacks when a
type is refused, the end of a wait with no_capacity, and Ray's status report as it writes it."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from jupyter_gpu.protocol import GRANTED, QUEUED, parse_gpu_spec
from pool_manager.core import NO_CAPACITY, LeaseRequestError, PoolCore, PoolPolicy
from pool_manager.model import Device, Lease, StartKernel
from pool_manager.ray_autoscale import (
    AutoscalerReport,
    DemandPlanner,
    IdleNodes,
    NodeKind,
    node_kinds,
    parse_report,
)
from pool_manager.scaler import NodeGroup, Scaler
from tests.test_pool_core import FakeClock

H100 = NodeKind("h100", "p5.48xlarge", 8, ("h100-spot", "h100"))
A100 = NodeKind("a100", "p4d.24xlarge", 8, ("a100",))
CAPACITY = "InsufficientInstanceCapacity"


def make_pool(max_queue_wait: float = 0.0) -> tuple[PoolCore, DemandPlanner, FakeClock]:
    clock = FakeClock()
    clock.set(1000.0)
    ids = itertools.count(1)
    core = PoolCore([], PoolPolicy(min_warm=0), clock, new_id=lambda: f"id{next(ids)}",
                    launchable={"h100": 8, "a100": 8})
    return core, DemandPlanner({"h100": H100, "a100": A100}, clock, max_queue_wait), clock


def ask(core: PoolCore, spec: str, user: str = "ada") -> Lease:
    return core.request_lease(user, parse_gpu_spec(spec))


def bundle(accelerator: str, gpus: int = 1) -> dict[str, float]:
    return {"GPU": float(gpus), f"accelerator_type:{accelerator}": 0.001}


def test_a_type_without_nodes_queues_and_becomes_demand() -> None:
    core, planner, _ = make_pool()
    lease = ask(core, "h100")
    assert lease.state == QUEUED
    plan = planner.plan(core, AutoscalerReport())
    assert plan.bundles == [bundle("H100")]
    assert plan.notes == {lease.id: "starting a p5.48xlarge for h100: usually 3-5 min"}


def test_queued_users_are_told_how_many_are_ahead() -> None:
    core, planner, _ = make_pool()
    leases = [ask(core, "h100", user) for user in ("ada", "bob", "cy")]
    notes = planner.plan(core, AutoscalerReport()).notes
    assert notes[leases[2].id] == "starting a p5.48xlarge for h100: usually 3-5 min; 2 ahead of you"
    assert notes[leases[1].id].endswith("; 1 ahead of you")


def test_multi_gpu_leases_are_one_bundle_and_too_many_gpus_is_refused() -> None:
    core, planner, _ = make_pool()
    ask(core, "h100:4")
    assert planner.plan(core, AutoscalerReport()).bundles == [bundle("H100", 4)]
    with pytest.raises(LeaseRequestError, match="no node has more than 8") as refused:
        ask(core, "h100:16")
    assert refused.value.reason == "too_many_gpus"
    with pytest.raises(LeaseRequestError, match="unknown GPU type 'l4'"):
        ask(core, "l4")


def test_refused_spot_is_said_and_on_demand_is_still_asked_for() -> None:
    core, planner, _ = make_pool()
    lease = ask(core, "h100")
    plan = planner.plan(core, AutoscalerReport(refused={"h100-spot": CAPACITY}))
    assert plan.bundles == [bundle("H100")]
    assert plan.notes[lease.id] == (
        f"starting a p5.48xlarge on-demand (spot refused: {CAPACITY}) for h100: usually 3-5 min")


def test_a_refused_type_moves_the_demand_to_the_lease_fallback() -> None:
    core, planner, _ = make_pool()
    lease = ask(core, "h100|a100")
    plan = planner.plan(core, AutoscalerReport(refused={"h100-spot": CAPACITY, "h100": CAPACITY}))
    assert plan.bundles == [bundle("A100")]
    assert plan.notes[lease.id] == f"no h100 ({CAPACITY}), starting a p4d.24xlarge for a100: usually 3-5 min"
    # the next round finds the a100 node launching: the note still says why not h100
    again = planner.plan(core, AutoscalerReport(refused={"h100-spot": CAPACITY, "h100": CAPACITY},
                                                launching={"a100": 1}))
    assert again.notes[lease.id] == plan.notes[lease.id]


def test_a_fallback_node_already_launching_is_taken_before_launching_another() -> None:
    core, planner, _ = make_pool()
    ask(core, "a100")
    fallback = ask(core, "h100|a100", "bob")
    plan = planner.plan(core, AutoscalerReport(launching={"a100": 1}))
    assert plan.bundles == [bundle("A100"), bundle("A100")]
    assert plan.notes[fallback.id].startswith("starting a p4d.24xlarge for a100")


def test_no_capacity_anywhere_keeps_the_lease_queued_with_the_reason_then_ends_it() -> None:
    core, planner, clock = make_pool(max_queue_wait=600)
    lease = ask(core, "h100")
    refused = AutoscalerReport(refused={"h100-spot": CAPACITY, "h100": CAPACITY})
    plan = planner.plan(core, refused)
    assert plan.bundles == [] and plan.expired == {}
    assert plan.notes[lease.id] == f"no capacity: h100: {CAPACITY}; waiting up to 10 min in all"
    clock.now += 601
    plan = planner.plan(core, refused)
    message = plan.expired[lease.id]
    assert message.startswith(f"no h100 within --max-queue-wait 10 min (no capacity: h100: {CAPACITY}")
    assert "`%%gpu h100|any`" in message
    core.end_lease(lease.id, NO_CAPACITY)
    assert (lease.state, lease.reason) == ("released", "no_capacity")
    assert planner.plan(core, refused).bundles == []
    assert [entry for _, entry in planner.log] == [
        "refused h100: InsufficientInstanceCapacity", "refused h100-spot: InsufficientInstanceCapacity",
        f"lease {lease.id} ended no_capacity: {message}"]


def test_a_cancelled_wait_is_still_cancelled() -> None:
    core, _, _ = make_pool()
    lease = ask(core, "h100")
    core.end_lease(lease.id, "deleted")
    assert lease.reason == "cancelled"


def test_when_the_node_joins_the_lease_is_granted_and_its_gpus_stay_asked_for() -> None:
    core, planner, _ = make_pool()
    lease = ask(core, "h100:2")
    planner.plan(core, AutoscalerReport())
    core.add_devices([Device(f"n1/{i}", "h100", i, "H100", 81920, True, "10.77.0.132") for i in range(8)])
    assert lease.slot_id is not None and lease.state == QUEUED  # its kernel starts on the new node
    plan = planner.plan(core, AutoscalerReport())
    assert plan.bundles == [bundle("H100", 2)] and plan.notes == {}
    core.kernel_ready(lease.slot_id)
    assert lease.state == GRANTED
    assert planner.plan(core, AutoscalerReport()).bundles == [bundle("H100", 2)]
    core.end_lease(lease.id, "deleted")
    assert planner.plan(core, AutoscalerReport()).bundles == []  # the node may idle out
    assert [entry for _, entry in planner.log] == [
        "demand h100: 2 GPU(s) queued -> p5.48xlarge nodes (h100-spot, h100)",
        "demand h100: 0 GPU(s) queued -> p5.48xlarge nodes (h100-spot, h100)"]


def test_report_as_rays_monitor_writes_it() -> None:
    autoscaler = pytest.importorskip("ray.autoscaler._private.autoscaler")
    tracker = pytest.importorskip("ray.autoscaler._private.node_provider_availability_tracker")
    info = tracker.UnavailableNodeInformation(category=CAPACITY, description="We currently do not have ...")
    summary = autoscaler.AutoscalerSummary(
        active_nodes={"head": 1}, idle_nodes={}, pending_nodes=[("10.77.0.132", "a100", "setting-up")],
        pending_launches={"h100": 1}, failed_nodes=[],
        node_availability_summary=tracker.NodeAvailabilitySummary(node_availabilities={
            "h100-spot": tracker.NodeAvailabilityRecord("h100-spot", False, 1.0, info),
            "h100": tracker.NodeAvailabilityRecord("h100", True, 1.0, None)}))
    report = parse_report(json.dumps({"autoscaler_report": asdict(summary), "load_metrics_report": {}}))
    assert report.launching == {"h100": 1, "a100": 1}
    assert report.refused == {"h100-spot": CAPACITY}
    assert parse_report(None) == AutoscalerReport()


def test_node_kinds_of_a_generated_config() -> None:
    from pool_manager.aws import cluster_config as cc
    from pool_manager.aws.catalog import offers_from_answers

    recorded = json.loads((Path(__file__).parent / "aws" / "data" / "describe_instance_types.json").read_text())
    offers = {o.instance_type: o for o in offers_from_answers([recorded], "us-east-1")}
    plan = cc.plan_cluster([("h100", "p5.48xlarge"), ("a10g", "g5.xlarge")], offers, spot=True)
    kinds = node_kinds(cc.cluster_config(plan, "us-east-1"))
    assert kinds["h100"] == NodeKind("h100", "p5.48xlarge", 8, ("h100-spot", "h100"), 0, 55.04)
    assert kinds["a10g"].node_types == ("a10g-spot", "a10g")


# --- idle nodes drained so that Ray can terminate them ------------------------------------------


NODE = "10.77.0.132"


def pool_with_node(minimum: int = 0) -> tuple[PoolCore, IdleNodes]:
    clock = FakeClock()
    clock.set(1000.0)
    ids = itertools.count(1)
    devices = [Device(f"n1/{i}", "h100", i, "H100", 81920, True, "10.77.0.132") for i in range(8)]
    core = PoolCore(devices, PoolPolicy(min_warm=1), clock, new_id=lambda: f"id{next(ids)}", launchable={"h100": 8})
    core.tick()  # the warm kernel's start, as the service's first tick
    for action in core.pop_actions():
        if isinstance(action, StartKernel):
            core.kernel_ready(action.slot_id)
    return core, IdleNodes(Scaler({"h100": NodeGroup(8, minimum)}, clock, wait_count=2))


def use(core: PoolCore, node: str, usable: bool) -> list[object]:
    for key in IdleNodes.device_keys(core, node, draining=not usable):
        core.set_device_health(key, usable)
    return core.pop_actions()


def test_an_idle_node_with_a_warm_kernel_is_drained_after_the_wait_and_taken_back_for_a_lease() -> None:
    core, idle = pool_with_node()
    assert core.summaries()[0].warm == 1  # the warm kernel would keep Ray from ever seeing it idle
    assert idle.plan(core) == ([], [])  # one round idle: not yet
    assert idle.plan(core) == (["10.77.0.132"], [])
    actions = use(core, NODE, False)
    assert [type(a).__name__ for a in actions] == ["KillKernel"]  # the spare goes, none replaces it
    assert idle.plan(core) == ([], [])
    lease = ask(core, "h100")
    assert lease.state == QUEUED and lease.slot_id is None
    assert idle.plan(core) == ([], ["10.77.0.132"])
    use(core, NODE, True)
    assert lease.slot_id is not None  # placed on the node that was about to go


def test_nodes_in_use_or_kept_as_the_minimum_are_never_drained() -> None:
    core, idle = pool_with_node()
    lease = ask(core, "h100")
    assert lease.state == GRANTED  # on the warm kernel
    for _ in range(4):
        assert idle.plan(core) == ([], [])
    core.end_lease(lease.id, "deleted")
    core, idle = pool_with_node(minimum=1)
    for _ in range(4):
        assert idle.plan(core) == ([], [])


def test_a_terminated_node_is_forgotten() -> None:
    core, idle = pool_with_node()
    idle.plan(core)
    assert idle.plan(core) == (["10.77.0.132"], [])
    use(core, NODE, False)
    core.remove_node("10.77.0.132")
    ask(core, "h100")
    assert idle.plan(core) == ([], [])
    assert idle.draining == {}


def test_a_drained_node_whose_spot_end_was_announced_is_not_taken_back_for_a_lease() -> None:
    core, idle = pool_with_node()
    idle.plan(core)
    assert idle.plan(core) == ([NODE], [])
    use(core, NODE, False)
    lease = ask(core, "h100")
    assert idle.plan(core, going={NODE}) == ([], [])
    assert lease.state == QUEUED and lease.slot_id is None  # it waits for a node that stays
