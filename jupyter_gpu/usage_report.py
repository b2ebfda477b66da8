"""``jupyter-gpu usage [--all]``: GPU-hours and cost from the gateway, mine or (operators) everyone's."""

from __future__ import annotations

from typing import Any

from .budget_view import format_budgets
from .gateway_command import as_json, command_parser, fetch


def usage_main(argv: list[str]) -> int:
    parser = command_parser("jupyter-gpu usage", "GPU time and cost metered by the gateway.")
    parser.add_argument("--all", action="store_true", help="every user's usage, by user and by group (operators)")
    args = parser.parse_args(argv)
    data = fetch(parser.prog, "/api/gpu/usage" + ("?all=1" if args.all else ""))
    if data is None:
        return 1
    print(as_json(data) if args.json else format_all(data) if args.all else format_mine(data))
    return 0


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3f}"


def _table(title: str, rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join
    out = [title, line(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += [line(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return out


def format_all(data: dict[str, Any]) -> str:
    """Usage by user (with groups) and by group, then the totals."""
    users = [[name, str(e["leases"]), _hours(e["gpu_seconds"]), f"${e['cost']:.2f}", ",".join(e["groups"]) or "-"]
             for name, e in data["by_user"].items()]
    groups = [[name, str(len(e["users"])), str(e["leases"]), _hours(e["gpu_seconds"]), f"${e['cost']:.2f}"]
              for name, e in data["by_group"].items()]
    out = _table("by user", users, ["user", "leases", "GPU-hours", "cost", "groups"])
    out += ["", *_table("by group", groups, ["group", "users", "leases", "GPU-hours", "cost"])]
    out += ["", f"total: {_hours(data['total_gpu_seconds'])} GPU-hours, ${data['total_cost']:.2f}"]
    if "paid" in data:  # an autoscaled pool: the machines launched for it
        out += ["", *format_paid(data["paid"])]
    return "\n".join(out)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_paid(paid: dict[str, Any]) -> list[str]:
    """Instance-hours and cost of the launched machines per type, and how much of them leases used."""
    rows = [[name, _hours(e["instance_seconds"]), _hours(e["launched_gpu_seconds"]), _hours(e["leased_gpu_seconds"]),
             _share(e["utilization"]), f"${e['cost']:.2f}"] for name, e in paid["by_type"].items()]
    out = _table("launched instances (cost at on-demand list price)", rows,
                 ["type", "instance-hours", "GPU-hours paid", "GPU-hours leased", "utilization", "cost"])
    return [*out, f"paid: ${paid['total_cost']:.2f}, utilization of paid GPUs {_share(paid['utilization'])}"]


def format_mine(data: dict[str, Any]) -> str:
    """A user's usage as ``jupyter-gpu usage`` and ``%gpu usage`` both print it: GPU-hours and
    cost per type as a bill shows them, the total, then what is left of each budget."""
    types = [[name, _hours(e["gpu_seconds"]), f"${e['cost']:.2f}"] for name, e in data["by_type"].items()]
    out = _table(f"usage of {data['user']}", types, ["type", "GPU-hours", "cost"])
    out += [f"total: {_hours(data['total_gpu_seconds'])} GPU-hours, ${data['total_cost']:.2f}"]
    out += [format_budgets(data.get("budgets", []))]
    return "\n".join(out)
