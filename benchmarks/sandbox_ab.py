"""Rows 1-3 with the kernel sandbox on and off, side by side: ``python benchmarks/sandbox_ab.py``.

A shared machine's load drifts by a factor of two within minutes, more than the difference to
measure, so two gateways run at once (``--sandbox off`` and the default) and every round
measures both, in alternating order, with the same code as ``benchmarks/run.py`` (ours.py).
Prints, per figure, the median over rounds of each round's median, and on / off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from ours import CELL, GATEWAY_ARGS_ENV, OurGateway, first_cell, magic_kernel, transfers, warm_magic
from wsclient import warm_roundtrips

SETTINGS = {"repeats": 30, "warmup": 5}
SIZES = [[10**6, 3], [10**8, 2]]


def start(args: str) -> OurGateway:
    os.environ[GATEWAY_ARGS_ENV] = args
    try:
        return OurGateway(cpu_slots=4, min_warm=2)
    finally:
        del os.environ[GATEWAY_ARGS_ENV]


def ws_samples(gateway: OurGateway) -> list[float]:
    """200 round trips of ``x = 1`` over the websocket on a fresh lease (ours.ws_roundtrips, longer)."""
    lease = gateway.lease()
    try:
        gateway.wait_quiet()
        return asyncio.run(warm_roundtrips(gateway.url, gateway.token, lease["kernel_id"], CELL, 200, 10))
    finally:
        gateway.release(lease)


def one_round(gateway: OurGateway, kernel: Any) -> dict[str, float]:
    ws = sorted(ws_samples(gateway))
    figures = {
        "1 ws x = 1 (ms)": 1000 * statistics.median(ws),
        # the path's own cost, which the machine's load hardly moves
        "1 ws x = 1, 10th pct (ms)": 1000 * ws[len(ws) // 10],
        "1 magic alone (ms)": 1000 * warm_magic(gateway, kernel, SETTINGS)["gpu_in_process"]["median"],
        "2 first cell (ms)": 1000 * first_cell(gateway, 2)["gpu_first_cell_e2e"]["median"],
    }
    moved = transfers(kernel, SIZES, 2)
    for size, _ in SIZES:
        for way in ("push", "pull"):
            figures[f"3 {way} {size // 10**6} MB (MB/s)"] = size / 1e6 / moved[str(size)][way]["median"]
    return figures


def main(rounds: int) -> None:
    sides = {"off": start("--sandbox off"), "on": start("")}
    kernels = {name: magic_kernel(gateway) for name, gateway in sides.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    try:
        for number in range(rounds):
            order = list(sides) if number % 2 == 0 else list(reversed(sides))
            for name in order:
                for figure, value in one_round(sides[name], kernels[name]).items():
                    samples[name].setdefault(figure, []).append(value)
    finally:
        for kernel in kernels.values():
            kernel.close()
        for gateway in sides.values():
            gateway.stop()
    print(f"{'figure':26s} {'sandbox off':>12s} {'sandbox on':>12s} {'on / off':>9s}")
    for figure in samples["off"]:
        off, on = (statistics.median(samples[name][figure]) for name in ("off", "on"))
        print(f"{figure:26s} {off:12.2f} {on:12.2f} {on / off:9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    main(parser.parse_args().rounds)
