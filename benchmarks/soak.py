"""Soak: many leases from concurrent clients against one gateway, its resources measured before and after.

Each client, in a loop: request a lease (waiting in the queue if need be), open the kernel's
websocket, run a cell with output, close, release. The gateway's RSS, open file descriptors,
threads and child processes (its kernels) are read from /proc once the pool is warm before the
run and again once it is warm after it. A healthy gateway ends where it started, within:

- child processes: exactly its warm kernels, none left of the leases (each kernel is killed after one);
- open file descriptors: at most FD_SLACK more; threads: at most THREAD_SLACK more (asyncio's
  default executor starts its workers on demand, up to cpu_count + 4);
- RSS: at most RSS_SLACK_BYTES more (allocator high-water marks, SQLite's page cache).

    python benchmarks/soak.py --leases 2000 --clients 20     # scripts/bench soak (the full run)
    python benchmarks/soak.py --leases 200 --clients 20      # tests/robustness/test_soak.py

Prints one JSON line after RESULT_MARK (with the errors the gateway logged); exits 1 when a bound
is exceeded or a lease failed.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import RESULT_MARK, free_port, rss_bytes, stop_process, wait_until
from wsclient import WsKernel, rest

FD_SLACK = 16
# the default executor's worker threads (at most cpu_count + 4) start on demand and stay
THREAD_SLACK = min(32, (os.cpu_count() or 1) + 4)
RSS_SLACK_BYTES = 64 * 2**20


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def _stop_with_parent() -> None:
    """In the gateway's child process: SIGTERM when this script dies, even by SIGKILL (a timeout),
    so a killed soak leaves no gateway and no kernels behind (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def process_stats(pid: int, base: str, token: str) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    warm = sum(t["warm"] for t in rest(base, token, "GET", "/api/gpu/types"))
    return {"rss": rss_bytes(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads,
            "children": len(children(pid)), "warm_kernels": warm}


async def one_lease(base: str, token: str, gpu: str) -> float:
    started = time.perf_counter()
    lease = await asyncio.to_thread(rest, base, token, "POST", "/api/gpu/leases", {"gpu": gpu})
    while lease["state"] == "queued":
        lease = await asyncio.to_thread(rest, base, token, "GET", f"/api/gpu/leases/{lease['id']}?wait=60")
    if lease["state"] != "granted":
        raise RuntimeError(f"lease {lease['id']} ended before its grant: {lease['reason']}")
    kernel = await WsKernel.open(base, token, lease["kernel_id"])
    try:
        result = await kernel.execute("for i in range(20): print('line', i)\n6 * 7", keep_text=True)
    finally:
        await kernel.close()
    if result.status != "ok" or result.lines != 20:
        raise RuntimeError(f"cell on lease {lease['id']}: status {result.status}, {result.lines} lines of 20")
    await asyncio.to_thread(rest, base, token, "DELETE", f"/api/gpu/leases/{lease['id']}")
    return time.perf_counter() - started


async def soak(base: str, token: str, leases: int, clients: int, gpu: str) -> dict[str, Any]:
    # The REST calls block (urllib) in threads, and a queued lease long-polls for up to 60 s: with
    # asyncio's default executor (cpu_count + 4 threads) the clients would queue behind each other.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2 * clients))
    remaining = [leases]
    durations: list[float] = []
    failures: list[str] = []

    async def client() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            try:
                durations.append(await one_lease(base, token, gpu))
            except Exception as exc:  # counted, reported, and the run goes on
                failures.append(repr(exc)[:300])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"seconds": time.perf_counter() - started, "lease_seconds": sorted(durations), "failures": failures}


def warm(base: str, token: str, min_warm: int, timeout: float) -> None:
    def ready() -> bool:  # idle, and every warm kernel started: no start in flight to miscount
        return all(t["warm"] == min(min_warm, t["total"]) and t["queued"] == 0 and t["free"] == t["total"]
                   for t in rest(base, token, "GET", "/api/gpu/types"))

    wait_until(ready, timeout, "the pool to be warm and idle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--inventory", default="a100=8")
    parser.add_argument("--min-warm", type=int, default=4)
    args = parser.parse_args(argv)
    port, token = free_port(), "soak-token"
    with tempfile.TemporaryDirectory(prefix="jupyter-gpu-soak-") as tmp:
        env = {**os.environ, "JUPYTER_GPU_TOKEN": token, "JUPYTER_CONFIG_DIR": f"{tmp}/config",
               "JUPYTER_DATA_DIR": f"{tmp}/data"}
        with open(f"{tmp}/gateway.log", "wb") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "jupyter_gpu.cli", "gateway", "--port", str(port), "--inventory",
                 args.inventory, "--cpu-slots", "0", "--min-warm", str(args.min_warm), "--db", f"{tmp}/usage.sqlite"],
                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_with_parent)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _answers(base, token), 60, "the gateway to answer")
            warm(base, token, args.min_warm, 120)
            before = process_stats(gateway.pid, base, token)
            run = asyncio.run(soak(base, token, args.leases, args.clients, args.inventory.split("=")[0]))
            warm(base, token, args.min_warm, 300)
            after = process_stats(gateway.pid, base, token)
        finally:
            stop_process(gateway, 30)
        gateway_log = Path(f"{tmp}/gateway.log").read_text(errors="replace")
    exceeded = [
        what for what, over in (
            ("children", after["children"] != after["warm_kernels"]),
            ("fds", after["fds"] > before["fds"] + FD_SLACK),
            ("threads", after["threads"] > before["threads"] + THREAD_SLACK),
            ("rss", after["rss"] > before["rss"] + RSS_SLACK_BYTES),
        ) if over
    ]
    durations = run.pop("lease_seconds")
    result = {
        "leases": args.leases, "clients": args.clients, "before": before, "after": after, "exceeded": exceeded,
        "leases_per_second": round(len(durations) / run["seconds"], 2), "seconds": round(run["seconds"], 1),
        "lease_median_s": round(durations[len(durations) // 2], 3) if durations else None,
        "failures": run["failures"][:5], "failed": len(run["failures"]),
        "gateway_errors": _errors(gateway_log)[:5],
    }
    print(RESULT_MARK + json.dumps(result))
    # Errors in the log are reported, not failed on: under load a kernel start can fail and be
    # retried (jupyter_client's TCP ports race between concurrent starts) without losing a lease.
    return 1 if exceeded or run["failures"] else 0


def _errors(log: str) -> list[str]:
    """Each error the gateway logged, with the traceback that followed it."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "[E " in line or line.startswith("Traceback")]
    return ["\n".join(lines[i : i + 25]) for i in starts if i == 0 or not lines[i - 1].startswith("[E ")]


def _answers(base: str, token: str) -> bool:
    try:
        rest(base, token, "GET", "/api/gpu/types", timeout=2)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
