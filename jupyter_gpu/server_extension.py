"""The jupyter_server extension behind the JupyterLab sidebar: a small proxy to the gateway.

The browser talks only to its own Jupyter server (``/jupyter-gpu/...``), which adds the gateway
token and forwards the call with the same :class:`~jupyter_gpu.client.GatewayClient` the magic
uses. So the token stays on the server, the browser needs no CORS access to the gateway, and
the client's one error type turns every gateway failure into words the panel can show.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Float, Unicode, default
from traitlets.config import Configurable

from . import hub
from .client import GatewayClient, GatewayConfig, GatewayError
from .defaults import read_default_type, write_default_type
from .protocol import TOKEN_ENV, URL_ENV, Reason, SpecError, error_body, parse_gpu_spec

API_PREFIX = "jupyter-gpu"
#: Gateway clients one server keeps (one per identity it forwards).
_MAX_CLIENTS = 16
#: Seconds a failed look for the gateway in the Hub's service list is remembered: the look is a
#: blocking call to the Hub on the server's event loop, and the sidebar asks every few seconds.
HUB_RETRY_SECONDS = 30.0


class JupyterGpu(Configurable):
    """Where the sidebar finds the gateway: ``c.JupyterGpu.gateway_url`` or ``$JUPYTER_GPU_URL``."""

    gateway_url = Unicode(help=f"URL of the jupyter-gpu gateway (default: ${URL_ENV}).").tag(config=True)
    gateway_token = Unicode(help=f"Token sent to the gateway; never sent to the browser (default: ${TOKEN_ENV}).").tag(
        config=True
    )
    request_timeout = Float(20.0, help="Seconds to wait for the gateway's answer.").tag(config=True)

    _clients: dict[GatewayConfig, GatewayClient]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clients = {}

    @default("gateway_url")
    def _url_from_env(self) -> str:
        return os.environ.get(URL_ENV, "")

    @default("gateway_token")
    def _token_from_env(self) -> str:
        return os.environ.get(TOKEN_ENV, "")

    _hub_error: hub.HubDiscoveryError | None = None
    _hub_error_at = 0.0

    @property
    def url(self) -> str:
        if not self.gateway_url and hub.in_hub():
            # A JupyterHub single-user server: the gateway is one of the Hub's services.
            if self._hub_error is not None and time.monotonic() - self._hub_error_at < HUB_RETRY_SECONDS:
                return ""  # client() says why
            try:
                self.gateway_url = hub.gateway_url_from_hub()
                self._hub_error = None
            except hub.HubDiscoveryError as exc:
                self._hub_error, self._hub_error_at = exc, time.monotonic()
                return ""
        return self.gateway_url.rstrip("/")

    def client(self, hub_token: str = "") -> GatewayClient:
        """The same client the ``%%gpu`` magic uses, with this server's token (``hub_token``: the
        logged-in JupyterHub user's own token, which then stands for them instead)."""
        if not self.url:
            if self._hub_error is not None:
                raise GatewayError(str(self._hub_error), 0, self._hub_error.reason)
            raise GatewayError(
                f"no gateway configured: start JupyterLab with {URL_ENV} and {TOKEN_ENV} set "
                "(or c.JupyterGpu.gateway_url and c.JupyterGpu.gateway_token)",
                0,
                Reason.NOT_CONFIGURED,
            )
        config = GatewayConfig(self.url, hub_token or self.gateway_token)
        # One client per identity, so that requests reuse its kept-alive connections.
        client = self._clients.get(config)
        if client is None or client.timeout != self.request_timeout:
            if len(self._clients) >= _MAX_CLIENTS:
                self._clients.clear()  # a few people logged in to one server at most; never grows without bound
            client = self._clients[config] = GatewayClient(config, timeout=self.request_timeout)
        return client


def browser_status(error: GatewayError, url: str) -> tuple[int, str]:
    """The status and message the browser gets for a failed gateway call, blaming the right party.

    A 401 from the gateway is the server's token, not the browser's login: passed on as 401 it
    would read as "log in to JupyterLab again", so it becomes a 502 like any upstream failure.
    """
    if error.reason == Reason.NOT_CONFIGURED:
        return 503, str(error)
    if error.status in (401, 403):
        return 502, f"gateway at {url} refused this server's token: {error}"
    if error.status == 0 or error.status >= 500:
        return 502, str(error)
    return error.status, str(error)


class GpuHandler(APIHandler):
    """Base of the sidebar's handlers: gateway failures become JSON ``{"message", "reason"}``."""

    @property
    def gpu(self) -> JupyterGpu:
        config: JupyterGpu = self.settings["jupyter_gpu"]
        return config

    def gateway_client(self) -> GatewayClient:
        """The client that speaks for the logged-in user: in a JupyterHub server, with a Hub token of theirs."""
        return self.gpu.client(self.hub_token())

    def hub_token(self) -> str:
        """The logged-in Hub user's token ("" outside a Hub, or with a gateway token configured).

        The server's own token (``JUPYTERHUB_API_TOKEN``) is its owner's: it is forwarded only for
        the owner. Anyone else the owner let in (JupyterHub's sharing) is forwarded as themselves,
        with the OAuth token of their own login, and the gateway sees their leases, not the owner's.
        """
        if self.gpu.gateway_token or not hub.in_hub():
            return ""
        user = self.current_user
        name = getattr(user, "username", None)
        if name is not None and name == os.environ.get("JUPYTERHUB_USER"):
            return hub.hub_token()
        hub_auth = getattr(self.identity_provider, "hub_auth", None)
        own = hub_auth.get_token(self) if hub_auth is not None else None
        if not own:
            raise GatewayError(f"Hub user {name!r} is not this server's owner and has no Hub token of their own here: "
                               "open your own server for GPUs", 403, Reason.FORBIDDEN)
        return str(own)

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def fail(self, error: GatewayError) -> None:
        status, message = browser_status(error, self.gpu.url)
        self.reply(error_body(message, error.reason), status)

    def notebook_path(self, notebook: str) -> str:
        """A lease's notebook (the kernel's absolute path) as JupyterLab names it: relative to the root."""
        if not notebook:
            return ""
        try:
            root = Path(self.settings["server_root_dir"]).resolve()
            return Path(notebook).resolve().relative_to(root).as_posix()
        except (KeyError, ValueError, OSError):
            return notebook

    def with_paths(self, leases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**lease, "notebook_path": self.notebook_path(str(lease.get("notebook") or ""))} for lease in leases]


class StateHandler(GpuHandler):
    """What one poll of the panel needs: the types, my leases and my budgets, fetched side by side."""

    @web.authenticated
    async def get(self) -> None:
        try:
            client = self.gateway_client()
            types, leases, budgets = await asyncio.gather(client.atypes(), client.aleases(), _budgets(client))
        except GatewayError as exc:
            self.fail(exc)
            return
        self.reply({"gateway": self.gpu.url, "types": types, "leases": self.with_paths(leases), "budgets": budgets})


async def _budgets(client: GatewayClient) -> list[dict[str, Any]]:
    """My budgets; none from a gateway too old to have budgets (404), so the panel still works."""
    try:
        return await client.abudgets()
    except GatewayError as exc:
        if exc.status == 404:
            return []
        raise


class LeaseHandler(GpuHandler):
    """The Release button."""

    @web.authenticated
    async def delete(self, lease_id: str) -> None:
        try:
            lease = await self.gateway_client().adelete_lease(lease_id)
        except GatewayError as exc:
            self.fail(exc)
            return
        self.reply(self.with_paths([lease])[0])


class DefaultTypeHandler(GpuHandler):
    """The sidebar's default type, written where ``%%gpu`` without a SPEC reads it."""

    @web.authenticated
    def get(self) -> None:
        self.reply({"gpu_type": read_default_type()})

    @web.authenticated
    def put(self) -> None:
        try:
            gpu_type = json.loads(self.request.body or b"{}").get("gpu_type")
        except (ValueError, AttributeError):
            gpu_type = None
        if not isinstance(gpu_type, str):
            self.fail(GatewayError('send {"gpu_type": "a100"} (a type, a100:2, h100|a100 or any)', 400,
                                   Reason.BAD_SPEC))
            return
        try:
            parse_gpu_spec(gpu_type)
        except SpecError as exc:
            self.fail(GatewayError(f"{exc}", 400, Reason.BAD_SPEC))
            return
        write_default_type(gpu_type)
        self.reply({"gpu_type": read_default_type()})


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the handlers; kernels this server starts get the same gateway as the sidebar."""
    config = JupyterGpu(config=serverapp.config, parent=serverapp)
    gateway_client = getattr(serverapp, "gateway_config", None)
    if not config.url and gateway_client is not None and gateway_client.gateway_enabled:
        # `jupyter lab --gateway-url=...` runs its kernels on our gateway: the sidebar shows the leases.
        config.gateway_url = gateway_client.url
        config.gateway_token = config.gateway_token or gateway_client.auth_token or ""
    # The %%gpu magic runs in kernels this server starts, and they inherit its environment.
    if config.url and not os.environ.get(URL_ENV):
        os.environ[URL_ENV] = config.url
    if config.gateway_token and not os.environ.get(TOKEN_ENV):
        os.environ[TOKEN_ENV] = config.gateway_token
    web_app = serverapp.web_app
    web_app.settings["jupyter_gpu"] = config
    base = url_path_join(web_app.settings["base_url"], API_PREFIX)
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "state"), StateHandler),
            (url_path_join(base, "leases", r"([\w-]+)"), LeaseHandler),
            (url_path_join(base, "default-type"), DefaultTypeHandler),
        ],
    )
    where = config.url or f"nowhere yet (set {URL_ENV})"
    serverapp.log.info("jupyter-gpu: sidebar API at %s, gateway %s", base, where)

