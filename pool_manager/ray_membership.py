"""Nodes joining and leaving the Ray cluster, turned into pool events.

Ray already knows which nodes are alive (its GCS health-checks every raylet); this module
only reads that table (``ray.nodes()``) every ``poll_interval`` seconds and tells the pool
core: a node with GPUs that joined adds its devices, a node that died or left ends the
leases on it with the reason ``node_lost``. No membership protocol of our own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .core import PoolCore
from .model import Device
from .ray_backend import RayKernelBackend
from .ray_nodes import NodeChanges, devices_of
from .service import PoolService

log = logging.getLogger(__name__)

NodeRows = Callable[[], Iterable[Mapping[str, Any]]]


class RayPoolService(PoolService):
    """The pool service plus the watch on Ray's node table."""

    def __init__(
        self,
        core: PoolCore,
        backend: RayKernelBackend,
        read_nodes: NodeRows,
        poll_interval: float = 0.5,
        node_loss_grace: float = 11.0,
    ) -> None:
        super().__init__(core, backend)
        self.ray_backend = backend
        self.nodes = backend.nodes
        self.read_nodes = read_nodes
        self.poll_interval = poll_interval
        #: how long Ray may take to declare a node dead (RayPool.node_loss_seconds())
        self.node_loss_grace = node_loss_grace
        self._membership: asyncio.Task[None] | None = None
        backend.on_actor_lost = self._on_actor_lost

    async def start(self) -> None:
        await super().start()
        self._membership = asyncio.get_running_loop().create_task(self._watch_nodes())

    async def stop(self, reason: str) -> None:
        if self._membership is not None:
            self._membership.cancel()
        await super().stop(reason)

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.refresh_nodes()

    async def refresh_nodes(self) -> NodeChanges:
        try:
            rows = list(await asyncio.to_thread(self.read_nodes))
        except Exception:  # the GCS restarting or unreachable: keep what we know, try again
            log.warning("could not read Ray's node table", exc_info=True)
            return NodeChanges()
        changes = self.nodes.update(rows)
        if changes:
            self.apply(changes)
        return changes

    def apply(self, changes: NodeChanges) -> None:
        for node in changes.lost:
            kernels = self.ray_backend.forget_node(node.address)
            ended = self.remove_node(node.address)
            log.warning("node %s (%s) lost: %d lease(s) ended, %d kernel(s) gone",
                        node.address, node.node_id[:12], len(ended), len(kernels))
        joined: list[Device] = [device for node in changes.joined for device in devices_of(node)]
        if joined:
            self.add_devices(joined)
            for node in changes.joined:
                log.info("node %s joined: %d x %s%s", node.address, node.gpus, node.gpu_type,
                         " (emulated)" if node.emulated else "")

    def _on_actor_lost(self, kernel_id: str, node: str) -> None:
        """An actor went without its kernel saying so: a lost node, or the actor alone died."""
        self._spawn(self._settle_actor_loss(kernel_id, node))

    async def _settle_actor_loss(self, kernel_id: str, node: str) -> None:
        # A killed machine breaks the actor's connection at once, seconds before Ray's health
        # check declares the node dead: give Ray that long to say so (the lease then ends as
        # node_lost, by refresh_nodes) before calling it the death of this kernel alone.
        deadline = time.monotonic() + self.node_loss_grace
        while self.nodes.by_address(node) is not None and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_interval)
            await self.refresh_nodes()
        if self.core.slot_for_kernel(kernel_id) is not None and self.nodes.by_address(node) is not None:
            self._on_kernel_death(kernel_id)
