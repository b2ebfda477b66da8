"""Fixtures that run the real gateway process with real ipykernel kernels on loopback.

No GPU exists on CI machines, so the pool serves a declared (emulated) inventory; every
other part is the real thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_gateway.auth import add_user

from .gateway_process import GatewayProcess

USERS = ("alice", "bob")
#: module-scoped gateway fixtures whose leases are released after every test
SHARED_GATEWAYS = ("gateway", "cpu_gateway", "upload_gateway", "download_gateway")


def make_gateway(tmp: Path, *extra: str, users: tuple[str, ...] = USERS) -> GatewayProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    users_file = tmp / "users.json"
    tokens = {name: add_user(str(users_file), name) for name in users}
    args = ["--users", str(users_file), "--db", str(tmp / "usage.sqlite"), *extra]
    return GatewayProcess(tmp, args, tokens)


def serve(tmp_path_factory: pytest.TempPathFactory, name: str, *extra: str) -> Iterator[GatewayProcess]:
    """Body of a module-scoped gateway fixture: ``yield from serve(...)``."""
    process = make_gateway(tmp_path_factory.mktemp(name), *extra).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A shared gateway: a100 x2 and h100 x1 emulated, two CPU slots, one warm kernel per type."""
    yield from serve(tmp_path_factory, "gateway", "--inventory", "a100=2,h100=1", "--cpu-slots", "2", "--min-warm", "1")


@pytest.fixture(autouse=True)
def release_leases_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test leaves the shared pool as it found it."""
    yield
    for name in SHARED_GATEWAYS:
        if name not in request.fixturenames:
            continue
        process: GatewayProcess = request.getfixturevalue(name)
        if process.proc is None or process.proc.poll() is not None:
            continue
        for user in process.tokens:
            for lease in process.get(user, "/api/gpu/leases").body:
                process.delete(user, f"/api/gpu/leases/{lease['id']}")
        process.wait_warm()
