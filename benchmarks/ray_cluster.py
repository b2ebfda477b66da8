"""The pool on a Ray cluster of namespace machines vs the local backend (root only):

    sudo .venv/bin/python benchmarks/ray_cluster.py [--repeats 30] [--transfer-bytes 1000000000]

(or ``scripts/bench --ray``: benchmarks/ray_rows.py runs this and adds row 10 to the table). Brings up
the test cluster of tests/ray_cluster (head n1: 2 x a100, n2: 1 x h100, gateway in gw; all
emulated, every process real), plus a local-backend gateway in the same namespace, and a
notebook kernel there with the ``%%gpu`` magic, and prints one JSON line per row:

- ``execute_x1``: ``%%gpu h100`` of ``x = 1`` on a held lease, median and p99 in ms, remote
  (kernel on n2, CurveZMQ) vs local (kernel on the gateway's machine), and their ratio
  (target <= 1.3); the same over the kernel websocket alone, for reference;
- ``first_cell_warm``: a new notebook's first ``%%gpu h100`` cell with a warm kernel on n2, ms
  (target <= 50); and its parts over the websocket: lease request, websocket open, first execute;
- ``transfer``: push and pull of ``--transfer-bytes`` through ``%%gpu h100`` (kernel on n2) vs
  raw TCP from gw to n2 (target: >= 40% of TCP), relayed to n2's node receiver, and (rounds
  alternating, same lease) over the websocket as with ``c.RayPool.bulk_transfers = False``;
- ``node_death_to_lease_end``: kill -9 of n2's processes until its lease reads ``node_lost``, s
  (target <= 15).

With ``--emit`` the rows are also handed to benchmarks/run.py as one marked JSON line; where
namespaces cannot be made (not root, no ``ip``, no Ray) that line says why, and nothing runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from baselines import raw_tcp  # noqa: E402
from common import LocalKernel, emit, in_kernel_loop, summarize  # noqa: E402

#: the rows' types: Ray's remote node has the h100; the local gateway declares one too
GPU = "h100"
REMOTE_NODE = "n2"


def granted(gateway: Any, gpu: str) -> dict[str, Any]:
    lease = gateway.lease("alice", gpu)
    if lease["state"] == "queued":
        lease = gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=120").body
    return dict(lease)


def wait_warm(gateway: Any, timeout: float = 120) -> None:
    """Until a warm kernel of the rows' type is ready (a released one's replacement starts anew)."""
    deadline = time.monotonic() + timeout
    while not any(t["name"] == GPU and t["warm"] >= 1 for t in gateway.get("alice", "/api/gpu/types").body):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm {GPU} kernel within {timeout:.0f} s")
        time.sleep(0.05)
    time.sleep(0.5)  # and the replacement's start has settled


def notebook(gateway: Any) -> LocalKernel:
    """A notebook's own kernel (started in this thread's namespace) with the magic loaded."""
    kernel = LocalKernel({"JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens["alice"]})
    kernel.run("%load_ext jupyter_gpu")
    return kernel


def cell(kernel: LocalKernel, code: str) -> float:
    result = kernel.execute(code)
    if result["reply"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {result['reply']}")
    return float(result["elapsed"])


def magic_x1(gateway: Any, repeats: int) -> dict[str, Any]:
    """``%%gpu h100`` of ``x = 1`` on a held lease, as a notebook's Run sees it."""
    kernel = notebook(gateway)
    try:
        for _ in range(5):
            cell(kernel, f"%%gpu {GPU}\nx = 1")
        samples = [cell(kernel, f"%%gpu {GPU}\nx = 1") for _ in range(repeats)]
        kernel.run("%gpu release")
        return summarize(samples)
    finally:
        kernel.close()


async def websocket_x1(gateway: Any, repeats: int) -> dict[str, Any]:
    lease = granted(gateway, GPU)
    ws = await gateway.connect("alice", lease["kernel_id"])
    try:
        for _ in range(5):
            await ws.run("x = 1")
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            await ws.run("x = 1")
            samples.append(time.perf_counter() - began)
        return summarize(samples)
    finally:
        ws.close()
        gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


def magic_first_cells(gateway: Any, count: int) -> dict[str, Any]:
    """A new notebook's first ``%%gpu`` cell, each time with a warm kernel waiting."""
    samples = []
    for _ in range(count):
        kernel = notebook(gateway)
        try:
            wait_warm(gateway)
            samples.append(cell(kernel, f"%%gpu {GPU}\nx = 1"))
            kernel.run("%gpu release")
        finally:
            kernel.close()
    return summarize(samples)


async def first_cell_parts(gateway: Any, count: int) -> dict[str, Any]:
    """Where a first cell's time goes, over the websocket: lease request, websocket open, execute."""
    parts: dict[str, list[float]] = {"lease": [], "connect": [], "execute": [], "total": []}
    for _ in range(count):
        wait_warm(gateway)
        began = time.perf_counter()
        lease = granted(gateway, GPU)
        leased = time.perf_counter()
        ws = await gateway.connect("alice", lease["kernel_id"])
        connected = time.perf_counter()
        await ws.run("x = 1")
        done = time.perf_counter()
        ws.close()
        gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")
        for key, value in (("lease", leased - began), ("connect", connected - leased), ("execute", done - connected),
                           ("total", done - began)):
            parts[key].append(value)
    return {key: summarize(values) for key, values in parts.items()}


#: the notebook's session of the rows' type (its ``uploads`` says whether bulk bytes go past the websocket)
SESSION = f"get_ipython().magics_manager.registry['GpuMagics'].sessions['{GPU}']"
#: how a round moves large values: past the websocket (relayed to the node's receiver), or over it
PATHS = ("node", "websocket")


def bulk_bytes_via_nodes(gateway: Any) -> float:
    text = gateway.get("alice", "/metrics").body
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("jupyter_gpu_bulk_bytes_total") and 'path="node"' in line)


def magic_transfers(gateway: Any, size: int, count: int, paths: tuple[str, ...] = PATHS) -> dict[str, Any]:
    """Push and pull of ``size`` bytes through ``%%gpu h100`` (a changed array each time), rounds
    alternating between past the websocket (to the node's receiving end, or on a local gateway its
    staging directory) and over it (as with bulk_transfers off)."""
    kernel = notebook(gateway)
    try:
        kernel.run(f"import numpy as np\na = np.ones({size}, dtype=np.uint8)\nchanges = 0")
        cell(kernel, f"%%gpu {GPU}\nx = 1")  # the lease, held for the transfers
        samples: dict[str, dict[str, list[float]]] = {path: {"push": [], "pull": []} for path in paths}
        relayed = 0.0
        for _ in range(count):
            for path in paths:
                kernel.run(f"{SESSION}.uploads = {path == 'node'}")
                before = bulk_bytes_via_nodes(gateway)
                samples[path]["push"] += kernel.value(in_kernel_loop(  # changed, so that it is sent again
                    f"changes += 1; a[0] = changes % 256; get_ipython().run_cell_magic('gpu', '{GPU}', 'n = len(a)')",
                    1))
                samples[path]["pull"] += kernel.value(in_kernel_loop(
                    f"get_ipython().run_cell_magic('gpu', '{GPU} --no-push a --pull-limit 4GB', 'b = a'); del b", 1))
                if path == "node":
                    relayed += bulk_bytes_via_nodes(gateway) - before
        kernel.run("%gpu release")
        return {"relayed_bytes": relayed,
                **{path: {way: summarize(values) for way, values in ways.items()} for path, ways in samples.items()}}
    finally:
        kernel.close()


def raw_tcp_to(cluster: Any, node: str, size: int, count: int) -> dict[str, Any]:
    """Seconds to send ``size`` bytes from this namespace to a receiver on ``node`` (until acked)."""
    return raw_tcp(size, count, host=cluster.nodes[node].ip,
                   launch=("ip", "netns", "exec", cluster.nodes[node].namespace))


def node_death(cluster: Any, gateway: Any) -> float:
    lease = granted(gateway, GPU)
    killed = time.monotonic()
    cluster.kill_machine(REMOTE_NODE)
    while time.monotonic() - killed < 60:
        if gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body.get("reason") == "node_lost":
            return time.monotonic() - killed
        time.sleep(0.05)
    return float("inf")


def ms(summary: dict[str, Any]) -> float:
    return round(summary["median"] * 1000, 2)


def measure_latency(out: dict[str, Any], remote: Any, local: Any, repeats: int, first_cells: int) -> None:
    """The rows ``execute_x1`` and ``first_cell_warm`` into ``out``."""
    on_ray, on_local = magic_x1(remote, repeats), magic_x1(local, repeats)
    ws_ray, ws_local = asyncio.run(websocket_x1(remote, repeats)), asyncio.run(websocket_x1(local, repeats))
    out["execute_x1"] = {
        "remote_ms": ms(on_ray), "local_ms": ms(on_local), "remote_p99_ms": round(on_ray["p99"] * 1000, 2),
        "ratio": round(on_ray["median"] / on_local["median"], 2), "target_ratio": 1.3,
        "websocket_remote_ms": ms(ws_ray), "websocket_local_ms": ms(ws_local)}
    first = magic_first_cells(remote, first_cells)
    first_local = magic_first_cells(local, first_cells)
    parts = asyncio.run(first_cell_parts(remote, first_cells))
    parts_local = asyncio.run(first_cell_parts(local, first_cells))
    out["first_cell_warm"] = {"remote_ms": ms(first), "remote_p99_ms": round(first["p99"] * 1000, 2),
                              "local_ms": ms(first_local), "target_ms": 50,
                              "websocket_parts_ms": {key: ms(value) for key, value in parts.items()},
                              "websocket_parts_local_ms": {k: ms(v) for k, v in parts_local.items()}}


def measure(repeats: int, first_cells: int, transfer_bytes: int, transfers: int, only_transfer: bool = False
            ) -> dict[str, Any]:
    """Every row, on a cluster brought up here and torn down after (its namespaces too)."""
    from e2e.conftest import make_gateway
    from ray_cluster.conftest import ray_gateway
    from ray_cluster.netns_cluster import NamespaceCluster

    from pool_manager.ray_pool import RayPool

    out: dict[str, Any] = {}
    cluster = NamespaceCluster(Path(tempfile.mkdtemp(prefix="jgbench-")), RayPool().system_config())
    gateways: list[Any] = []
    try:
        cluster.up()
        for name, host in (("gw", 10), ("n1", 11), ("n2", 12)):
            cluster.add_machine(name, host)
        cluster.start_ray("n1", {"a100": 2}, head=True)
        cluster.start_ray(REMOTE_NODE, {GPU: 1})
        with cluster.inside("gw"):
            remote = ray_gateway(cluster, cluster.root / "ray-gateway", "--min-warm", "1")
            gateways.append(remote)
            local = make_gateway(cluster.root / "local-gateway", "--inventory", f"{GPU}=1", "--cpu-slots", "0").start()
            gateways.append(local)
            if not only_transfer:
                measure_latency(out, remote, local, repeats, first_cells)
            moved = magic_transfers(remote, transfer_bytes, transfers)
            # the same through the local backend's staging directory: what the client side allows
            on_local = magic_transfers(local, transfer_bytes, transfers, paths=("node",))["node"]
            tcp = raw_tcp_to(cluster, REMOTE_NODE, transfer_bytes, transfers)
            tcp_rate = transfer_bytes / tcp["median"] / 1e6
            out["transfer"] = {"bytes": transfer_bytes, "tcp_mb_s": round(tcp_rate), "target_share": 0.4,
                               # every byte of the node rounds went through the node's receiver
                               "relayed_via_node": moved["relayed_bytes"] >= 2 * transfers * transfer_bytes}
            for path, prefix in (("node", ""), ("websocket", "websocket_")):
                for way in ("push", "pull"):
                    rate = transfer_bytes / moved[path][way]["median"] / 1e6
                    out["transfer"][f"{prefix}{way}_mb_s"] = round(rate)
                    out["transfer"][f"{prefix}{way}_share_of_tcp"] = round(rate / tcp_rate, 3)
            for way in ("push", "pull"):
                out["transfer"][f"local_{way}_mb_s"] = round(transfer_bytes / on_local[way]["median"] / 1e6)
            if not only_transfer:
                out["node_death_to_lease_end"] = {"seconds": round(node_death(cluster, remote), 1), "target_s": 15}
            for gateway in gateways:
                gateway.stop()
    finally:
        for gateway in gateways:
            if gateway.proc is not None and gateway.proc.poll() is None:
                gateway.proc.kill()
                gateway.proc.wait()
        problems = cluster.down()
        if problems:
            out["cleanup_problems"] = problems
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="x = 1 cells per system")
    parser.add_argument("--first-cells", type=int, default=5, help="new notebooks, one first cell each")
    parser.add_argument("--transfer-bytes", type=int, default=10**9)
    parser.add_argument("--transfers", type=int, default=3, help="pushes and pulls each")
    parser.add_argument("--only-transfer", action="store_true", help="the transfer row alone (quicker A/B)")
    parser.add_argument("--emit", action="store_true", help="also hand the results to benchmarks/run.py")
    args = parser.parse_args()
    from ray_cluster.netns_cluster import namespaces_unavailable

    why = namespaces_unavailable()
    if why:
        if args.emit:
            emit({"skipped": why})
            return
        sys.exit(why)
    results = measure(args.repeats, args.first_cells, args.transfer_bytes, args.transfers, args.only_transfer)
    for name, values in results.items():
        print(json.dumps({"row": name, **values} if isinstance(values, dict) else {name: values}), flush=True)
    if args.emit:
        emit(results)


if __name__ == "__main__":
    main()
