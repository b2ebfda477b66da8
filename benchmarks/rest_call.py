"""What one REST call of the ``%%gpu`` magic costs, for versions of the client side by side.

``python benchmarks/rest_call.py --tree now=. --tree before=/tmp/old-tree [--rounds 5]``: one
gateway (this checkout's), then round after round, for each tree in turn (so that a machine
shared with others loads every version alike), a fresh notebook kernel whose
``jupyter_gpu`` comes from that tree (first on its ``PYTHONPATH``) times, inside a cell
(where the kernel's event loop is running, as it is for the magic), its client's first
``types()`` call and the median of 30 more; then a fresh kernel runs a new notebook's first
``%%gpu cpu`` cell (the benchmark's row 2, end to end). Prints medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path

from common import LocalKernel
from ours import OurGateway, first_cell

MEASURE = """
import json, statistics, time
from jupyter_gpu.client import GatewayClient, GatewayConfig
client = GatewayClient(GatewayConfig.from_env())
started = time.perf_counter()
client.types()
first = time.perf_counter() - started
later = []
for _ in range(30):
    started = time.perf_counter()
    client.types()
    later.append(time.perf_counter() - started)
print(json.dumps([first, statistics.median(later)]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a tree holding jupyter_gpu/")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.tree)
    figures: dict[str, dict[str, list[float]]] = {name: {"first": [], "later": [], "row2": []} for name in trees}
    gateway = OurGateway(cpu_slots=2, min_warm=1)
    original = os.environ.get("PYTHONPATH", "")
    try:
        for _ in range(args.rounds):
            for name, path in trees.items():
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(path).resolve()), original) if p)
                kernel = LocalKernel(gateway.env())
                try:
                    kernel.run("import jupyter_gpu.client")  # the magic has it loaded before its first call
                    gateway.wait_quiet()
                    first, later = kernel.value(MEASURE)
                finally:
                    kernel.close()
                figures[name]["first"].append(first)
                figures[name]["later"].append(later)
                figures[name]["row2"].append(first_cell(gateway, 1)["gpu_first_cell_e2e"]["median"])
    finally:
        os.environ["PYTHONPATH"] = original
        gateway.stop()
        shutil.rmtree(gateway.tmp, ignore_errors=True)  # OurGateway.stop leaves its log and database
    print(f"medians over {args.rounds} rounds (ms; the spread is min-max)")
    print(f"{'tree':<10} {'first call':>20} {'later calls':>20} {'row 2 first cell':>22}")
    for name, rows in figures.items():
        cells = [f"{statistics.median(v) * 1e3:6.2f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})" for v in rows.values()]
        print(f"{name:<10} {cells[0]:>20} {cells[1]:>20} {cells[2]:>22}")


if __name__ == "__main__":
    main()
