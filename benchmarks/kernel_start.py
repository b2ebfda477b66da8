"""What the sandbox costs a kernel start: ``python benchmarks/kernel_start.py [--repeats N]``.

Starts pooled kernels with the local backend exactly as the gateway does (jupyter_client,
the pooled kernel classes, the helper's boot code as warm-up), timed from the start request
to a warm kernel, then killed. Three ways, interleaved so that the machine's state drifts
over all of them alike: no sandbox, the sandbox (bubblewrap, and a uid of its own when run
as root), and the sandbox with a memory limit in a control group. Prints medians and p90s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from jupyter_gpu.protocol import HELPER_BOOT
from pool_manager.backend import LocalKernelBackend
from pool_manager.model import StartKernel
from pool_manager.sandbox import Sandbox

WAYS = {
    "no sandbox": lambda: None,
    "sandbox": lambda: Sandbox.probe("required"),
    "sandbox + 4G memory limit": lambda: Sandbox.probe("required", memory="4G"),
}


async def start_once(sandbox: Sandbox | None, number: int) -> float:
    backend = LocalKernelBackend(warmup_code=HELPER_BOOT, sandbox=sandbox)
    try:
        began = time.perf_counter()
        await backend.start_kernel(StartKernel(f"bench{number}", "cpu", (), "local"))
        took = time.perf_counter() - began
        await backend.kill_kernel(f"bench{number}")
        return took
    finally:
        await backend.close()


async def main(repeats: int) -> None:
    samples: dict[str, list[float]] = {way: [] for way in WAYS}
    for number in range(repeats + 1):
        for way, make in WAYS.items():
            took = await start_once(make(), number)
            if number:  # the first round warms the page cache and the .pyc files
                samples[way].append(took)
    for way, values in samples.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"{way:28s} median {1000 * statistics.median(values):7.1f} ms   p90 {1000 * p90:7.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    asyncio.run(main(parser.parse_args().repeats))
