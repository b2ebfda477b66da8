"""One Ray cluster of namespace "machines" per test module, and a gateway in a namespace of its own.

node ``n1`` (10.77.0.11, Ray head): 2 x a100; node ``n2`` (10.77.0.12): 1 x h100; the gateway
runs in ``gw`` (10.77.0.10). All GPUs are declared (emulated); Ray, the actors and the
ipykernels are real. Bringing the cluster up costs ~20 s on 2 cores, so it is shared.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from e2e.gateway_process import GatewayProcess

from kernel_gateway.auth import add_user
from pool_manager.ray_pool import RayPool

from .netns_cluster import NamespaceCluster, namespaces_unavailable

USERS = ("alice", "bob")
#: the product's own settings (RayPool's defaults): the head is started with them
TEST_HEALTH_CHECK = RayPool().system_config()


@dataclass
class RayTestbed:
    cluster: NamespaceCluster
    gateway: GatewayProcess
    head_seconds: float
    worker_seconds: float


def ray_gateway(cluster: NamespaceCluster, tmp: Path, *extra: str, wait_warm: bool = True) -> GatewayProcess:
    """A gateway process in ``gw`` against the cluster (call inside ``cluster.inside("gw")``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    users_file = tmp / "users.json"
    tokens = {name: add_user(str(users_file), name) for name in USERS}
    config = tmp / "config"
    config.mkdir(exist_ok=True)
    (config / "jupyter_gpu_config.py").write_text("c.RayPool.poll_interval = 0.25\n")
    args = ["--users", str(users_file), "--db", str(tmp / "usage.sqlite"), "--ray", cluster.head_address,
            "--cpu-slots", "0", *extra]
    with mock.patch.dict(os.environ, cluster.env("gw"), clear=True):
        return GatewayProcess(tmp, args, tokens).start(wait_warm=wait_warm, timeout=120)


@pytest.fixture(scope="module")
def testbed() -> Iterator[RayTestbed]:
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    # Short paths: Ray's unix sockets live under the temp dir (108 bytes at most).
    cluster = NamespaceCluster(Path(tempfile.mkdtemp(prefix="jgray-")), TEST_HEALTH_CHECK)
    gateway: GatewayProcess | None = None
    try:
        cluster.up()
        for name, host in (("gw", 10), ("n1", 11), ("n2", 12)):
            cluster.add_machine(name, host)
        head = cluster.start_ray("n1", {"a100": 2}, head=True)
        worker = cluster.start_ray("n2", {"h100": 1})
        with cluster.inside("gw"):
            gateway = ray_gateway(cluster, cluster.root / "gateway", "--min-warm", "1")
            yield RayTestbed(cluster, gateway, head, worker)
            gateway.stop()
    finally:
        if gateway is not None and gateway.proc is not None and gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait()
        problems = cluster.down()
        assert not problems, problems
