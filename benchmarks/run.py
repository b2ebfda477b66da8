"""jupyter-gpu against its peers, side by side, in one run: ``python benchmarks/run.py --quick|--full``.

``scripts/bench`` sets up the peers' virtual environments (.bench/ipp: ipyparallel 9,
.bench/kg: jupyter-kernel-gateway 3, which shares the import name ``kernel_gateway`` with
this project) and then runs this file. The peers run as their own processes in their own
venvs on the same cell code, in the same run, on the same machine. Prints a table of
medians, p99s and ratios against the peers and the targets of issue 5, and writes the same
as JSON (and the table as Markdown) under ``bench-results/``.

What every figure includes is said in README.md's "Performance" section and in the
docstrings of ours.py, peer_ipp.py, peer_kg.py, baselines.py and pool_sim.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import parse_emitted  # noqa: E402

PEERS = {"ipp": REPO / ".bench" / "ipp" / "bin" / "python", "kg": REPO / ".bench" / "kg" / "bin" / "python"}

FLOOD_CELLS = {
    # 500,000 lines of 100 bytes: 50 MB in one write
    "print_50mb": 'import sys\nsys.stdout.write(("y" * 99 + "\\n") * 500_000)',
    "prints_10k": "for i in range(10_000):\n    print(i, flush=True)",
}
FLOOD_LINES = {"print_50mb": 500_000, "prints_10k": 10_000}
SMOKE_FLOOD_LINES = {"print_50mb": 5_000, "prints_10k": 100}
SMOKE_FLOOD_CELLS = {
    "print_50mb": 'import sys\nsys.stdout.write(("y" * 99 + "\\n") * 5_000)',
    "prints_10k": "for i in range(100):\n    print(i, flush=True)",
}

MODES: dict[str, dict[str, Any]] = {
    "smoke": {
        "repeats": 5, "warmup": 2, "cold_repeats": 1, "ipp_cold_repeats": 1,
        "transfer_sizes": [[10**6, 2]], "rerun_repeats": 2,
        "flood_cells": SMOKE_FLOOD_CELLS, "flood_lines": SMOKE_FLOOD_LINES, "flood_timeout": 60,
        "tp_kernels": 2, "tp_clients_per_kernel": 2, "tp_seconds": 1, "tp_warmup": 0.5,
        "churn_leases": 5, "churn_warmup": 2, "sim_requests": 5_000,
    },
    "quick": {
        "repeats": 30, "warmup": 5, "cold_repeats": 3, "ipp_cold_repeats": 1,
        "transfer_sizes": [[10**5, 10], [10**6, 5], [10**7, 3], [10**8, 2]], "rerun_repeats": 5,
        "flood_cells": FLOOD_CELLS, "flood_lines": FLOOD_LINES, "flood_timeout": 120,
        "tp_kernels": 10, "tp_clients_per_kernel": 2, "tp_seconds": 2, "tp_warmup": 1,
        "churn_leases": 40, "churn_warmup": 10, "sim_requests": 100_000,
    },
    "full": {
        "repeats": 300, "warmup": 20, "cold_repeats": 10, "ipp_cold_repeats": 3,
        "transfer_sizes": [[10**5, 50], [10**6, 20], [10**7, 10], [10**8, 5], [10**9, 5]], "rerun_repeats": 10,
        "flood_cells": FLOOD_CELLS, "flood_lines": FLOOD_LINES, "flood_timeout": 180,
        "tp_kernels": 10, "tp_clients_per_kernel": 2, "tp_seconds": 5, "tp_warmup": 2,
        "churn_leases": 500, "churn_warmup": 10, "sim_requests": 100_000,
    },
}

#: Row 8's scaling: the pool core at each pool size over the same window of the trace (see
#: pool_sim.scaling); the largest pool's window is what bounds the time it takes.
SCALING: dict[str, dict[str, Any]] = {
    "smoke": {"scales": (100, 1_000), "hours": 0.5, "min_decisions": 500},
    "quick": {"scales": (100, 1_000, 10_000, 100_000), "hours": 0.5, "min_decisions": 20_000},
    "full": {"scales": (100, 1_000, 10_000, 100_000), "hours": 2.0, "min_decisions": 100_000},
}


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def run_peer(name: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    python = PEERS[name]
    if not python.exists():
        return {"skipped": f"{python.parent.parent} is missing: run scripts/bench to set it up"}
    script = HERE / f"peer_{name}.py"
    # A PYTHONPATH that puts a checkout of this project first (its kernel_gateway package) must
    # not reach a peer's environment: the peer runs on its own packages only.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), str(script), json.dumps(settings)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(HERE), env=env)
    try:
        return dict(parse_emitted(proc.stdout))
    except ValueError:
        raise RuntimeError(f"{name} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}") from None


def guarded(results: dict[str, Any], key: str, what: Callable[[], Any]) -> None:
    """Run one part; an exception is recorded (and reported) instead of ending the run."""
    started = time.perf_counter()
    print(f"[bench] {key} ...", file=sys.stderr, flush=True)
    try:
        results[key] = what()
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        print(f"[bench] {key} failed: {exc}", file=sys.stderr, flush=True)
    results.setdefault("seconds", {})[key] = round(time.perf_counter() - started, 1)


def measure(mode: str, peers: bool, ray: bool = False) -> dict[str, Any]:
    import baselines
    import ours
    import pool_sim
    import snapshot_rows

    settings = MODES[mode]
    results: dict[str, Any] = {"mode": mode, "machine": machine(), "settings": settings}
    started = time.perf_counter()
    guarded(results, "pool_sim", lambda: pool_sim.simulate(settings["sim_requests"], time_limit=300))
    guarded(results, "pool_scaling", lambda: pool_sim.scaling(**SCALING[mode]))
    guarded(results, "zmq", lambda: baselines.direct_zmq(settings["repeats"], settings["warmup"]))
    guarded(results, "tcp", lambda: {str(size): baselines.raw_tcp(size, count)
                                     for size, count in settings["transfer_sizes"]})
    guarded(results, "ours", lambda: ours.main(settings))
    guarded(results, "snapshots", lambda: snapshot_rows.measure(mode))  # row 9: kept state (issue 12)
    if peers:
        guarded(results, "ipp", lambda: run_peer("ipp", {**settings, "cold_repeats": settings["ipp_cold_repeats"]},
                                                 timeout=1800))
        guarded(results, "kg", lambda: run_peer("kg", settings, timeout=1800))
    else:
        results["ipp"] = results["kg"] = {"skipped": "--no-peers"}
    if ray or mode == "full":  # row 10: a namespace Ray cluster (root; skipped with the reason otherwise)
        import ray_rows

        guarded(results, "ray", lambda: ray_rows.run(mode))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    return results


# --- the table ------------------------------------------------------------------------------


def dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f} ms"


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def build_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: row number, what, system, median, p99, ratio, target, verdict."""
    rows: list[dict[str, Any]] = []

    def add(row: int, what: str, system: str, median: str, p99: str = "", ratio_text: str = "", target: str = "",
            ok: bool | None = None, **values: Any) -> None:
        rows.append({"row": row, "what": what, "system": system, "median": median, "p99": p99, "ratio": ratio_text,
                     "target": target, "verdict": verdict(ok) if target else "", "values": values})

    ours, ipp, kg = r.get("ours", {}), r.get("ipp", {}), r.get("kg", {})
    # 1. warm round trip
    e2e = dig(ours, "warm", "gpu_e2e", "median")
    inproc = dig(ours, "warm", "gpu_in_process", "median")
    px_e2e = dig(ipp, "px_e2e", "median")
    px_in = dig(ipp, "px_in_process", "median")
    zmq = dig(r, "zmq", "zmq_execute", "median")
    kg_ws = dig(kg, "ws_execute", "median")
    def at_most(a: float | None, b: float | None, limit: float) -> bool | None:
        share = ratio(a, b)
        return None if share is None else share <= limit

    notebook = "x = 1 sent to a notebook kernel, reply + idle"
    alone = "the magic alone, timed inside that kernel"
    websocket = "x = 1 over the kernel websocket (same client)"
    add(1, notebook, "jupyter-gpu %%gpu cpu", ms(e2e), ms(dig(ours, "warm", "gpu_e2e", "p99")), median_s=e2e)
    add(1, notebook, "ipyparallel %%px", ms(px_e2e), ms(dig(ipp, "px_e2e", "p99")), fmt_ratio(ratio(e2e, px_e2e)),
        "<= 1.0x", at_most(e2e, px_e2e, 1.0), median_s=px_e2e)
    add(1, alone, "jupyter-gpu %%gpu cpu", ms(inproc), ms(dig(ours, "warm", "gpu_in_process", "p99")),
        median_s=inproc)
    add(1, alone, "ipyparallel %%px", ms(px_in), ms(dig(ipp, "px_in_process", "p99")),
        fmt_ratio(ratio(inproc, px_in)), "<= 1.0x", at_most(inproc, px_in, 1.0), median_s=px_in)
    add(1, "x = 1 straight on a kernel (jupyter_client, ZMQ)", "direct ZMQ", ms(zmq),
        ms(dig(r, "zmq", "zmq_execute", "p99")), fmt_ratio(ratio(inproc, zmq)), "magic alone <= 1.3x",
        at_most(inproc, zmq, 1.3), median_s=zmq)
    add(1, websocket, "Kernel Gateway stock", ms(kg_ws), ms(dig(kg, "ws_execute", "p99")),
        fmt_ratio(ratio(kg_ws, e2e)) + " slower than %%gpu", ">= 10x slower",
        None if kg_ws is None else not at_most(kg_ws, e2e, 10 - 1e-9), median_s=kg_ws)
    add(1, websocket, "Kernel Gateway stock", ms(kg_ws), "vs the magic alone",
        fmt_ratio(ratio(kg_ws, inproc)) + " slower", ">= 10x slower",
        None if kg_ws is None else not at_most(kg_ws, inproc, 10 - 1e-9), median_s=kg_ws)
    our_ws = dig(ours, "ws_execute", "median")
    add(1, websocket, "jupyter-gpu gateway", ms(our_ws), ms(dig(ours, "ws_execute", "p99")),
        fmt_ratio(ratio(kg_ws, our_ws)) + " faster than KG", median_s=our_ws)
    add(1, "reference: run_cell('x = 1') inside the kernel", "IPython, local",
        ms(dig(r, "zmq", "local_run_cell", "median")), ms(dig(r, "zmq", "local_run_cell", "p99")))
    # 2. first cell
    first = dig(ours, "first_cell", "gpu_first_cell_e2e", "median")
    add(2, "first cell of a new notebook (lease, connect, execute)", "jupyter-gpu %%gpu cpu", ms(first),
        ms(dig(ours, "first_cell", "gpu_first_cell_e2e", "p99")), "", "<= 50 ms", at_most(first, 0.05, 1.0),
        median_s=first)
    add(2, "  the same, the magic's own time inside the kernel", "jupyter-gpu %%gpu cpu",
        ms(dig(ours, "first_cell", "gpu_first_cell_kernel_side", "median")),
        ms(dig(ours, "first_cell", "gpu_first_cell_kernel_side", "p99")))
    cold = dig(kg, "cold_kernel", "median")
    add(2, "POST /api/kernels to the first execute_reply", "Kernel Gateway stock", ms(cold),
        ms(dig(kg, "cold_kernel", "p99")), fmt_ratio(ratio(cold, first)) + " slower", median_s=cold)
    ipp_cold = dig(ipp, "cold_start", "median")
    add(2, "one-engine cluster start to the first result", "ipyparallel", secs(ipp_cold),
        secs(dig(ipp, "cold_start", "p99")), fmt_ratio(ratio(ipp_cold, first)) + " slower", median_s=ipp_cold)
    # 3. transfers
    for size, _count in r.get("settings", {}).get("transfer_sizes", []):
        label = f"{size / 1e3:g} KB" if size < 10**6 else f"{size / 1e6:g} MB" if size < 10**9 else f"{size / 1e9:g} GB"
        tcp = dig(r, "tcp", str(size), "median")
        tcp_rate = size / tcp / 1e6 if tcp else None
        for direction in ("push", "pull"):
            ours_s = dig(ours, "transfer", str(size), direction, "median")
            ipp_s = dig(ipp, "transfer", str(size), direction, "median")
            ours_rate = size / ours_s / 1e6 if ours_s else None
            ipp_rate = size / ipp_s / 1e6 if ipp_s else None
            big = size >= 10**9  # both ways: pulls take a path as direct as pushes
            ok = None
            if big and ours_rate and ipp_rate and tcp_rate:
                ok = ours_rate >= 2 * ipp_rate and ours_rate >= 0.4 * tcp_rate
            elif size == 10**6 and ours_rate and ipp_rate:  # the most common size a cell moves
                ok = ours_rate >= ipp_rate
            target = ">= 2x ipp, >= 0.4x TCP" if big else ">= 1.0x ipp" if size == 10**6 else ""
            add(3, f"{direction} numpy {label}", "jupyter-gpu %%gpu", _rate(ours_rate), ms(ours_s),
                f"{fmt_ratio(ratio(ours_rate, ipp_rate))} of ipp, {fmt_ratio(ratio(ours_rate, tcp_rate))} of TCP",
                target, ok, mb_per_s=ours_rate)
            add(3, f"{direction} numpy {label}", "ipyparallel", _rate(ipp_rate), ms(ipp_s), mb_per_s=ipp_rate)
        add(3, f"send {label} one way", "raw loopback TCP", _rate(tcp_rate), ms(tcp), mb_per_s=tcp_rate)
    # 4. re-run over an unchanged array
    rerun = dig(ours, "transfer", "rerun")
    if isinstance(rerun, dict):
        size = rerun["array_bytes"]
        label = f"{size / 1e6:g} MB" if size < 10**9 else f"{size / 1e9:g} GB"
        extra = rerun["extra_median"]
        pushed = rerun["bytes_pushed"]["median"]
        loop = rerun["loopback_bytes"]["median"]
        add(4, f"re-run over an unchanged {label} array: extra time", "jupyter-gpu %%gpu", ms(extra),
            "", f"rerun {ms(rerun['rerun']['median'])} vs x = 1 {ms(rerun['trivial']['median'])}", "<= 10 ms",
            extra <= 0.010, seconds=extra)
        add(4, "  bytes pushed (the magic's counter) / all loopback bytes", "jupyter-gpu %%gpu", f"{pushed:,.0f} B",
            f"{loop:,.0f} B", "", "no array bytes", pushed == 0 and loop < size / 100, pushed=pushed, loopback=loop)
    # 5. output floods
    for cell, expected in r.get("settings", {}).get("flood_lines", {}).items():
        off = dig(kg, "flood_limiter_off", cell, "seconds")
        for system, data in (("jupyter-gpu %%gpu (to the notebook)", dig(ours, "flood_magic", cell)),
                             ("jupyter-gpu gateway (ws client)", dig(ours, "flood_ws", cell)),
                             ("Kernel Gateway stock", dig(kg, "flood_stock", cell)),
                             ("Kernel Gateway, limiter off", dig(kg, "flood_limiter_off", cell))):
            if not isinstance(data, dict):
                add(5, cell, system, "-")
                continue
            ours_row = system.startswith("jupyter-gpu")
            ok = None
            if ours_row and off is not None and data.get("seconds") is not None:
                ok = data["lines"] == expected and data["seconds"] <= off
            add(5, f"{cell}: time, lines delivered of {expected:,}", system, secs(data.get("seconds")),
                "-" if data.get("lines") is None else f"{data['lines']:,} lines",
                fmt_ratio(ratio(data.get("seconds"), off)) + " of KG off" if ours_row else "",
                "all lines, <= KG off" if ours_row else "", ok, **data)
    # 6. throughput
    ours_tp = dig(ours, "throughput", "executes_per_s")
    kg_tp = dig(kg, "throughput", "executes_per_s")
    clients = dig(ours, "throughput", "clients")
    kernels = dig(ours, "throughput", "kernels")
    add(6, f"{clients} clients on {kernels} kernels, x = 1 back to back", "jupyter-gpu gateway",
        f"{ours_tp:.0f}/s" if ours_tp else "-", ms(dig(ours, "throughput", "latency", "p99")) + " p99 latency",
        fmt_ratio(ratio(ours_tp, kg_tp)), ">= 2x KG", (ratio(ours_tp, kg_tp) or 0) >= 2 if kg_tp else None,
        per_s=ours_tp)
    add(6, f"{clients} clients on {kernels} kernels, x = 1 back to back", "Kernel Gateway stock",
        f"{kg_tp:.0f}/s" if kg_tp else "-", ms(dig(kg, "throughput", "latency", "p99")) + " p99 latency", per_s=kg_tp)
    # 7. memory
    churn = dig(ours, "lease_churn")
    if isinstance(churn, dict) and "rss_after" in churn:
        add(7, f"gateway RSS, {churn['leases']} leases granted and released", "jupyter-gpu gateway",
            f"{churn['rss_before'] / 2**20:.1f} -> {churn['rss_after'] / 2**20:.1f} MiB",
            f"from start {churn['rss_start'] / 2**20:.1f} MiB: {churn['growth_from_start'] * 100:+.1f}%",
            f"{churn['growth'] * 100:+.1f}%", "<= +10%", churn["growth"] <= 0.10, **churn)
    # 8. pool core
    sim = r.get("pool_sim")
    if isinstance(sim, dict) and "wall_s" in sim:
        # For information: an absolute time moves with the machine, so it is no target.
        add(8, f"pool core: {sim['requests']:,} requests, {sim['gpus']:,} GPUs, {sim['types']} types (fake clock)",
            "jupyter-gpu pool core", f"{sim['decisions_per_s']:,.0f} decisions/s", secs(sim["wall_s"]) + " wall",
            f"{sim['decisions']:,} decisions", **sim)
    scales = dig(r, "pool_scaling", "scales") or []
    for scale in scales:
        largest = scale is scales[-1] and len(scales) > 1 and scale["gpus"] >= 100_000
        share = ratio(scale["us_per_decision"], scales[0]["us_per_decision"])
        add(8, f"pool core per decision, {scale['gpus']:,} GPUs (same demand per GPU)", "jupyter-gpu pool core",
            f"{scale['us_per_decision']:.1f} us CPU", f"{scale['decisions']:,} decisions, {scale['requests']:,} "
            f"requests, {scale['wall_us_per_decision']:.1f} us wall",
            f"{fmt_ratio(share)} of {scales[0]['gpus']:,} GPUs", "<= 1.5x of the smallest" if largest else "",
            share is not None and share <= 1.5 if largest else None, **scale)
    # 9. kept state: snapshot, restore, re-acquire, switch (benchmarks/snapshot_rows.py)
    import snapshot_rows

    snapshot_rows.add_rows(r.get("snapshots"), add)
    # 10. the pool on a Ray cluster (--ray; benchmarks/ray_rows.py)
    import ray_rows

    for values in ray_rows.table_rows(r.get("ray")):
        add(10, **values)
    return rows


def _rate(mb_per_s: float | None) -> str:
    return "-" if mb_per_s is None else f"{mb_per_s:,.0f} MB/s"


def render(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ["#", "what", "system", "median", "p99 / detail", "ratio", "target", ""]
    lines = [
        f"jupyter-gpu benchmark, {r['mode']} mode: {r['machine']['date']}, {r['machine']['cores']} cores "
        f"({r['machine']['cpu']}), Python {r['machine']['python']}; peers: ipyparallel "
        f"{dig(r, 'ipp', 'version') or '-'}, jupyter-kernel-gateway {dig(r, 'kg', 'version') or '-'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows:
        cells = [str(row["row"]), row["what"], row["system"], row["median"], row["p99"], row["ratio"], row["target"],
                 row["verdict"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    problems = [f"{key}: {value['error']}" for key, value in r.items() if isinstance(value, dict) and "error" in value]
    problems += [f"{key}: skipped ({value['skipped']})" for key, value in r.items()
                 if isinstance(value, dict) and "skipped" in value]
    if problems:
        lines += ["", *problems]
    lines += ["", f"total {r['total_seconds']} s; parts: " + ", ".join(f"{k} {v} s" for k, v in r["seconds"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes, few repeats")
    group.add_argument("--full", dest="mode", action="store_const", const="full", help="the README's table")
    group.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny: does it run at all")
    parser.add_argument("--no-peers", action="store_true", help="measure jupyter-gpu and the baselines only")
    parser.add_argument("--ray", action="store_true", help="add row 10, the pool on a namespace Ray cluster (root; "
                        "--full includes it)")
    parser.add_argument("--out", default=str(REPO / "bench-results"), help="where the JSON and table go")
    args = parser.parse_args(argv)
    mode = args.mode or "quick"
    results = measure(mode, peers=not args.no_peers, ray=args.ray)
    rows = build_rows(results)
    results["table"] = [{k: v for k, v in row.items()} for row in rows]
    text = render(results, rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"{mode}-{stamp}", f"latest-{mode}"):
        (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
        (out / f"{name}.md").write_text(text + "\n")
    print(f"\nwritten: {out / f'latest-{mode}.json'} and .md", file=sys.stderr)
    failed = [key for key, value in results.items() if isinstance(value, dict) and "error" in value]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
