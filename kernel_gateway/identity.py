"""Who is making a request: an :class:`IdentityProvider` turns it into a :class:`User`.

After jupyter_server's ``auth/identity.py``: handlers never look at tokens or headers
themselves, so another way of knowing people (JupyterHub tokens, an operator's single
sign-on) is one class set in ``c.GatewayApp.identity_provider_class``, and what a user may
do is the :class:`~kernel_gateway.authorizer.Authorizer`'s question, not this one's.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from tornado import web
from traitlets import Instance, List, Unicode
from traitlets.config import LoggingConfigurable

from .auth import TokenAuthenticator, token_from_request


@dataclass(frozen=True)
class User:
    """A person or service as the gateway knows them.

    ``name`` owns leases (and is what metering records); ``groups`` and ``admin`` are for
    authorizers: a Hub user's groups, an operator's scope.
    """

    name: str
    groups: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False


class IdentityProvider(LoggingConfigurable):
    """Says who sent a request, or that nobody the gateway knows did.

    Subclasses override :meth:`get_user` (it may be a coroutine, e.g. to ask a Hub). The
    gateway's own tokens are handed to every provider as ``tokens``, so that one accepting
    Hub tokens can keep accepting them too.
    """

    tokens = Instance(TokenAuthenticator, allow_none=True, help="The gateway's own users and tokens.")

    def get_user(self, handler: web.RequestHandler) -> User | Awaitable[User | None] | None:
        raise NotImplementedError

    def check(self) -> None:
        """Called once at start: raise ValueError (one clear line) when the provider cannot work."""

    def web_settings(self) -> dict[str, Any]:
        """Settings the provider needs in the tornado application (e.g. a cookie secret)."""
        return {}

    def routes(self) -> list[Any]:
        """Handlers the provider adds (e.g. an OAuth login and callback), as tornado route tuples."""
        return []

    def unauthenticated_message(self, handler: web.RequestHandler) -> str:
        """The 401's message: what the caller should send instead."""
        return "this request does not say who sent it in a way the gateway accepts"


class TokenIdentityProvider(IdentityProvider):
    """``Authorization: token T`` (or ``Bearer T``, or ``?token=T`` on websockets) -> the token's user."""

    operators = List(
        Unicode(), help="Names of the gateway's token users that are operators (every lease and all usage, the "
        "decision log), for a gateway without a Hub."
    ).tag(config=True)

    def get_user(self, handler: web.RequestHandler) -> User | None:
        if self.tokens is None:
            return None
        name = self.tokens.user_for(request_token(handler))
        return User(name, admin=name in self.operators) if name is not None else None

    def unauthenticated_message(self, handler: web.RequestHandler) -> str:
        what = "no token given" if not request_token(handler) else "the token is not valid"
        return (f"{what}: send 'Authorization: token YOUR_TOKEN' (set JUPYTER_GPU_TOKEN; an operator creates "
                "tokens with 'jupyter-gpu token add NAME')")


def request_token(handler: Any) -> str | None:
    request = handler.request
    query = request.arguments.get("token", [b""])[0].decode(errors="replace") or None
    return token_from_request(request.headers.get("Authorization"), query)
