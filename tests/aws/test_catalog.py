"""The GPU catalog: recorded DescribeInstanceTypes answers read into offers, spot prices picked
from a price history, and ``jupyter-gpu aws catalog`` against moto's server.

``data/describe_instance_types.json`` was recorded from moto 5.2.5 (its copy of EC2's instance
type data) with ``describe_instance_types(InstanceTypes=[...])``; the spot price entries below are
written in the shape AWS documents for ``DescribeSpotPriceHistory``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool_manager.aws.catalog import cheapest_spot, gpu_type_for, offers_from_answers, with_spot_prices

RECORDED = json.loads((Path(__file__).parent / "data" / "describe_instance_types.json").read_text())


def test_recorded_answer_becomes_offers_in_our_type_names() -> None:
    offers = {offer.instance_type: offer for offer in offers_from_answers([RECORDED], "us-east-1")}
    # a CPU type and a fractional GPU (g6f.large: a slice of an L4) are no pool nodes
    assert "m5.large" not in offers and "g6f.large" not in offers
    p4d, p4de, p5 = offers["p4d.24xlarge"], offers["p4de.24xlarge"], offers["p5.48xlarge"]
    assert (p4d.gpu_type, p4d.gpus, p4d.gpu_memory_mib, p4d.vcpus) == ("a100", 8, 40960, 96)
    assert (p4de.gpu_type, p4de.gpu_memory_mib) == ("a100-80gb", 81920)
    assert (p5.gpu_type, p5.gpus, p5.vcpus) == ("h100", 8, 192)
    assert offers["p3dn.24xlarge"].gpu_type == "v100-32gb"  # the 16 GB V100 is plain v100
    assert {offers[t].gpu_type for t in ("g5.xlarge", "g5.12xlarge")} == {"a10g"}
    assert offers["g5.12xlarge"].gpus == 4
    assert offers["g6.xlarge"].gpu_type == "l4" and offers["g6e.xlarge"].gpu_type == "l40s"
    assert offers["g4dn.xlarge"].gpu_type == "t4"
    assert p5.spot_supported


def test_on_demand_prices_say_where_they_come_from() -> None:
    east = {o.instance_type: o for o in offers_from_answers([RECORDED], "us-east-1")}
    assert east["p5.48xlarge"].on_demand_per_hour == 55.04
    assert east["p5.48xlarge"].on_demand_source == "AWS list price us-east-1 2025-07"
    assert east["g5.12xlarge"].on_demand_per_hour is None
    assert "not in the built-in list" in east["g5.12xlarge"].on_demand_source
    west = {o.instance_type: o for o in offers_from_answers([RECORDED], "eu-west-1")}
    assert "not eu-west-1's" in west["p5.48xlarge"].on_demand_source


def test_offers_sorted_by_type_then_size() -> None:
    offers = offers_from_answers([RECORDED], "us-east-1")
    keys = [(o.gpu_type, o.gpus) for o in offers]
    assert keys == sorted(keys)
    assert [o.instance_type for o in offers if o.gpu_type == "a10g"] == ["g5.xlarge", "g5.12xlarge"]


def test_gpu_type_names_follow_the_nvml_convention() -> None:
    assert gpu_type_for("A100", 40960) == "a100"
    assert gpu_type_for("A100", 81920) == "a100-80gb"
    assert gpu_type_for("H100", 81920) == "h100"
    assert gpu_type_for("A10G", 22888) == "a10g"  # within 10% of the nominal 24 GB
    assert gpu_type_for("RTX PRO Server 6000", 98304) == "rtxproserver6000"


def _spot(zone: str, price: str, hour: int, instance_type: str = "p5.48xlarge") -> dict[str, object]:
    return {"AvailabilityZone": zone, "InstanceType": instance_type, "ProductDescription": "Linux/UNIX",
            "SpotPrice": price, "Timestamp": datetime.datetime(2026, 11, 29, hour, 0, tzinfo=datetime.UTC)}


def test_spot_price_is_the_newest_per_zone_and_the_cheapest_zone() -> None:
    history = [_spot("us-east-1a", "20.0", 9), _spot("us-east-1a", "30.0", 10),  # 1a now costs 30
               _spot("us-east-1b", "25.0", 8), _spot("us-east-1c", "12.0", 7), _spot("us-east-1c", "40.0", 11),
               _spot("us-east-1a", "0.5", 10, "g5.xlarge")]
    prices = cheapest_spot(history)
    assert prices["p5.48xlarge"] == (25.0, "EC2 spot price history, us-east-1b, 2026-11-29 08:00")
    assert prices["g5.xlarge"][0] == 0.5


def test_types_without_spot_or_without_a_price_say_so() -> None:
    offers = offers_from_answers([RECORDED], "us-east-1")
    offers = [o for o in offers if o.instance_type in ("p5.48xlarge", "g5.xlarge")]
    priced = {o.instance_type: o for o in with_spot_prices(offers, {"p5.48xlarge": (21.5, "history")})}
    assert (priced["p5.48xlarge"].spot_per_hour, priced["p5.48xlarge"].spot_source) == (21.5, "history")
    assert (priced["g5.xlarge"].spot_per_hour, priced["g5.xlarge"].spot_source) == (
        None, "no spot price in the history")


# --- the command, against moto's server ---------------------------------------------------

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def ec2_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def run_cli(endpoint: str, *args: str, region: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_MAX_ATTEMPTS="1")
    argv = ["aws", *args, *(["--region", "us-east-1"] if region else [])]
    return subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=180)  # imports Ray: slow on a loaded machine


def test_catalog_json_from_ec2(ec2_endpoint: str) -> None:
    result = run_cli(ec2_endpoint, "catalog", "--json")
    assert result.returncode == 0, result.stderr
    offers = {row["instance_type"]: row for row in json.loads(result.stdout)}
    assert offers["p5.48xlarge"]["gpu_type"] == "h100" and offers["p5.48xlarge"]["gpus"] == 8
    assert offers["p5.48xlarge"]["on_demand_per_hour"] == 55.04
    # moto answers DescribeSpotPriceHistory with a price for every zone
    assert offers["p5.48xlarge"]["spot_per_hour"] is not None
    assert offers["p5.48xlarge"]["spot_source"].startswith("EC2 spot price history, us-east-1")
    assert "m5.large" not in offers and all(row["gpus"] >= 1 for row in offers.values())


def test_catalog_table_for_people(ec2_endpoint: str) -> None:
    result = run_cli(ec2_endpoint, "catalog")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["GPU", "TYPE", "INSTANCE"]
    p4de = next(line for line in lines if " p4de.24xlarge " in line)
    assert p4de.split()[:4] == ["a100-80gb", "p4de.24xlarge", "8", "80"]
    assert "40.9657" in p4de and "AWS list price us-east-1" in p4de


def test_catalog_without_a_region_says_how_to_give_one(ec2_endpoint: str) -> None:
    result = run_cli(ec2_endpoint, "catalog", region=False)
    assert result.returncode != 0
    assert "--region" in result.stderr and "AWS_REGION" in result.stderr


def test_catalog_unreachable_names_the_region_and_permissions() -> None:
    result = run_cli("http://127.0.0.1:9", "catalog")
    assert result.returncode == 1
    assert "us-east-1" in result.stderr and "ec2:DescribeInstanceTypes" in result.stderr
