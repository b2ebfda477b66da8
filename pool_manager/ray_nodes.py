"""What a Ray node offers the pool, and which nodes joined or left: plain data, no Ray import.

GPU types follow Ray's own convention: a node with GPUs has the resource ``GPU: N`` and,
when Ray recognised the GPU (or the operator declared it), ``accelerator_type:A100: 1``.
A machine without a real GPU declares both itself (``ray start --num-gpus=2
--resources='{"accelerator_type:A100": 1, "jupyter_gpu_emulated": 1}'``); the extra
resource marks its GPUs emulated in every listing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .inventory import KNOWN_MEMORY_MB, UNKNOWN_TYPE
from .model import Device

ACCELERATOR_PREFIX = "accelerator_type:"
#: Declared on a node whose GPUs are not real (tests, demos, a laptop cluster).
EMULATED_RESOURCE = "jupyter_gpu_emulated"

_RAY_MEMORY_RE = re.compile(r"^(.*)-(\d+)g$")
_OUR_MEMORY_RE = re.compile(r"^(.*)-(\d+)gb$")


def gpu_type_of(accelerator: str) -> str:
    """Ray's accelerator name as the type users ask for: ``A100`` -> ``a100``, ``A100-80G`` -> ``a100-80gb``."""
    name = accelerator.strip().lower()
    sized = _RAY_MEMORY_RE.match(name)
    return f"{sized.group(1)}-{sized.group(2)}gb" if sized else name or UNKNOWN_TYPE


def accelerator_name(gpu_type: str) -> str:
    """The inverse of :func:`gpu_type_of`: ``a100-80gb`` -> ``A100-80G``."""
    sized = _OUR_MEMORY_RE.match(gpu_type)
    return f"{sized.group(1)}-{sized.group(2)}G".upper() if sized else gpu_type.upper()


def accelerator_resource(gpu_type: str) -> str:
    """The node resource Ray uses for this type, e.g. ``accelerator_type:H100``."""
    return ACCELERATOR_PREFIX + accelerator_name(gpu_type)


@dataclass(frozen=True)
class NodeView:
    """One row of Ray's node table, as far as the pool cares."""

    node_id: str
    address: str
    alive: bool
    gpus: int
    accelerator: str | None
    emulated: bool

    @property
    def gpu_type(self) -> str:
        return gpu_type_of(self.accelerator) if self.accelerator else UNKNOWN_TYPE


def node_view(row: Mapping[str, Any]) -> NodeView:
    """Read one entry of ``ray.nodes()``."""
    resources: Mapping[str, float] = row.get("Resources") or {}
    accelerators = sorted(key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX))
    return NodeView(
        node_id=str(row["NodeID"]),
        address=str(row.get("NodeManagerAddress", "")),
        alive=bool(row.get("Alive", False)),
        gpus=int(resources.get("GPU", 0)),
        # Ray gives a node one accelerator type; a node declaring several is read as its first.
        accelerator=accelerators[0] if accelerators else None,
        emulated=resources.get(EMULATED_RESOURCE, 0) > 0,
    )


def devices_of(node: NodeView) -> list[Device]:
    """The node's GPUs as pool devices; a node without GPUs (e.g. a CPU-only head) offers none.

    ``node`` of each device is the node's address: what listings show and what a lost node
    is removed by. Keys carry the node id, so a machine that comes back at the same address
    gets devices of its own.
    """
    gpu_type = node.gpu_type
    return [
        Device(
            key=f"{node.node_id[:12]}/{index}",
            gpu_type=gpu_type,
            index=index,
            name=node.accelerator or UNKNOWN_TYPE,
            memory_mb=KNOWN_MEMORY_MB.get(gpu_type, 0),
            emulated=node.emulated,
            node=node.address,
        )
        for index in range(node.gpus)
    ]


@dataclass(frozen=True)
class NodeChanges:
    joined: tuple[NodeView, ...] = ()
    lost: tuple[NodeView, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.lost)


class NodeTable:
    """The alive GPU nodes last seen; :meth:`update` says which joined and which were lost.

    Sans-I/O: fed the rows of ``ray.nodes()`` by whoever polls Ray.
    """

    def __init__(self) -> None:
        self.alive: dict[str, NodeView] = {}  # node id -> view
        self._gone: set[str] = set()  # ids given up for a newer node at their address

    def by_address(self, address: str) -> NodeView | None:
        return next((node for node in self.alive.values() if node.address == address), None)

    def update(self, rows: Iterable[Mapping[str, Any]]) -> NodeChanges:
        seen = {view.node_id: view for view in map(node_view, rows)}
        lost = [node for node_id, node in self.alive.items() if not (node_id in seen and seen[node_id].alive)]
        joined = [view for node_id, view in seen.items()
                  if view.alive and view.gpus and node_id not in self.alive and node_id not in self._gone]
        # A machine back at the same address before its death was noticed: the old one is gone.
        addresses = {view.address for view in joined}
        lost += [node for node in self.alive.values() if node.address in addresses and node not in lost]
        for node in lost:
            del self.alive[node.node_id]
            self._gone.add(node.node_id)
        for view in joined:
            self.alive[view.node_id] = view
        return NodeChanges(tuple(joined), tuple(lost))
