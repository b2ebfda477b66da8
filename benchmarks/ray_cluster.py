"""The pool on a Ray cluster of namespace machines vs the local backend (root only):

    sudo .venv/bin/python benchmarks/ray_cluster.py [--repeats 50]

Brings up the test cluster of tests/ray_cluster (head n1: 2 x a100, n2: 1 x h100, gateway in
gw; all emulated, every process real), plus a local-backend gateway in the same namespace,
and prints one JSON line per row:

- ``execute_x1``: ``x = 1`` over a held lease's websocket, median and p90 in ms, remote (kernel
  on n2, CurveZMQ) vs local (kernel on the gateway's machine), and their ratio (target <= 1.3);
- ``first_cell_warm``: lease request + websocket + first ``x = 1`` with a warm kernel on n2, ms
  (target <= 50);
- ``node_death_to_lease_end``: kill -9 of n2's processes until its lease reads ``node_lost``, s
  (target <= 15).

Not measured yet: 1 GB push/pull to a remote node vs raw TCP (no per-node bulk receiving end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from e2e.conftest import make_gateway  # noqa: E402
from e2e.gateway_process import GatewayProcess  # noqa: E402
from ray_cluster.conftest import ray_gateway  # noqa: E402
from ray_cluster.netns_cluster import NamespaceCluster, namespaces_unavailable  # noqa: E402

from pool_manager.ray_pool import RayPool  # noqa: E402


def granted(gateway: GatewayProcess, gpu: str) -> dict[str, Any]:
    lease = gateway.lease("alice", gpu)
    if lease["state"] == "queued":
        lease = gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=120").body
    return dict(lease)


async def execute_times(gateway: GatewayProcess, gpu: str, repeats: int) -> list[float]:
    lease = granted(gateway, gpu)
    socket = await gateway.connect("alice", lease["kernel_id"])
    try:
        for _ in range(5):
            await socket.run("x = 1")
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            await socket.run("x = 1")
            samples.append((time.perf_counter() - began) * 1000)
        return samples
    finally:
        socket.close()
        gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


async def first_cell(gateway: GatewayProcess, gpu: str) -> float:
    gateway.wait_warm(120)
    began = time.perf_counter()
    lease = granted(gateway, gpu)
    socket = await gateway.connect("alice", lease["kernel_id"])
    await socket.run("x = 1")
    elapsed = (time.perf_counter() - began) * 1000
    socket.close()
    gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")
    return elapsed


def node_death(cluster: NamespaceCluster, gateway: GatewayProcess) -> float:
    lease = granted(gateway, "h100")
    killed = time.monotonic()
    cluster.kill_machine("n2")
    while time.monotonic() - killed < 60:
        if gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body.get("reason") == "node_lost":
            return time.monotonic() - killed
        time.sleep(0.05)
    return float("inf")


def row(name: str, **values: Any) -> None:
    print(json.dumps({"row": name, **values}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    why = namespaces_unavailable()
    if why:
        sys.exit(why)
    cluster = NamespaceCluster(Path(tempfile.mkdtemp(prefix="jgbench-")), RayPool().system_config())
    gateways: list[GatewayProcess] = []
    try:
        cluster.up()
        for name, host in (("gw", 10), ("n1", 11), ("n2", 12)):
            cluster.add_machine(name, host)
        cluster.start_ray("n1", {"a100": 2}, head=True)
        cluster.start_ray("n2", {"h100": 1})
        with cluster.inside("gw"):
            remote = ray_gateway(cluster, cluster.root / "ray-gateway", "--min-warm", "1")
            gateways.append(remote)
            local = make_gateway(cluster.root / "local-gateway", "--inventory", "h100=1", "--cpu-slots", "0").start()
            gateways.append(local)
            on_ray = asyncio.run(execute_times(remote, "h100", args.repeats))
            on_local = asyncio.run(execute_times(local, "h100", args.repeats))
            ray_ms, local_ms = statistics.median(on_ray), statistics.median(on_local)
            row("execute_x1", remote_median_ms=round(ray_ms, 2), local_median_ms=round(local_ms, 2),
                remote_p90_ms=round(sorted(on_ray)[int(0.9 * len(on_ray))], 2), ratio=round(ray_ms / local_ms, 2),
                target_ratio=1.3)
            row("first_cell_warm", remote_ms=round(asyncio.run(first_cell(remote, "h100")), 1), target_ms=50)
            row("node_death_to_lease_end", seconds=round(node_death(cluster, remote), 1), target_s=15)
            for gateway in gateways:
                gateway.stop()
    finally:
        for gateway in gateways:
            if gateway.proc is not None and gateway.proc.poll() is None:
                gateway.proc.kill()
        problems = cluster.down()
        if problems:
            print(json.dumps({"cleanup_problems": problems}), file=sys.stderr)


if __name__ == "__main__":
    main()
