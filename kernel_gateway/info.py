"""``GET /api/gpu/info``: what this gateway is, and how isolated its kernels are."""

from __future__ import annotations

from jupyter_gpu import __version__

from .handlers import ApiHandler


class InfoHandler(ApiHandler):
    def get(self) -> None:
        pool = self.gateway.pool
        self.reply({"version": __version__, "sandbox": pool.isolation.to_json()})
