"""Ray's node table turned into pool membership, without a cluster: the rows are given.

No lease is asked for here, so no actor is ever created (that would start a Ray cluster on
the host network); tests/ray_cluster covers kernels on real nodes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("ray")

from pool_manager.core import PoolCore, PoolPolicy
from pool_manager.node_summary import node_summaries
from pool_manager.ray_backend import RayKernelBackend
from pool_manager.ray_membership import RayPoolService
from pool_manager.ray_nodes import EMULATED_RESOURCE, NodeTable
from pool_manager.ray_slot import SlotSettings

HEAD = {"NodeID": "h" * 56, "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {"CPU": 4}}


def gpu_node(node_id: str, address: str, accelerator: str, gpus: int, alive: bool = True) -> dict[str, Any]:
    resources = {"CPU": 8, "GPU": gpus, f"accelerator_type:{accelerator}": 1, EMULATED_RESOURCE: 1}
    return {"NodeID": node_id * 56, "NodeManagerAddress": address, "Alive": alive, "Resources": resources}


def service_over(rows: list[dict[str, Any]]) -> RayPoolService:
    core = PoolCore([], PoolPolicy(min_warm=0), clock=time.monotonic, wall_clock=time.time)
    backend = RayKernelBackend(NodeTable(), SlotSettings())
    return RayPoolService(core, backend, read_nodes=lambda: list(rows))


@pytest.mark.asyncio
async def test_joining_nodes_bring_their_gpus_and_lost_ones_take_them_away() -> None:
    rows = [HEAD]
    service = service_over(rows)
    assert not await service.refresh_nodes()
    rows += [gpu_node("a", "10.0.0.11", "A100", 2), gpu_node("b", "10.0.0.12", "H100", 1)]
    changes = await service.refresh_nodes()
    assert sorted(n.address for n in changes.joined) == ["10.0.0.11", "10.0.0.12"]
    totals = {s.gpu_type: (s.total, s.emulated) for s in service.core.summaries()}
    assert totals == {"a100": (2, True), "h100": (1, True)}
    assert [(s.node, s.gpu_type, s.free) for s in node_summaries(service.core)] == [
        ("10.0.0.11", "a100", 2), ("10.0.0.12", "h100", 1)]

    rows[2] = gpu_node("b", "10.0.0.12", "H100", 1, alive=False)
    changes = await service.refresh_nodes()
    assert [n.address for n in changes.lost] == ["10.0.0.12"]
    assert [s.node for s in node_summaries(service.core)] == ["10.0.0.11"]
    assert {s.gpu_type: s.total for s in service.core.summaries()}["h100"] == 0


@pytest.mark.asyncio
async def test_an_unreadable_node_table_changes_nothing() -> None:
    service = service_over([HEAD, gpu_node("a", "10.0.0.11", "A100", 2)])
    await service.refresh_nodes()

    def gcs_down() -> list[dict[str, Any]]:
        raise ConnectionError("GCS unreachable")

    service.read_nodes = gcs_down
    assert not await service.refresh_nodes()  # a restarting GCS is not every node lost
    assert [s.total for s in service.core.summaries()] == [2]
