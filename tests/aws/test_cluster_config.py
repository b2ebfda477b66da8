"""The cluster config writer: node types from the catalog, Ray's own validation, the cost cap,
configs edited by hand, and ``jupyter-gpu aws cluster-config`` against moto's server."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pool_manager.aws import cluster_config as cc
from pool_manager.aws.catalog import InstanceOffer, offers_from_answers

from .test_catalog import ec2_endpoint, run_cli  # noqa: F401  (the module's moto server)

RECORDED = json.loads((Path(__file__).parent / "data" / "describe_instance_types.json").read_text())
OFFERS = {o.instance_type: o for o in offers_from_answers([RECORDED], "us-east-1")}
TYPES = [("h100", "p5.48xlarge"), ("a100", "p4d.24xlarge"), ("a10g", "g5.xlarge")]


def test_node_types_carry_our_gpu_types_as_ray_resources() -> None:
    plan = cc.plan_cluster(TYPES, OFFERS, min_nodes={"a10g": 1}, max_nodes={"h100": 2})
    config = cc.validate(cc.cluster_config(plan, "us-east-1", idle_minutes=5))
    nodes = config["available_node_types"]
    assert nodes["h100"]["resources"] == {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}
    assert nodes["h100"]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert (nodes["h100"]["min_workers"], nodes["h100"]["max_workers"]) == (0, 2)
    assert (nodes["a10g"]["min_workers"], nodes["a10g"]["max_workers"]) == (1, cc.DEFAULT_MAX_NODES)
    assert nodes["a100"]["resources"]["accelerator_type:A100"] == 1
    assert "InstanceMarketOptions" not in nodes["h100"]["node_config"]
    tags = nodes["h100"]["node_config"]["TagSpecifications"][0]["Tags"]
    assert {"Key": cc.GPU_TYPE_TAG, "Value": "h100"} in tags
    assert config["idle_timeout_minutes"] == 5
    assert config["provider"] == {"type": "aws", "region": "us-east-1", "cache_stopped_nodes": False}
    # the head runs the gateway and offers no GPUs
    assert config["head_node_type"] == "head" and nodes["head"]["resources"] == {"GPU": 0}
    assert any("jupyter-gpu gateway --ray=auto" in c for c in config["head_start_ray_commands"])
    assert config["max_workers"] == 2 + cc.DEFAULT_MAX_NODES * 2


def test_a100_80gb_instances_are_their_own_type() -> None:
    plan = cc.plan_cluster([("a100-80gb", "p4de.24xlarge")], OFFERS)
    nodes = cc.validate(cc.cluster_config(plan, "us-east-1"))["available_node_types"]
    assert nodes["a100-80gb"]["resources"]["accelerator_type:A100-80G"] == 1
    # a request for a100 may be served by 80 GB cards: the pool's type rule
    assert cc.plan_cluster([("a100", "p4de.24xlarge")], OFFERS).node_types[0].gpu_type == "a100-80gb"


def test_spot_adds_a_spot_twin_and_the_scorer_on_the_head() -> None:
    plan = cc.plan_cluster(TYPES, OFFERS, min_nodes={"h100": 1}, spot=True)
    config = cc.validate(cc.cluster_config(plan, "us-east-1"))
    nodes = config["available_node_types"]
    assert nodes["h100-spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert nodes["h100-spot"]["resources"] == nodes["h100"]["resources"]
    # the nodes kept up all the time are on-demand
    assert (nodes["h100-spot"]["min_workers"], nodes["h100"]["min_workers"]) == (0, 1)
    assert cc.SCORER_ENV in config["head_start_ray_commands"][0]


@pytest.mark.parametrize(("types", "message"), [
    ([("h100", "p4d.24xlarge")], "a p4d.24xlarge has 8x a100, not h100"),
    ([("h100", "p9.huge")], "no GPU instance type 'p9.huge'"),
    ([("h100", "p5.48xlarge"), ("h100", "p5.48xlarge")], "each GPU type once"),
])
def test_wrong_types_are_refused_by_name(types: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cc.plan_cluster(types, OFFERS)


def test_bad_assignments_name_the_part_and_the_form() -> None:
    with pytest.raises(ValueError, match=r"'h100' is not TYPE=INSTANCE_TYPE \(e.g. --types h100=p5"):
        cc.parse_assignments("h100", "--types", "TYPE=INSTANCE_TYPE")
    with pytest.raises(ValueError, match=r"'l4' is not one of --types \(h100, a100\)"):
        cc.node_counts("l4=1", "--max-nodes", ["h100", "a100"])
    with pytest.raises(ValueError, match="h100='two' is not a whole number"):
        cc.node_counts("h100=two", "--max-nodes", ["h100"])
    with pytest.raises(ValueError, match="--min-nodes h100=3 is more than its most nodes, 2"):
        cc.plan_cluster(TYPES, OFFERS, min_nodes={"h100": 3}, max_nodes={"h100": 2})


@pytest.mark.parametrize("cap", [150.0, 200.0, 1000.0])
@pytest.mark.parametrize("spot", [False, True])
def test_the_dearest_nodes_ray_may_run_stay_under_the_cost_cap(cap: float, spot: bool) -> None:
    plan = cc.plan_cluster(TYPES, OFFERS, spot=spot, max_cost_per_hour=cap, max_nodes={"h100": 1})
    config = cc.validate(cc.cluster_config(plan, "us-east-1"))
    # the worst Ray can do: max_workers nodes, each type up to its own max, dearest first
    prices = {"p5.48xlarge": 55.04, "p4d.24xlarge": 32.7726, "g5.xlarge": 1.006}
    nodes = [prices[t["node_config"]["InstanceType"]]
             for name, t in config["available_node_types"].items() if name != "head" for _ in range(t["max_workers"])]
    worst = sum(sorted(nodes, reverse=True)[: config["max_workers"]])
    assert worst <= cap
    assert config["max_workers"] >= 1


def test_a_cap_too_small_for_a_type_says_what_it_allows() -> None:
    with pytest.raises(ValueError, match=r"leaves \$25.00/h for h100: not one p5.48xlarge \(\$55.04/h\)"):
        cc.plan_cluster(TYPES[:2], OFFERS, max_cost_per_hour=50)
    with pytest.raises(ValueError, match=r"--max-nodes alone may cost \$110.08/h"):
        cc.plan_cluster(TYPES, OFFERS, max_nodes={"h100": 2}, max_cost_per_hour=100)


def test_a_cap_needs_every_price() -> None:
    types = [("a10g", "g5.12xlarge")]  # no list price known
    with pytest.raises(ValueError, match=r"--price g5\.12xlarge=DOLLARS_PER_HOUR"):
        cc.plan_cluster(types, OFFERS, max_cost_per_hour=100)
    plan = cc.plan_cluster(types, OFFERS, max_cost_per_hour=100, prices={"g5.12xlarge": 5.672})
    assert plan.node_types[0].max_nodes == 17 and plan.max_workers == 17


def _generated() -> dict[str, Any]:
    return cc.cluster_config(cc.plan_cluster(TYPES, OFFERS, spot=True), "us-east-1")


def test_a_config_edited_by_hand_keeps_working() -> None:
    config = copy.deepcopy(_generated())
    config["available_node_types"]["a100"]["max_workers"] = 3
    config["available_node_types"]["a100"]["node_config"].pop("TagSpecifications")
    config["available_node_types"]["l4"] = {  # an operator adds a type of their own
        "min_workers": 0, "max_workers": 2, "resources": {"CPU": 4, "GPU": 1, "accelerator_type:L4": 1},
        "node_config": {"InstanceType": "g6.xlarge", "ImageId": "ami-0123456789abcdef0"}}
    config["available_node_types"]["cpu"] = {"resources": {"CPU": 8}, "node_config": {"InstanceType": "m5.2xlarge"}}
    config["setup_commands"].append("pip install torch")
    cc.validate(config)
    read = {t.name: t for t in cc.gpu_node_types(config)}
    assert set(read) == {"h100", "h100-spot", "a100", "a100-spot", "a10g", "a10g-spot", "l4"}
    assert (read["l4"].gpu_type, read["l4"].instance_type, read["l4"].max_nodes) == ("l4", "g6.xlarge", 2)
    assert read["a100"].max_nodes == 3 and read["h100-spot"].spot and not read["h100"].spot


def test_ray_validation_names_what_is_wrong() -> None:
    config = copy.deepcopy(_generated())
    config["available_node_types"]["h100"]["max_workers"] = "two"
    with pytest.raises(ValueError, match="Ray rejects the cluster config at available_node_types/h100/max_workers"):
        cc.validate(config)
    config = copy.deepcopy(_generated())
    config["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        cc.validate(config)


# --- the command, against moto's server ---------------------------------------------------

def test_command_writes_a_config_that_checks(ec2_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "cluster.yaml"
    result = run_cli(ec2_endpoint, "cluster-config", "--types", "h100=p5.48xlarge,a10g=g5.xlarge", "--spot",
                     "--min-nodes", "a10g=1", "--max-cost-per-hour", "120", "--idle-minutes", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"ray up {out}" in result.stderr
    config = yaml.safe_load(out.read_text())
    assert config["idle_timeout_minutes"] == 3
    assert config["available_node_types"]["a10g"]["min_workers"] == 1
    checked = run_cli(ec2_endpoint, "cluster-config", "--check", str(out), region=False)
    assert checked.returncode == 0, checked.stderr
    assert "h100-spot: h100 on p5.48xlarge (8 GPUs, spot), 0-1 nodes" in checked.stdout


def test_command_errors_name_the_value(ec2_endpoint: str) -> None:  # noqa: F811
    result = run_cli(ec2_endpoint, "cluster-config", "--types", "h100=p4d.24xlarge")
    assert result.returncode == 2 and "not h100" in result.stderr
    result = run_cli(ec2_endpoint, "cluster-config", "--types", "h100=p5.48xlarge", "--max-cost-per-hour", "10")
    assert result.returncode == 2 and "not one p5.48xlarge" in result.stderr
    result = run_cli(ec2_endpoint, "cluster-config", "--types", "h100=nope.large")
    assert result.returncode == 2 and "nope.large" in result.stderr


def test_offer_without_spot_stays_on_demand() -> None:
    offer = OFFERS["g5.xlarge"]
    no_spot = {"g5.xlarge": InstanceOffer(**{**offer.__dict__, "spot_supported": False})}
    plan = cc.plan_cluster([("a10g", "g5.xlarge")], no_spot, spot=True)
    assert [t.name for t in plan.node_types] == ["a10g"]
    assert plan.notes == ["g5.xlarge has no spot market: a10g nodes are on-demand"]
