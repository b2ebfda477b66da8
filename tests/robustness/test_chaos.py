"""Chaos with "nothing lost": processes killed mid-cell, and what the user and the bill see after."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.gateway_process import kernel_host_pid, pid_alive, poll, stdout_text

from .conftest import make_gateway


@pytest.mark.asyncio
async def test_kill_9_of_a_kernel_mid_cell_ends_its_lease_bills_it_and_tells_the_client(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "0").start(
        wait_warm=False)
    try:
        lease = gateway.lease("alice", "a100")
        lease = gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=60").body
        assert lease["state"] == "granted"
        socket = await gateway.connect("alice", lease["kernel_id"])
        pid = await kernel_host_pid(gateway, socket, lease["kernel_id"])
        assert pid in gateway.kernel_pids()
        socket.execute("import time\nfor i in range(600):\n    print(i, flush=True); time.sleep(0.1)")
        await socket.recv_until(lambda m: m["msg_type"] == "stream")
        os.kill(pid, signal.SIGKILL)
        # the client is told, in words, and its socket closes
        told, _ = await socket.recv_until(
            lambda m: m["msg_type"] in ("error", "stream") and "died" in str(m["content"]), timeout=30)
        assert "Run the cell again" in str(told["content"])
        ended = poll(lambda: (row := gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body)["state"]
                     == "released" and row, 30, "the lease to end")
        assert ended["reason"] == "kernel_died" and ended["gpu_seconds"] > 0 and ended["cost"] > 0
        # the GPU is free again for the next user, and no process is left behind
        assert poll(lambda: not pid_alive(pid), 10, "the killed kernel to be reaped")
        fresh = gateway.lease("bob", "a100")
        fresh = gateway.get("bob", f"/api/gpu/leases/{fresh['id']}?wait=60").body
        assert fresh["state"] == "granted" and fresh["kernel_id"] != lease["kernel_id"]
    finally:
        gateway.stop()


@pytest.mark.asyncio
async def test_sigkill_of_the_gateway_mid_cell_loses_no_metering_and_leaves_no_kernel(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "1").start()
    lease = gateway.lease("alice", "a100")
    socket = await gateway.connect("alice", lease["kernel_id"])
    kernel = await kernel_host_pid(gateway, socket, lease["kernel_id"])
    warm = gateway.kernel_pids() - {kernel}
    socket.execute("import time; time.sleep(600)")
    await socket.recv_until(lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "busy")
    await asyncio.sleep(6.5)  # past one metering heartbeat (every 5 s): what it wrote must survive
    gateway.stop(signal.SIGKILL)
    socket.close()
    # the kernels it started must not outlive it: nobody could reach or bill them
    for pid in {kernel, *warm}:
        assert poll(lambda pid=pid: not pid_alive(pid), 15, f"kernel {pid} to exit after its gateway died")
    restarted = make_gateway(tmp_path, "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "1")
    try:
        restarted.start()
        row = restarted.get("alice", f"/api/gpu/leases/{lease['id']}").body
        assert (row["state"], row["reason"]) == ("released", "gateway_restart")
        # billed up to its last heartbeat: at most one heartbeat interval (5 s) of GPU time is not billed
        assert 6.5 - 5.0 - 0.5 <= row["gpu_seconds"] <= 10.0, row
        assert restarted.get("alice", "/api/gpu/usage").body["total_gpu_seconds"] >= row["gpu_seconds"]
    finally:
        restarted.stop()


@pytest.mark.asyncio
async def test_a_client_gone_mid_output_finds_the_rest_and_its_variables_when_it_comes_back(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "1").start()
    try:
        lease = gateway.lease("alice", "a100")
        socket = await gateway.connect("alice", lease["kernel_id"])
        # 20 MB of output, then a pause (the client is gone by then), then the end of the cell
        msg_id = socket.execute("import sys, time\nmade = 42\nfor i in range(200):\n"
                                "    sys.stdout.write(str(i).rjust(100000) + '\\n'); sys.stdout.flush()\n"
                                "time.sleep(2)\nprint('END')")
        await socket.recv_until(lambda m: m["msg_type"] == "stream")
        socket.ws.protocol.stream.close()  # vanish mid-stream: no close handshake
        again = await gateway.connect("alice", lease["kernel_id"], session_id=socket.session_id)
        reply, outputs = await again.collect(msg_id, timeout=60)
        assert reply["content"]["status"] == "ok"
        assert stdout_text(outputs).endswith("END\n")  # what the kernel said after the client vanished
        _, outputs = await again.run("print(made)")
        assert stdout_text(outputs) == "42\n"  # the cell's variables are still on its kernel
        assert gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body["state"] == "granted"
        again.close()
    finally:
        gateway.stop()
