"""``jupyter-gpu gateway``: the traitlets application that serves the pool over HTTP."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import signal
import urllib.parse
from pathlib import Path
from typing import Any

from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_config_dir, jupyter_data_dir
from tornado import httpserver, netutil, web
from traitlets import Bool, Float, Int, TraitError, Type, Unicode, default

from jupyter_gpu import __version__
from jupyter_gpu.protocol import TOKEN_ENV, Reason
from pool_manager.budget_settings import Budgets
from pool_manager.manager import PoolManager
from pool_manager.ray_pool import RayPool
from pool_manager.service import PoolService

from . import handlers as h
from .auth import TokenAuthenticator
from .authorizer import Authorizer
from .channels import ChannelsHandler
from .config_watch import ConfigWatcher
from .downloads import DownloadHandler
from .errors import ApiError
from .gateway import Gateway
from .heap import keep_freed_memory
from .identity import IdentityProvider, TokenIdentityProvider
from .info import InfoHandler
from .metering import MeteringStore
from .nodes import NodesHandler
from .openapi import OpenApiHandler
from .snapshot_handlers import SnapshotsHandler
from .snapshot_store import open_store
from .snapshots import SnapshotKeeper
from .uploads import UploadHandler

log = logging.getLogger("jupyter_gpu.gateway")

_ID = r"(?P<{}>[0-9a-zA-Z_.-]+)"


def default_users_file() -> str:
    return str(Path(jupyter_config_dir()) / "jupyter_gpu_users.json")


def make_app(
    gateway: Gateway, identity_provider: IdentityProvider, authorizer: Authorizer, **settings: Any
) -> web.Application:
    kernel, lease = _ID.format("kernel_id"), _ID.format("lease_id")
    routes: list[Any] = [
        *identity_provider.routes(),
        (r"/api/?", h.ApiRootHandler),
        (r"/api/kernelspecs/?", h.KernelSpecsHandler),
        (rf"/api/kernelspecs/{_ID.format('name')}/?", h.KernelSpecsHandler),
        (r"/api/kernels/?", h.KernelsHandler),
        (rf"/api/kernels/{kernel}/?", h.KernelHandler),
        (rf"/api/kernels/{kernel}/(?P<action>interrupt|restart)/?", h.KernelActionHandler),
        (rf"/api/kernels/{kernel}/channels", ChannelsHandler),
        (rf"/api/kernels/{kernel}/upload", UploadHandler),
        (rf"/api/kernels/{kernel}/download/{_ID.format('download_id')}", DownloadHandler),
        (r"/api/gpu/types/?", h.TypesHandler),
        (r"/api/gpu/leases/?", h.LeasesHandler),
        (rf"/api/gpu/leases/{lease}/?", h.LeaseHandler),
        (r"/api/gpu/nodes/?", NodesHandler),
        (r"/api/gpu/usage/?", h.UsageHandler),
        (r"/api/gpu/budgets/?", h.BudgetsHandler),
        (r"/api/gpu/decisions/?", h.DecisionsHandler),
        (r"/api/gpu/info/?", InfoHandler),
        (r"/api/gpu/snapshots/?", SnapshotsHandler),
        (rf"/api/gpu/snapshots/{_ID.format('snapshot_id')}/?", SnapshotsHandler),
        (r"/api/gpu/openapi.json", OpenApiHandler),
        (r"/metrics", h.MetricsHandler),
    ]
    # Behind the Hub's proxy a service's URLs keep its prefix (/services/NAME/): serve there too.
    provider_settings = identity_provider.web_settings()
    prefix = str(provider_settings.get("service_prefix", "/")).rstrip("/")
    if prefix:
        routes += [(prefix + pattern, *rest) for pattern, *rest in routes if pattern.startswith("/api")]
    return web.Application(
        routes,
        log_function=log_request,
        gateway=gateway,
        identity_provider=identity_provider,
        authorizer=authorizer,
        default_handler_class=NotFoundHandler,
        websocket_ping_interval=30,
        **{**provider_settings, **settings},
    )


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log without the query string: websockets carry ``?token=`` there."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access = logging.getLogger("tornado.access")
    request = handler.request
    access.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip,
               1000.0 * request.request_time())


class NotFoundHandler(h.ApiHandler):
    async def prepare(self) -> None:
        raise ApiError(404, f"no such resource: {self.request.path}", "not_found")


def is_loopback(ip: str) -> bool:
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def hub_service_address() -> tuple[str, int] | None:
    """Where a Hub-managed service listens: the host and port of $JUPYTERHUB_SERVICE_URL (only in a
    service's environment: a notebook server the Hub spawned has that variable too, for itself)."""
    if not os.environ.get("JUPYTERHUB_SERVICE_NAME"):
        return None
    parsed = urllib.parse.urlsplit(os.environ.get("JUPYTERHUB_SERVICE_URL", ""))
    try:
        port = parsed.port
    except ValueError:
        return None
    return (parsed.hostname, port) if parsed.hostname and port else None


class GatewayApp(JupyterApp):
    name = "jupyter-gpu-gateway"
    version = __version__
    description = "Serve a pool of warm GPU kernels over the Jupyter kernel API."
    config_file_name = Unicode("jupyter_gpu_config")
    classes = [PoolManager, IdentityProvider, Authorizer, RayPool, Budgets]

    ip = Unicode(help="Address to listen on. Anything but loopback requires tokens.").tag(config=True)
    port = Int(help="Port to listen on (0 picks a free one and logs it; a Hub-managed service: that of "
               "$JUPYTERHUB_SERVICE_URL, else 8765).").tag(config=True)
    db = Unicode(help="SQLite file where every lease is metered; survives restarts.").tag(config=True)
    users = Unicode(
        help="Users file with token hashes (jupyter-gpu token add NAME). Without one, the token in "
        f"{TOKEN_ENV} belongs to the single user 'default'."
    ).tag(config=True)
    no_auth = Bool(False, help="Accept requests without a token (loopback only; every caller is 'default').").tag(
        config=True
    )
    max_message_size = Int(256 * 2**20, help="Largest websocket message a client may send, in bytes.").tag(config=True)
    max_upload_size = Int(
        64 * 2**30,
        help="Largest single buffer a client may upload to a kernel's staging area, in bytes "
        "(pushed arrays of 4 MiB or more travel that way).",
    ).tag(config=True)
    replay_buffer_bytes = Int(
        64 * 2**20, help="Output kept per disconnected client session for replay when it reconnects, in bytes."
    ).tag(config=True)
    identity_provider_class = Type(
        TokenIdentityProvider,
        klass=IdentityProvider,
        help="Who sends each request (a User with a name and groups): the gateway's tokens by default; another "
        "class, e.g. one that accepts JupyterHub tokens, changes no handler.",
    ).tag(config=True)
    authorizer_class = Type(
        Authorizer,
        klass=Authorizer,
        help="Whether a user may do an action (read, write, execute) on a resource (kernels, leases, types, "
        "usage, metrics, ...). The default lets every known user use the API on their own leases.",
    ).tag(config=True)
    kernel_request_timeout = Float(
        60.0, help="How long POST /api/kernels waits for a free GPU before answering 503."
    ).tag(config=True)
    snapshot_store = Unicode(
        help="Where a released lease's variables are kept for the notebook's next lease: a directory, "
        "s3://bucket/prefix (pip install jupyter-gpu[s3]), or 'none' to keep nothing."
    ).tag(config=True)
    snapshot_ttl = Float(24 * 3600.0, help="Seconds a kept snapshot lives before it expires.").tag(config=True)
    snapshot_quota = Int(0, help="Bytes of kept snapshots per user (0: no limit).").tag(config=True)
    snapshot_timeout = Float(
        300.0, help="Seconds a kernel may take to save its variables when its lease ends (its GPU stays held)."
    ).tag(config=True)
    hub = Bool(
        help="Run as a JupyterHub service: accept Hub users' API tokens and OAuth logins (configure "
        "c.HubIdentityProvider). On by itself when JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN are set."
    ).tag(config=True)
    config_check_interval = Float(
        2.0, help="Seconds between looks at the config file(s) loaded at start; when one changed, its c.Budgets "
        "are put in force without a restart (0: never look)."
    ).tag(config=True)

    aliases = {
        "ip": "GatewayApp.ip",
        "port": "GatewayApp.port",
        "db": "GatewayApp.db",
        "users": "GatewayApp.users",
        "max-message-size": "GatewayApp.max_message_size",
        "max-upload-size": "GatewayApp.max_upload_size",
        "snapshot-store": "GatewayApp.snapshot_store",
        "snapshot-ttl": "GatewayApp.snapshot_ttl",
        "snapshot-quota": "GatewayApp.snapshot_quota",
        "snapshot-timeout": "GatewayApp.snapshot_timeout",
        "inventory": "PoolManager.inventory",
        "cpu-slots": "PoolManager.cpu_slots",
        "min-warm": "PoolManager.min_warm",
        "staging-dir": "PoolManager.staging_dir",
        "idle-timeout": "PoolManager.idle_timeout",
        "max-idle-timeout": "PoolManager.max_idle_timeout",
        "max-lease-duration": "PoolManager.max_lease_duration",
        "gpu-idle-timeout": "PoolManager.gpu_idle_timeout",
        "gpu-idle-warning": "PoolManager.gpu_idle_warning",
        "max-gpus-per-user": "PoolManager.max_gpus_per_user",
        "warmup-code": "PoolManager.warmup_code",
        "ray": "RayPool.address",
        "cluster-config": "RayPool.cluster_config",
        "max-queue-wait": "RayPool.max_queue_wait",
        "sandbox": "PoolManager.sandbox",
        "kernel-uids": "PoolManager.kernel_uids",
        "kernel-memory": "PoolManager.kernel_memory",
        "kernel-cpus": "PoolManager.kernel_cpus",
        "log-level": "Application.log_level",
        "config": "JupyterApp.config_file",
    }
    flags = {
        "no-auth": ({"GatewayApp": {"no_auth": True}}, "Accept requests without a token (loopback only)."),
        "debug": ({"Application": {"log_level": "DEBUG"}}, "Log everything."),
        "hub": ({"GatewayApp": {"hub": True}}, "Accept JupyterHub users (run as a Hub service)."),
    }

    @default("hub")
    def _hub_from_env(self) -> bool:
        return bool(os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN"))

    @default("ip")
    def _ip_from_hub(self) -> str:
        # A Hub-managed service listens where the Hub's proxy and users expect it.
        address = hub_service_address()
        return address[0] if address else "127.0.0.1"

    @default("port")
    def _port_from_hub(self) -> int:
        address = hub_service_address()
        return address[1] if address else 8765

    @default("db")
    def _default_db(self) -> str:
        return str(Path(jupyter_data_dir()) / "jupyter_gpu" / "usage.sqlite")

    @default("snapshot_store")
    def _default_snapshot_store(self) -> str:
        return str(Path(jupyter_data_dir()) / "jupyter_gpu" / "snapshots")

    def snapshot_keeper(self, service: PoolService) -> SnapshotKeeper | None:
        if self.snapshot_store in ("", "none"):
            return None
        store = open_store(self.snapshot_store, self.snapshot_ttl, self.snapshot_quota)
        local = not self.snapshot_store.startswith("s3://")
        # Files taken out of a kernel's reach wait here; inside a local store, moving them in costs nothing.
        spool = Path(self.snapshot_store if local else jupyter_data_dir()) / ("spool" if local else "snapshot-spool")
        return SnapshotKeeper(store, service, str(spool), self.snapshot_timeout)

    def start(self) -> None:
        level = int(str(self.log_level)) if str(self.log_level).isdigit() else str(self.log_level)
        logging.basicConfig(level=level, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s", force=True)
        try:  # configuration errors: one clear line, no traceback
            identity_provider = self.identity_provider()
            pool = PoolManager(parent=self)
            service = pool.build_service(hidden=self.state_paths())
            snapshots = self.snapshot_keeper(service)
        except ValueError as exc:
            self.log.critical("%s", exc)
            self.exit(2)
        keep_freed_memory()  # pushed megabytes pass through here: reuse warm pages (see heap.py)
        asyncio.run(self.serve(identity_provider, pool, service, snapshots))

    def identity_provider(self) -> IdentityProvider:
        """The configured provider, holding the gateway's own tokens (any provider may accept them);
        JupyterHub's users as well with ``--hub`` (or inside a Hub service's environment)."""
        provider_class: type[IdentityProvider] = self.identity_provider_class
        if self.hub and provider_class is TokenIdentityProvider:
            try:
                from .hub import HubIdentityProvider
            except ImportError as exc:
                raise ValueError(f"--hub needs JupyterHub's service library ({exc}): pip install "
                                 "'jupyter-gpu[hub]'") from None
            provider_class = HubIdentityProvider
        try:
            provider: IdentityProvider = provider_class(parent=self, tokens=self.authenticator())
        except TraitError as exc:  # a bad setting of the provider: one line, as for the others
            raise ValueError(str(exc)) from None
        provider.check()
        return provider

    def state_paths(self) -> list[str]:
        """What no kernel may see: the database, the users file, the gateway's config and runtime."""
        users = self.users or default_users_file()
        paths = [str(Path(self.db).parent), users, jupyter_config_dir(), self.runtime_dir,
                 *map(str, self.loaded_config_files)]
        return [os.path.abspath(p) for p in paths if p]

    def watched_config_files(self) -> list[str]:
        """The config files loaded at start, and the one named by --config even if it was not there yet."""
        paths = [os.path.abspath(p) for p in self.loaded_config_files]
        if self.config_file and os.path.abspath(self.config_file) not in paths:
            paths.append(os.path.abspath(self.config_file))
        return paths

    def authenticator(self) -> TokenAuthenticator:
        users = self.users or (default_users_file() if os.path.exists(default_users_file()) else "")
        if self.no_auth:
            if not is_loopback(self.ip):
                raise ValueError(
                    f"refusing to serve {self.ip} without tokens: anyone on the network could use the GPUs. "
                    "Drop --no-auth, or listen on 127.0.0.1"
                )
            log.warning("no authentication: every request is user 'default' (loopback only)")
            return TokenAuthenticator.open_access()
        if users:
            return TokenAuthenticator.from_users_file(users)
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            token = secrets.token_urlsafe(32)
            log.warning(
                "no users file and no %s: generated a token for user 'default':\n    %s=%s", TOKEN_ENV, TOKEN_ENV, token
            )
        return TokenAuthenticator.single_user(token)

    async def serve(self, identity_provider: IdentityProvider, pool: PoolManager, service: PoolService,
                    snapshots: SnapshotKeeper | None = None) -> None:
        Path(self.db).parent.mkdir(parents=True, exist_ok=True)
        gateway = Gateway(pool, service, MeteringStore(self.db), self.replay_buffer_bytes, snapshots=snapshots)
        app = make_app(
            gateway,
            identity_provider,
            self.authorizer_class(parent=self),
            websocket_max_message_size=self.max_message_size,
            max_upload_bytes=self.max_upload_size,
            kernel_request_timeout=self.kernel_request_timeout,
        )
        sockets = netutil.bind_sockets(self.port, address=self.ip)
        # Bodies past this are cut off by tornado itself; handlers answer 413 above MAX_BODY_BYTES
        # with a message, so the hard limit only needs to stop a runaway upload.
        server = httpserver.HTTPServer(app, max_body_size=h.MAX_BODY_BYTES * 16)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        await gateway.start()
        watcher = ConfigWatcher(self.watched_config_files(), self.cli_config, gateway.configure_budgets,
                                self.config_check_interval)
        watcher.start()
        types = ", ".join(
            f"{s.gpu_type}={s.total}{' (emulated)' if s.emulated else ''}" for s in gateway.service.core.summaries()
        )
        log.info("jupyter-gpu gateway %s listening at http://%s:%d with %s", __version__, self.ip, port, types)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        log.info("stopping: ending leases and killing kernels")
        server.stop()
        watcher.stop()
        await gateway.stop(Reason.GATEWAY_RESTART)
        log.info("stopped")


main = GatewayApp.launch_instance
