"""Budgets as ``%gpu usage`` and ``jupyter-gpu usage`` print them: one line per budget that applies,
with what is left."""

from __future__ import annotations

from typing import Any

_UNITS = {"gpus": "GPUs", "gpu_hours_per_day": "GPU-hours today", "money_per_month": "this month"}


def _amount(budget: str, value: float) -> str:
    if budget == "money_per_month":
        return f"${value:.2f}"
    if budget == "gpus":
        return f"{value:.0f}"
    return f"{value:.2f}"


def format_budgets(budgets: list[dict[str, Any]]) -> str:
    """``budgets`` of ``GET /api/gpu/usage``."""
    if not budgets:
        return "no budget limits you"
    lines = ["budgets (what is left; at 90% running leases are warned, at 100% they end, keeping their variables):"]
    for row in budgets:
        budget = row["budget"]
        used, limit, left = (_amount(budget, row[key]) for key in ("used", "limit", "left"))
        resets = f", resets {row['resets_at'].replace('T', ' ')[:16]} UTC" if row.get("resets_at") else ""
        flag = "  <- used up" if row["share"] >= 1 else "  <- over 90%" if row["share"] >= 0.9 else ""
        lines.append(f"  {row['scope']} {row['name']}: {budget} {used} of {limit} {_UNITS.get(budget, '')} used, "
                     f"{left} left{resets}{flag}")
    return "\n".join(lines)
