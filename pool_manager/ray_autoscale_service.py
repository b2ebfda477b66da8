"""The Ray pool service on an autoscaled cluster: every ``interval`` it reads Ray's autoscaler
status, plans the demand (:class:`~pool_manager.ray_autoscale.DemandPlanner`), hands it to
``ray.autoscaler.sdk.request_resources`` when it changed, ends the waits that ran out, and
drains the idle nodes the pool can do without (:class:`~pool_manager.ray_autoscale.IdleNodes`)
and writes each decision to the gateway's log (logger ``pool_manager.autoscale``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from .core import NO_CAPACITY, PoolCore
from .ray_autoscale import AutoscalerReport, DemandPlan, DemandPlanner, IdleNodes, InstanceEvent, parse_report
from .ray_backend import RayKernelBackend
from .ray_membership import NodeRows, RayPoolService
from .ray_nodes import NodeChanges, NodeView

log = logging.getLogger("pool_manager.autoscale")

Bundles = list[dict[str, float]]
#: ended leases whose reason is kept for the client to read (it polls a few seconds apart)
ENDED_NOTES_KEPT = 1000


class AutoscaledRayPoolService(RayPoolService):
    def __init__(
        self,
        core: PoolCore,
        backend: RayKernelBackend,
        read_nodes: NodeRows,
        planner: DemandPlanner,
        idle_nodes: IdleNodes | None = None,
        request: Callable[[Bundles], None] | None = None,
        read_report: Callable[[], AutoscalerReport] | None = None,
        interval: float = 1.0,
        **membership: Any,
    ) -> None:
        super().__init__(core, backend, read_nodes, **membership)
        self.planner = planner
        self.idle_nodes = idle_nodes
        #: told of every launched node that joins or leaves (the gateway meters instance-hours)
        self.instance_listeners: list[Callable[[InstanceEvent], None]] = []
        self.request = request or request_resources
        self.read_report = read_report or read_autoscaler_report
        self.interval = interval
        self.notes: dict[str, str] = {}
        self._ended_notes: OrderedDict[str, str] = OrderedDict()
        self._requested: Bundles | None = None
        self._logged = 0
        self._steering: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._tell_instances(True, self.nodes.alive.values())  # up before this gateway: billed from now
        self._steering = asyncio.get_running_loop().create_task(self._steer_forever())

    async def stop(self, reason: str) -> None:
        if self._steering is not None:
            self._steering.cancel()
        await super().stop(reason)

    def apply(self, changes: NodeChanges) -> None:
        super().apply(changes)
        self._tell_instances(True, changes.joined)
        self._tell_instances(False, changes.lost)

    def _tell_instances(self, joined: bool, nodes: Iterable[NodeView]) -> None:
        now = time.time()
        for node in nodes:
            kind = self.planner.kinds.get(node.gpu_type)
            if kind is None:
                continue  # a node the autoscaler did not launch (e.g. a GPU head)
            event = InstanceEvent(node.node_id, node.address, node.gpu_type, kind.instance_type, node.gpus,
                                  kind.price_per_hour, joined, now)
            price = "" if kind.price_per_hour is None else f", ${kind.price_per_hour:g}/h on demand"
            self.decide(f"node {node.address} {'joined' if joined else 'left'}: {kind.instance_type} for "
                        f"{node.gpu_type} ({node.gpus} GPUs{price})" + ("" if joined else
                        "; billed until now (terminated by Ray's autoscaler, or lost)"), now)
            for listener in self.instance_listeners:
                listener(event)

    def capacity_note(self, lease_id: str) -> str | None:
        return self._ended_notes.get(lease_id) or self.notes.get(lease_id)

    async def _steer_forever(self) -> None:
        while True:
            try:
                await self.steer()
            except Exception:  # Ray's GCS restarting: the demand stands, try again
                log.warning("could not update the autoscaler's demand", exc_info=True)
            await asyncio.sleep(self.interval)

    async def steer(self) -> DemandPlan:
        """One round: read what the autoscaler said, plan, and act on the plan."""
        report = await asyncio.to_thread(self.read_report)
        plan = self.planner.plan(self.core, report)
        self.notes = {lease_id: note for lease_id, note in plan.notes.items() if lease_id not in plan.expired}
        for lease_id, message in plan.expired.items():
            self._ended_notes[lease_id] = message
            while len(self._ended_notes) > ENDED_NOTES_KEPT:
                self._ended_notes.popitem(last=False)
            self.end_lease(lease_id, NO_CAPACITY)
        if plan.bundles != self._requested:
            await asyncio.to_thread(self.request, plan.bundles)
            self._requested = plan.bundles
        if self.idle_nodes is not None:
            drain, again = self.idle_nodes.plan(self.core, self.spot_watch.interrupted if self.spot_watch else ())
            for node in drain:
                self.decide(f"drain {node}: idle and not needed; its spare kernels stop so that Ray can "
                            "terminate it")
                self._use_node(node, False)
            for node in again:
                self.decide(f"use {node} again: a lease of its type is waiting")
                self._use_node(node, True)
        entries = list(self.planner.log)
        for at, entry in entries[max(0, len(entries) - (self.planner.log_total - self._logged)):]:
            self.decide(entry, at)
        self._logged = self.planner.log_total
        return plan


    def _use_node(self, node: str, usable: bool) -> None:
        for key in IdleNodes.device_keys(self.core, node, draining=not usable):
            self.set_device_health(key, usable)


def request_resources(bundles: Bundles) -> None:
    from ray.autoscaler.sdk import request_resources as ray_request

    ray_request(bundles=bundles)


def read_autoscaler_report() -> AutoscalerReport:
    from ray.experimental.internal_kv import _internal_kv_get

    return parse_report(_internal_kv_get("__autoscaling_status"))
