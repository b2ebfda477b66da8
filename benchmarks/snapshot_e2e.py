"""Release with 1 GB of state and re-acquire, through the real gateway and kernels:
``python benchmarks/snapshot_e2e.py [--gb 1] [--repeats 3]``.

Per repeat: a cell on a cpu lease makes the arrays (kept remote), the lease is released
(timed until the gateway reports the snapshot kept, and until the GPU is free again), then a
new lease of the same notebook is requested and a cell that reads every array runs (timed
from the request to the cell's end, restore included). A release with nothing to keep is
timed the same way. Medians; the machine's load is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jupyter_gpu.client import GatewayClient, GatewayConfig  # noqa: E402
from jupyter_gpu.remote import CellOptions, RemoteSession, acquire_lease  # noqa: E402
from tests.e2e.conftest import make_gateway  # noqa: E402


class Quiet:
    def __init__(self) -> None:
        self.out: list[str] = []

    def stream(self, name: str, text: str) -> None:
        self.out.append(text)

    def display(self, data: dict[str, Any], metadata: dict[str, Any], transient: dict[str, Any], update: bool) -> None:
        pass

    def clear_output(self, wait: bool) -> None:
        pass

    def input(self, prompt: str, password: bool) -> str:
        return ""

    def comm(self, msg_type: str, content: dict[str, Any], buffers: list[Any]) -> None:
        pass


def cell(client: GatewayClient, lease: dict[str, Any], code: str) -> str:
    session = RemoteSession(client, lease)
    frontend = Quiet()
    relay = session.run_cell(code, [], [], {}, CellOptions(no_pull=True), frontend)
    session.close()
    if relay.error is not None:
        raise relay.error
    return "".join(frontend.out)


def wait_free(client: GatewayClient) -> None:
    while not any(t["name"] == "cpu" and t["warm"] >= 1 for t in client.types()):
        time.sleep(0.02)


def release(client: GatewayClient, lease_id: str) -> tuple[float, float]:
    """Seconds until the snapshot is reported (kept or nothing), and until a kernel is warm again."""
    began = time.perf_counter()
    client.delete_lease(lease_id)
    while (client.get_lease(lease_id).get("snapshot") or {}).get("state", "saving") == "saving":
        time.sleep(0.02)
    kept = time.perf_counter() - began
    wait_free(client)
    return kept, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    arrays = 4
    per_array = int(args.gb * 1e9) // 8 // arrays
    make = ("import numpy as np\n" + "\n".join(f"a{i} = np.full({per_array}, {i}.0)" for i in range(arrays)))
    use = "print(sum(float(a[::512].sum()) for a in (" + ", ".join(f"a{i}" for i in range(arrays)) + ")))"
    tmp = Path(tempfile.mkdtemp(prefix="snapshot-e2e-"))
    gateway = make_gateway(tmp, "--cpu-slots", "1", "--min-warm", "1", "--snapshot-store", str(tmp / "store")).start()
    figures: dict[str, list[float]] = {f"{step}_{kind}_{what}": [] for kind in ("snapshot", "nothing")
                                       for step, what in (("release", "kept"), ("release", "until_gpu_free"),
                                                          ("reacquire", "first_cell"))}
    try:
        client = GatewayClient(GatewayConfig(gateway.url, gateway.tokens["alice"]), timeout=120)
        for _ in range(args.repeats):
            for notebook, code, use_code, kind in (("bench.ipynb", make, use, "snapshot"),
                                                   ("empty.ipynb", "pass", "print(1)", "nothing")):
                lease = acquire_lease(client, "cpu", None, notebook, lambda lease: None)
                cell(client, lease, code)
                kept, free = release(client, lease["id"])
                figures[f"release_{kind}_kept"].append(kept)
                figures[f"release_{kind}_until_gpu_free"].append(free)
                began = time.perf_counter()
                lease = acquire_lease(client, "cpu", None, notebook, lambda lease: None)
                out = cell(client, lease, use_code)
                figures[f"reacquire_{kind}_first_cell"].append(time.perf_counter() - began)
                assert out.strip(), out
                client.delete_lease(lease["id"], forget=True)
                wait_free(client)
    finally:
        gateway.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"gb": args.gb, "load": os.getloadavg(),
                      "seconds": {k: round(statistics.median(v), 3) for k, v in figures.items() if v}}, indent=2))


if __name__ == "__main__":
    main()
