"""REST handlers: authenticate, call one method of the Gateway, write JSON."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from tornado import web

from jupyter_gpu.protocol import (
    KERNELSPEC_PREFIX,
    QUEUED,
    REASON_CANCELLED,
    REASON_DELETED,
    REASON_RESTARTED,
    GpuChoice,
    SpecError,
    error_body,
    parse_gpu_spec,
)
from pool_manager.core import LeaseRequestError

from .auth import TokenAuthenticator, token_from_request
from .gateway import Gateway, MeteringFull, NotFound, iso
from .metrics import render_metrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_LONG_POLL = 300.0


class ApiError(web.HTTPError):
    """An error a client sees as ``{"message", "reason"}``."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(status, message)
        self.message = message
        self.error_reason = reason


class AuthMixin:
    """Token auth for REST and websocket handlers alike."""

    request: Any
    settings: dict[str, Any]
    user: str

    def authenticate(self) -> str:
        auth: TokenAuthenticator = self.settings["authenticator"]
        token = token_from_request(
            self.request.headers.get("Authorization"),
            self.request.arguments.get("token", [b""])[0].decode(errors="replace") or None,
        )
        user = auth.user_for(token)
        if user is None:
            what = "no token given" if not token else "the token is not valid"
            raise ApiError(
                401,
                f"{what}: send 'Authorization: token YOUR_TOKEN' (set JUPYTER_GPU_TOKEN; "
                "an operator creates tokens with 'jupyter-gpu token add NAME')",
                "unauthorized",
            )
        return user

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.settings["gateway"]
        return gateway

    def owned(self, kernel_id: str) -> Any:
        """The lease of the caller's kernel; anyone else's answers 404, as if it did not exist."""
        try:
            return self.gateway.owned_kernel(self.user, kernel_id)
        except NotFound:
            raise not_found(kernel_id) from None


def not_found(kernel_id: str) -> ApiError:
    return ApiError(404, f"no kernel {kernel_id}", "not_found")


class ApiHandler(AuthMixin, web.RequestHandler):
    user = ""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        # A request and its reply are small: Nagle's algorithm would hold them back.
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)
        self.user = self.authenticate()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = error_body(exc.message, exc.error_reason)
        elif isinstance(exc, web.HTTPError) and status_code < 500:
            body = error_body(exc.log_message or self._reason, self._reason.lower().replace(" ", "_"))
        else:
            # Never leak a traceback to a client: log it under an id the operator can find.
            incident = uuid.uuid4().hex[:8]
            log.error(
                "internal error %s on %s %s",
                incident,
                self.request.method,
                self.request.path,
                exc_info=kwargs.get("exc_info"),
            )
            body = error_body(f"internal error {incident}: see the gateway log", "internal_error")
        self.finish(json.dumps(body))

    def json_body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {len(self.request.body)} bytes exceeds {MAX_BODY_BYTES}", "too_large")
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", "bad_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", "bad_json")
        return body

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


def lease_choices(spec: Any, gateway: Gateway) -> Any:
    if not isinstance(spec, str):
        raise ApiError(
            400, f"'gpu' must be a string such as 'a100', 'a100:2', 'h100|a100' or 'any', got {spec!r}", "bad_spec"
        )
    try:
        return parse_gpu_spec(spec)
    except SpecError as exc:
        offered = ", ".join(gateway.service.core.types)
        raise ApiError(400, f"{exc}; this gateway offers {offered}", "bad_spec") from None


class ApiRootHandler(ApiHandler):
    def get(self) -> None:
        from jupyter_gpu import __version__

        self.reply({"version": __version__, "started": iso(self.gateway.started_at)})


class KernelSpecsHandler(ApiHandler):
    def get(self, name: str | None = None) -> None:
        specs = {spec["name"]: spec for spec in self._specs()}
        if name is not None:
            if name not in specs:
                raise ApiError(404, f"no kernelspec {name!r}: offered are {', '.join(specs)}", "not_found")
            self.reply(specs[name])
            return
        default = next(iter(specs), "")
        self.reply({"default": default, "kernelspecs": specs})

    def _specs(self) -> list[dict[str, Any]]:
        rows = []
        for summary in self.gateway.service.core.summaries():
            label = "CPU" if summary.gpu_type == "cpu" else f"{summary.gpu_type} GPU"
            name = KERNELSPEC_PREFIX + summary.gpu_type
            rows.append(
                {
                    "name": name,
                    "spec": {
                        "argv": [],
                        "display_name": f"Python 3 ({label}{', emulated' if summary.emulated else ''})",
                        "language": "python",
                        "metadata": {"jupyter_gpu": {"gpu_type": summary.gpu_type, "emulated": summary.emulated}},
                    },
                    "resources": {},
                }
            )
        return rows


class AwaitsKernel(ApiHandler):
    """A handler that takes a lease and answers once its kernel is ready."""

    waiting_lease: str | None = None

    async def kernel_of(self, lease: Any) -> Any:
        """The lease once its kernel is ready; 503 (and nothing held) when no GPU comes free in time."""
        self.waiting_lease = lease.id
        await self.gateway.service.wait_while_queued(lease, self.settings["kernel_request_timeout"])
        self.waiting_lease = None
        if lease.state == QUEUED:
            info = self.gateway.describe(lease)
            self.gateway.end_lease(self.user, lease.id, REASON_CANCELLED)
            raise ApiError(
                503,
                f"no {lease.spec} free within {self.settings['kernel_request_timeout']:.0f} s "
                f"(queue position {info['queue_position']}, about {info['expected_wait']:.0f} s): "
                "POST /api/gpu/leases to wait in the queue",
                "no_capacity",
            )
        try:
            return self.gateway.owned_kernel(self.user, lease.slot_id or "")
        except NotFound:
            why = f"the lease ended before its kernel was ready ({lease.reason})"
            raise ApiError(503, why, "lease_ended") from None

    def on_connection_close(self) -> None:
        # The client gave up waiting: a GPU granted later would bill nobody's notebook.
        if self.waiting_lease is not None:
            try:
                self.gateway.end_lease(self.user, self.waiting_lease, REASON_CANCELLED)
            except NotFound:
                pass


class KernelsHandler(AwaitsKernel):
    def get(self) -> None:
        self.reply(self.gateway.kernels_json(self.user))

    async def post(self) -> None:
        # Stock Jupyter clients start kernels by name: a kernelspec gpu-TYPE means a lease.
        body = self.json_body()
        name = body.get("name")
        if name is None or name == "":
            name = KERNELSPEC_PREFIX + self.gateway.service.core.types[0]
        if not isinstance(name, str) or not name.startswith(KERNELSPEC_PREFIX):
            raise ApiError(400, f"unknown kernel name {name!r}: use gpu-TYPE, see /api/kernelspecs", "bad_spec")
        choices = lease_choices(name[len(KERNELSPEC_PREFIX) :], self.gateway)
        lease = request_lease(self.gateway, self.user, choices, None, "")
        self.reply(self.gateway.kernel_json(await self.kernel_of(lease)), 201)


def request_lease(gateway: Gateway, user: str, choices: Any, idle_timeout: Any, notebook: str) -> Any:
    if idle_timeout is not None and (isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int | float)):
        raise ApiError(400, f"'idle_timeout' must be a number of seconds, got {idle_timeout!r}", "bad_idle_timeout")
    try:
        return gateway.request_lease(user, choices, idle_timeout, notebook)
    except LeaseRequestError as exc:
        raise ApiError(400, str(exc), exc.reason) from None
    except MeteringFull as exc:
        raise ApiError(507, str(exc), "metering_unavailable") from None


class KernelHandler(ApiHandler):
    def get(self, kernel_id: str) -> None:
        self.reply(self.gateway.kernel_json(self.owned(kernel_id)))

    def delete(self, kernel_id: str) -> None:
        lease = self.owned(kernel_id)
        self.gateway.end_lease(self.user, lease.id, REASON_DELETED)
        self.set_status(204)
        self.finish()


class KernelActionHandler(AwaitsKernel):
    async def post(self, kernel_id: str, action: str) -> None:
        lease = self.owned(kernel_id)
        if action == "restart":
            await self.restart(kernel_id, lease)
            return
        await self.gateway.service.interrupt(lease.slot_id)
        self.set_status(204)
        self.finish()

    async def restart(self, kernel_id: str, lease: Any) -> None:
        """Pooled kernels are single-use: a restart ends the lease and takes a new one of the same
        type and count, behind the same kernel id (stock clients keep the id they started with)."""
        self.gateway.end_lease(self.user, lease.id, REASON_RESTARTED)
        choices = (GpuChoice(lease.gpu_type, lease.count),)
        new_lease = request_lease(self.gateway, self.user, choices, lease.idle_timeout, lease.notebook)
        kernel = await self.kernel_of(new_lease)
        self.gateway.kernel_ids.replaced(kernel_id, kernel.slot_id)
        self.reply(self.gateway.kernel_json(kernel))


class TypesHandler(ApiHandler):
    def get(self) -> None:
        core = self.gateway.service.core
        self.reply(
            [
                {
                    "name": s.gpu_type,
                    "total": s.total,
                    "free": s.free,
                    "warm": s.warm,
                    "queued": s.queued,
                    "memory_mb": s.memory_mb,
                    "price_per_gpu_hour": self.gateway.pool.price(s.gpu_type),
                    "emulated": s.emulated,
                }
                for s in core.summaries()
            ]
        )


class LeasesHandler(ApiHandler):
    def get(self) -> None:
        include_released = self.get_argument("all", "0") not in ("0", "false", "")
        self.reply(self.gateway.leases_json(self.user, include_released))

    def post(self) -> None:
        body = self.json_body()
        choices = lease_choices(body.get("gpu", "any"), self.gateway)
        notebook = body.get("notebook", "")
        if not isinstance(notebook, str) or len(notebook) > 1024:
            raise ApiError(400, "'notebook' must be a string of at most 1024 characters", "bad_notebook")
        lease = request_lease(self.gateway, self.user, choices, body.get("idle_timeout"), notebook)
        self.set_header("Location", f"/api/gpu/leases/{lease.id}")
        self.reply(self.gateway.describe(lease), 201)


class LeaseHandler(ApiHandler):
    async def get(self, lease_id: str) -> None:
        wait = self.get_argument("wait", "0")
        try:
            seconds = min(float(wait), MAX_LONG_POLL)
        except ValueError:
            raise ApiError(400, f"'wait' must be seconds, got {wait!r}", "bad_wait") from None
        if seconds > 0:
            try:
                lease = self.gateway.active_lease(self.user, lease_id)
            except NotFound:
                pass
            else:
                await self.gateway.service.wait_while_queued(lease, seconds)
        self.reply(self.lease_or_404(lease_id))

    def delete(self, lease_id: str) -> None:
        try:
            self.reply(self.gateway.end_lease(self.user, lease_id, REASON_DELETED))
        except NotFound:
            self.reply(self.lease_or_404(lease_id))  # already ended: deleting twice is harmless

    def lease_or_404(self, lease_id: str) -> dict[str, Any]:
        try:
            return self.gateway.lease_json(self.user, lease_id)
        except NotFound:
            raise ApiError(404, f"no lease {lease_id}", "not_found") from None


class UsageHandler(ApiHandler):
    def get(self) -> None:
        self.reply(self.gateway.metering.usage(self.user))


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(render_metrics(self.gateway))
