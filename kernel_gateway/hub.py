"""JupyterHub users without gateway tokens: the gateway as a Hub service.

A request carrying a Hub API token (``Authorization: token T``, or ``?token=T`` on a
websocket), or the cookie of a Hub OAuth login, is identified by asking the Hub, through
JupyterHub's own service-auth library (:class:`jupyterhub.services.auth.HubAuth`): the user
is the Hub's user name, ``groups`` the Hub's groups, ``admin`` an operator's scope or name.
The Hub's answers are cached for at most 30 s, so a revoked token or a removed user stops
working within that. The gateway's own tokens keep working next to Hub tokens.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

from jupyterhub.services.auth import HubAuth, HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import web, websocket
from traitlets import Int, List, TraitError, Unicode, default, validate

from jupyter_gpu.protocol import Reason

from .errors import ApiError
from .identity import IdentityProvider, User, request_token

#: The Hub revokes a token or removes a user; the gateway notices within this many seconds.
MAX_CACHE_SECONDS = 30
SERVICE_NAME_ENV = "JUPYTERHUB_SERVICE_NAME"


class HubIdentityProvider(IdentityProvider):
    """Hub API tokens and Hub OAuth cookies -> the Hub's user (and the gateway's own tokens -> theirs)."""

    service_name = Unicode(
        help=f"This gateway's name among the Hub's services (default: ${SERVICE_NAME_ENV}, else 'jupyter-gpu'). "
        "A Hub user needs the scope access:services!service=NAME to use it."
    ).tag(config=True)
    access_scopes = List(
        Unicode(),
        help="Hub scopes of which a token needs one (default: $JUPYTERHUB_OAUTH_ACCESS_SCOPES, which the Hub "
        "sets for a managed service, else access:services!service=NAME).",
    ).tag(config=True)
    operators = List(
        Unicode(), help="Hub user names that are operators: they see and release every lease and all usage."
    ).tag(config=True)
    operator_scopes = List(
        Unicode(),
        ["admin:users"],
        help="Hub scopes that make a token's user an operator (any one of them; Hub admins hold admin:users).",
    ).tag(config=True)
    cache_max_age = Int(
        MAX_CACHE_SECONDS,
        help=f"Seconds the Hub's answer about a token is reused (1 to {MAX_CACHE_SECONDS}: a revoked token or "
        "removed user stops working within this).",
    ).tag(config=True)
    api_url = Unicode(help="The Hub's API URL (default: $JUPYTERHUB_API_URL).").tag(config=True)
    api_token = Unicode(help="This service's Hub API token (default: $JUPYTERHUB_API_TOKEN).").tag(config=True)

    _hub_auth: HubAuth | None = None

    @default("service_name")
    def _service_name_from_env(self) -> str:
        return os.environ.get(SERVICE_NAME_ENV, "") or "jupyter-gpu"

    @default("access_scopes")
    def _access_scopes_default(self) -> list[str]:
        from_hub = os.environ.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES", "")
        if from_hub:
            return sorted(json.loads(from_hub))
        return [f"access:services!service={self.service_name}"]

    @default("api_url")
    def _api_url_from_env(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    @default("api_token")
    def _api_token_from_env(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @validate("cache_max_age")
    def _at_most_thirty(self, proposal: Any) -> int:
        value = int(proposal["value"])
        # Not 0: JupyterHub's cache reads a max age of 0 as "keep forever", so a revoked token would never stop.
        if not 1 <= value <= MAX_CACHE_SECONDS:
            raise TraitError(f"HubIdentityProvider.cache_max_age={value}: give 1 to {MAX_CACHE_SECONDS} seconds "
                             "(a revoked Hub token must stop working within 30 s; JupyterHub keeps answers forever "
                             "at 0)")
        return value

    @property
    def hub_auth(self) -> HubAuth:
        """JupyterHub's client for its own API: HubOAuth where the Hub gave this service an OAuth
        client (then browsers' login cookies work too), else HubAuth (tokens only)."""
        if self._hub_auth is None:
            if not self.api_url:
                raise ValueError("JupyterHub identity needs the Hub's API URL: set JUPYTERHUB_API_URL (the Hub sets "
                                 "it for a managed service) or c.HubIdentityProvider.api_url")
            settings: dict[str, Any] = {"api_url": self.api_url, "api_token": self.api_token,
                                        "cache_max_age": self.cache_max_age, "access_scopes": set(self.access_scopes)}
            client_id = os.environ.get("JUPYTERHUB_CLIENT_ID", "")
            self._hub_auth = HubOAuth(oauth_client_id=client_id, **settings) if client_id else HubAuth(**settings)
        return self._hub_auth

    def check(self) -> None:
        """Fail at start, not at the first request, when the Hub is not configured."""
        self.log.info("JupyterHub identity: Hub API %s, access scope(s) %s, operators %s (scopes %s), cache %d s",
                      self.hub_auth.api_url, ", ".join(self.access_scopes), ", ".join(self.operators) or "none",
                      ", ".join(self.operator_scopes) or "none", self.cache_max_age)

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        token = request_token(handler)
        if token and self.tokens is not None and self.tokens.requires_token:
            own = self.tokens.user_for(token)  # the gateway's own tokens still work
            if own is not None:
                return User(own, admin=own in self.operators)
        if not token and isinstance(handler, websocket.WebSocketHandler):
            # No login cookie on a kernel's websocket: browsers send it along from any page, and the
            # socket takes any origin (its clients are kernels and servers, which send tokens).
            return None
        try:
            if token:
                model = await self.hub_auth.user_for_token(token, sync=False)
            else:  # a browser logged in through the Hub: its OAuth cookie
                model = await self.hub_auth.get_user(handler, sync=False)
        except web.HTTPError:
            raise ApiError(503, f"the JupyterHub at {self.hub_auth.api_url} did not answer whether this token is "
                                "valid: try again shortly (the gateway log says more)", Reason.GATEWAY_UNREACHABLE
                           ) from None
        if not model:
            return None
        return self.user_from_model(model)

    def user_from_model(self, model: dict[str, Any]) -> User:
        """The Hub's user model as the gateway's User; 403 when the token may not use this service."""
        name = str(model.get("name", ""))
        if model.get("kind", "user") != "user":
            raise ApiError(403, f"Hub {model.get('kind')} {name!r} is not a user: only Hub users hold GPU leases",
                           Reason.FORBIDDEN)
        if self.access_scopes and not self.hub_auth.check_scopes(set(self.access_scopes), model):
            raise ApiError(403, f"Hub user {name!r} has a token without the scope {' or '.join(self.access_scopes)}: "
                                "the Hub's operator grants it in a role (see the README, 'Sharing a pool safely')",
                           Reason.FORBIDDEN)
        operator = name in self.operators or bool(
            self.operator_scopes and self.hub_auth.check_scopes(set(self.operator_scopes), model))
        return User(name, frozenset(str(g) for g in model.get("groups") or ()), operator)

    def web_settings(self) -> dict[str, Any]:
        if not isinstance(self.hub_auth, HubOAuth):
            return {}
        # The login cookie is signed with a secret of this process: a restart asks browsers to log in again.
        return {"cookie_secret": os.urandom(32), "hub_auth": self.hub_auth, "service_prefix": self.hub_auth.base_url}

    def routes(self) -> list[Any]:
        """With an OAuth client (a managed service, or one given JUPYTERHUB_CLIENT_ID): a browser's
        ``oauth_login`` goes through the Hub's login and comes back with a cookie the API accepts."""
        if not isinstance(self.hub_auth, HubOAuth):
            return []
        callback = urllib.parse.urlsplit(self.hub_auth.oauth_redirect_uri).path
        return [(callback, HubOAuthCallbackHandler),
                (url_path_join(self.hub_auth.base_url, "oauth_login"), HubLoginHandler)]

    def unauthenticated_message(self, handler: web.RequestHandler) -> str:
        what = "no token given" if not request_token(handler) else "the token is not valid (revoked or expired?)"
        return (f"{what}: send 'Authorization: token T' with a JupyterHub API token (a notebook server started by "
                "the Hub has one in JUPYTERHUB_API_TOKEN) or a token of this gateway")


class HubLoginHandler(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    """A browser's way in: the Hub's login (OAuth), then the caller's leases, where the cookie works."""

    @web.authenticated
    def get(self) -> None:
        self.redirect(url_path_join(self.settings["service_prefix"], "api/gpu/leases"))
