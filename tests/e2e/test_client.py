"""The notebook side's gateway client against a real gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

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
