"""What a GPU-hour costs when the operator configured nothing, something, or an unknown type."""

from __future__ import annotations

import re

import pytest
from traitlets.config import Config

from pool_manager.aws.list_prices import on_demand_price
from pool_manager.manager import PoolManager
from pool_manager.prices import INSTANCE_PRICES, KNOWN_PRICES, list_price


def pool(**settings: object) -> PoolManager:
    config = Config()
    for name, value in settings.items():
        setattr(config.PoolManager, name, value)
    return PoolManager(config=config)


def test_known_types_cost_their_list_price_without_any_config() -> None:
    manager = pool()
    assert manager.price("a100") == 4.10
    assert manager.price("h100") == 6.88
    # the 80 GB A100 has its own, higher price; a 40 GB one is priced as its model
    assert manager.price("a100-80gb") == 5.12
    assert manager.price("a100-40gb") == 4.10
    assert manager.price("cpu") == 0.0


def test_operator_prices_win_over_list_prices_and_cover_the_model_s_variants() -> None:
    manager = pool(price_per_gpu_hour={"a100": 2.5}, cpu_price=0.1)
    assert manager.price("a100") == 2.5
    assert manager.price("a100-80gb") == 2.5  # the operator priced the model: all its variants
    assert manager.price("h100") == 6.88
    assert manager.price("cpu") == 0.1


def test_unknown_types_use_the_default_price() -> None:
    assert pool().price("mi300x") == 1.0
    assert pool(default_price=3.0).price("mi300x") == 3.0


@pytest.mark.parametrize("gpu_type", sorted(KNOWN_PRICES))
def test_every_list_price_names_its_instance_and_matches_its_per_gpu_share(gpu_type: str) -> None:
    listed = KNOWN_PRICES[gpu_type]
    match = re.search(r"(\d+)x .*\$([\d.]+)/h", listed.source)
    assert match, listed.source
    gpus, instance_price = int(match.group(1)), float(match.group(2))
    assert listed.per_gpu_hour == pytest.approx(instance_price / gpus, abs=0.005)
    assert re.fullmatch(r"\d{4}-\d{2}", listed.as_of)


@pytest.mark.parametrize("instance_type", sorted(INSTANCE_PRICES))
def test_the_catalog_s_instance_price_and_the_gpu_hour_price_come_from_one_table(instance_type: str) -> None:
    per_hour, source = on_demand_price(instance_type, "us-east-1")
    gpu_type, gpus = INSTANCE_PRICES[instance_type].gpu_type, INSTANCE_PRICES[instance_type].gpus
    assert per_hour is not None and "us-east-1" in source
    assert list_price(gpu_type) == pytest.approx(per_hour / gpus, abs=0.005)
