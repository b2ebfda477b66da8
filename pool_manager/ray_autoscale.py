"""What the pool asks Ray's autoscaler for, and what queued users are told meanwhile.

Ray's autoscaler (with its AWS node provider on AWS) launches and terminates the machines;
the pool only states its demand, with ``ray.autoscaler.sdk.request_resources``: one bundle
per lease, ``{"GPU": count, "accelerator_type:H100": 0.001}`` as a slot actor asks. A request
is for capacity in total (Ray compares it with what the nodes have, not with what is free),
so granted leases are in it too: their nodes then count as needed. Ray's autoscaler status
(its report in the GCS) says back which launches are under way and which node types were
refused (capacity, spot), from which each queued lease gets a line in place
("starting a p5.48xlarge for h100: usually 3-5 min; 2 ahead of you"), a fallback type when its
own is refused, and after ``max_queue_wait`` the end of its wait with reason ``no_capacity``.

:class:`DemandPlanner` is sans-I/O (fed the core and the parsed report); the service runs it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpu.protocol import GRANTED, QUEUED, GpuChoice, type_matches

from .core import PoolCore, duration_text
from .ray_nodes import accelerator_resource
from .scaler import NodeMayGo, Scaler

#: what a slot actor with ``accelerator_type`` asks of its node's ``accelerator_type:X`` resource
ACCELERATOR_SHARE = 0.001


@dataclass(frozen=True)
class NodeKind:
    """A GPU type's nodes as the cluster config declares them."""

    gpu_type: str
    instance_type: str
    gpus: int
    node_types: tuple[str, ...]  # Ray's node type names (e.g. the spot twin and the on-demand type)
    min_nodes: int = 0  # kept up whether used or not (the config's min_workers, all node types together)
    price_per_hour: float | None = None  # on-demand list price of the instance type


@dataclass(frozen=True)
class InstanceEvent:
    """A launched GPU node joined the pool or left it: what metering bills instance-hours by."""

    node_id: str
    address: str
    gpu_type: str
    instance_type: str
    gpus: int
    price_per_hour: float | None  # on-demand list price (an upper bound for a spot node); None: unknown
    joined: bool
    at: float  # wall time


@dataclass(frozen=True)
class AutoscalerReport:
    """What Ray's autoscaler last said of its node types."""

    launching: Mapping[str, int] = field(default_factory=dict)  # node type -> nodes being launched
    refused: Mapping[str, str] = field(default_factory=dict)  # node type -> why its last launch failed


def parse_report(text: str | bytes | None) -> AutoscalerReport:
    """Ray's autoscaling status (the JSON its monitor keeps under ``__autoscaling_status``)."""
    if not text:
        return AutoscalerReport()
    report = json.loads(text).get("autoscaler_report") or {}
    launching: dict[str, int] = dict(report.get("pending_launches") or {})
    for _ip, node_type, *_status in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    refused = {}
    availability = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for node_type, record in availability.items():
        if not record.get("is_available", True):
            info = record.get("unavailable_node_information") or {}
            refused[node_type] = str(info.get("category") or info.get("description") or "launch failed")
    return AutoscalerReport(launching, refused)


@dataclass
class DemandPlan:
    bundles: list[dict[str, float]]
    notes: dict[str, str]  # queued lease id -> what it waits for, in words
    expired: dict[str, str]  # lease id -> why its wait ends (reason no_capacity)


class DemandPlanner:
    def __init__(
        self,
        kinds: Mapping[str, NodeKind],
        clock: Callable[[], float],
        max_queue_wait: float = 0.0,
        boot_time: str = "usually 3-5 min",
        log_size: int = 1000,
    ) -> None:
        """``kinds``: per GPU type, the nodes the autoscaler can launch. ``clock``: wall time, as
        leases' ``queued_at``. ``max_queue_wait``: seconds a lease may wait (0: for ever)."""
        self.kinds = dict(kinds)
        self.clock = clock
        self.max_queue_wait = max_queue_wait
        self.boot_time = boot_time
        #: (time, decision) for every change of demand, refusal seen and wait ended, newest last
        self.log: deque[tuple[float, str]] = deque(maxlen=log_size)
        self.log_total = 0  # entries ever made (the log keeps the last log_size)
        self._last_demand: dict[str, int] = {}
        self._last_refused: dict[str, str] = {}

    def refusal(self, gpu_type: str, report: AutoscalerReport) -> str | None:
        """Why no node of the type can be launched now (all its node types refused), or None."""
        kind = self.kinds[gpu_type]
        reasons = [report.refused[t] for t in kind.node_types if t in report.refused]
        return reasons[0] if kind.node_types and len(reasons) == len(kind.node_types) else None

    def plan(self, core: PoolCore, report: AutoscalerReport) -> DemandPlan:
        now = self.clock()
        bundles: list[dict[str, float]] = []
        notes: dict[str, str] = {}
        expired: dict[str, str] = {}
        demand: dict[str, int] = {}
        ahead: dict[str, int] = {}  # type -> queued leases before this one that wait for it
        for lease in core.leases.values():
            if lease.state == GRANTED and lease.gpu_type in self.kinds:
                bundles.append(self._bundle(lease.gpu_type, lease.count))
        # GPUs on nodes being launched that no queued lease was sent to yet: a fallback type
        # already on its way is taken before another node is launched
        spare = {t: sum(report.launching.get(n, 0) for n in kind.node_types) * kind.gpus
                 for t, kind in self.kinds.items()}
        for lease_id in core.queued_ids():
            lease = core.leases[lease_id]
            if lease.state != QUEUED:
                continue
            if lease.slot_id is not None:  # its kernel starts on a node that is up: no note
                slot = core.slots.get(lease.slot_id)
                if slot is not None and slot.gpu_type in self.kinds:
                    bundles.append(self._bundle(slot.gpu_type, len(slot.devices) or 1))
                continue
            chosen, refused = self._choose(lease.choices, report, spare)
            if chosen is not None:
                spare[chosen[0]] = max(0, spare[chosen[0]] - chosen[1])
                gpu_type, count = chosen
                bundles.append(self._bundle(gpu_type, count))
                demand[gpu_type] = demand.get(gpu_type, 0) + count
                notes[lease_id] = self._note(gpu_type, refused, ahead.get(gpu_type, 0), report)
                ahead[gpu_type] = ahead.get(gpu_type, 0) + 1
            elif refused:
                notes[lease_id] = "no capacity: " + "; ".join(f"{t}: {why}" for t, why in refused) + (
                    f"; waiting up to {duration_text(self.max_queue_wait)} in all" if self.max_queue_wait else "")
            if self.max_queue_wait and now - lease.queued_at > self.max_queue_wait:
                why = notes.get(lease_id, "no GPU became free")
                expired[lease_id] = (f"no {lease.spec} within --max-queue-wait {duration_text(self.max_queue_wait)} "
                                     f"({why}): try again later or ask for other types, e.g. `%%gpu {lease.spec}|any`")
        self._log_changes(now, demand, report, expired)
        return DemandPlan(bundles, notes, expired)

    def _choose(self, choices: Sequence[GpuChoice], report: AutoscalerReport, spare: Mapping[str, int]
                ) -> tuple[tuple[str, int] | None, list[tuple[str, str]]]:
        """A choice whose node is already being launched with room, else the first choice whose
        type can be launched; and the refused types passed over (also before a launching one:
        the lease's note keeps saying why its first choice is not the one it waits for)."""
        passed: list[tuple[str, str]] = []
        for choice in choices:
            types = [t for t in self.kinds if type_matches(choice.gpu_type, t)]
            for gpu_type in types:
                if spare.get(gpu_type, 0) >= choice.count:
                    return (gpu_type, choice.count), passed
            passed += [(t, why) for t in types if (why := self.refusal(t, report)) is not None]
        refused: list[tuple[str, str]] = []
        for choice in choices:
            for gpu_type in (t for t in self.kinds if type_matches(choice.gpu_type, t)):
                if choice.count > self.kinds[gpu_type].gpus:
                    continue
                why = self.refusal(gpu_type, report)
                if why is None:
                    return (gpu_type, choice.count), refused
                refused.append((gpu_type, why))
        return None, refused

    def _note(self, gpu_type: str, refused: list[tuple[str, str]], ahead: int, report: AutoscalerReport) -> str:
        kind = self.kinds[gpu_type]
        before = "".join(f"no {t} ({why}), " for t, why in refused)
        spot_refused = [t for t in kind.node_types if t in report.refused]
        market = f" on-demand (spot refused: {report.refused[spot_refused[0]]})" if spot_refused else ""
        queue = f"; {ahead} ahead of you" if ahead else ""
        return f"{before}starting a {kind.instance_type}{market} for {gpu_type}: {self.boot_time}{queue}"

    def _decide(self, entry: tuple[float, str]) -> None:
        self.log.append(entry)
        self.log_total += 1

    def _bundle(self, gpu_type: str, count: int) -> dict[str, float]:
        return {"GPU": float(count), accelerator_resource(gpu_type): ACCELERATOR_SHARE}

    def _log_changes(self, now: float, demand: dict[str, int], report: AutoscalerReport,
                     expired: Mapping[str, str]) -> None:
        for gpu_type in sorted(set(demand) | set(self._last_demand)):
            if demand.get(gpu_type, 0) != self._last_demand.get(gpu_type, 0):
                kind = self.kinds[gpu_type]
                self._decide((now, f"demand {gpu_type}: {demand.get(gpu_type, 0)} GPU(s) queued "
                                      f"-> {kind.instance_type} nodes ({', '.join(kind.node_types)})"))
        for node_type, why in sorted(report.refused.items()):
            if self._last_refused.get(node_type) != why:
                self._decide((now, f"refused {node_type}: {why}"))
        for lease_id, why in expired.items():
            self._decide((now, f"lease {lease_id} ended no_capacity: {why}"))
        self._last_demand, self._last_refused = demand, dict(report.refused)


class IdleNodes:
    """Which nodes the pool stops using so that Ray's autoscaler can terminate them.

    A spare (warm) kernel holds its GPUs through its slot actor, so Ray would never see its
    node idle. The :class:`~pool_manager.scaler.Scaler` says which idle nodes the pool can do
    without (beyond each type's minimum, idle ``wait_count`` rounds in a row); those are
    drained: their GPUs are marked unusable, which stops their spare kernels and starts no new
    one there, and Ray terminates the node after its idle timeout. Nodes that hold a lease, a
    kernel starting for a queued lease, or a kernel whose variables are being saved are not
    idle and are never drained. When a lease for the type queues meanwhile, its drained nodes
    are taken back into use before anything is launched.
    """

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self.draining: dict[str, str] = {}  # node -> its GPU type

    @staticmethod
    def device_keys(core: PoolCore, node: str, draining: bool) -> list[str]:
        """The node's devices in the order to mark them: when draining, those no kernel holds
        first (else a spare kernel stopped on one would start again on the next)."""
        keys = [device.key for device in core.devices.values() if device.node == node]
        held = {key for slot in core.slots.values() for key in slot.devices}
        return sorted(keys, key=lambda key: key in held) if draining else keys

    def plan(self, core: PoolCore, going: Collection[str] = ()) -> tuple[list[str], list[str]]:
        """(nodes to drain, drained nodes to use again); ``going``: nodes never taken back (AWS
        announced their end)."""
        present = {device.node for device in core.devices.values()}
        for node in [n for n in self.draining if n not in present]:
            del self.draining[node]  # terminated: it left the pool
        unmet = core.unmet_demand()
        again = [node for node, gpu_type in self.draining.items() if unmet.get(gpu_type) and node not in going]
        for node in again:
            del self.draining[node]
        drain = []
        for recommendation in self.scaler.recommendations(core):
            if isinstance(recommendation, NodeMayGo) and recommendation.node not in self.draining:
                self.draining[recommendation.node] = recommendation.gpu_type
                drain.append(recommendation.node)
        return drain, again


def node_kinds(config: Mapping[str, Any]) -> dict[str, NodeKind]:
    """Per GPU type, its node types in a Ray cluster config (written by ``jupyter-gpu aws
    cluster-config`` or by hand): spot twins first, as Ray's scorer tries them."""
    from .aws.cluster_config import gpu_node_types
    from .aws.list_prices import on_demand_price

    region = str((config.get("provider") or {}).get("region", ""))
    kinds: dict[str, NodeKind] = {}
    for node_type in sorted(gpu_node_types(config), key=lambda t: not t.spot):
        known = kinds.get(node_type.gpu_type)
        if known is None:
            price, _ = on_demand_price(node_type.instance_type, region)
            kinds[node_type.gpu_type] = NodeKind(node_type.gpu_type, node_type.instance_type, node_type.gpus,
                                                 (node_type.name,), node_type.min_nodes, price)
        else:
            kinds[node_type.gpu_type] = NodeKind(known.gpu_type, known.instance_type, max(known.gpus, node_type.gpus),
                                                 (*known.node_types, node_type.name),
                                                 known.min_nodes + node_type.min_nodes, known.price_per_hour)
    return kinds
