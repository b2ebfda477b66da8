"""A gateway whose inventory is empty (no GPU found, no CPU slots) still answers clearly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import serve
from .gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def empty_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from serve(tmp_path_factory, "empty", "--cpu-slots", "0")


def test_an_empty_pool_lists_no_types_and_refuses_kernels_with_the_next_step(empty_gateway: GatewayProcess) -> None:
    types = empty_gateway.get("alice", "/api/gpu/types")
    assert types.status == 200 and types.body == []
    specs = empty_gateway.get("alice", "/api/kernelspecs")
    assert specs.status == 200 and specs.body["kernelspecs"] == {}

    for path, body in (("/api/kernels", {}), ("/api/gpu/leases", {})):
        reply = empty_gateway.post("alice", path, body)
        assert reply.status == 503, (path, reply)
        assert reply.body["reason"] == "no_capacity"
        assert "offers no GPU" in reply.body["message"] and "--inventory" in reply.body["message"]
