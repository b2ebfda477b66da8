"""Small pushes, A/B: ``%%gpu`` from two checkouts against ipyparallel, rounds alternating in one run.

Usage (after ``scripts/bench`` set up .bench/ipp)::

    .venv/bin/python benchmarks/push_ab.py --a /work/main --b . [--sizes 100000,1000000] [--rounds 6] [--per 10]

Each checkout gets its own gateway and notebook kernel (its PYTHONPATH first); ipyparallel runs
a one-engine cluster from a notebook kernel of .bench/ipp, as in peer_ipp.py. The cells are the
table's row 3: ``a[0] = i`` (so the array changed), then ``%%gpu cpu`` over ``n = len(a)``, and
``view.push({'a': a})``.
Prints the medians, ipyparallel's time over ours, and the load average next to them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ours  # noqa: E402
from common import LocalKernel, in_kernel_loop  # noqa: E402
from pull_ab import ipp_kernel  # noqa: E402

OURS_PUSH = "a[0] = _i % 256; get_ipython().run_cell_magic('gpu', 'cpu', 'n = len(a)')"
IPP_PUSH = "a[0] = _i % 256; view.push({'a': a})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (its packages go first on PYTHONPATH)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--sizes", default="100000,1000000",
                        help="in the order of the table's row 3: the gateway's malloc state depends on it")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per", type=int, default=10, help="pushes per system per round")
    parser.add_argument("--ipp", default=str(HERE.parent / ".bench/ipp/bin/python"))
    args = parser.parse_args()
    systems: dict[str, tuple[LocalKernel, str, list[str]]] = {}
    gateways: list[ours.OurGateway] = []
    try:
        for name, path in (("A", args.a), ("B", args.b)):
            os.environ["PYTHONPATH"] = str(Path(path).resolve())
            gateway = ours.OurGateway(cpu_slots=2, min_warm=1)
            gateways.append(gateway)
            kernel = ours.magic_kernel(gateway)
            kernel.run("import numpy as np")
            systems[name] = (kernel, OURS_PUSH, ["a = np.ones({n}, dtype=np.uint8)"])
        os.environ.pop("PYTHONPATH")
        if Path(args.ipp).exists():
            systems["ipp"] = (ipp_kernel(Path(args.ipp)), IPP_PUSH, ["a = np.ones({n}, dtype=np.uint8)"])
        for size in (int(s) for s in args.sizes.split(",")):
            samples: dict[str, list[float]] = {name: [] for name in systems}
            for kernel, push, setup in systems.values():
                for code in setup:
                    kernel.run(code.format(n=size))
                kernel.value(in_kernel_loop(push, 3))  # warm-up
            for round_ in range(args.rounds):
                order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
                for name in order:
                    kernel, push, _ = systems[name]
                    samples[name] += kernel.value(in_kernel_loop(push, args.per))
            medians = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
            line = f"{size:,} B push: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
            if "ipp" in medians:
                line += " | ipyparallel / ours: " + ", ".join(
                    f"{name} {medians['ipp'] / ms:.2f}x" for name, ms in medians.items() if name != "ipp")
            print(f"{line} (load {os.getloadavg()[0]:.1f}, {args.rounds} x {args.per} each)", flush=True)
    finally:
        for name, (kernel, *_) in systems.items():
            if name == "ipp":
                try:
                    kernel.run("cluster.stop_cluster_sync()")
                except Exception:
                    pass
            kernel.close()
        for gateway in gateways:
            gateway.stop()


if __name__ == "__main__":
    main()
