"""ipyparallel's side of the benchmark; runs in .bench/ipp with that venv's python.

Usage: python peer_ipp.py '{"repeats": 30, ...}' (the driver, run.py, passes the settings).
Prints one marked JSON line (see common.emit). ipyparallel is run as shipped: one engine,
the controller's default settings, magics from ``Client.activate()`` with ``block=True``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ipyparallel as ipp
from common import (
    CELL_TIMER,
    CELL_TIMER_READ,
    CELL_TIMER_RESET,
    LocalKernel,
    emit,
    in_kernel_loop,
    summarize,
)


def cluster_start(profile_dir: str, index: int) -> tuple[float, ipp.Cluster]:
    """Start a one-engine cluster and run the first cell on it: the peer of a first %%gpu cell."""
    started = time.perf_counter()
    cluster = ipp.Cluster(n=1, profile_dir=profile_dir, cluster_id=f"cold{index}", log_level=40)
    client = cluster.start_and_connect_sync()
    client.wait_for_engines(1, timeout=120)
    client[:].execute("x = 1", block=True)
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed, cluster


def main(settings: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {"version": ipp.__version__}
    repeats, warmup = settings["repeats"], settings["warmup"]
    profile_dir = tempfile.mkdtemp(prefix="bench-ipp-")

    # Row 2: a one-engine cluster from nothing to the first cell's result.
    cold = []
    for index in range(settings["cold_repeats"]):
        elapsed, cluster = cluster_start(profile_dir, index)
        cold.append(elapsed)
        cluster.stop_cluster_sync()
    results["cold_start"] = summarize(cold)

    cluster = ipp.Cluster(n=1, profile_dir=profile_dir, cluster_id="warm", log_level=40)
    client = cluster.start_and_connect_sync()
    client.wait_for_engines(1, timeout=120)
    url_file = os.path.join(profile_dir, "security", "ipcontroller-warm-client.json")
    kernel = LocalKernel()
    try:
        kernel.run(
            "import ipyparallel as ipp, numpy as np\n"
            f"rc = ipp.Client({url_file!r})\n"
            "rc.wait_for_engines(1, timeout=120)\n"
            "view = rc[:]\nview.block = True\nview.activate()\n"
        )
        kernel.run(CELL_TIMER)
        # Row 1: `%%px` of `x = 1` as a notebook runs it (a cell sent to the local kernel) ...
        for _ in range(warmup):
            kernel.run("%%px\nx = 1")
        kernel.run(CELL_TIMER_RESET)
        e2e = []
        for _ in range(repeats):
            result = kernel.execute("%%px\nx = 1")
            if result["reply"]["status"] != "ok":
                raise RuntimeError(f"%%px failed: {result['reply']}")
            e2e.append(result["elapsed"])
        results["px_e2e"] = summarize(e2e)
        results["px_kernel_side"] = summarize(kernel.value(CELL_TIMER_READ))
        # ... and the magic alone, called in a loop inside that kernel's IPython shell.
        results["px_in_process"] = summarize(
            kernel.value(in_kernel_loop("get_ipython().run_cell_magic('px', '', 'x = 1')", repeats))
        )

        # Row 3: push and pull of numpy arrays, from the notebook kernel, through the controller.
        transfers: dict[str, Any] = {}
        for size, count in settings["transfer_sizes"]:
            kernel.run(f"a = np.ones({size}, dtype=np.uint8)")
            push = kernel.value(in_kernel_loop("a[0] = _i % 256; view.push({'a': a})", count))
            pull = kernel.value(in_kernel_loop("b = view.pull('a'); del b", count))
            kernel.run("del a; view.execute('del a')")
            transfers[str(size)] = {"push": summarize(push), "pull": summarize(pull)}
        results["transfer"] = transfers
    finally:
        kernel.close()
        client.close()
        cluster.stop_cluster_sync()
    return results


if __name__ == "__main__":
    emit(main(json.loads(sys.argv[1])))
