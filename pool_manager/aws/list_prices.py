"""On-demand list prices of GPU instances, for a catalog that cannot ask AWS's Price List API:
the built-in table of :mod:`pool_manager.prices` (the same figures it divides into prices per
GPU-hour). Only instance types whose price was read there are known; any other type's on-demand
price is shown as unknown rather than guessed. Other regions cost more or less: the source says
which region the figure is for.
"""

from __future__ import annotations

from ..prices import INSTANCE_PRICES, LIST_PRICE_AS_OF, LIST_PRICE_REGION


def on_demand_price(instance_type: str, region: str) -> tuple[float | None, str]:
    """The list price of ``instance_type`` per hour and where it comes from (None: not known)."""
    price = INSTANCE_PRICES.get(instance_type)
    if price is None:
        return None, "not in the built-in list (pool_manager/prices.py)"
    where = f"AWS list price {LIST_PRICE_REGION} {LIST_PRICE_AS_OF}"
    if region != LIST_PRICE_REGION:
        where += f" (not {region}'s: prices differ by region)"
    return price.per_hour, where
