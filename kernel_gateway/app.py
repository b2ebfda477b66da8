"""``jupyter-gpu gateway``: the traitlets application that serves the pool over HTTP."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_config_dir, jupyter_data_dir
from tornado import httpserver, netutil, web
from traitlets import Bool, Float, Int, Unicode, default

from jupyter_gpu import __version__
from jupyter_gpu.protocol import REASON_GATEWAY_RESTART, TOKEN_ENV
from pool_manager.manager import PoolManager
from pool_manager.service import PoolService

from . import handlers as h
from .auth import TokenAuthenticator
from .channels import ChannelsHandler
from .gateway import Gateway
from .metering import MeteringStore
from .openapi import OpenApiHandler
from .uploads import UploadHandler, abort_uploads

log = logging.getLogger("jupyter_gpu.gateway")

_ID = r"(?P<{}>[0-9a-zA-Z_.-]+)"


def default_users_file() -> str:
    return str(Path(jupyter_config_dir()) / "jupyter_gpu_users.json")


def make_app(gateway: Gateway, authenticator: TokenAuthenticator, **settings: Any) -> web.Application:
    kernel, lease = _ID.format("kernel_id"), _ID.format("lease_id")
    routes: list[Any] = [
        (r"/api/?", h.ApiRootHandler),
        (r"/api/kernelspecs/?", h.KernelSpecsHandler),
        (rf"/api/kernelspecs/{_ID.format('name')}/?", h.KernelSpecsHandler),
        (r"/api/kernels/?", h.KernelsHandler),
        (rf"/api/kernels/{kernel}/?", h.KernelHandler),
        (rf"/api/kernels/{kernel}/(?P<action>interrupt|restart)/?", h.KernelActionHandler),
        (rf"/api/kernels/{kernel}/channels", ChannelsHandler),
        (rf"/api/kernels/{kernel}/upload", UploadHandler),
        (r"/api/gpu/types/?", h.TypesHandler),
        (r"/api/gpu/leases/?", h.LeasesHandler),
        (rf"/api/gpu/leases/{lease}/?", h.LeaseHandler),
        (r"/api/gpu/usage/?", h.UsageHandler),
        (r"/api/gpu/openapi.json", OpenApiHandler),
        (r"/metrics", h.MetricsHandler),
    ]
    return web.Application(
        routes,
        log_function=log_request,
        gateway=gateway,
        authenticator=authenticator,
        default_handler_class=NotFoundHandler,
        websocket_ping_interval=30,
        **settings,
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
    def prepare(self) -> None:
        raise h.ApiError(404, f"no such resource: {self.request.path}", "not_found")


def is_loopback(ip: str) -> bool:
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class GatewayApp(JupyterApp):
    name = "jupyter-gpu-gateway"
    version = __version__
    description = "Serve a pool of warm GPU kernels over the Jupyter kernel API."
    config_file_name = Unicode("jupyter_gpu_config")
    classes = [PoolManager]

    ip = Unicode("127.0.0.1", help="Address to listen on. Anything but loopback requires tokens.").tag(config=True)
    port = Int(8765, help="Port to listen on (0 picks a free one and logs it).").tag(config=True)
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
    kernel_request_timeout = Float(
        60.0, help="How long POST /api/kernels waits for a free GPU before answering 503."
    ).tag(config=True)

    aliases = {
        "ip": "GatewayApp.ip",
        "port": "GatewayApp.port",
        "db": "GatewayApp.db",
        "users": "GatewayApp.users",
        "max-message-size": "GatewayApp.max_message_size",
        "max-upload-size": "GatewayApp.max_upload_size",
        "inventory": "PoolManager.inventory",
        "cpu-slots": "PoolManager.cpu_slots",
        "min-warm": "PoolManager.min_warm",
        "staging-dir": "PoolManager.staging_dir",
        "idle-timeout": "PoolManager.idle_timeout",
        "max-idle-timeout": "PoolManager.max_idle_timeout",
        "max-lease-duration": "PoolManager.max_lease_duration",
        "max-gpus-per-user": "PoolManager.max_gpus_per_user",
        "warmup-code": "PoolManager.warmup_code",
        "log-level": "Application.log_level",
        "config": "JupyterApp.config_file",
    }
    flags = {
        "no-auth": ({"GatewayApp": {"no_auth": True}}, "Accept requests without a token (loopback only)."),
        "debug": ({"Application": {"log_level": "DEBUG"}}, "Log everything."),
    }

    @default("db")
    def _default_db(self) -> str:
        return str(Path(jupyter_data_dir()) / "jupyter_gpu" / "usage.sqlite")

    def start(self) -> None:
        level = int(str(self.log_level)) if str(self.log_level).isdigit() else str(self.log_level)
        logging.basicConfig(level=level, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s", force=True)
        try:  # configuration errors: one clear line, no traceback
            authenticator = self.authenticator()
            pool = PoolManager(parent=self)
            service = pool.build_service()
        except ValueError as exc:
            self.log.critical("%s", exc)
            self.exit(2)
        asyncio.run(self.serve(authenticator, pool, service))

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

    async def serve(self, authenticator: TokenAuthenticator, pool: PoolManager, service: PoolService) -> None:
        Path(self.db).parent.mkdir(parents=True, exist_ok=True)
        gateway = Gateway(pool, service, MeteringStore(self.db), self.replay_buffer_bytes)
        app = make_app(
            gateway,
            authenticator,
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
        abort_uploads()
        await gateway.stop(REASON_GATEWAY_RESTART)
        log.info("stopped")


main = GatewayApp.launch_instance
