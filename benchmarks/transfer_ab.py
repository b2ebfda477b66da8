"""Small pushes or pulls, A/B: ``%%gpu`` from two checkouts against ipyparallel, rounds alternating in one run.

Usage (after ``scripts/bench`` set up .bench/ipp)::

    .venv/bin/python benchmarks/transfer_ab.py push|pull --a /work/main --b . [--sizes 100000,1000000]
        [--rounds 6] [--per 10]

Each checkout gets its own gateway and notebook kernel (its PYTHONPATH first); ipyparallel runs
a one-engine cluster from a notebook kernel of .bench/ipp, as in peer_ipp.py. The cells are the
table's row 3. Push: ``a[0] = i`` (so the array changed), then ``%%gpu cpu`` over ``n = len(a)``,
and ``view.push({'a': a})``. Pull: ``%%gpu cpu --no-push a --pull-limit 4GB`` over ``b = a``, and
``view.pull('a')``. The sizes run in the order given (by default the table's): the gateway's
malloc state depends on what it moved before. Prints the medians, ipyparallel's time over ours,
and the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ours  # noqa: E402
from common import LocalKernel, in_kernel_loop  # noqa: E402

#: way -> (our cell, ipyparallel's, our set-up cells, ipyparallel's set-up cells), ``{n}`` the size
CELLS = {
    "push": ("a[0] = _i % 256; get_ipython().run_cell_magic('gpu', 'cpu', 'n = len(a)')",
             "a[0] = _i % 256; view.push({'a': a})",
             ["a = np.ones({n}, dtype=np.uint8)"],
             ["a = np.ones({n}, dtype=np.uint8)"]),
    "pull": ("get_ipython().run_cell_magic('gpu', 'cpu --no-push a --pull-limit 4GB', 'b = a'); del b",
             "b = view.pull('a'); del b",
             ["a = np.ones({n}, dtype=np.uint8)", "%%gpu cpu\na = np.ones({n}, dtype=np.uint8)"],
             ["a = np.ones({n}, dtype=np.uint8); view.push({{'a': a}})"]),
}


def ipp_kernel(python: Path) -> LocalKernel:
    """A notebook kernel of ipyparallel's environment, with a one-engine cluster and its view."""
    from jupyter_client.manager import KernelManager

    specs = tempfile.mkdtemp(prefix="transfer-ab-ipp-")
    os.makedirs(f"{specs}/kernels/ipp")
    with open(f"{specs}/kernels/ipp/kernel.json", "w") as spec:
        json.dump({"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "ipp", "language": "python"}, spec)
    os.environ["JUPYTER_PATH"] = specs  # read when the kernel starts, below
    kernel = LocalKernel.__new__(LocalKernel)
    kernel.km = KernelManager(kernel_name="ipp")
    kernel.km.start_kernel(env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    kernel.kc = kernel.km.blocking_client()
    kernel.kc.start_channels()
    kernel.kc.wait_for_ready(timeout=60)
    shutil.rmtree(specs)
    kernel.run("import ipyparallel as ipp, numpy as np\ncluster = ipp.Cluster(n=1, log_level=40)\n"
               "rc = cluster.start_and_connect_sync()\nrc.wait_for_engines(1, timeout=120)\n"
               "view = rc[:]\nview.block = True\n")
    return kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("way", choices=sorted(CELLS))
    parser.add_argument("--a", required=True, help="checkout A (its packages go first on PYTHONPATH)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--sizes", default="100000,1000000", help="run in this order (the table's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per", type=int, default=10, help="cells per system per round")
    parser.add_argument("--ipp", default=str(HERE.parent / ".bench/ipp/bin/python"))
    args = parser.parse_args()
    ours_cell, ipp_cell, ours_setup, ipp_setup = CELLS[args.way]
    systems: dict[str, tuple[LocalKernel, str, list[str]]] = {}
    gateways: list[ours.OurGateway] = []
    try:
        for name, path in (("A", args.a), ("B", args.b)):
            os.environ["PYTHONPATH"] = str(Path(path).resolve())
            gateway = ours.OurGateway(cpu_slots=2, min_warm=1)
            gateways.append(gateway)
            kernel = ours.magic_kernel(gateway)
            kernel.run("import numpy as np")
            systems[name] = (kernel, ours_cell, ours_setup)
        os.environ.pop("PYTHONPATH")
        if Path(args.ipp).exists():
            systems["ipp"] = (ipp_kernel(Path(args.ipp)), ipp_cell, ipp_setup)
        for size in (int(s) for s in args.sizes.split(",")):
            samples: dict[str, list[float]] = {name: [] for name in systems}
            for kernel, cell, setup in systems.values():
                for code in setup:
                    kernel.run(code.format(n=size))
                kernel.value(in_kernel_loop(cell, 3))  # warm-up
            for round_ in range(args.rounds):
                order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
                for name in order:
                    kernel, cell, _ = systems[name]
                    samples[name] += kernel.value(in_kernel_loop(cell, args.per))
            medians = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
            line = f"{size:,} B {args.way}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
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
