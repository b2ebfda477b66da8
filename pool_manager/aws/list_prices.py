"""On-demand list prices of GPU instances, for a catalog that cannot ask AWS's Price List API.

AWS EC2 On-Demand, Linux, US East (N. Virginia), from https://aws.amazon.com/ec2/pricing/on-demand/
as listed in July 2025 (P5 after AWS's June 2025 price cut): the same figures
:mod:`pool_manager.prices` divides into prices per GPU-hour. Only instance types whose price was
read there are listed; any other type's on-demand price is shown as unknown rather than guessed.
Other regions cost more or less: the source says which region the figure is for.
"""

from __future__ import annotations

LIST_PRICE_REGION = "us-east-1"
LIST_PRICE_AS_OF = "2025-07"

#: instance type -> on-demand dollars per hour in LIST_PRICE_REGION
ON_DEMAND_PER_HOUR: dict[str, float] = {
    "p4d.24xlarge": 32.7726,
    "p4de.24xlarge": 40.9657,
    "p5.48xlarge": 55.04,
    "p3.2xlarge": 3.06,
    "g5.xlarge": 1.006,
    "g6e.xlarge": 1.861,
    "g6.xlarge": 0.8048,
    "g4dn.xlarge": 0.526,
}


def on_demand_price(instance_type: str, region: str) -> tuple[float | None, str]:
    """The list price of ``instance_type`` per hour and where it comes from (None: not known)."""
    price = ON_DEMAND_PER_HOUR.get(instance_type)
    if price is None:
        return None, "not in the built-in list (pool_manager/aws/list_prices.py)"
    where = f"AWS list price {LIST_PRICE_REGION} {LIST_PRICE_AS_OF}"
    if region != LIST_PRICE_REGION:
        where += f" (not {region}'s: prices differ by region)"
    return price, where
