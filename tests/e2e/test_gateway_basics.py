"""The gateway's REST API and websocket relay, driven like a notebook client would."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import make_gateway
from .gateway_process import GatewayProcess, stdout_text


def test_types_list_the_emulated_inventory_and_cpu(gateway: GatewayProcess) -> None:
    types = {t["name"]: t for t in gateway.get("alice", "/api/gpu/types").body}
    assert set(types) == {"a100", "h100", "cpu"}
    assert types["a100"]["total"] == 2 and types["a100"]["emulated"] is True
    assert types["cpu"]["emulated"] is False
    assert types["a100"]["warm"] == 1 and types["h100"]["free"] == 1
    # emulated GPUs cost what the real ones would (pool_manager/prices.py), not a placeholder
    assert (types["a100"]["price_per_gpu_hour"], types["h100"]["price_per_gpu_hour"]) == (4.10, 6.88)
    specs = gateway.get("alice", "/api/kernelspecs").body["kernelspecs"]
    assert "gpu-a100" in specs and "emulated" in specs["gpu-a100"]["spec"]["display_name"]


def test_lease_from_warm_pool_is_granted_in_the_request(gateway: GatewayProcess) -> None:
    # Granted in the POST's own reply: the core only grants synchronously from a kernel that
    # is already warm, so no kernel was started on the request path.
    lease = gateway.lease("alice", "a100")
    assert lease["state"] == "granted"
    assert lease["gpu_type"] == "a100" and lease["count"] == 1 and lease["kernel_id"]
    assert lease["emulated"] is True
    kernels = gateway.get("alice", "/api/kernels").body
    assert [k["id"] for k in kernels] == [lease["kernel_id"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [True, False], ids=["v1-binary", "json"])
async def test_execute_over_websocket_sees_its_pinned_gpu(gateway: GatewayProcess, binary: bool) -> None:
    lease = gateway.lease("alice", "a100")
    socket = await gateway.connect("alice", lease["kernel_id"], binary=binary)
    reply, outputs = await socket.run("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    assert reply["content"]["status"] == "ok"
    assert stdout_text(outputs).strip() == ",".join(map(str, lease["gpu_indices"]))
    socket.close()


@pytest.mark.asyncio
async def test_two_gpus_are_two_distinct_indices(gateway: GatewayProcess) -> None:
    lease = gateway.lease("alice", "a100:2")
    if lease["state"] == "queued":
        lease = gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=60").body
    assert lease["state"] == "granted" and lease["count"] == 2
    socket = await gateway.connect("alice", lease["kernel_id"])
    _, outputs = await socket.run("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    assert sorted(stdout_text(outputs).strip().split(",")) == ["0", "1"]
    socket.close()


def test_settings_come_from_jupyter_gpu_config_py(tmp_path: Path) -> None:
    process = make_gateway(tmp_path, "--cpu-slots", "0")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "jupyter_gpu_config.py").write_text(
        "c.PoolManager.inventory = 'v100=1'\n"
        "c.PoolManager.price_per_gpu_hour = {'v100': 0.5}\n"
        "c.PoolManager.min_warm = 0\n"
    )
    process.start(wait_warm=False)
    try:
        types = process.get("alice", "/api/gpu/types").body
        assert [(t["name"], t["price_per_gpu_hour"], t["warm"]) for t in types] == [("v100", 0.5, 0)]
    finally:
        process.stop()


def test_nodes_list_the_one_local_machine_and_leases_name_it(gateway: GatewayProcess) -> None:
    rows = gateway.get("alice", "/api/gpu/nodes").body
    assert {(r["node"], r["gpu_type"], r["total"]) for r in rows} == {
        ("local", "a100", 2), ("local", "h100", 1), ("local", "cpu", 2)}
    lease = gateway.lease("alice", "h100")
    assert lease["node"] == "local"
    held = {r["gpu_type"]: r["free"] for r in gateway.get("alice", "/api/gpu/nodes").body}
    assert held["h100"] == 0


def relayed(gateway: GatewayProcess) -> float:
    text = gateway.get("alice", "/metrics").body
    (line,) = [line for line in text.splitlines() if line.startswith("jupyter_gpu_messages_relayed_total ")]
    return float(line.split()[1])


@pytest.mark.asyncio
async def test_the_relayed_messages_counter_never_goes_down_when_a_lease_ends(gateway: GatewayProcess) -> None:
    # Prometheus reads a counter that falls as a restart of the process: rate() would jump.
    lease = gateway.lease("alice", "cpu")
    socket = await gateway.connect("alice", lease["kernel_id"])
    before = relayed(gateway)
    await socket.run("print('counted')")
    during = relayed(gateway)
    assert during > before
    socket.close()
    assert gateway.delete("alice", f"/api/gpu/leases/{lease['id']}").status == 200
    assert relayed(gateway) >= during
