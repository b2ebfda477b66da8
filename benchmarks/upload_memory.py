"""Why a 1 GB push varies so much on this VM: uploads into memory the guest reused vs new.

``python benchmarks/upload_memory.py``: starts a gateway with one CPU kernel, uploads the same
1 GB array eight times, once deleting each staged file right away (its memory is reused by
the next upload) and once keeping them all (each upload needs memory the guest has not used
lately). On a VM whose balloon device reports free pages to the host, the second kind is
several times slower: the host faults those pages back in one by one. Not part of the table.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ours import OurGateway

from jupyter_gpu.client import GatewayClient, GatewayConfig


def uploads(keep: bool, count: int = 8, size: int = 10**9) -> list[float]:
    gateway = OurGateway(cpu_slots=1, min_warm=1)
    try:
        env = gateway.env()
        client = GatewayClient(GatewayConfig(env["JUPYTER_GPU_URL"], env["JUPYTER_GPU_TOKEN"]))
        lease = client.create_lease("cpu", None, "upload-memory")
        while lease["state"] != "granted":
            lease = client.get_lease(lease["id"], wait=5)
        data = np.ones(size, dtype=np.uint8)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            upload = client.upload(lease["kernel_id"], data)
            times.append(time.perf_counter() - started)
            if not keep:
                for path in glob.glob(f"/dev/shm/jupyter-gpu-staging-{gateway.proc.pid}-*/*/{upload}"):
                    os.unlink(path)
        return times
    finally:
        gateway.stop()


if __name__ == "__main__":
    for keep in (False, True):
        what = "kept (new memory each time)" if keep else "deleted (memory reused)"
        print(f"1 GB uploads, staged files {what}: " + ", ".join(f"{t:.2f} s" for t in uploads(keep)))
