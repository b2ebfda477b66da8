"""Batch runs of whole notebooks on pooled kernels with nbclient (papermill alike)::

    NotebookClient(nb, kernel_name="gpu-a100", kernel_manager_class=PooledKernelManager).execute()

This is jupyter_server's gateway kernel manager (``--gateway-url`` style: the kernel is a lease,
shut down at the end of the run) with two fixes: its kernel client opens the websocket without
any credentials (jupyter_server 2.x), which a gateway that checks tokens must refuse, so ours sends
the gateway's Authorization header; and it starts the kernel the client asked for, where
jupyter_server's starts ``python3`` unless the name is passed once more to ``execute()``; and it
answers ``wait_for_ready``'s liveness check from the gateway instead of a local process.
The gateway comes from ``GatewayClient`` config, else ``$JUPYTER_GPU_URL`` / ``$JUPYTER_GPU_TOKEN``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import websocket
from jupyter_core.utils import ensure_async
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelClient, GatewayKernelManager
from jupyter_server.utils import url_path_join
from tornado.escape import url_escape
from traitlets import DottedObjectName, Type

from . import hub
from .client import GatewayConfig
from .protocol import TOKEN_ENV, URL_ENV


def gateway_client() -> GatewayClient:
    """jupyter_server's gateway settings, filled from our environment variables where not configured
    (in a JupyterHub server: from the Hub, as the magic finds it)."""
    client: GatewayClient = GatewayClient.instance()
    if not client.url and os.environ.get(URL_ENV):
        client.url = os.environ[URL_ENV]
    if not client.auth_token and os.environ.get(TOKEN_ENV):
        client.auth_token = os.environ[TOKEN_ENV]
    if hub.in_hub() and not (client.url and client.auth_token):
        found = GatewayConfig.from_env()
        client.url = client.url or found.url
        client.auth_token = client.auth_token or found.token
    return client


class PooledKernelClient(GatewayKernelClient):
    async def start_channels(  # type: ignore[override]  # jupyter_client's is sync, the gateway's async
        self, shell: bool = True, iopub: bool = True, stdin: bool = True, hb: bool = True, control: bool = True
    ) -> None:
        # jupyter_server's own start_channels, plus the Authorization header
        settings = gateway_client()
        ws_url = url_path_join(settings.ws_url or "", settings.kernels_endpoint, url_escape(self.kernel_id), "channels")
        headers = settings.load_connection_args().get("headers", {})
        self.channel_socket = websocket.create_connection(
            ws_url,
            timeout=settings.KERNEL_LAUNCH_TIMEOUT,
            enable_multithread=True,
            header=[f"{key}: {value}" for key, value in headers.items()],
            sslopt={"ca_certs": settings.ca_certs, "certfile": settings.client_cert, "keyfile": settings.client_key},
        )
        channels = super(GatewayKernelClient, self).start_channels
        await ensure_async(channels(shell=shell, iopub=iopub, stdin=stdin, hb=hb, control=control))
        self.response_router = threading.Thread(target=self._route_responses)
        self.response_router.start()


class PooledKernelManager(GatewayKernelManager):
    client_class = DottedObjectName("jupyter_gpu.batch.PooledKernelClient")
    client_factory = Type(klass="jupyter_gpu.batch.PooledKernelClient")

    def __init__(self, **kwargs: Any) -> None:
        gateway_client()
        super().__init__(**kwargs)

    async def start_kernel(self, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("kernel_name", self.kernel_name)
        await super().start_kernel(**kwargs)

    async def _async_is_alive(self) -> bool:
        # what jupyter_client's wait_for_ready asks; the base answers from a local process it lacks
        return bool(await self.is_alive())
