"""The real gateway (pool, relays, uploads, HTTP server) on loopback inside the test process.

For what a separate process cannot show: two gateways sharing one Python process, and
settings objects handed in directly. The kernels are still real ipykernel processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado import httpserver, netutil

from jupyter_gpu.client import GatewayClient, GatewayConfig
from jupyter_gpu.protocol import REASON_GATEWAY_RESTART
from kernel_gateway.app import make_app
from kernel_gateway.auth import TokenAuthenticator
from kernel_gateway.authorizer import Authorizer
from kernel_gateway.gateway import Gateway
from kernel_gateway.identity import IdentityProvider, TokenIdentityProvider
from kernel_gateway.metering import MeteringStore
from pool_manager.manager import PoolManager

TOKEN = "in-process-test-token"


@dataclass
class InProcessGateway:
    gateway: Gateway
    server: httpserver.HTTPServer
    url: str
    stopped: bool = False

    def client(self, timeout: float = 10.0) -> GatewayClient:
        """A client of the user ``alice`` (blocking: call it through ``asyncio.to_thread``)."""
        return GatewayClient(GatewayConfig(self.url, TOKEN), timeout=timeout)

    async def wait_warm(self, gpu_type: str = "cpu", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(s.gpu_type == gpu_type and s.warm for s in self.gateway.service.core.summaries()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no warm {gpu_type} kernel within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """What ``jupyter-gpu gateway`` does on SIGTERM."""
        if not self.stopped:
            self.stopped = True
            self.server.stop()
            await self.gateway.stop(REASON_GATEWAY_RESTART)


@asynccontextmanager
async def gateway_in_process(tmp: Path, *, cpu_slots: int = 1, min_warm: int = 1,
                             identity_provider: IdentityProvider | None = None, authorizer: Authorizer | None = None,
                             **settings: Any) -> AsyncIterator[InProcessGateway]:
    tmp.mkdir(parents=True, exist_ok=True)
    pool = PoolManager(cpu_slots=cpu_slots, min_warm=min_warm)
    gateway = Gateway(pool, pool.build_service(), MeteringStore(str(tmp / "usage.sqlite")), 2**20)
    identity = identity_provider or TokenIdentityProvider(tokens=TokenAuthenticator.single_user(TOKEN, "alice"))
    settings = {"max_upload_bytes": 2**30, "kernel_request_timeout": 30.0, **settings}
    app = make_app(gateway, identity, authorizer or Authorizer(), **settings)
    sockets = netutil.bind_sockets(0, address="127.0.0.1")
    server = httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    running = InProcessGateway(gateway, server, f"http://127.0.0.1:{sockets[0].getsockname()[1]}")
    await gateway.start()
    try:
        yield running
    finally:
        await running.stop()
