"""Prices per GPU-hour by GPU type, each with where it was read and when.

Published list prices move: check them before relying on a cost, or pass your own table
(``--prices FILE``: CSV with the header ``gpu_type,usd_per_gpu_hour,source,date``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Price:
    gpu_type: str
    usd_per_gpu_hour: float
    source: str
    date: str


_MODAL = "modal.com/pricing, per-second GPU rates x 3600"
_MODAL_CHECKED = "modal.com/pricing as quoted by techbytes.app, checked 2026-05-07"
_AWS = "aws.amazon.com/ec2/pricing/on-demand, us-east-1 Linux, instance price / GPUs"

TABLES: dict[str, tuple[Price, ...]] = {
    "modal": (
        Price("h100", 3.9492, _MODAL_CHECKED + " ($0.001097/s)", "2026-05-07"),
        Price("a100-80gb", 2.4984, _MODAL_CHECKED + " ($0.000694/s)", "2026-05-07"),
        Price("a100", 2.0988, _MODAL + " (A100 40 GB, $0.000583/s)", "2025 list, not re-checked"),
        Price("l40s", 1.9512, _MODAL_CHECKED + " ($0.000542/s)", "2026-05-07"),
        Price("a10g", 1.1016, _MODAL + " ($0.000306/s)", "2025 list, not re-checked"),
        Price("l4", 0.7992, _MODAL_CHECKED + " ($0.000222/s)", "2026-05-07"),
        Price("t4", 0.5904, _MODAL_CHECKED + " ($0.000164/s)", "2026-05-07"),
    ),
    "aws": (
        Price("h100", 55.04 / 8, _AWS + ": p5.48xlarge $55.04/h, 8 GPUs (after the June 2025 cut)", "2025-06"),
        Price("a100", 21.96 / 8, _AWS + ": p4d.24xlarge $21.96/h, 8 GPUs (after the June 2025 cut)", "2025-06"),
        Price("a10g", 1.006, _AWS + ": g5.xlarge $1.006/h, 1 GPU (factualminds.com, 2026-06-17)", "2026-06-17"),
        Price("l4", 0.8048, _AWS + ": g6.xlarge $0.8048/h, 1 GPU", "2024 list, not re-checked"),
    ),
}


def load_prices(choice: str) -> dict[str, Price]:
    """``modal``, ``aws`` or the path of a CSV table."""
    table = TABLES.get(choice.lower())
    if table is not None:
        return {price.gpu_type: price for price in table}
    path = Path(choice)
    if not path.exists():
        raise ValueError(f"--prices {choice!r}: not a table name ({', '.join(TABLES)}) and no such file")
    prices = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if "gpu_type" not in (reader.fieldnames or ()) or "usd_per_gpu_hour" not in (reader.fieldnames or ()):
            raise ValueError(f"{path} line 1: the header must be gpu_type,usd_per_gpu_hour,source,date")
        for row in reader:
            value = row.get("usd_per_gpu_hour") or ""
            try:
                usd = float(value)
            except ValueError:
                usd = math.nan
            if not (math.isfinite(usd) and usd >= 0):
                raise ValueError(f"{path} line {reader.line_num}: field 'usd_per_gpu_hour': "
                                 f"{value!r} is not a price >= 0")
            gpu_type = (row.get("gpu_type") or "").strip().lower()
            if not gpu_type:
                raise ValueError(f"{path} line {reader.line_num}: field 'gpu_type' is empty")
            source, date = (row.get("source") or path.name).strip(), (row.get("date") or "").strip()
            prices[gpu_type] = Price(gpu_type, usd, source, date)
    return prices


def price_for(prices: dict[str, Price], gpu_type: str) -> Price | None:
    """The type's own price, else that of the family it belongs to (``a100-40gb`` -> ``a100``)."""
    while gpu_type:
        if gpu_type in prices:
            return prices[gpu_type]
        gpu_type = gpu_type.rpartition("-")[0]
    return None
