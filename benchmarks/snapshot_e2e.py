"""Release with 1 GB of state and re-acquire, through the real gateway and kernels:
``python benchmarks/snapshot_e2e.py [--gb 1] [--repeats 3]``.

Per repeat: a cell on an a100 lease (emulated) makes the arrays (kept remote), the lease is
released (timed until the gateway reports the snapshot kept, and until a warm kernel of the type
is there again), then a new lease of the same notebook is requested and a cell that reads every
array runs (timed from the request to the cell's end, restore included). The switch: the a100
lease is released and an h100 one requested at once, timed to the end of its first cell (the
save, the restore and the cell all included). A release with nothing
to keep, and a plain one (no notebook path: the kernel is not asked), are timed the same way.
Medians; the machine's load is printed with them.
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


def wait_free(client: GatewayClient, gpu_type: str) -> None:
    while not any(t["name"] == gpu_type and t["warm"] >= 1 for t in client.types()):
        time.sleep(0.02)


def release(client: GatewayClient, lease_id: str, gpu_type: str, asks_kernel: bool) -> tuple[float, float]:
    """Seconds until the snapshot is reported (kept or nothing; at once where the kernel is not
    asked), and until a warm kernel of the type is there again."""
    began = time.perf_counter()
    client.delete_lease(lease_id)
    while asks_kernel and (client.get_lease(lease_id).get("snapshot") or {}).get("state", "saving") == "saving":
        time.sleep(0.02)
    kept = time.perf_counter() - began
    wait_free(client, gpu_type)
    return kept, time.perf_counter() - began


#: (kind, notebook, first type, next type, state made): "snapshot" keeps the arrays and gets them
#: back on the same type; "switch" on another; "nothing" has a notebook but no variables; "plain"
#: has no notebook path, so nothing is asked of the kernel (a release as before kept state).
KINDS = (("snapshot", "bench.ipynb", "a100", "a100", True), ("switch", "switch.ipynb", "a100", "h100", True),
         ("nothing", "empty.ipynb", "a100", "a100", False), ("plain", "", "a100", "a100", False))


def measure(gb: float, repeats: int) -> dict[str, Any]:
    """Medians of every kind's release and re-acquire (what main prints; benchmarks/snapshot_rows.py's rows)."""
    arrays = 4
    per_array = int(gb * 1e9) // 8 // arrays
    make = ("import numpy as np\n" + "\n".join(f"a{i} = np.full({per_array}, {i}.0)" for i in range(arrays)))
    use = "print(sum(float(a[::512].sum()) for a in (" + ", ".join(f"a{i}" for i in range(arrays)) + ")))"
    tmp = Path(tempfile.mkdtemp(prefix="snapshot-e2e-"))
    gateway = make_gateway(tmp, "--inventory", "a100=1,h100=1", "--cpu-slots", "0", "--min-warm", "1",
                           "--snapshot-store", str(tmp / "store")).start()
    figures: dict[str, list[float]] = {}
    try:
        client = GatewayClient(GatewayConfig(gateway.url, gateway.tokens["alice"]), timeout=120)
        for _ in range(repeats):
            for kind, notebook, first, second, state in KINDS:
                lease = acquire_lease(client, first, None, notebook, lambda lease: None)
                cell(client, lease, make if state else "pass")
                if first != second:  # the switch: from the release straight to the other type's first cell
                    began = time.perf_counter()
                    client.delete_lease(lease["id"])
                    lease = acquire_lease(client, second, None, notebook, lambda lease: None)
                    out = cell(client, lease, use)
                    figures.setdefault(f"release_to_first_cell_{kind}", []).append(time.perf_counter() - began)
                    wait_free(client, first)
                else:
                    kept, free = release(client, lease["id"], first, asks_kernel=bool(notebook))
                    figures.setdefault(f"release_{kind}_kept", []).append(kept)
                    figures.setdefault(f"release_{kind}_until_gpu_free", []).append(free)
                    began = time.perf_counter()
                    lease = acquire_lease(client, second, None, notebook, lambda lease: None)
                    out = cell(client, lease, use if state else "print(1)")
                    figures.setdefault(f"reacquire_{kind}_first_cell", []).append(time.perf_counter() - began)
                assert out.strip(), out
                client.delete_lease(lease["id"], forget=True)
                wait_free(client, second)
    finally:
        gateway.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"gb": gb, "repeats": repeats, "load": os.getloadavg(),
            "seconds": {k: round(statistics.median(v), 3) for k, v in figures.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.gb, args.repeats), indent=2))


if __name__ == "__main__":
    main()
