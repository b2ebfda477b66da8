"""``GET /api/gpu/nodes``: the pool per machine (node address, GPU type, total, free, memory)."""

from __future__ import annotations

from pool_manager.node_summary import node_summaries

from .handlers import ApiHandler


class NodesHandler(ApiHandler):
    def get(self) -> None:
        self.reply(
            [
                {
                    "node": s.node,
                    "gpu_type": s.gpu_type,
                    "total": s.total,
                    "free": s.free,
                    "warm": s.warm,
                    "memory_mb": s.memory_mb,
                    "emulated": s.emulated,
                }
                for s in node_summaries(self.gateway.service.core)
            ]
        )
