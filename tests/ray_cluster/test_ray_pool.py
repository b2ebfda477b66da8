"""The pool on a real Ray cluster of namespace machines: placement, transport, membership.

Tests run in order on one shared cluster (see conftest); the node-loss test goes last.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from e2e.gateway_process import poll, stdout_text

from .conftest import RayTestbed

#: the first test also pays for bringing the shared cluster up (retried on a loaded machine)
pytestmark = pytest.mark.timeout(600)


def types_of(testbed: RayTestbed) -> dict[str, dict[str, object]]:
    return {t["name"]: t for t in testbed.gateway.get("alice", "/api/gpu/types").body}


def granted(testbed: RayTestbed, user: str, gpu: str) -> dict[str, Any]:
    """A granted lease (waiting while the type's warm kernel is still being replaced)."""
    lease = testbed.gateway.lease(user, gpu)
    if lease["state"] == "queued":
        lease = testbed.gateway.get(user, f"/api/gpu/leases/{lease['id']}?wait=60").body
    assert lease["state"] == "granted", lease
    return lease


def test_types_list_the_cluster_gpus_as_emulated(testbed: RayTestbed) -> None:
    types = types_of(testbed)
    assert set(types) == {"a100", "h100"}
    assert types["a100"]["total"] == 2 and types["h100"]["total"] == 1
    assert types["a100"]["emulated"] is True and types["h100"]["emulated"] is True
    assert types["a100"]["warm"] == 1 and types["h100"]["warm"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("gpu", "node"), [("h100", "n2"), ("a100", "n1")])
async def test_kernel_runs_on_the_node_of_its_gpu_type(testbed: RayTestbed, gpu: str, node: str) -> None:
    gateway = testbed.gateway
    lease = granted(testbed, "alice", gpu)
    socket = await gateway.connect("alice", lease["kernel_id"])
    try:
        reply, outputs = await socket.run("import os; x = 1; print(os.getpid(), os.environ['CUDA_VISIBLE_DEVICES'])")
        assert reply["content"]["status"] == "ok", reply
        pid, visible = stdout_text(outputs).split()
        # The kernel process lives in that node's network namespace: it is on that "machine".
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == testbed.cluster.netns_inode(node)
        assert visible == ",".join(map(str, lease["gpu_indices"]))
        reply, outputs = await socket.run("print(x + 1)")
        assert stdout_text(outputs) == "2\n"
    finally:
        socket.close()
        gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


@pytest.mark.asyncio
async def test_kernel_traffic_is_curve_encrypted(testbed: RayTestbed) -> None:
    gateway = testbed.gateway
    lease = granted(testbed, "alice", "h100")
    socket = await gateway.connect("alice", lease["kernel_id"])
    try:
        # ipykernel's own sockets say whether they run as CurveZMQ servers.
        _, outputs = await socket.run("print(get_ipython().kernel.shell_stream.socket.curve_server)")
        assert stdout_text(outputs).strip() == "True"
    finally:
        socket.close()
        gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


def test_released_kernel_is_replaced_by_a_warm_one_on_its_node(testbed: RayTestbed) -> None:
    gateway = testbed.gateway
    lease = granted(testbed, "alice", "h100")
    gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")
    poll(lambda: types_of(testbed)["h100"]["warm"] == 1, 30, "a fresh warm h100 kernel")
    again = granted(testbed, "bob", "h100")
    assert again["kernel_id"] != lease["kernel_id"]
    gateway.delete("bob", f"/api/gpu/leases/{again['id']}")
