"""jupyter-gpu's side of the benchmark: the real gateway process, real kernels, the real magic.

Runs in the project's .venv. The gateway serves the ``cpu`` type (no GPU is needed: the
relay, the pool and the magic are the same code paths whatever the kernels are pinned to),
and every ``%%gpu`` cell runs in a local ipykernel started with jupyter_client, as a
notebook would run it.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import (
    CELL_TIMER,
    CELL_TIMER_READ,
    CELL_TIMER_RESET,
    LocalKernel,
    in_kernel_loop,
    rss_bytes,
    stop_process,
    summarize,
    wait_until,
)
from wsclient import WsKernel, output_flood, rest, throughput, warm_roundtrips

READY = re.compile(r"listening at (http://127\.0\.0\.1:\d+)")
CELL = "x = 1"


#: Extra gateway options for a comparison run, e.g. ``--sandbox off`` against the default.
GATEWAY_ARGS_ENV = "JUPYTER_GPU_BENCH_GATEWAY_ARGS"


class OurGateway:
    """``jupyter-gpu gateway`` on port 0 of 127.0.0.1, serving ``cpu`` kernels, one user."""

    def __init__(self, cpu_slots: int, min_warm: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="bench-gw-")
        self.token = secrets.token_hex(16)
        self.log_path = os.path.join(self.tmp, "gateway.log")
        log = open(self.log_path, "w")
        env = {**os.environ, "JUPYTER_GPU_TOKEN": self.token, "JUPYTER_CONFIG_DIR": os.path.join(self.tmp, "config"),
               "JUPYTER_DATA_DIR": os.path.join(self.tmp, "data"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_gpu.cli", "gateway", "--port", "0", "--db",
             os.path.join(self.tmp, "usage.sqlite"), "--cpu-slots", str(cpu_slots), "--min-warm", str(min_warm),
             *shlex.split(os.environ.get(GATEWAY_ARGS_ENV, ""))],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
        )
        self.url = ""
        self.min_warm = min_warm
        wait_until(self._listening, 60, "jupyter-gpu gateway start")
        self.wait_warm(min_warm)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {open(self.log_path).read()[-3000:]}")
        match = READY.search(open(self.log_path).read())
        if match:
            self.url = match.group(1)
        return bool(match)

    def env(self) -> dict[str, str]:
        return {"JUPYTER_GPU_URL": self.url, "JUPYTER_GPU_TOKEN": self.token}

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return rest(self.url, self.token, method, path, body)

    def warm(self) -> int:
        return int(sum(t["warm"] for t in self.api("GET", "/api/gpu/types")))

    def wait_warm(self, count: int, timeout: float = 120) -> None:
        wait_until(lambda: self.warm() >= count, timeout, f"{count} warm kernel(s)")

    def wait_quiet(self) -> None:
        """Until the pool has refilled its warm kernels: a kernel starting in the background
        takes a core of this small machine, so nothing is timed while one starts."""
        self.wait_warm(self.min_warm)
        time.sleep(0.5)

    def lease(self) -> dict[str, Any]:
        lease = self.api("POST", "/api/gpu/leases", {"gpu": "cpu"})
        while lease["state"] == "queued":
            lease = self.api("GET", f"/api/gpu/leases/{lease['id']}?wait=30")
        if lease["state"] != "granted":
            raise RuntimeError(f"lease not granted: {lease}")
        return dict(lease)

    def release(self, lease: dict[str, Any]) -> None:
        self.api("DELETE", f"/api/gpu/leases/{lease['id']}")

    @property
    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, 60)
        shutil.rmtree(self.tmp, ignore_errors=True)  # its database, config and log: nothing to keep


def magic_kernel(gateway: OurGateway) -> LocalKernel:
    """A notebook's local kernel with the magic loaded and cell timing hooks installed."""
    kernel = LocalKernel(gateway.env())
    kernel.run("%load_ext jupyter_gpu")
    kernel.run(CELL_TIMER)
    return kernel


def warm_magic(gateway: OurGateway, kernel: LocalKernel, settings: dict[str, Any]) -> dict[str, Any]:
    """Row 1: ``%%gpu cpu`` of ``x = 1`` on a held lease (the lease is taken by the warm-up cells)."""
    for _ in range(settings["warmup"]):
        kernel.run(f"%%gpu cpu\n{CELL}")
    gateway.wait_quiet()
    kernel.run(CELL_TIMER_RESET)
    e2e = []
    for _ in range(settings["repeats"]):
        result = kernel.execute(f"%%gpu cpu\n{CELL}")
        if result["reply"]["status"] != "ok":
            raise RuntimeError(f"%%gpu failed: {result['reply']}")
        e2e.append(result["elapsed"])
    kernel_side = kernel.value(CELL_TIMER_READ)
    in_process = kernel.value(in_kernel_loop(f"get_ipython().run_cell_magic('gpu', 'cpu', {CELL!r})",
                                             settings["repeats"]))
    return {"gpu_e2e": summarize(e2e), "gpu_kernel_side": summarize(kernel_side),
            "gpu_in_process": summarize(in_process)}


def first_cell(gateway: OurGateway, repeats: int) -> dict[str, Any]:
    """Row 2: a new notebook's first ``%%gpu`` cell: lease from the warm pool, connect, execute."""
    e2e, kernel_side = [], []
    for _ in range(repeats):
        kernel = magic_kernel(gateway)
        gateway.wait_quiet()
        try:
            kernel.run(CELL_TIMER_RESET)
            result = kernel.execute(f"%%gpu cpu\n{CELL}")
            if result["reply"]["status"] != "ok":
                raise RuntimeError(f"first %%gpu cell failed: {result['reply']}")
            e2e.append(result["elapsed"])
            kernel_side.extend(kernel.value(CELL_TIMER_READ))
            kernel.run("%gpu release")
        finally:
            kernel.close()
    return {"gpu_first_cell_e2e": summarize(e2e), "gpu_first_cell_kernel_side": summarize(kernel_side)}


#: Inside the notebook kernel: the magic's own counter of pushed bytes, and all loopback traffic.
BYTES_PROBE = """
def _bench_bytes():
    session = get_ipython().magics_manager.registry['GpuMagics'].sessions['cpu']
    with open('/proc/net/dev') as dev:
        lo = next(int(l.split(':')[1].split()[8]) for l in dev if l.split(':')[0].strip() == 'lo')
    return session.bytes_pushed, lo
"""


def transfers(kernel: LocalKernel, sizes: list[list[int]], rerun_repeats: int) -> dict[str, Any]:
    """Rows 3 and 4: push / pull through ``%%gpu``, then re-runs over the unchanged largest array."""
    kernel.run("import numpy as np")
    kernel.run(BYTES_PROBE)
    out: dict[str, Any] = {}
    for size, count in sizes:
        kernel.run(f"a = np.ones({size}, dtype=np.uint8)")
        # a changed byte each time: a new content hash, so the whole array really travels
        push = kernel.value(in_kernel_loop("a[0] = _i % 256; get_ipython().run_cell_magic('gpu', 'cpu', 'n = len(a)')",
                                           count))
        pull = kernel.value(in_kernel_loop(
            "get_ipython().run_cell_magic('gpu', 'cpu --no-push a --pull-limit 4GB', 'b = a'); del b", count))
        out[str(size)] = {"push": summarize(push), "pull": summarize(pull)}
        if size == sizes[-1][0]:
            out["rerun"] = rerun(kernel, size, rerun_repeats)
        kernel.run("del a")
        kernel.run("%%gpu cpu --no-pull\ndel a")
    return out


def rerun(kernel: LocalKernel, size: int, repeats: int) -> dict[str, Any]:
    """Row 4: the same cell over the same (unchanged) array, against a trivial cell, interleaved."""
    code = (
        "import time as _bt, json as _bj\n"
        "_triv, _re, _pushed, _lo = [], [], [], []\n"
        f"for _i in range({repeats}):\n"
        "    _t = _bt.perf_counter()\n"
        f"    get_ipython().run_cell_magic('gpu', 'cpu', {CELL!r})\n"
        "    _triv.append(_bt.perf_counter() - _t)\n"
        "    _p0, _l0 = _bench_bytes()\n"
        "    _t = _bt.perf_counter()\n"
        "    get_ipython().run_cell_magic('gpu', 'cpu', 'n = len(a)')\n"
        "    _re.append(_bt.perf_counter() - _t)\n"
        "    _p1, _l1 = _bench_bytes()\n"
        "    _pushed.append(_p1 - _p0); _lo.append(_l1 - _l0)\n"
        "print(_bj.dumps([_triv, _re, _pushed, _lo]))\n"
    )
    trivial, again, pushed, loopback = kernel.value(code)
    extra = summarize(again)["median"] - summarize(trivial)["median"]
    return {"array_bytes": size, "trivial": summarize(trivial), "rerun": summarize(again), "extra_median": extra,
            "bytes_pushed": summarize(pushed), "loopback_bytes": summarize(loopback)}


def floods_magic(kernel: LocalKernel, cells: dict[str, str], timeout: float) -> dict[str, Any]:
    """Row 5 through the magic: what reaches the notebook frontend of the local kernel."""
    out = {}
    for name, code in cells.items():
        try:
            result = kernel.execute(f"%%gpu cpu\n{code}", timeout=timeout)
            out[name] = {"seconds": result["elapsed"], "lines": result["lines"], "status": result["reply"]["status"]}
        except TimeoutError:
            out[name] = {"seconds": None, "lines": None, "status": f"no reply within {timeout:.0f} s"}
    return out


def floods_ws(gateway: OurGateway, cells: dict[str, str], timeout: float) -> dict[str, Any]:
    """Row 5 with the websocket client that measures Kernel Gateway: like with like."""
    out = {}
    for name, code in cells.items():
        lease = gateway.lease()
        try:
            gateway.wait_quiet()
            out[name] = asyncio.run(output_flood(gateway.url, gateway.token, lease["kernel_id"], code, timeout))
        finally:
            gateway.release(lease)
    return out


def ws_roundtrips(gateway: OurGateway, settings: dict[str, Any]) -> dict[str, Any]:
    lease = gateway.lease()
    try:
        gateway.wait_quiet()
        samples = asyncio.run(warm_roundtrips(gateway.url, gateway.token, lease["kernel_id"], CELL,
                                              settings["repeats"], settings["warmup"]))
    finally:
        gateway.release(lease)
    return summarize(samples)


def throughput_ws(gateway: OurGateway, settings: dict[str, Any]) -> dict[str, Any]:
    """Row 6: 20 clients on 10 leased kernels, trivial cells back to back."""
    leases = [gateway.lease() for _ in range(settings["tp_kernels"])]
    try:
        gateway.wait_quiet()
        result = asyncio.run(throughput(gateway.url, gateway.token, [lease["kernel_id"] for lease in leases],
                                        settings["tp_clients_per_kernel"], settings["tp_seconds"],
                                        settings["tp_warmup"]))
    finally:
        for lease in leases:
            gateway.release(lease)
    result["latency"] = summarize(result["latency"])
    return result


def lease_churn(count: int, warmup: int) -> dict[str, Any]:
    """Row 7: RSS of a fresh gateway before and after ``count`` leases granted and released.

    Each lease is used as a notebook uses one: its websocket opened, one cell executed, the
    socket closed, the lease deleted (so relays, sessions and metering rows come and go too).
    """
    gateway = OurGateway(cpu_slots=6, min_warm=4)
    try:
        rss_start = gateway.rss

        async def one() -> None:
            lease = gateway.lease()
            kernel = await WsKernel.open(gateway.url, gateway.token, lease["kernel_id"])
            result = await kernel.execute(CELL)
            await kernel.close()
            gateway.release(lease)
            if result.status != "ok":
                raise RuntimeError(f"execute failed on lease {lease['id']}")

        async def run(n: int) -> None:
            for _ in range(n):
                await one()

        started = time.perf_counter()
        asyncio.run(run(warmup))
        rss_warm = gateway.rss
        asyncio.run(run(count))
        elapsed = time.perf_counter() - started
        gateway.wait_warm(4)
        time.sleep(1)
        rss_end = gateway.rss
    finally:
        gateway.stop()
    return {"leases": count, "warmup_leases": warmup, "rss_start": rss_start, "rss_before": rss_warm,
            "rss_after": rss_end, "growth": rss_end / rss_warm - 1, "growth_from_start": rss_end / rss_start - 1,
            "seconds": elapsed}


def main(settings: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    gateway = OurGateway(cpu_slots=12, min_warm=2)
    try:
        results["first_cell"] = first_cell(gateway, settings["cold_repeats"])
        kernel = magic_kernel(gateway)
        try:
            results["warm"] = warm_magic(gateway, kernel, settings)
            results["transfer"] = transfers(kernel, settings["transfer_sizes"], settings["rerun_repeats"])
            results["flood_magic"] = floods_magic(kernel, settings["flood_cells"], settings["flood_timeout"])
            kernel.run("%gpu release")
        finally:
            kernel.close()
        results["ws_execute"] = ws_roundtrips(gateway, settings)
        results["flood_ws"] = floods_ws(gateway, settings["flood_cells"], settings["flood_timeout"])
        results["throughput"] = throughput_ws(gateway, settings)
    finally:
        gateway.stop()
    results["lease_churn"] = lease_churn(settings["churn_leases"], settings["churn_warmup"])
    return results
