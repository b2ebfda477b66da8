"""Scaling policy: from the pool's unmet demand and idle nodes to "want N more nodes of type
T" and "node X may go", after dask's ``distributed/deploy/adaptive_core.py``.

Nothing here launches or stops a machine: whoever runs the nodes (Ray's autoscaler, the AWS
code) carries the recommendations out and tells the pool when nodes join or leave. As in
dask, a node is recommended away only after it was a candidate ``wait_count`` rounds in a
row (a lull between two cells must not cost a node that takes minutes to boot), while more
nodes are asked for at once; every recommendation made is kept in a bounded ``log``.

Per type, three counts (dask's plan / requested / observed): ``observed`` nodes are in the
pool; ``planned`` ones were asked for and are in the pool or still booting (the caller says,
default: none booting). The target is the nodes the type needs: those in use, plus what
the unmet demand needs, never below ``minimum`` nor above ``maximum``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .core import PoolCore
from .placement import NodeUse


@dataclass(frozen=True)
class NodeGroup:
    """What scaling knows of one GPU type's nodes."""

    gpus_per_node: int
    minimum: int = 0
    maximum: int = 100


@dataclass(frozen=True)
class WantNodes:
    """Launch ``count`` more nodes of the type."""

    gpu_type: str
    count: int
    unmet_gpus: int


@dataclass(frozen=True)
class NodeMayGo:
    """The node was idle ``wait_count`` rounds in a row and the type has more than it needs."""

    gpu_type: str
    node: str


Recommendation = WantNodes | NodeMayGo


class Scaler:
    def __init__(
        self,
        groups: Mapping[str, NodeGroup],
        clock: Callable[[], float],
        wait_count: int = 3,
        log_size: int = 1000,
    ) -> None:
        self.groups = dict(groups)
        self.clock = clock
        self.wait_count = wait_count
        #: (time, recommendation) for every recommendation made, newest last
        self.log: deque[tuple[float, Recommendation]] = deque(maxlen=log_size)
        self._close_counts: dict[str, int] = {}  # node -> rounds in a row it was a candidate to go

    def target(self, gpu_type: str, unmet_gpus: int, nodes: list[NodeUse]) -> int:
        """How many nodes of the type the pool needs now."""
        group = self.groups[gpu_type]
        busy = sum(1 for use in nodes if not use.idle)
        if unmet_gpus:
            # Idle nodes stay: the demand is waiting for them, or for what they will start.
            wanted = len(nodes) + math.ceil(unmet_gpus / group.gpus_per_node)
        else:
            wanted = busy
        return max(group.minimum, min(group.maximum, wanted))

    def recommendations(self, core: PoolCore, planned: Mapping[str, int] | None = None) -> list[Recommendation]:
        """One round: what to launch and what may go, from the core's state now."""
        unmet = core.unmet_demand()
        node_use = core.node_use()
        made: list[Recommendation] = []
        candidates: set[str] = set()
        for gpu_type in self.groups:
            nodes = node_use.get(gpu_type, [])
            plan = max(len(nodes), (planned or {}).get(gpu_type, len(nodes)))
            target = self.target(gpu_type, unmet.get(gpu_type, 0), nodes)
            if target > plan:
                made.append(WantNodes(gpu_type, target - plan, unmet.get(gpu_type, 0)))
            elif target < plan:
                # The latest to join go first; nodes still booting are left to land (and go
                # idle) rather than cancelled here.
                idle = [use.node for use in reversed(nodes) if use.idle]
                for node in idle[: len(nodes) - target]:
                    candidates.add(node)
                    self._close_counts[node] = self._close_counts.get(node, 0) + 1
                    if self._close_counts[node] >= self.wait_count:
                        made.append(NodeMayGo(gpu_type, node))
        for node in list(self._close_counts):
            if node not in candidates:
                del self._close_counts[node]  # busy again, or needed: the count starts over
        now = self.clock()
        self.log.extend((now, recommendation) for recommendation in made)
        return made
