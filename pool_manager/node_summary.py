"""Per-node view of the pool (``GET /api/gpu/nodes``): which machine has which GPUs, how many free.

On one machine there is one node (``local``); on Ray, one per GPU node, named by address.
"""

from __future__ import annotations

from dataclasses import dataclass

from .core import PoolCore
from .model import SlotState


@dataclass(frozen=True)
class NodeSummary:
    node: str
    gpu_type: str
    total: int
    free: int
    warm: int
    memory_mb: int
    emulated: bool


def node_summaries(core: PoolCore) -> list[NodeSummary]:
    """One row per (node, GPU type), counted as :meth:`PoolCore.summaries` counts types."""
    held: set[str] = set()
    warm: dict[tuple[str, str], int] = {}
    for slot in core.slots.values():
        if slot.lease_id is not None or slot.state == SlotState.DRAINING:
            held.update(slot.devices)
        elif slot.state == SlotState.WARM:
            warm[(slot.node, slot.gpu_type)] = warm.get((slot.node, slot.gpu_type), 0) + 1
    rows: dict[tuple[str, str], list[int | bool]] = {}
    for device in core.devices.values():
        if not device.healthy:
            continue
        row = rows.setdefault((device.node, device.gpu_type), [0, 0, 0, False])
        row[0] = int(row[0]) + 1
        row[1] = int(row[1]) + (device.key not in held)
        row[2] = max(int(row[2]), device.memory_mb)
        row[3] = bool(row[3]) or device.emulated
    return [
        NodeSummary(node, gpu_type, int(total), int(free), warm.get((node, gpu_type), 0), int(memory), bool(emulated))
        for (node, gpu_type), (total, free, memory, emulated) in sorted(rows.items())
    ]
