"""A token checked once at a websocket's handshake must not keep a kernel open after it is revoked.

A kernel's websocket lives for hours. The user is removed from the users file (or their Hub
token is revoked) while their socket is open: the socket closes (code 1008) within a recheck,
and until then it works as before.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from tornado import httpclient, websocket

from kernel_gateway.auth import TokenAuthenticator, add_user, remove_user
from kernel_gateway.identity import TokenIdentityProvider

from .gateway_in_process import gateway_in_process

RECHECK = 0.3


async def kernel_of_a_new_lease(url: str, token: str) -> str:
    http = httpclient.AsyncHTTPClient()
    headers = {"Authorization": f"token {token}"}
    created = await http.fetch(f"{url}/api/gpu/leases", method="POST", body=json.dumps({"gpu": "cpu"}),
                               headers=headers)
    lease_id = json.loads(created.body)["id"]
    granted = json.loads((await http.fetch(f"{url}/api/gpu/leases/{lease_id}?wait=60", headers=headers)).body)
    assert granted["state"] == "granted", granted
    return str(granted["kernel_id"])


def kernel_info_request() -> str:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "kernel_info_request", "session": "s", "username": "",
              "version": "5.3", "date": "2026-11-29T10:00:00Z"}
    return json.dumps({"channel": "shell", "header": header, "parent_header": {}, "metadata": {}, "content": {}})


async def reply_to(ws: websocket.WebSocketClientConnection, msg_type: str) -> dict[str, object]:
    while True:
        raw = await asyncio.wait_for(ws.read_message(), 30)
        assert raw is not None, f"socket closed ({ws.close_code} {ws.close_reason}) before a {msg_type}"
        msg = json.loads(raw)
        if msg["header"]["msg_type"] == msg_type:
            return dict(msg)


@pytest.mark.asyncio
async def test_an_open_websocket_closes_once_its_token_is_revoked(tmp_path: Path) -> None:
    users = str(tmp_path / "users.json")
    token = add_user(users, "alice")
    identity = TokenIdentityProvider(tokens=TokenAuthenticator.from_users_file(users))
    async with gateway_in_process(tmp_path / "gw", identity_provider=identity,
                                  identity_recheck_interval=RECHECK) as gw:
        await gw.wait_warm()
        kernel_id = await kernel_of_a_new_lease(gw.url, token)
        request = httpclient.HTTPRequest(f"{gw.url.replace('http', 'ws', 1)}/api/kernels/{kernel_id}/channels",
                                         headers={"Authorization": f"token {token}"})
        ws = await websocket.websocket_connect(request)
        await asyncio.sleep(RECHECK * 3)  # rechecks with a valid token leave it open and working
        ws.write_message(kernel_info_request())
        assert (await reply_to(ws, "kernel_info_reply"))["content"]
        remove_user(users, "alice")  # the operator revokes alice's token
        with pytest.raises(AssertionError, match="socket closed"):
            await asyncio.wait_for(reply_to(ws, "never sent"), RECHECK * 10)
        assert ws.close_code == 1008 and "no longer works" in (ws.close_reason or "")
