"""The Ray backend: each kernel slot is a Ray actor on the GPU node the pool core chose.

The actor (:mod:`pool_manager.ray_slot`) reserves the slot's GPUs with Ray (``num_gpus``,
``accelerator_type``) and starts the pooled ipykernel on its node, bound to the node's
address and CurveZMQ-encrypted. The connection info (ports, HMAC key, Curve keys) comes
back to the gateway through Ray and stays there: clients only ever see the websocket. So does
where the actor takes the kernel's bulk bytes (:class:`~pool_manager.node_bulk.BulkEndpoint`,
with the kernel's secret), which the gateway relays pushes and pulls to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .backend import KernelBackend, KernelInfo, KernelStartError
from .model import StartKernel
from .node_bulk import BulkEndpoint
from .ray_nodes import NodeTable
from .ray_slot import KernelSlotActor, SlotSettings
from .sandbox import Isolation

log = logging.getLogger(__name__)


class RayKernelBackend(KernelBackend):
    def __init__(self, nodes: NodeTable, settings: SlotSettings, stop_timeout: float = 10.0,
                 isolation: Isolation | None = None, cluster_warnings: Sequence[str] = ()) -> None:
        super().__init__()
        self.nodes = nodes
        self.settings = settings
        self.stop_timeout = stop_timeout
        #: how isolated kernels are, as the slot actors found on their nodes (listings show it;
        #: updated in place, so whoever holds it sees the latest)
        self.isolation = isolation or Isolation()
        #: what the cluster itself leaves open (no Ray token), listed ahead of what nodes found
        self.cluster_warnings = list(cluster_warnings)
        self.isolation.warnings = [*self.cluster_warnings, "not known yet: no kernel has started on a Ray node"]
        #: who hears of a kernel whose actor went away (rather than the kernel dying inside
        #: it): the node may be lost, which membership decides; by default a kernel death
        self.on_actor_lost: Callable[[str, str], None] = lambda kernel_id, node: self._on_death(kernel_id, None)
        self._actors: dict[str, Any] = {}  # slot id -> actor handle
        self._node_of: dict[str, str] = {}  # slot id -> node address
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._bulk: dict[str, BulkEndpoint] = {}  # slot id -> its node's receiving end

    def bulk_endpoint(self, kernel_id: str) -> BulkEndpoint | None:
        return self._bulk.get(kernel_id)

    async def start_kernel(self, request: StartKernel) -> KernelInfo:
        node = self.nodes.by_address(request.node)
        if node is None:
            raise KernelStartError(f"kernel for {request.gpu_type}: node {request.node} has left the Ray cluster")
        options: dict[str, Any] = {
            "num_cpus": 0,
            "num_gpus": len(request.gpu_indices),
            # The core chose the node (and the GPUs on it); Ray must not place it elsewhere.
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        }
        if request.gpu_indices and node.accelerator:
            options["accelerator_type"] = node.accelerator
        real_gpus = bool(request.gpu_indices) and not node.emulated
        actor = KernelSlotActor.options(**options).remote(self.settings, real_gpus)
        self._actors[request.kernel_id] = actor
        self._node_of[request.kernel_id] = request.node
        try:
            info, isolation = await asyncio.wait_for(
                _awaitable(actor.start.remote(request)), self.settings.startup_timeout + 30
            )
            endpoint = await asyncio.wait_for(_awaitable(actor.bulk_endpoint.remote()), self.stop_timeout)
        except Exception as exc:
            await self.kill_kernel(request.kernel_id)
            raise KernelStartError(
                f"kernel for {request.gpu_type} {request.gpu_indices} on node {request.node} did not start: {exc}"
            ) from exc
        if self._actors.get(request.kernel_id) is not actor:  # killed while it started
            raise KernelStartError(f"kernel {request.kernel_id} was stopped while it started")
        if endpoint is not None:
            self._bulk[request.kernel_id] = endpoint
        task = asyncio.get_running_loop().create_task(self._watch(request.kernel_id, actor))
        self._watchers[request.kernel_id] = task
        self._note_isolation(request.node, isolation)
        return info  # type: ignore[no-any-return]

    def _note_isolation(self, node: str, found: Isolation) -> None:
        warnings = [*self.cluster_warnings, *found.warnings]
        if found.summary != self.isolation.summary or warnings != self.isolation.warnings:
            log.log(logging.WARNING if found.warnings else logging.INFO, "kernel isolation on node %s: %s%s", node,
                    found.summary, "".join(f"; {warning}" for warning in found.warnings))
        vars(self.isolation).update(vars(found))
        self.isolation.warnings = warnings

    async def _watch(self, kernel_id: str, actor: Any) -> None:
        """Wait for the kernel to die inside its actor, or for the actor itself to go."""
        try:
            await _awaitable(actor.wait_until_died.remote())
            alone = True
        except Exception:  # RayActorError and kin: the actor went, maybe with its node
            alone = False
        if self._actors.get(kernel_id) is not actor:
            return  # killed on purpose meanwhile
        node = self._node_of.get(kernel_id, "")
        self._forget(kernel_id)
        if alone:
            log.warning("kernel %s on node %s died", kernel_id, node)
            await self._stop_actor(actor)
            self._on_death(kernel_id, None)
        else:
            log.warning("the actor of kernel %s on node %s went away", kernel_id, node)
            self.on_actor_lost(kernel_id, node)

    def _forget(self, kernel_id: str) -> Any:
        self._node_of.pop(kernel_id, None)
        self._bulk.pop(kernel_id, None)
        watcher = self._watchers.pop(kernel_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        return self._actors.pop(kernel_id, None)

    def forget_node(self, node: str) -> list[str]:
        """Drop the kernels of a lost node without waiting on them (their actors are gone); returns their ids."""
        gone = [kernel_id for kernel_id, address in self._node_of.items() if address == node]
        for kernel_id in gone:
            actor = self._forget(kernel_id)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        return gone

    async def _stop_actor(self, actor: Any) -> None:
        try:
            await asyncio.wait_for(_awaitable(actor.stop.remote()), self.stop_timeout)
        except Exception:  # a dead actor or node: nothing left to stop politely
            log.debug("polite stop of an actor failed", exc_info=True)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)

    async def kill_kernel(self, kernel_id: str) -> None:
        actor = self._forget(kernel_id)
        if actor is not None:
            await self._stop_actor(actor)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        actor = self._actors.get(kernel_id)
        if actor is not None:
            await asyncio.wait_for(_awaitable(actor.interrupt.remote()), self.stop_timeout)

    async def close(self) -> None:
        await asyncio.gather(*(self.kill_kernel(kernel_id) for kernel_id in list(self._actors)))


def _awaitable(ref: Any) -> Any:
    """A Ray ObjectRef as an asyncio future (Ray supports ``await ref``; typed as Any)."""
    return asyncio.wrap_future(ref.future())
