"""``GET /api/gpu/openapi.json``: the OpenAPI 3 description of the gateway's REST API.

The description is the committed file next to this module (kernel_gateway/openapi.json); the
robustness tests fuzz a live gateway against it, so it cannot drift from what the handlers do.
"""

from __future__ import annotations

from pathlib import Path

from .handlers import ApiHandler

DESCRIPTION = Path(__file__).with_name("openapi.json")


class OpenApiHandler(ApiHandler):
    async def prepare(self) -> None:
        """The description is public: no token needed to read it."""

    def get(self) -> None:
        self.finish(DESCRIPTION.read_bytes())
