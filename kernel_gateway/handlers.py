"""REST handlers: say who asks and whether they may, call one method of the Gateway, write JSON.

Who is asking is the configured :class:`~kernel_gateway.identity.IdentityProvider`'s answer,
whether they may the :class:`~kernel_gateway.authorizer.Authorizer`'s; each handler names
the resource it serves, so neither needs a change here when another kind of user arrives.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from typing import Any

from tornado import web

from jupyter_gpu.protocol import Reason, error_body

from .authorizer import Authorizer
from .errors import ApiError
from .gateway import Gateway
from .identity import IdentityProvider, User

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_LONG_POLL = 300.0


class GatewayHandlerMixin:
    """Identity, authorization and JSON errors for REST and websocket handlers alike."""

    request: Any
    settings: dict[str, Any]
    _reason: str
    #: what the authorizer is asked about (see kernel_gateway/authorizer.py)
    auth_resource = "api"
    #: the action, where the HTTP method does not say it (websockets, uploads: "execute")
    auth_action: str | None = None
    #: the caller, once identified
    current_user: User | None = None

    @property
    def user(self) -> str:
        """The caller's name: who owns the leases and kernels this request may touch."""
        assert self.current_user is not None, "identify() runs before any handler method"
        return self.current_user.name

    @property
    def groups(self) -> frozenset[str]:
        """The caller's groups (their group budgets count what they take)."""
        assert self.current_user is not None, "identify() runs before any handler method"
        return self.current_user.groups

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.settings["gateway"]
        return gateway

    async def identify(self) -> User:
        """Who is calling, and may they do this? 401 or 403 otherwise."""
        identity: IdentityProvider = self.settings["identity_provider"]
        found = identity.get_user(self)  # type: ignore[arg-type]
        user = await found if inspect.isawaitable(found) else found
        if user is None:
            raise ApiError(401, identity.unauthenticated_message(self), Reason.UNAUTHORIZED)  # type: ignore[arg-type]
        self.current_user = user
        action = self.auth_action or ("read" if self.request.method in ("GET", "HEAD") else "write")
        authorizer: Authorizer = self.settings["authorizer"]
        allowed = authorizer.is_authorized(self, user, action, self.auth_resource)  # type: ignore[arg-type]
        if not (await allowed if inspect.isawaitable(allowed) else allowed):
            raise ApiError(403, f"user {user.name!r} may not {action} {self.auth_resource} on this gateway: ask its "
                                "operator", Reason.FORBIDDEN)
        return user

    def require_operator(self, what: str) -> None:
        """403 unless the caller is an operator (a Hub admin scope, or a configured operator)."""
        assert self.current_user is not None
        if not self.current_user.admin:
            raise ApiError(403, f"user {self.current_user.name!r} is not an operator of this gateway: {what} is "
                                "for operators (a Hub admin scope, or a name in c.HubIdentityProvider.operators); "
                                "without all=1 you get your own", Reason.FORBIDDEN)

    @property
    def operator(self) -> bool:
        """Whether the caller may see and end anyone's lease, not just their own."""
        assert self.current_user is not None, "identify() runs before any handler method"
        return self.current_user.admin

    def flag(self, name: str) -> bool:
        return self.get_argument(name, "0") not in ("0", "false", "")  # type: ignore[attr-defined]

    def _request_summary(self) -> str:
        """Tornado's words for a request in its log lines (a refused one's warning, an uncaught
        error), without the query string: ``?token=`` there would put a user's token in the log."""
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """As tornado's, but an uncaught error is logged without ``repr(request)`` (the full URI, token and all)."""
        if isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)  # type: ignore[misc]
            return
        log.error("uncaught exception %s", self._request_summary(), exc_info=value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error as ``{"message", "reason"}``; never a traceback to a client."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = error_body(exc.message, exc.error_reason)
        elif isinstance(exc, web.HTTPError) and status_code < 500:
            body = error_body(exc.log_message or self._reason, self._reason.lower().replace(" ", "_"))
        else:
            # Logged under an id the operator can find.
            incident = uuid.uuid4().hex[:8]
            log.error("internal error %s on %s %s", incident, self.request.method, self.request.path,
                      exc_info=kwargs.get("exc_info"))
            body = error_body(f"internal error {incident}: see the gateway log", Reason.INTERNAL_ERROR)
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps(body))  # type: ignore[attr-defined]


class ApiHandler(GatewayHandlerMixin, web.RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    async def prepare(self) -> None:
        # A request and its reply are small: Nagle's algorithm would hold them back.
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)
        await self.identify()

    def json_body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {len(self.request.body)} bytes exceeds {MAX_BODY_BYTES}",
                           Reason.TOO_LARGE)
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", Reason.BAD_JSON) from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", Reason.BAD_JSON)
        return body

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


class ApiRootHandler(ApiHandler):
    def get(self) -> None:
        self.reply(self.gateway.api_json())


class KernelSpecsHandler(ApiHandler):
    auth_resource = "kernelspecs"

    def get(self, name: str | None = None) -> None:
        self.reply(self.gateway.kernelspecs_json(name))


class KernelsHandler(ApiHandler):
    auth_resource = "kernels"
    _starting: asyncio.Task[dict[str, Any]] | None = None
    _gone = False

    def get(self) -> None:
        self.reply(self.gateway.kernels_json(self.user))

    async def post(self) -> None:
        name = self.json_body().get("name")
        # A task, so that a client that gives up waiting cancels it, and with it the lease.
        self._starting = asyncio.ensure_future(
            self.gateway.start_kernel(self.user, name, self.settings["kernel_request_timeout"], self.groups)
        )
        try:
            kernel = await self._starting
        except asyncio.CancelledError:
            if self._gone:
                return  # nobody to answer
            raise
        self.reply(kernel, 201)

    def on_connection_close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._gone = True
            self._starting.cancel()


class KernelHandler(ApiHandler):
    auth_resource = "kernels"

    def get(self, kernel_id: str) -> None:
        self.reply(self.gateway.user_kernel_json(self.user, kernel_id))

    def delete(self, kernel_id: str) -> None:
        self.gateway.shut_down_kernel(self.user, kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(ApiHandler):
    auth_resource = "kernels"

    async def post(self, kernel_id: str, action: str) -> None:
        restarted = await self.gateway.kernel_action(self.user, kernel_id, action,
                                                     self.settings["kernel_request_timeout"])
        if restarted is not None:  # a restart answers the kernel now behind the id
            self.reply(restarted)
            return
        self.set_status(204)
        self.finish()


class TypesHandler(ApiHandler):
    auth_resource = "types"

    def get(self) -> None:
        self.reply(self.gateway.types_json())


class LeasesHandler(ApiHandler):
    auth_resource = "leases"

    def get(self) -> None:
        if self.flag("all"):  # every user's
            self.require_operator("all=1 (every user's leases)")
            self.reply(self.gateway.all_leases_json(self.flag("released")))
            return
        self.reply(self.gateway.leases_json(self.user, self.flag("released")))

    def post(self) -> None:
        body = self.json_body()
        lease = self.gateway.create_lease(self.user, body.get("gpu", "any"), body.get("idle_timeout"),
                                          body.get("notebook", ""), self.groups)
        self.set_header("Location", f"/api/gpu/leases/{lease.id}")
        self.reply(self.gateway.describe(lease), 201)


class LeaseHandler(ApiHandler):
    auth_resource = "leases"

    async def get(self, lease_id: str) -> None:
        wait = self.get_argument("wait", "0")
        try:
            seconds = min(float(wait), MAX_LONG_POLL)
        except ValueError:
            raise ApiError(400, f"'wait' must be seconds, got {wait!r}", Reason.BAD_WAIT) from None
        self.reply(await self.gateway.wait_for_lease(self.user, lease_id, seconds, self.operator))

    def delete(self, lease_id: str) -> None:
        # forget: keep none of its variables; deleting twice is harmless
        self.reply(self.gateway.release_lease(self.user, lease_id, self.flag("forget"), self.operator))


class UsageHandler(ApiHandler):
    auth_resource = "usage"

    def get(self) -> None:
        if self.flag("all"):  # by user and by group
            self.require_operator("all=1 (every user's usage)")
            self.reply(self.gateway.all_usage_json())
            return
        self.reply(self.gateway.usage_json(self.user, self.groups))


class BudgetsHandler(ApiHandler):
    """What is left of each budget of the caller's (the sidebar polls this; usage has it too)."""

    auth_resource = "usage"

    def get(self) -> None:
        self.reply(self.gateway.budgets_json(self.user, self.groups))


class DecisionsHandler(ApiHandler):
    """The autoscaling decision log (demand, launches, drains, terminations, spot interruptions)."""

    auth_resource = "usage"

    def get(self) -> None:
        self.require_operator("the pool's decision log")
        self.reply(self.gateway.decisions_json())


class MetricsHandler(ApiHandler):
    auth_resource = "metrics"

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gateway.metrics_text())
