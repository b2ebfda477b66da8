"""Which node type Ray's autoscaler launches for a demand, with our scorer plugged in: Ray's own
decision function (``get_nodes_for``) fed the node types of a generated cluster config."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from pool_manager.aws import cluster_config as cc
from pool_manager.aws.catalog import offers_from_answers
from pool_manager.aws.scoring import spot_first_scorer

scheduler = pytest.importorskip("ray.autoscaler._private.resource_demand_scheduler")
tracker = pytest.importorskip("ray.autoscaler._private.node_provider_availability_tracker")

RECORDED = json.loads((Path(__file__).parent / "data" / "describe_instance_types.json").read_text())
OFFERS = {o.instance_type: o for o in offers_from_answers([RECORDED], "us-east-1")}
H100 = {"GPU": 1, "accelerator_type:H100": 0.001}  # what a slot actor for one H100 asks Ray for


def node_types(spot: bool = True) -> dict[str, Any]:
    plan = cc.plan_cluster([("h100", "p5.48xlarge"), ("a10g", "g5.xlarge")], OFFERS, spot=spot,
                           max_nodes={"h100": 2, "a10g": 4})
    config: dict[str, Any] = cc.validate(cc.cluster_config(plan, "us-east-1"))["available_node_types"]
    return config


def refused(*types: str) -> Any:
    info = tracker.UnavailableNodeInformation(category="InsufficientInstanceCapacity", description="no capacity")
    return tracker.NodeAvailabilitySummary(node_availabilities={
        t: tracker.NodeAvailabilityRecord(node_type=t, is_available=False, last_checked_timestamp=time.time(),
                                          unavailable_node_information=info) for t in types})


def launches(demand: list[dict[str, float]], existing: dict[str, int] | None = None,
             summary: Any = None) -> tuple[dict[str, int], list[dict[str, float]]]:
    scorer = functools.partial(spot_first_scorer, node_availability_summary=summary or refused())
    to_add, unmet = scheduler.get_nodes_for(node_types(), existing or {}, "head", 10, demand, scorer)
    return dict(to_add), unmet


def test_demand_for_h100_launches_a_spot_p5_first() -> None:
    assert launches([H100]) == ({"h100-spot": 1}, [])


def test_refused_spot_falls_back_to_on_demand() -> None:
    assert launches([H100], summary=refused("h100-spot")) == ({"h100": 1}, [])


def test_when_both_are_refused_nothing_launches_and_the_demand_stays_unmet() -> None:
    assert launches([H100], summary=refused("h100-spot", "h100")) == ({}, [H100])


def test_spot_at_its_most_nodes_goes_on_demand() -> None:
    assert launches([H100], existing={"h100-spot": 2}) == ({"h100": 1}, [])


def test_demand_of_nine_h100s_needs_two_nodes_and_a10g_demand_no_h100() -> None:
    assert launches([H100] * 9) == ({"h100-spot": 2}, [])
    a10g = {"GPU": 1, "accelerator_type:A10G": 0.001}
    assert launches([a10g, a10g]) == ({"a10g-spot": 2}, [])


def test_without_spot_the_on_demand_type_is_launched() -> None:
    scorer = functools.partial(spot_first_scorer, node_availability_summary=refused())
    to_add, _ = scheduler.get_nodes_for(node_types(spot=False), {}, "head", 10, [H100], scorer)
    assert dict(to_add) == {"h100": 1}
