"""May this user do this? The :class:`Authorizer` answers, after jupyter_server's ``auth/authorizer.py``.

Every handler names its ``resource`` (``kernels``, ``leases``, ``types``, ``usage``,
``metrics``, ``kernelspecs``, ``api``); the action is ``read`` for GET, ``write`` for
requests that change something, ``execute`` for a kernel's websocket and uploads (code
and data that reach a kernel). Whose lease or kernel it is stays the gateway's check:
another user's answers 404 whatever an authorizer says.
"""

from __future__ import annotations

from collections.abc import Awaitable

from tornado import web
from traitlets.config import LoggingConfigurable

from .identity import User

ACTIONS = ("read", "write", "execute")


class Authorizer(LoggingConfigurable):
    """The default: every user the identity provider knows may use the whole API on their own leases."""

    def is_authorized(
        self, handler: web.RequestHandler, user: User, action: str, resource: str
    ) -> bool | Awaitable[bool]:
        return True
