"""The notebook side's gateway client against a real gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpu.client import GatewayClient
from jupyter_gpu.protocol import PULL_METADATA_KEY

from .gateway_in_process import gateway_in_process


@pytest.mark.asyncio
async def test_a_long_poll_longer_than_the_clients_timeout_succeeds_first_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        holder, waiter = running.client(), running.client(timeout=1.0)
        await asyncio.to_thread(holder.create_lease, "cpu", None, "")
        queued = await asyncio.to_thread(waiter.create_lease, "cpu", None, "")  # opens the connection
        assert queued["state"] == "queued"
        with caplog.at_level(logging.INFO, logger="tornado.access"):
            polled = await asyncio.to_thread(waiter.get_lease, queued["id"], 2.0)
            await asyncio.sleep(0.2)  # the gateway logs a request as it answers it
        assert polled["state"] == "queued"
        # One request: the poll did not time out after the client's 1 s on the reused socket and go again.
        polls = [r for r in caplog.records if f"GET /api/gpu/leases/{queued['id']}" in r.getMessage()]
        assert len(polls) == 1, [r.getMessage() for r in polls]


@pytest.mark.asyncio
async def test_a_kept_alive_connection_the_gateway_closed_costs_the_next_request_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        client = running.client()
        await asyncio.to_thread(client.types)  # the connection the client then keeps alive
        await running.server.close_all_connections()  # as a gateway restart or its idle timeout does
        with caplog.at_level(logging.INFO, logger="tornado.access"):
            lease = await asyncio.to_thread(client.create_lease, "cpu", None, "")
            await asyncio.sleep(0.2)
        assert lease["state"] == "granted"
        # A POST is not repeated blindly: it went out once, on a new connection.
        posts = [r for r in caplog.records if "POST /api/gpu/leases" in r.getMessage()]
        assert len(posts) == 1, [r.getMessage() for r in posts]


def iopub_types(client: GatewayClient, kernel_id: str, metadata: dict[str, Any]) -> list[str]:
    """The IOPub message types one cell's execute_request brings back, up to its idle status."""
    channel = client.open_channel(kernel_id)
    try:
        msg_id = channel.send("shell", "execute_request", {
            "code": "x = 1", "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
            "stop_on_error": True}, metadata=metadata)
        types: list[str] = []
        while not types or types[-1] != "idle":
            msg = channel.recv(timeout=30)
            assert msg is not None, f"no idle status within 30 s; saw {types}"
            if msg["channel"] == "iopub" and msg["parent_header"].get("msg_id") == msg_id:
                kind = msg["header"]["msg_type"]
                types.append(msg["content"]["execution_state"] if kind == "status" else kind)
        return types
    finally:
        channel.close()


@pytest.mark.asyncio
async def test_the_magics_cells_are_not_echoed_back_as_execute_input_other_clients_cells_are(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        client = running.client()
        lease = await asyncio.to_thread(client.create_lease, "cpu", None, "")
        # One IOPub message less per %%gpu cell; a stock client still sees the code it ran echoed.
        magic = await asyncio.to_thread(iopub_types, client, lease["kernel_id"], {PULL_METADATA_KEY: {"names": []}})
        stock = await asyncio.to_thread(iopub_types, client, lease["kernel_id"], {})
        assert (magic, stock) == (["busy", "idle"], ["busy", "execute_input", "idle"])
