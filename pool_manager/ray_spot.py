"""Spot interruption notices on a Ray cluster: the metadata service answers only on its own
instance, so each GPU node is asked from a Ray task pinned to that node (no CPU reserved: it
runs beside the slot actors), every :class:`~pool_manager.spot_notice.SpotWatch` round."""

from __future__ import annotations

import functools
from typing import Any

from .ray_membership import RayPoolService
from .spot_notice import Probes, SpotAction, read_spot_action

#: seconds a node's answer may take (its task waits for a worker process there) before the round moves on
PROBE_TIMEOUT = 20.0


@functools.cache
def _remote_read() -> Any:
    """``read_spot_action`` as a Ray task that reserves no CPU (made once: every round uses it).
    Any: Ray's stubs type a remote function by its arguments only as far as five overloads reach."""
    import ray

    return ray.remote(num_cpus=0)(read_spot_action)


def read_on_node(node_id: str, url: str) -> SpotAction | None:
    """``read_spot_action`` run on the Ray node ``node_id``; OSError where it does not answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = _remote_read().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    pending = task.remote(url)
    try:
        action: SpotAction | None = ray.get(pending, timeout=PROBE_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(pending, force=True)
        raise TimeoutError(f"no answer from node {node_id[:12]} within {PROBE_TIMEOUT:.0f} s") from None
    return action


def node_probes(service: RayPoolService, url: str) -> Probes:
    """Per alive GPU node (by address, the pool's node name) a probe of its own metadata service."""
    return lambda: {node.address: functools.partial(read_on_node, node.node_id, url)
                    for node in service.nodes.alive.values()}
