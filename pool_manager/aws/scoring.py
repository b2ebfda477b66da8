"""Which node type Ray's autoscaler launches for a demand: spot first, on-demand when spot is refused.

Plugged into Ray's (v1) autoscaler on the head with ``RAY_AUTOSCALER_UTILIZATION_SCORER=
pool_manager.aws.scoring.spot_first_scorer`` (the cluster config sets it). Ray scores every node
type that fits the demand and launches the best; its own scorer ranks a spot type and its
on-demand twin (same resources) equal and keeps trying a type whose launches fail. This one
leaves out a node type whose last launch failed (Ray's availability tracker: capacity errors,
spot refusals; remembered for ``AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S``, 30 min) and,
among the rest, ranks spot above on-demand.
"""

from __future__ import annotations

from typing import Any

from .cluster_config import SPOT_SUFFIX


def spot_first_scorer(
    node_resources: dict[str, float],
    resources: list[dict[str, float]],
    node_type: str,
    *,
    node_availability_summary: Any,
) -> tuple[Any, ...] | None:
    from ray.autoscaler._private.resource_demand_scheduler import _resource_based_utilization_scorer

    record = node_availability_summary.node_availabilities.get(node_type)
    if record is not None and not record.is_available:
        return None
    score: tuple[Any, ...] | None = _resource_based_utilization_scorer(
        node_resources, resources, node_availability_summary=node_availability_summary)  # type: ignore[arg-type]
    if score is None:
        return None
    return (*score[:2], node_type.endswith(SPOT_SUFFIX), *score[2:])
