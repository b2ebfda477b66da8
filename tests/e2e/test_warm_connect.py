"""The gateway connects to a warm kernel before it is leased: a grant hands over a connected
kernel, its first cell sees only its own messages, and a relay never outlives its kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .gateway_in_process import TOKEN, InProcessGateway, gateway_in_process
from .gateway_process import KernelSocket


async def open_socket(running: InProcessGateway, kernel_id: str) -> KernelSocket:
    gateway: Any = SimpleNamespace(url=running.url, tokens={"alice": TOKEN})
    return await KernelSocket.open(gateway, "alice", kernel_id, None, binary=True)


def warm_relays(running: InProcessGateway) -> dict[str, Any]:
    return dict(running.gateway._warm_relays)


@pytest.mark.asyncio
async def test_a_lease_gets_a_connected_kernel_whose_first_cell_sees_only_its_own_messages(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path, cpu_slots=1, min_warm=1) as running:
        await running.wait_warm()
        (kernel_id, relay), = warm_relays(running).items()
        assert not relay.closed

        client = running.client()
        lease = await asyncio.to_thread(client.create_lease, "cpu", None, "")
        assert lease["state"] == "granted" and lease["kernel_id"] == kernel_id
        # handed over at the grant: no connect of its own, none pending
        assert running.gateway.relays[kernel_id] is relay and not running.gateway._preconnecting

        socket = await open_socket(running, kernel_id)
        try:
            msg_id = socket.execute("print('mine')")
            idle, before = await socket.recv_until(
                lambda m: m["msg_type"] == "status" and m["parent_header"].get("msg_id") == msg_id
                and m["content"]["execution_state"] == "idle")
            messages = [*before, idle]
            # nothing from before the lease (the gateway's handshake, the warm-up's requests)
            assert {m["parent_header"].get("msg_id") for m in messages} == {msg_id}
            assert [m["content"]["text"] for m in messages if m["msg_type"] == "stream"] == ["mine\n"]
        finally:
            socket.ws.close()

        await asyncio.to_thread(client.delete_lease, lease["id"])
        await running.wait_warm()  # the kernel's replacement, connected while it waits
        deadline = asyncio.get_running_loop().time() + 30
        while relay.closed is False or kernel_id in running.gateway.relays:
            assert asyncio.get_running_loop().time() < deadline, "the released kernel's relay stayed open"
            await asyncio.sleep(0.05)
        (replacement_id, replacement), = warm_relays(running).items()
        assert replacement_id != kernel_id  # a kernel is never handed to a second lease

        await running.stop()
        assert replacement.closed and not running.gateway._warm_relays
