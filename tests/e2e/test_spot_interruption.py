"""A spot interruption notice, end to end: the real gateway process (local backend) watches a
loopback stand-in for EC2's metadata service (AWS's own cannot run here); when it announces
the instance's end, the lease running a cell ends with reason ``spot_interrupted`` and a message
naming the interruption, its variables are kept, nothing new is placed on the machine, and the
notebook's next lease on the replacement machine gets them back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.aws.imds_standin import ImdsStandIn

from .conftest import make_gateway
from .gateway_process import GatewayProcess
from .test_snapshots import poll, run, text

NOTEBOOK = "work/spot.ipynb"


def aws_log(gateway: GatewayProcess, user: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens[user]}
    return subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", "aws", "log"], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.asyncio
async def test_a_spot_notice_ends_the_lease_keeps_its_variables_and_drains_the_machine(tmp_path: Path) -> None:
    with ImdsStandIn() as imds:
        gateway = make_gateway(tmp_path, "--TokenIdentityProvider.operators=ops", "--cpu-slots", "2", "--min-warm", "1",
                               "--snapshot-store", str(tmp_path / "store"),
                               f"--PoolManager.spot_notice_url={imds.url}",
                               "--PoolManager.spot_notice_interval=0.2", users=("alice", "bob", "ops")).start()
        try:
            lease = gateway.lease("alice", "cpu", notebook=NOTEBOOK)
            socket = await gateway.connect("alice", lease["kernel_id"])
            socket.execute("progress = 41\nimport time\ntime.sleep(60)")
            await socket.recv(5)  # the cell is running
            poll(lambda: imds.action_reads >= 2, 10, "the gateway to ask the metadata service")
            assert gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body["state"] == "granted"

            imds.notice = {"action": "terminate", "time": "2026-11-29T10:40:00Z"}

            def ended() -> Any:
                row = gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body
                return row if row["state"] == "released" and row.get("snapshot", {}).get("state") == "kept" else None

            row = poll(ended, 30, "the interrupted lease to end with its variables kept")
            assert row["reason"] == "spot_interrupted"
            assert "spot interruption" in row["reason_message"] and "terminate at 2026-11-29T10:40:00Z" in row[
                "reason_message"]
            assert "progress" in row["snapshot"]["names"]
            socket.close()
            # the operator reads why in the decision log; a user may not
            decisions = aws_log(gateway, "ops")
            assert decisions.returncode == 0, decisions.stderr
            assert ("AWS takes back the spot instance of node local (terminate at 2026-11-29T10:40:00Z): a spot "
                    "interruption: node drained, 1 lease(s) ended (spot_interrupted)") in decisions.stdout
            refused = aws_log(gateway, "alice")
            assert refused.returncode == 1 and "'alice' is not an operator" in refused.stderr

            # drained: no warm kernel comes back there, and with no other machine a request is refused
            time.sleep(1.0)
            assert not any(t["warm"] for t in gateway.get("bob", "/api/gpu/types").body)
            refused = gateway.post("bob", "/api/gpu/leases", {"gpu": "cpu"})
            assert refused.status == 503 and refused.body["reason"] == "no_capacity", refused
            gateway.stop()

            # The replacement machine (no notice there) shares the snapshot store: the notebook's
            # next lease gets its variables back.
            imds.notice = None
            gateway.start()
            cells = run(gateway, "alice", "%%gpu cpu\nprint('back', progress + 1)", notebook=NOTEBOOK)
            assert "back 42" in text(cells[0], "stdout"), cells[0].outputs
            assert "restored" in text(cells[0], "stderr")
        finally:
            gateway.stop()
