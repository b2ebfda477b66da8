"""List prices: the one table of what the GPU instances people know cost, from which come both
the default price of one GPU-hour of each GPU type (so that a gateway nobody has configured, the
demo, an emulated pool, shows what a lease would really cost) and the on-demand price of each
instance type that ``jupyter-gpu aws catalog`` and the autoscaled pool's metering show.

AWS EC2 On-Demand, Linux, US East (N. Virginia), from https://aws.amazon.com/ec2/pricing/on-demand/
as listed in July 2025 (P5 after AWS's June 2025 price cut). A GPU type's price is its instance's
divided by its GPUs, to the cent; single-GPU instances include their vCPUs and memory, as a pooled
kernel does. Operators override any GPU type's price with ``c.PoolManager.price_per_gpu_hour``.
"""

from __future__ import annotations

from dataclasses import dataclass

LIST_PRICE_REGION = "us-east-1"
LIST_PRICE_AS_OF = "2025-07"


@dataclass(frozen=True)
class InstancePrice:
    """One instance type's on-demand dollars per hour in LIST_PRICE_REGION, and its GPUs."""

    gpu_type: str  # normalised (see inventory.normalize_gpu_name)
    gpus: int
    gpu_name: str
    per_hour: float


#: instance type -> its list price; the first instance of a GPU type sets that type's price per GPU-hour
INSTANCE_PRICES: dict[str, InstancePrice] = {
    "p4d.24xlarge": InstancePrice("a100", 8, "A100 40GB", 32.7726),
    "p4de.24xlarge": InstancePrice("a100-80gb", 8, "A100 80GB", 40.9657),
    "p5.48xlarge": InstancePrice("h100", 8, "H100 80GB", 55.04),
    "p3.2xlarge": InstancePrice("v100", 1, "V100 16GB", 3.06),
    "g5.xlarge": InstancePrice("a10g", 1, "A10G 24GB", 1.006),
    "g6e.xlarge": InstancePrice("l40s", 1, "L40S 48GB", 1.861),
    "g6.xlarge": InstancePrice("l4", 1, "L4 24GB", 0.8048),
    "g4dn.xlarge": InstancePrice("t4", 1, "T4 16GB", 0.526),
}


@dataclass(frozen=True)
class ListPrice:
    per_gpu_hour: float
    source: str  # instance type and its price per hour, for whoever checks the number
    as_of: str


def per_gpu_prices(instances: dict[str, InstancePrice]) -> dict[str, ListPrice]:
    """Per GPU type, the first of its instances' price divided by its GPUs, to the cent."""
    prices: dict[str, ListPrice] = {}
    for instance_type, price in instances.items():
        prices.setdefault(price.gpu_type, ListPrice(
            round(price.per_hour / price.gpus, 2),
            f"AWS {instance_type}, {price.gpus}x {price.gpu_name}, ${price.per_hour:g}/h", LIST_PRICE_AS_OF))
    return prices


#: normalised GPU type -> its list price per GPU-hour
KNOWN_PRICES = per_gpu_prices(INSTANCE_PRICES)


def lookup(gpu_type: str, prices: dict[str, float]) -> float | None:
    """The price of ``gpu_type`` in ``prices``: its own entry, else its model's
    (``a100-40gb`` costs what ``a100`` does), else None."""
    if gpu_type in prices:
        return prices[gpu_type]
    return prices.get(gpu_type.split("-")[0])


def list_price(gpu_type: str) -> float | None:
    """The known list price of ``gpu_type`` per GPU-hour, or None for a type not in the table."""
    return lookup(gpu_type, {name: price.per_gpu_hour for name, price in KNOWN_PRICES.items()})
