"""A gateway stopped while relays are still connecting to fresh kernels stops cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .conftest import make_gateway


@pytest.mark.asyncio
async def test_stopping_while_relays_connect_leaves_no_unretrieved_task_errors(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--inventory", "a100=4", "--cpu-slots", "0", "--min-warm", "4").start()
    kernels = [gateway.lease("alice", "a100")["kernel_id"] for _ in range(4)]
    # websockets opening (each connects its kernel's relay) as the gateway is told to stop
    opening = [asyncio.ensure_future(gateway.connect("alice", kernel)) for kernel in kernels]
    await asyncio.sleep(0)
    assert gateway.stop() == 0
    await asyncio.gather(*opening, return_exceptions=True)
    log = gateway.log_text()
    assert "stopped" in log
    assert "never retrieved" not in log and "Traceback" not in log, log[-3000:]
