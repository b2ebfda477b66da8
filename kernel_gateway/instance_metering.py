"""Instance-hours of an autoscaled pool, next to the leases' GPU-seconds in the metering file.

A GPU node the autoscaler launched is paid for from the moment it joins until it leaves,
whether or not anyone leases its GPUs: one row per node (its Ray node id), with its GPU type,
instance type, GPUs and on-demand price per hour (the list price: an upper bound for a spot
node). Leased GPU-seconds over launched GPU-seconds is the pool's utilization of what it paid
for. Rows still open when a gateway starts are closed then: the new gateway sees the nodes
that are still up join again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pool_manager.ray_autoscale import InstanceEvent

from .metering import MeteringStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    price_per_hour REAL,
    joined_at REAL NOT NULL,
    left_at REAL
);
"""

_SECONDS = "MAX(0.0, COALESCE(left_at, :now) - joined_at)"


class InstanceHours:
    """The ``instances`` table of the metering file, through the metering store's connection
    (instance events may come from another thread than the leases' records: the store's lock
    serialises them)."""

    def __init__(self, metering: MeteringStore) -> None:
        self._metering = metering
        with metering.connection() as conn, conn:
            conn.executescript(_SCHEMA)

    def record(self, event: InstanceEvent) -> None:
        with self._metering.connection() as conn, conn:
            if event.joined:
                conn.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                    (event.node_id, event.address, event.gpu_type, event.instance_type, event.gpus,
                     event.price_per_hour, event.at))
            else:
                conn.execute("UPDATE instances SET left_at = ? WHERE node_id = ? AND left_at IS NULL",
                             (event.at, event.node_id))

    def close_open(self, now: float) -> int:
        with self._metering.connection() as conn, conn:
            return conn.execute("UPDATE instances SET left_at = ? WHERE left_at IS NULL", (now,)).rowcount

    def totals(self, *, now: float | None = None) -> dict[str, tuple[float, float, float]]:
        """Per GPU type: (instance-seconds, GPU-seconds launched, cost in dollars), open nodes up to now."""
        with self._metering.connection() as conn:
            rows = conn.execute(
                f"SELECT gpu_type, SUM({_SECONDS}) AS seconds, SUM({_SECONDS} * gpus) AS gpu_seconds, "
                f"SUM({_SECONDS} / 3600.0 * COALESCE(price_per_hour, 0)) AS cost FROM instances "
                "GROUP BY gpu_type ORDER BY gpu_type", {"now": time.time() if now is None else now}).fetchall()
        return {row["gpu_type"]: (float(row["seconds"]), float(row["gpu_seconds"]), float(row["cost"]))
                for row in rows}


def paid_capacity(leased: Mapping[str, float], paid: Mapping[str, tuple[float, float, float]]) -> dict[str, Any]:
    """Per type what was launched (instance-seconds, GPU-seconds, cost) next to the GPU-seconds
    leased (``MeteringStore.totals``), with the utilization of what was paid for; and the totals."""
    by_type = {
        gpu_type: {"instance_seconds": seconds, "launched_gpu_seconds": gpu_seconds,
                   "leased_gpu_seconds": leased.get(gpu_type, 0.0), "cost": cost,
                   "utilization": leased.get(gpu_type, 0.0) / gpu_seconds if gpu_seconds > 0 else None}
        for gpu_type, (seconds, gpu_seconds, cost) in paid.items()
    }
    launched = sum(gpu_seconds for _, gpu_seconds, _ in paid.values())
    used = sum(leased.get(gpu_type, 0.0) for gpu_type in paid)
    return {"by_type": by_type, "total_cost": sum(cost for _, _, cost in paid.values()),
            "utilization": used / launched if launched > 0 else None}
