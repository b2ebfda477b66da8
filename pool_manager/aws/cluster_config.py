"""The Ray cluster config (the YAML ``ray up`` takes) of an autoscaled GPU pool on AWS.

One Ray node type per GPU type (and a ``-spot`` twin with ``--spot``), each carrying the GPU type
as Ray resources (``GPU: N``, ``accelerator_type:H100: 1``), so Ray's autoscaler launches the
instance type that a queued lease's demand asks for; the head runs the gateway. Ray's AWS node
provider does the launching and terminating; this module only writes what it is told.

A cost cap is kept by the config itself: per-type ``max_workers`` and the global ``max_workers``
are chosen so that the most expensive set of nodes Ray may run at once stays under it.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpu.protocol import type_matches

from ..ray_nodes import ACCELERATOR_PREFIX, accelerator_resource, gpu_type_of
from .catalog import InstanceOffer

#: tag on every instance of the pool (cost allocation, and how a test finds the pool's instances)
POOL_TAG = "jupyter-gpu:pool"
GPU_TYPE_TAG = "jupyter-gpu:gpu-type"
SPOT_SUFFIX = "-spot"
HEAD_NODE_TYPE = "head"
DEFAULT_MAX_NODES = 10
#: Ray's autoscaler on the head scores node types with ours (spot first, failed types left out)
SCORER_ENV = "RAY_AUTOSCALER_UTILIZATION_SCORER=pool_manager.aws.scoring.spot_first_scorer"


@dataclass(frozen=True)
class GpuNodeType:
    """One Ray node type of GPU instances."""

    name: str  # Ray's node type name
    gpu_type: str
    instance_type: str
    gpus: int
    vcpus: int
    spot: bool
    min_nodes: int
    max_nodes: int
    price_per_hour: float | None  # on-demand: what a spot node costs at most too


@dataclass
class ClusterPlan:
    node_types: list[GpuNodeType]
    max_workers: int
    notes: list[str] = field(default_factory=list)  # what an operator should know about the choices


def parse_assignments(text: str, option: str, form: str) -> list[tuple[str, str]]:
    """``h100=p5.48xlarge,a10g=g5.xlarge`` -> pairs, in the order given; errors name the bad part."""
    pairs: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{option}: {part!r} is not {form} (e.g. {option} {_EXAMPLES[option]})")
        pairs.append((key.strip(), value.strip()))
    if not pairs:
        raise ValueError(f"{option}: nothing given (e.g. {option} {_EXAMPLES[option]})")
    return pairs


_EXAMPLES = {"--types": "h100=p5.48xlarge,a10g=g5.xlarge", "--min-nodes": "a10g=1", "--max-nodes": "h100=2",
             "--price": "g5.12xlarge=5.672"}


def node_counts(text: str, option: str, gpu_types: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for gpu_type, value in parse_assignments(text, option, "TYPE=N") if text else []:
        if gpu_type not in gpu_types:
            raise ValueError(f"{option}: {gpu_type!r} is not one of --types ({', '.join(gpu_types)})")
        if not value.isdigit():
            raise ValueError(f"{option}: {gpu_type}={value!r} is not a whole number of nodes")
        counts[gpu_type] = int(value)
    return counts


def plan_cluster(
    types: list[tuple[str, str]],
    offers: Mapping[str, InstanceOffer],
    min_nodes: Mapping[str, int] | None = None,
    max_nodes: Mapping[str, int] | None = None,
    spot: bool = False,
    max_cost_per_hour: float | None = None,
    prices: Mapping[str, float] | None = None,
) -> ClusterPlan:
    """The node types for ``types`` (GPU type -> instance type), checked against the catalog.

    ``prices`` (instance type -> dollars per hour) fills in prices the catalog does not know.
    """
    min_nodes, max_nodes, prices = dict(min_nodes or {}), dict(max_nodes or {}), dict(prices or {})
    chosen: list[tuple[str, InstanceOffer, float | None]] = []
    for gpu_type, instance_type in types:
        offer = offers.get(instance_type)
        if offer is None:
            raise ValueError(f"--types {gpu_type}={instance_type}: the region has no GPU instance type "
                             f"{instance_type!r}; `jupyter-gpu aws catalog` lists those it has")
        if not type_matches(gpu_type, offer.gpu_type):
            raise ValueError(f"--types {gpu_type}={instance_type}: a {instance_type} has {offer.gpus}x "
                             f"{offer.gpu_type}, not {gpu_type}; `jupyter-gpu aws catalog` lists the {gpu_type} types")
        chosen.append((gpu_type, offer, prices.get(instance_type, offer.on_demand_per_hour)))
    if len({gpu_type for gpu_type, _, _ in chosen}) < len(chosen):
        raise ValueError("--types: each GPU type once (fallbacks between types are the lease's: `%%gpu h100|a100`)")
    plan = ClusterPlan(node_types=[], max_workers=0)
    shares = _cost_shares(chosen, max_nodes, max_cost_per_hour)
    for gpu_type, offer, price in chosen:
        low = min_nodes.get(gpu_type, 0)
        high = max_nodes.get(gpu_type, shares.get(gpu_type, DEFAULT_MAX_NODES))
        if low > high:
            raise ValueError(f"--min-nodes {gpu_type}={low} is more than its most nodes, {high}"
                             + (" (what --max-cost-per-hour allows)" if gpu_type not in max_nodes else ""))
        on_demand = GpuNodeType(f"{gpu_type}", offer.gpu_type, offer.instance_type, offer.gpus, offer.vcpus,
                                spot=False, min_nodes=low, max_nodes=high, price_per_hour=price)
        if spot and offer.spot_supported:
            # The minimum stays on-demand: nodes kept up all the time should not be interrupted.
            plan.node_types.append(GpuNodeType(f"{gpu_type}{SPOT_SUFFIX}", offer.gpu_type, offer.instance_type,
                                               offer.gpus, offer.vcpus, spot=True, min_nodes=0, max_nodes=high,
                                               price_per_hour=price))
        elif spot:
            plan.notes.append(f"{offer.instance_type} has no spot market: {gpu_type} nodes are on-demand")
        plan.node_types.append(on_demand)
    plan.max_workers = _max_workers(plan, max_nodes, max_cost_per_hour)
    return plan


def _cost_shares(chosen: list[tuple[str, InstanceOffer, float | None]], max_nodes: Mapping[str, int],
                 max_cost: float | None) -> dict[str, int]:
    """Most nodes per type that a cost cap allows, for the types without an explicit --max-nodes:
    the money left after the explicit ones, split evenly between them."""
    if max_cost is None:
        return {}
    for gpu_type, offer, price in chosen:
        if price is None:
            raise ValueError(f"--max-cost-per-hour needs the price of a {offer.instance_type} ({gpu_type}), which "
                             f"the catalog does not know: give it with --price {offer.instance_type}=DOLLARS_PER_HOUR")
    explicit = sum(max_nodes[g] * (p or 0.0) for g, _, p in chosen if g in max_nodes)
    if explicit > max_cost:
        raise ValueError(f"--max-nodes alone may cost ${explicit:.2f}/h, more than --max-cost-per-hour {max_cost:g}")
    free = [(g, o, p) for g, o, p in chosen if g not in max_nodes]
    shares: dict[str, int] = {}
    for gpu_type, offer, price in free:
        shares[gpu_type] = math.floor((max_cost - explicit) / len(free) / (price or 1.0))
        if shares[gpu_type] == 0:
            raise ValueError(f"--max-cost-per-hour {max_cost:g} leaves ${(max_cost - explicit) / len(free):.2f}/h for "
                             f"{gpu_type}: not one {offer.instance_type} (${price:.2f}/h). Raise the cap, give "
                             "--max-nodes, or drop the type")
    return shares


def worst_cost(plan: ClusterPlan, max_workers: int) -> float:
    """The most that ``max_workers`` nodes of the plan can cost per hour at once (the dearest first)."""
    prices = sorted((t.price_per_hour or 0.0 for t in plan.node_types for _ in range(t.max_nodes)), reverse=True)
    return sum(prices[:max_workers])


def _max_workers(plan: ClusterPlan, max_nodes: Mapping[str, int], max_cost: float | None) -> int:
    """Ray's global cap on worker nodes: every type's most, and with ``--spot`` no more than one
    type's most across its spot and on-demand twins, nor what the cost cap pays for."""
    by_gpu_type: dict[str, int] = {}
    for node_type in plan.node_types:
        by_gpu_type[node_type.gpu_type] = max(by_gpu_type.get(node_type.gpu_type, 0), node_type.max_nodes)
    most = sum(by_gpu_type.values())
    if max_cost is None:
        return most
    while most and worst_cost(plan, most) > max_cost:
        most -= 1
    if most < sum(by_gpu_type.values()):
        plan.notes.append(f"--max-cost-per-hour {max_cost:g}: at most {most} GPU nodes at once "
                          f"(the dearest {most} cost ${worst_cost(plan, most):.2f}/h)")
    return most


def cluster_config(
    plan: ClusterPlan,
    region: str,
    cluster_name: str = "jupyter-gpu",
    idle_minutes: float = 10.0,
    head_instance_type: str = "m5.large",
    package: str = "jupyter-gpu[aws]",
    gateway_args: str = "--ip=0.0.0.0",
    system_config: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The cluster YAML as a dict (``yaml.safe_dump`` it)."""
    ray_system_config = f" --system-config={shlex.quote(_json(system_config))}" if system_config else ""
    node_types: dict[str, Any] = {
        HEAD_NODE_TYPE: {
            # The head runs the gateway and Ray's control plane, never kernels: no GPUs.
            "resources": {"GPU": 0},
            "node_config": {"InstanceType": head_instance_type, **_tags(cluster_name, "head")},
        },
    }
    for node_type in plan.node_types:
        node_config: dict[str, Any] = {"InstanceType": node_type.instance_type,
                                       **_tags(cluster_name, node_type.gpu_type)}
        if node_type.spot:
            node_config["InstanceMarketOptions"] = {"MarketType": "spot"}
        node_types[node_type.name] = {
            "min_workers": node_type.min_nodes,
            "max_workers": node_type.max_nodes,
            "resources": {"CPU": node_type.vcpus, "GPU": node_type.gpus,
                          accelerator_resource(node_type.gpu_type): 1},
            "node_config": node_config,
        }
    return {
        "cluster_name": cluster_name,
        "max_workers": plan.max_workers,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "aws",
            "region": region,
            # Idle GPU nodes are terminated, not stopped: a stopped node still holds its volumes and
            # is not what the pool's minimum counts.
            "cache_stopped_nodes": False,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": HEAD_NODE_TYPE,
        "setup_commands": [f"pip install {shlex.quote(package)}"],
        "head_start_ray_commands": [
            f"export {SCORER_ENV}; ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0{ray_system_config}",
            f"nohup jupyter-gpu gateway --ray=auto {gateway_args} > ~/jupyter-gpu-gateway.log 2>&1 &",
        ],
        "worker_start_ray_commands": [
            "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }


def _tags(cluster_name: str, gpu_type: str) -> dict[str, Any]:
    tags = [{"Key": POOL_TAG, "Value": cluster_name}, {"Key": GPU_TYPE_TAG, "Value": gpu_type}]
    return {"TagSpecifications": [{"ResourceType": "instance", "Tags": tags}]}


def _json(value: Mapping[str, int]) -> str:
    import json

    return json.dumps(dict(value), separators=(",", ":"))


def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Ray's own checks of a cluster config (``ray up`` runs them first); returns it with Ray's
    defaults filled in. Raises ValueError naming what Ray found wrong."""
    import copy
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    ray_log = logging.getLogger("ray.autoscaler._private.util")
    level = ray_log.level
    ray_log.setLevel(logging.WARNING)  # its INFO lines ("setting max workers for head...") are no news here
    try:
        prepared: dict[str, Any] = prepare_config(copy.deepcopy(dict(config)))
        validate_config(prepared)
    except Exception as exc:  # jsonschema's ValidationError, Ray's ValueError/RuntimeError
        message = getattr(exc, "message", None) or str(exc)
        where = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
        raise ValueError(f"Ray rejects the cluster config{f' at {where}' if where else ''}: {message}") from exc
    finally:
        ray_log.setLevel(level)
    return prepared


def gpu_node_types(config: Mapping[str, Any]) -> list[GpuNodeType]:
    """The GPU node types of a cluster config, written by :func:`cluster_config` or by hand: a node
    type is a GPU node type when its ``resources`` say ``GPU`` and an ``accelerator_type:``."""
    found: list[GpuNodeType] = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources: Mapping[str, float] = node_type.get("resources") or {}
        accelerators = [key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX)]
        if not accelerators or not resources.get("GPU"):
            continue
        node_config: Mapping[str, Any] = node_type.get("node_config") or {}
        market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType")
        found.append(GpuNodeType(
            name=str(name), gpu_type=gpu_type_of(accelerators[0]),
            instance_type=str(node_config.get("InstanceType", "")),
            gpus=int(resources["GPU"]), vcpus=int(resources.get("CPU", 0)), spot=market == "spot",
            min_nodes=int(node_type.get("min_workers", 0)), max_nodes=int(node_type.get("max_workers", 0)),
            price_per_hour=None,
        ))
    return found
