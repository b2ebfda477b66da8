"""``jupyter-gpu simulate``: what pooling saves on a notebook workload, computed by the pool core."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from .driver import Outcome, Timing, simulate
from .metrics import summarize
from .plot import PlotUnavailable, require_matplotlib, write_plot
from .policies import DEFAULT_POLICIES, Policy, parse_duration, parse_policy
from .prices import TABLES, Price, load_prices, price_for
from .sizing import QUANTILE, smallest_pool
from .synthetic import SyntheticShape, synthetic_workload
from .traces import TraceError, read_adobe_sessions, read_adobe_training, read_user_trace
from .workload import Workload

NAMED_TRACES = {
    "adobe-sessions": "adobe-notebook-sessions-2021-06-01.json",
    "adobe-training": "adobe-training-events-2021-06.csv",
}
TRACE_DIR_ENV = "JUPYTER_GPU_TRACES"

DESCRIPTION = """\
Replay a notebook GPU workload through the pool core with a fake clock and compare, side by
side, how each release policy uses GPUs: GPU-hours held and busy, wait before a cell starts,
the pool a target p99 wait needs, what it costs and how often remote variables are lost."""

EPILOG = f"""\
workloads (--trace):
  adobe-sessions   59 notebook sessions over 2 days (1-minute ticks), Adobe production trace
                   published with NotebookOS (ASPLOS 2026, arXiv 2503.20591). CPU-only cells
                   are skipped; each session is one user; GPU cells ask for 1, 4 or 8 GPUs.
  adobe-training   30,909 trainings in June 2021 from the same source (whole minutes; no
                   user column, so each training is its own session).
  synthetic        --users N for --days D (default 1), seeded (--seed). Shapes fitted to the
                   Adobe sessions trace above (training cells: median 6 min, mean 27 min;
                   pauses between cells: median 3 min, mean 29 min):
{textwrap.fill(SyntheticShape().describe() + ".", 90, initial_indent=" " * 21, subsequent_indent=" " * 21)}
                   The working day (8 h notebook opened 08:00-11:00) is an assumption.
  FILE             your own trace, CSV with a header or JSON lines, one GPU cell per record:
                   user,start,duration,gpus,gpu_type[,session] (seconds from the trace start,
                   seconds run, GPUs used, e.g. a100). A pause over 8 h ends a user's session.
  Named traces are read from --trace-dir (default: ${TRACE_DIR_ENV}, else shared/data/traces
  beside the source checkout). Traces without GPU types ask for --gpu-type.

policies (--policy, repeatable or comma-separated; default {",".join(DEFAULT_POLICIES)}):
  dedicated        one lease per session from its start to its end (a GPU per notebook)
  idle:T           the pool releases a lease after T (90s, 10m, 2h) without a running cell;
                   a release before the session's next cell on it loses remote variables
  per-cell         a lease per cell, ended with the cell; state is snapshotted and restored
                   into the next lease, adding --snapshot-restore-s to that cell's wait

pool (--pool): TYPE=N,... GPUs per type in nodes of --gpus-per-node, or auto (default): per
  policy the smallest pool whose p99 wait is <= --target-wait, found by bisection over full
  replays. Every free GPU keeps a warm kernel unless --warm says otherwise; the core keeps
  only 1-GPU kernels warm, so a multi-GPU cell waits for its kernel to start.

prices (--prices): {", ".join(TABLES)} or a CSV file gpu_type,usd_per_gpu_hour,source,date.
  "cost held" prices the GPU-hours leases held (what per-second billing charges); "cost
  pool" prices the whole pool for the simulated time (what a fixed pool costs)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyter-gpu simulate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="adobe-sessions",
                        help="adobe-sessions | adobe-training | synthetic | FILE (default: %(default)s)")
    parser.add_argument("--trace-dir", type=Path, help="where the named traces are")
    parser.add_argument("--users", type=int, help="synthetic only: number of users (default 100)")
    parser.add_argument("--days", type=float,
                        help="first D days of a trace (default: all of it), or D synthetic days (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic only: random seed (default: %(default)s)")
    parser.add_argument("--gpu-type", default="a100", help="type for traces that name none (default: %(default)s)")
    parser.add_argument("--pool", default="auto", help="TYPE=N,... or auto (default: %(default)s)")
    parser.add_argument("--target-wait", default="10s", help="auto pool: p99 wait to meet (default: %(default)s)")
    parser.add_argument("--policy", action="append", help="dedicated, idle:T or per-cell")
    parser.add_argument("--snapshot-restore-s", type=float, default=5.0,
                        help="per-cell: seconds to restore the state before each cell after the first "
                             "(default %(default)s: ~2.5 GB at the ~0.5 GB/s measured for pushes)")
    parser.add_argument("--kernel-start-s", type=float, default=30.0,
                        help="seconds from a kernel start to warm, warm-up code included (default: %(default)s)")
    parser.add_argument("--kernel-stop-s", type=float, default=2.0,
                        help="seconds to stop a kernel (default: %(default)s)")
    parser.add_argument("--warm", type=int, help="warm kernels kept per type (default: every free GPU)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: %(default)s)")
    parser.add_argument("--prices", default="modal", help=f"{' | '.join(TABLES)} | FILE (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="write a PNG of demand, pool and waits")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (TraceError, ValueError, PlotUnavailable) as exc:
        print(f"jupyter-gpu simulate: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `jupyter-gpu simulate --json | head`: the reader left; say nothing more on a closed pipe.
        sys.stdout = open(os.devnull, "w")  # interpreter shutdown would flush into the closed pipe
        return 0


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    workload = _workload(args)
    if not workload.cells:
        raise ValueError(f"{workload.name}: no GPU cells to simulate (try more --days)")
    policies = _policies(args)
    timing = Timing(_non_negative(args.kernel_start_s, "--kernel-start-s"),
                    _non_negative(args.kernel_stop_s, "--kernel-stop-s"))
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be at least 1, got {args.gpus_per_node}")
    if args.warm is not None and args.warm < 0:
        raise ValueError(f"--warm must be 0 or more, got {args.warm}")
    prices = load_prices(args.prices)
    fixed = None if args.pool.strip().lower() == "auto" else _parse_pool(args.pool, workload, args.gpus_per_node)
    for gpu_type in sorted(workload.gpu_types()):
        if workload.largest_request(gpu_type) > args.gpus_per_node:
            raise ValueError(f"a cell asks for {workload.largest_request(gpu_type)} {gpu_type} GPUs on one node but "
                             f"--gpus-per-node is {args.gpus_per_node}: give at least that many")
    target = parse_duration(args.target_wait, "--target-wait")
    if args.plot is not None:
        _check_plot_path(args.plot)

    outcomes: list[Outcome] = []
    rows = []
    for policy in policies:
        outcome, floors = _replay(workload, policy, fixed, target, timing, args)
        outcomes.append(outcome)
        rows.append({**summarize(outcome, workload, prices), "p99_floor_s": floors or None})
    elapsed = time.perf_counter() - started
    report = {
        "workload": {"name": workload.name, "source": workload.source, "sessions": len(workload.sessions),
                     "users": workload.users, "cells": workload.cells, "hours": workload.span() / 3600},
        "settings": {"pool": "auto" if fixed is None else fixed, "target_wait_s": target if fixed is None else None,
                     "kernel_start_s": timing.kernel_start_s, "kernel_stop_s": timing.kernel_stop_s,
                     "warm": args.warm, "gpus_per_node": args.gpus_per_node,
                     "snapshot_restore_s": args.snapshot_restore_s},
        "prices": [vars(p) for p in _used_prices(prices, workload)],
        "policies": rows,
        "elapsed_s": elapsed,
    }
    if args.plot is not None:
        opened = min(s.start for s in workload.sessions)
        write_plot(args.plot, f"{workload.name}: {workload.users} users, {workload.cells} GPU cells", outcomes, opened)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_table(report, fixed is None))
        if args.plot is not None:
            print(f"plot written to {args.plot}")
    return 0


def _replay(workload: Workload, policy: Policy, fixed: dict[str, int] | None, target: float, timing: Timing,
            args: argparse.Namespace) -> tuple[Outcome, dict[str, float]]:
    """One policy on the given pool, or on the smallest that meets the target (and the p99
    floors of the types no pool brings under it)."""
    if fixed is not None:
        return simulate(workload, policy, fixed, timing, args.warm, args.gpus_per_node), {}
    sizing = smallest_pool(workload, policy, target, timing, args.warm, args.gpus_per_node)
    return sizing.outcome, sizing.floors


def _workload(args: argparse.Namespace) -> Workload:
    if args.trace == "synthetic":
        return synthetic_workload(100 if args.users is None else args.users, args.days or 1.0, args.gpu_type, args.seed)
    if args.users is not None:
        raise ValueError(f"--users {args.users} applies to --trace synthetic only; {args.trace} has its own users")
    if args.trace in NAMED_TRACES:
        path = _trace_dir(args.trace_dir, NAMED_TRACES[args.trace])
        reader = read_adobe_sessions if args.trace == "adobe-sessions" else read_adobe_training
        return reader(path, args.gpu_type, args.days)
    path = Path(args.trace)
    if not path.exists():
        raise ValueError(f"--trace {args.trace!r}: no such file, and not one of synthetic, {', '.join(NAMED_TRACES)}")
    return read_user_trace(path, args.days)


def _trace_dir(given: Path | None, name: str) -> Path:
    candidates = [given] if given else [
        Path(os.environ[TRACE_DIR_ENV]) if os.environ.get(TRACE_DIR_ENV) else None,
        Path(__file__).resolve().parents[3] / "shared" / "data" / "traces",
    ]
    for directory in candidates:
        if directory is not None and (directory / name).exists():
            return directory / name
    looked = ", ".join(str(d) for d in candidates if d is not None)
    raise ValueError(f"trace file {name} not found (looked in {looked}): pass --trace-dir DIR or set {TRACE_DIR_ENV}")


def _policies(args: argparse.Namespace) -> list[Policy]:
    restore = _non_negative(args.snapshot_restore_s, "--snapshot-restore-s")
    names = [n for given in (args.policy or [",".join(DEFAULT_POLICIES)]) for n in given.split(",") if n.strip()]
    policies = [parse_policy(name, restore) for name in names]
    if not policies:
        raise ValueError("--policy is empty: give dedicated, idle:T or per-cell")
    return policies


def _non_negative(value: float, option: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{option} must be a number of seconds >= 0, got {value}")
    return value


def _parse_pool(text: str, workload: Workload, gpus_per_node: int) -> dict[str, int]:
    pool: dict[str, int] = {}
    for part in text.split(","):
        gpu_type, sep, count = part.strip().partition("=")
        gpu_type = gpu_type.strip().lower()
        if not sep or not gpu_type or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--pool part {part.strip()!r}: write TYPE=N with N >= 1, e.g. a100=16,h100=8, or auto")
        pool[gpu_type] = int(count)
    for gpu_type in sorted(workload.gpu_types()):
        if gpu_type not in pool:
            raise ValueError(f"the trace asks for {gpu_type} but --pool has only {', '.join(pool)}: "
                             f"add {gpu_type}=N or use --pool auto")
        largest = workload.largest_request(gpu_type)
        if largest > pool[gpu_type]:
            raise ValueError(f"a cell asks for {largest} {gpu_type} GPUs but --pool {gpu_type}={pool[gpu_type]}: "
                             f"give at least {gpu_type}={largest}")
    return pool


def _check_plot_path(path: Path) -> None:
    if path.parent and not path.parent.exists():
        raise ValueError(f"--plot {path}: folder {path.parent} does not exist")
    require_matplotlib()  # fail before minutes of replays, not after


def _used_prices(prices: dict[str, Price], workload: Workload) -> list[Price]:
    found = (price_for(prices, t) for t in sorted(workload.gpu_types()))
    return [p for p in found if p is not None]


def _table(report: dict[str, Any], auto: bool) -> str:
    w = report["workload"]
    rows: list[dict[str, Any]] = report["policies"]
    s = report["settings"]
    lines = [
        f"{w['name']}: {w['sessions']} sessions, {w['users']} users, {w['cells']} GPU cells over {w['hours']:.1f} h",
        f"  {w['source']}",
        "  pool: " + (f"auto, per policy the smallest with p99 wait <= {s['target_wait_s']:g} s" if auto
                      else ",".join(f"{t}={n}" for t, n in s["pool"].items()))
        + f"; kernel start {s['kernel_start_s']:g} s, stop {s['kernel_stop_s']:g} s; "
        + ("every free GPU warm" if s["warm"] is None else f"{s['warm']} warm per type")
        + f"; {s['gpus_per_node']} GPUs per node",
        "",
    ]

    def money(value: float | None) -> str:
        return "no price" if value is None else f"${value:,.0f}"

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    table = [
        ("pool (GPUs)", [",".join(f"{t}={n}" for t, n in r["pool"].items()) for r in rows]),
        ("GPUs per user", [number(r["gpus_per_user"], 2) for r in rows]),
        ("GPU-hours held", [number(r["gpu_hours_held"]) for r in rows]),
        ("GPU-hours busy", [number(r["gpu_hours_busy"]) for r in rows]),
        ("held / busy", [number(r["held_busy_ratio"], 2) for r in rows]),
        ("wait p50 (s)", [number(r["wait_p50_s"]) for r in rows]),
        (f"wait p{QUANTILE * 100:g} (s)", [number(r["wait_p99_s"]) for r in rows]),
        ("wait max (s)", [number(r["wait_max_s"]) for r in rows]),
        ("peak GPUs held", [str(r["peak_gpus_held"]) for r in rows]),
        ("releases losing state", [str(r["lost_state_releases"]) for r in rows]),
        ("cost of GPU-hours held", [money(r["cost_held_usd"]) for r in rows]),
        ("cost of the pool", [money(r["cost_pool_usd"]) for r in rows]),
    ]
    width = max(12, *(len(r["policy"]) for r in rows), *(len(v) for _, values in table for v in values))
    lines.append(f"{'':24}" + "".join(f"{r['policy']:>{width + 2}}" for r in rows))
    for label, values in table:
        lines.append(f"{label:24}" + "".join(f"{v:>{width + 2}}" for v in values))
    for r in rows:
        for gpu_type, floor in (r["p99_floor_s"] or {}).items():
            lines.append(f"  {r['policy']}: no {gpu_type} pool gives p99 <= {s['target_wait_s']:g} s (kernel starts "
                         f"and restores stay); sized for its lowest p99, {floor:g} s")
    for price in report["prices"]:
        lines.append(f"  price {price['gpu_type']}: ${price['usd_per_gpu_hour']:.4f}/GPU-h, "
                     f"{price['source']} ({price['date']})")
    missing = sorted(t for r in rows for t in r["pool"] if not any(p["gpu_type"] == t for p in report["prices"]))
    if missing:
        lines.append(f"  no price for {', '.join(sorted(set(missing)))}: pass --prices FILE with them")
    lines.append(f"  simulated in {report['elapsed_s']:.1f} s")
    return "\n".join(lines)
