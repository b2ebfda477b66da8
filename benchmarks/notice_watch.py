"""Does the notice watcher (issue 12) cost a ``%%gpu`` cell anything? Row 1's measurement
(``%%gpu cpu`` of ``x = 1`` on a held lease, as a notebook frontend times it, and in-process)
in a fresh notebook kernel per setting: the watcher off, at its default interval, and looking
ten times a second; then off again, to see the drift of the machine over the run.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/notice_watch.py [--repeats 300]

Prints one JSON document: per setting, the medians and p99s in milliseconds, and the threads
the kernel ran (the watcher's is ``jupyter-gpu-notices``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ours import OurGateway, magic_kernel, warm_magic

SETTINGS: list[tuple[str, float | None]] = [("off", None), ("default 3 s", 3.0), ("every 0.1 s", 0.1),
                                            ("off again", None)]
THREADS = "import threading, json; print(json.dumps(sorted(t.name for t in threading.enumerate())))"


def measure(repeats: int, warmup: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    gateway = OurGateway(cpu_slots=2, min_warm=1)
    try:
        for name, interval in SETTINGS:
            kernel = magic_kernel(gateway)
            try:
                kernel.run(f"import jupyter_gpu.magic\njupyter_gpu.magic.NOTICE_WATCH_INTERVAL = {interval!r}")
                timed = warm_magic(gateway, kernel, {"warmup": warmup, "repeats": repeats})
                results[name] = {
                    "interval_s": interval,
                    **{f"{what}_ms": {"median": round(timed[what]["median"] * 1e3, 3),
                                      "p99": round(timed[what]["p99"] * 1e3, 3), "n": timed[what]["n"]}
                       for what in ("gpu_e2e", "gpu_kernel_side", "gpu_in_process")},
                    "threads": kernel.value(THREADS),
                }
                kernel.run("%gpu release")
            finally:
                kernel.close()
            gateway.wait_quiet()
    finally:
        gateway.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats, args.warmup), indent=1))


if __name__ == "__main__":
    main()
