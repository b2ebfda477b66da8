"""Two gateways in one process keep their own state: stopping one touches nothing of the other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from .gateway_in_process import gateway_in_process


@pytest.mark.asyncio
async def test_stopping_one_gateway_leaves_another_gateways_uploads_working(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path / "first", min_warm=0) as first, \
            gateway_in_process(tmp_path / "second") as second:
        await second.wait_warm()
        client = second.client()
        lease = await asyncio.to_thread(client.create_lease, "cpu", None, "")
        assert lease["state"] == "granted"
        await first.stop()  # cuts the first gateway's uploads, and only those

        data = np.arange(5_000_000, dtype=np.uint8)
        upload = await asyncio.to_thread(client.upload, lease["kernel_id"], data)
        staging = second.gateway.staging_dir(lease["kernel_id"])
        assert staging is not None
        assert (Path(staging) / upload).read_bytes() == data.tobytes()
