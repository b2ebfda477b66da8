"""``--plot``: per policy, demand and GPUs held over time against the pool; then the waits.

matplotlib is imported here only, when a plot is asked for: the pool runs without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .driver import Outcome

EXTRA_HINT = 'pip install "jupyter-gpu[simulate]"'


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """pyplot, or a PlotUnavailable that says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, never a window
        import matplotlib.pyplot as pyplot
    except ImportError as exc:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from exc
    return pyplot


def write_plot(path: Path, title: str, outcomes: Sequence[Outcome], opened: float) -> None:
    """One panel per policy (GPUs over hours since the first notebook opened), one for waits."""
    pyplot = require_matplotlib()
    rows = len(outcomes) + 1
    figure, axes = pyplot.subplots(rows, 1, figsize=(9, 1.7 * rows + 1.2), dpi=80,
                                   gridspec_kw={"height_ratios": [1] * len(outcomes) + [1.4]})
    top = max(max((h for _, h in o.held_steps), default=0) for o in outcomes)
    top = max([top] + [sum(o.pool.values()) for o in outcomes])
    for axis, outcome in zip(axes[:-1], outcomes, strict=True):
        busy = outcome.busy_steps()
        axis.fill_between(*_xy(busy, opened), step="post", color="tab:orange", alpha=0.6, linewidth=0,
                          label="cells running (demand)")
        axis.step(*_xy(outcome.held_steps, opened), where="post", color="tab:blue", linewidth=0.8,
                  label="GPUs held by leases")
        axis.axhline(sum(outcome.pool.values()), color="black", linestyle="--", linewidth=0.8, label="pool size")
        axis.set_ylim(0, top * 1.08 + 1)
        axis.set_ylabel("GPUs")
        axis.set_title(outcome.policy.name, fontsize=9, loc="left")
        axis.tick_params(labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.975), frameon=False)
    axes[-2].set_xlabel("hours since the first notebook opened", fontsize=8)
    waits_axis = axes[-1]
    for outcome in outcomes:
        waits = sorted(outcome.all_waits())
        if waits:
            shares = [(i + 1) / len(waits) for i in range(len(waits))]
            waits_axis.step(waits, shares, where="post", linewidth=1, label=outcome.policy.name)
    waits_axis.set_xscale("symlog", linthresh=1)
    waits_axis.set_xlabel("wait before a cell starts (s, log scale above 1 s)", fontsize=8)
    waits_axis.set_ylabel("share of cells", fontsize=8)
    waits_axis.set_ylim(0, 1.02)
    waits_axis.grid(alpha=0.3)
    waits_axis.legend(fontsize=7, loc="lower right")
    waits_axis.tick_params(labelsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path)
    pyplot.close(figure)


def _xy(steps: list[tuple[float, int]], opened: float) -> tuple[list[float], list[int]]:
    return [(when - opened) / 3600 for when, _ in steps], [level for _, level in steps]
