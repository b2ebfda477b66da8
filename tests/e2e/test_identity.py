"""Identity and authorization are pluggable: classes named in the config decide, no handler changes."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tornado import web
from traitlets.config import Config

from kernel_gateway.app import GatewayApp
from kernel_gateway.authorizer import Authorizer
from kernel_gateway.identity import IdentityProvider, User

from .gateway_in_process import gateway_in_process


class HeaderIdentity(IdentityProvider):
    """Trusts an ``X-Test-User: name group,group`` header (as a proxy in front of a gateway would)."""

    async def get_user(self, handler: web.RequestHandler) -> User | None:  # a coroutine, as a Hub lookup is
        await asyncio.sleep(0)
        name, _, groups = handler.request.headers.get("X-Test-User", "").partition(" ")
        return User(name, frozenset(filter(None, groups.split(",")))) if name else None

    def unauthenticated_message(self, handler: web.RequestHandler) -> str:
        return "send X-Test-User"


class ObserversMayOnlyRead(Authorizer):
    asked: list[tuple[str, str, str]] = []

    def is_authorized(self, handler: web.RequestHandler, user: User, action: str, resource: str) -> bool:
        self.asked.append((user.name, action, resource))
        return action == "read" or "observers" not in user.groups


def call(url: str, method: str, path: str, user: str | None, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None)
    if user:
        request.add_header("X-Test-User", user)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.asyncio
async def test_an_identity_provider_and_authorizer_set_in_the_config_decide(tmp_path: Path) -> None:
    config = Config()
    config.GatewayApp.identity_provider_class = f"{__name__}.HeaderIdentity"
    config.GatewayApp.authorizer_class = ObserversMayOnlyRead
    app = GatewayApp(config=config)
    app.no_auth = True  # no users file in this test; the header provider ignores the gateway's tokens anyway
    identity, authorizer = app.identity_provider(), app.authorizer_class(parent=app)
    assert isinstance(identity, HeaderIdentity) and isinstance(authorizer, ObserversMayOnlyRead)

    async with gateway_in_process(tmp_path, min_warm=0, identity_provider=identity, authorizer=authorizer) as gw:
        def scenario() -> None:
            status, body = call(gw.url, "GET", "/api/gpu/types", None)
            assert (status, body) == (401, {"message": "send X-Test-User", "reason": "unauthorized"})
            assert call(gw.url, "GET", "/api/gpu/types", "olga observers")[0] == 200
            status, body = call(gw.url, "POST", "/api/gpu/leases", "olga observers", {"gpu": "cpu"})
            assert status == 403 and body["reason"] == "forbidden" and "'olga' may not write leases" in body["message"]
            status, lease = call(gw.url, "POST", "/api/gpu/leases", "carol", {"gpu": "cpu"})
            assert status == 201 and lease["state"] in ("queued", "granted")
            # The leases are carol's: the provider's name is the owner.
            assert [row["id"] for row in call(gw.url, "GET", "/api/gpu/leases", "carol")[1]] == [lease["id"]]
            assert call(gw.url, "GET", "/api/gpu/leases", "olga observers")[1] == []
            assert call(gw.url, "DELETE", f"/api/gpu/leases/{lease['id']}", "carol")[0] == 200

        await asyncio.to_thread(scenario)
    assert ("olga", "write", "leases") in ObserversMayOnlyRead.asked
