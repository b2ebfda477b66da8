"""The GPU instance types of a region, in the pool's GPU type names, with their prices.

Read from EC2's ``DescribeInstanceTypes`` (``GpuInfo``: GPU model, count, memory per GPU) and,
for spot, ``DescribeSpotPriceHistory``; on-demand prices come from :mod:`.list_prices`. Reading
the answers is plain data (:func:`offers_from_answers`, :func:`cheapest_spot`), so it is
tested against recorded answers; :func:`fetch_catalog` is the thin part that calls boto3.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..inventory import KNOWN_MEMORY_MB, normalize_gpu_name
from .list_prices import on_demand_price

#: a GPU model's memory that differs from its nominal size by more than this is another type
#: (p4de's 80 GB A100s are ``a100-80gb``); within it, it is the same (NVML and EC2 report
#: 22888 MiB for the A10G's nominal 24 GB)
_SAME_MEMORY = 0.10


@dataclass(frozen=True)
class InstanceOffer:
    """One GPU instance type: what a node of it brings to the pool, and what it costs."""

    instance_type: str
    gpu_type: str  # the name users ask for: a100, a100-80gb, h100, a10g, l4, ...
    gpu_name: str  # EC2's name of the GPU model, e.g. "A100"
    gpus: int
    gpu_memory_mib: int  # per GPU
    vcpus: int
    memory_mib: int
    spot_supported: bool
    on_demand_per_hour: float | None = None
    on_demand_source: str = ""
    spot_per_hour: float | None = None
    spot_source: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "instance_type": self.instance_type, "gpu_type": self.gpu_type, "gpu_name": self.gpu_name,
            "gpus": self.gpus, "gpu_memory_mib": self.gpu_memory_mib, "vcpus": self.vcpus,
            "memory_mib": self.memory_mib, "spot_supported": self.spot_supported,
            "on_demand_per_hour": self.on_demand_per_hour, "on_demand_source": self.on_demand_source,
            "spot_per_hour": self.spot_per_hour, "spot_source": self.spot_source,
        }


def gpu_type_for(gpu_name: str, memory_mib: int) -> str:
    """EC2's GPU model and memory as the pool's type name: ``A100`` with 81920 MiB -> ``a100-80gb``.

    The model is normalised as NVML names are (:func:`pool_manager.inventory.normalize_gpu_name`),
    so a node launched from this catalog reports the type it was launched for. A size suffix is
    added only when the model comes in another size than its nominal one.
    """
    base = normalize_gpu_name(gpu_name)
    nominal = KNOWN_MEMORY_MB.get(base)
    if nominal and memory_mib and abs(memory_mib - nominal) > _SAME_MEMORY * nominal:
        return f"{base}-{round(memory_mib / 1024)}gb"
    return base


def offer_of(answer: Mapping[str, Any], region: str) -> InstanceOffer | None:
    """One ``InstanceTypes`` entry as an offer; None for a type without a whole GPU.

    Fractional GPUs (g6f: ``Count`` 0, a slice of an L4) are left out: a pool slot holds whole GPUs.
    """
    gpus = (answer.get("GpuInfo") or {}).get("Gpus") or []
    if not gpus or int(gpus[0].get("Count", 0)) < 1:
        return None
    gpu = gpus[0]  # EC2 lists one GPU model per instance type
    memory = int((gpu.get("MemoryInfo") or {}).get("SizeInMiB", 0))
    instance_type = str(answer["InstanceType"])
    price, source = on_demand_price(instance_type, region)
    return InstanceOffer(
        instance_type=instance_type,
        gpu_type=gpu_type_for(str(gpu["Name"]), memory),
        gpu_name=str(gpu["Name"]),
        gpus=int(gpu["Count"]),
        gpu_memory_mib=memory,
        vcpus=int((answer.get("VCpuInfo") or {}).get("DefaultVCpus", 0)),
        memory_mib=int((answer.get("MemoryInfo") or {}).get("SizeInMiB", 0)),
        spot_supported="spot" in (answer.get("SupportedUsageClasses") or []),
        on_demand_per_hour=price,
        on_demand_source=source,
    )


def offers_from_answers(pages: Iterable[Mapping[str, Any]], region: str) -> list[InstanceOffer]:
    """Every GPU instance type in the pages of a ``DescribeInstanceTypes`` answer, sorted by
    GPU type, then GPUs per instance, then instance type."""
    offers = [offer for page in pages for entry in page.get("InstanceTypes", [])
              if (offer := offer_of(entry, region)) is not None]
    return sorted(offers, key=lambda o: (o.gpu_type, o.gpus, o.vcpus, o.instance_type))


def cheapest_spot(history: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, str]]:
    """Instance type -> (spot price per hour, source) from ``DescribeSpotPriceHistory`` entries.

    Per availability zone only the newest price counts; across zones the cheapest is shown,
    as that is where Ray's AWS provider can be told to launch.
    """
    newest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for entry in history:
        key = (str(entry["InstanceType"]), str(entry["AvailabilityZone"]))
        if key not in newest or entry["Timestamp"] > newest[key]["Timestamp"]:
            newest[key] = entry
    cheapest: dict[str, tuple[float, str]] = {}
    for (instance_type, zone), entry in sorted(newest.items()):
        price = float(entry["SpotPrice"])
        if instance_type not in cheapest or price < cheapest[instance_type][0]:
            stamp = entry["Timestamp"]
            when = stamp.strftime("%Y-%m-%d %H:%M") if isinstance(stamp, datetime.datetime) else str(stamp)
            cheapest[instance_type] = (price, f"EC2 spot price history, {zone}, {when}")
    return cheapest


def with_spot_prices(offers: list[InstanceOffer], spot: Mapping[str, tuple[float, str]]) -> list[InstanceOffer]:
    out = []
    for offer in offers:
        price, source = spot.get(offer.instance_type, (None, ""))
        if not offer.spot_supported:
            source = "no spot for this type"
        elif price is None:
            source = "no spot price in the history"
        price = price if offer.spot_supported else None
        out.append(dataclasses.replace(offer, spot_per_hour=price, spot_source=source))
    return out


def fetch_offers(ec2: Any, region: str, instance_types: list[str]) -> dict[str, InstanceOffer]:
    """The named instance types that have GPUs, by name (on-demand prices only)."""
    pages = ec2.get_paginator("describe_instance_types").paginate(InstanceTypes=instance_types)
    return {offer.instance_type: offer for offer in offers_from_answers(pages, region)}


def fetch_catalog(ec2: Any, region: str, now: datetime.datetime | None = None) -> list[InstanceOffer]:
    """The region's GPU instance types, with on-demand and spot prices (``ec2``: a boto3 EC2 client).

    EC2 has no filter for "has a GPU": every type is read (about ten pages) and filtered here.
    """
    pages = ec2.get_paginator("describe_instance_types").paginate()
    offers = offers_from_answers(pages, region)
    spot_types = [offer.instance_type for offer in offers if offer.spot_supported]
    history: list[Mapping[str, Any]] = []
    if spot_types:
        # A start time of now gives the price in effect now per zone, not 90 days of history.
        start = now or datetime.datetime.now(datetime.UTC)
        for page in ec2.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=spot_types, ProductDescriptions=["Linux/UNIX"], StartTime=start
        ):
            history.extend(page.get("SpotPriceHistory", []))
    return with_spot_prices(offers, cheapest_spot(history))

