"""Default prices of one GPU-hour for the GPU types people know, so that a gateway nobody has
configured (the demo, an emulated pool) shows what a lease would really cost.

Each price is a public cloud's on-demand list price of an instance divided by its GPUs: AWS EC2
On-Demand, Linux, US East (N. Virginia), from https://aws.amazon.com/ec2/pricing/on-demand/ as
listed in July 2025 (P5 after AWS's June 2025 price cut). Single-GPU instances include their
vCPUs and memory, as a pooled kernel does. Operators override any of them with
``c.PoolManager.price_per_gpu_hour``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListPrice:
    per_gpu_hour: float
    source: str  # instance type and its price per hour, for whoever checks the number
    as_of: str


_AWS_JULY_2025 = "2025-07"

#: normalised GPU type (see inventory.normalize_gpu_name) -> its list price
KNOWN_PRICES: dict[str, ListPrice] = {
    "a100": ListPrice(4.10, "AWS p4d.24xlarge, 8x A100 40GB, $32.7726/h", _AWS_JULY_2025),
    "a100-80gb": ListPrice(5.12, "AWS p4de.24xlarge, 8x A100 80GB, $40.9657/h", _AWS_JULY_2025),
    "h100": ListPrice(6.88, "AWS p5.48xlarge, 8x H100 80GB, $55.04/h", _AWS_JULY_2025),
    "v100": ListPrice(3.06, "AWS p3.2xlarge, 1x V100 16GB, $3.06/h", _AWS_JULY_2025),
    "a10g": ListPrice(1.01, "AWS g5.xlarge, 1x A10G 24GB, $1.006/h", _AWS_JULY_2025),
    "l40s": ListPrice(1.86, "AWS g6e.xlarge, 1x L40S 48GB, $1.861/h", _AWS_JULY_2025),
    "l4": ListPrice(0.80, "AWS g6.xlarge, 1x L4 24GB, $0.8048/h", _AWS_JULY_2025),
    "t4": ListPrice(0.53, "AWS g4dn.xlarge, 1x T4 16GB, $0.526/h", _AWS_JULY_2025),
}


def lookup(gpu_type: str, prices: dict[str, float]) -> float | None:
    """The price of ``gpu_type`` in ``prices``: its own entry, else its model's
    (``a100-40gb`` costs what ``a100`` does), else None."""
    if gpu_type in prices:
        return prices[gpu_type]
    return prices.get(gpu_type.split("-")[0])


def list_price(gpu_type: str) -> float | None:
    """The known list price of ``gpu_type`` per GPU-hour, or None for a type not in the table."""
    return lookup(gpu_type, {name: price.per_gpu_hour for name, price in KNOWN_PRICES.items()})
