"""Jupyter Kernel Gateway's side of the benchmark; runs in .bench/kg with that venv's python.

Usage: python peer_kg.py '{"repeats": 30, ...}'. Starts ``jupyter kernelgateway`` as its
own process on 127.0.0.1 (stock settings, a token as our gateway has), and once more with
the IOPub rate limiter off for the output rows. Every cell goes through
:mod:`wsclient`, the same client that measures the jupyter-gpu gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, free_port, stop_process, summarize, wait_until
from wsclient import WsKernel, output_flood, rest, throughput, warm_roundtrips

LIMITER_OFF = ["--ZMQChannelsWebsocketConnection.limit_rate=False"]


class KernelGateway:
    def __init__(self, extra: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.tmp = tempfile.mkdtemp(prefix="bench-kg-")
        self.log = open(os.path.join(self.tmp, "kg.log"), "w")
        env = {**os.environ, "KG_AUTH_TOKEN": self.token, "JUPYTER_RUNTIME_DIR": os.path.join(self.tmp, "runtime")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
             f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.port_retries=0", *extra],
            # not the repository as working directory: its kernel_gateway/ would shadow KG's own
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
        )
        wait_until(self._answers, 60, "Kernel Gateway start")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"Kernel Gateway exited: {open(self.log.name).read()[-2000:]}")
        try:
            rest(self.base, self.token, "GET", "/api", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def new_kernel(self) -> str:
        return str(rest(self.base, self.token, "POST", "/api/kernels", {"name": "python3"})["id"])

    def delete_kernel(self, kernel_id: str) -> None:
        rest(self.base, self.token, "DELETE", f"/api/kernels/{kernel_id}")

    def stop(self) -> None:
        stop_process(self.proc, 30)


async def cold_kernel(kg: KernelGateway) -> float:
    """POST /api/kernels, open its websocket, execute: time to the first cell's reply."""
    started = time.perf_counter()
    kernel_id = kg.new_kernel()
    kernel = await WsKernel.open(kg.base, kg.token, kernel_id)
    result = await kernel.execute("x = 1", timeout=120)
    elapsed = time.perf_counter() - started
    await kernel.close()
    kg.delete_kernel(kernel_id)
    if result.status != "ok":
        raise RuntimeError(f"first cell failed: {result.status}")
    return elapsed


async def floods(kg: KernelGateway, settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, code in settings["flood_cells"].items():
        kernel_id = kg.new_kernel()
        try:
            out[name] = await output_flood(kg.base, kg.token, kernel_id, code, settings["flood_timeout"])
        finally:
            kg.delete_kernel(kernel_id)
    return out


async def main(settings: dict[str, Any]) -> dict[str, Any]:
    from kernel_gateway._version import __version__

    results: dict[str, Any] = {"version": __version__}
    kg = KernelGateway([])
    try:
        kernel_id = kg.new_kernel()
        samples = await warm_roundtrips(kg.base, kg.token, kernel_id, "x = 1", settings["repeats"],
                                        settings["warmup"])
        results["ws_execute"] = summarize(samples)
        kg.delete_kernel(kernel_id)
        results["cold_kernel"] = summarize([await cold_kernel(kg) for _ in range(settings["cold_repeats"])])
        results["flood_stock"] = await floods(kg, settings)
        kernels = [kg.new_kernel() for _ in range(settings["tp_kernels"])]
        tp = await throughput(kg.base, kg.token, kernels, settings["tp_clients_per_kernel"], settings["tp_seconds"],
                              settings["tp_warmup"])
        tp["latency"] = summarize(tp["latency"])
        results["throughput"] = tp
        for kernel_id in kernels:
            kg.delete_kernel(kernel_id)
    finally:
        kg.stop()
    kg = KernelGateway(LIMITER_OFF)
    try:
        results["flood_limiter_off"] = await floods(kg, settings)
    finally:
        kg.stop()
    return results


if __name__ == "__main__":
    emit(asyncio.run(main(json.loads(sys.argv[1]))))
