"""The asyncio service around the pool core, with a backend standing in for remote nodes.

The backend here starts no process: it plays a node that can vanish (its kill raises, as a
departed node's does), which no local process can reproduce. The core and the service are
the real ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from jupyter_gpu.protocol import (
    GRANTED,
    REASON_DELETED,
    REASON_GATEWAY_RESTART,
    REASON_IDLE,
    REASON_NODE_LOST,
    parse_gpu_spec,
)
from pool_manager.backend import KernelBackend, KernelInfo
from pool_manager.core import PoolCore, PoolPolicy
from pool_manager.model import Action, Device, LeaseEnded, StartKernel
from pool_manager.service import PoolService

pytestmark = pytest.mark.asyncio


class NodeGoneError(RuntimeError):
    pass


class RemoteNodeBackend(KernelBackend):
    """Kernels on a node that may depart: once it has, every kill raises."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: set[str] = set()
        self.departed = False

    async def start_kernel(self, request: StartKernel) -> KernelInfo:
        self.alive.add(request.kernel_id)
        return KernelInfo(request.kernel_id, {})

    async def kill_kernel(self, kernel_id: str) -> None:
        if self.departed:
            raise NodeGoneError(f"node of {kernel_id} is gone")
        self.alive.discard(kernel_id)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        pass

    async def close(self) -> None:
        self.alive.clear()


def make_service(spec: str = "a100", count: int = 1) -> tuple[PoolService, RemoteNodeBackend]:
    ids = itertools.count(1)
    devices = [Device(f"gpu-{i}", spec, i, "NVIDIA A100", 81920, True, "node-1") for i in range(count)]
    core = PoolCore(devices, PoolPolicy(min_warm=0), clock=lambda: 0.0, new_id=lambda: f"id{next(ids)}")
    backend = RemoteNodeBackend()
    return PoolService(core, backend), backend


async def settle(service: PoolService) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.gather(*list(service._tasks), return_exceptions=True)


async def test_a_kill_that_raises_returns_the_gpu_and_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    service, backend = make_service()
    await service.start()
    try:
        first = service.request_lease("ada", parse_gpu_spec("a100"))
        await settle(service)
        assert first.state == GRANTED
        backend.departed = True
        with caplog.at_level(logging.ERROR, logger="pool_manager.service"):
            service.end_lease(first.id, REASON_DELETED)
            await settle(service)
        failures = [r for r in caplog.records if "kill" in r.getMessage()]
        assert failures and failures[0].exc_info is not None
        assert isinstance(failures[0].exc_info[1], NodeGoneError)
        # The GPU is back: the next user gets it instead of waiting forever.
        assert service.core.summaries()[0].free == 1
        backend.departed = False
        second = service.request_lease("grace", parse_gpu_spec("a100"))
        await settle(service)
        assert second.state == GRANTED
    finally:
        backend.departed = False
        await service.stop(REASON_GATEWAY_RESTART)


def make_timed_service(count: int = 1) -> tuple[PoolService, RemoteNodeBackend]:
    ids = itertools.count(1)
    devices = [Device(f"gpu-{i}", "a100", i, "NVIDIA A100", 81920, True, "node-1") for i in range(count)]
    core = PoolCore(devices, PoolPolicy(min_warm=0), clock=time.monotonic, wall_clock=time.time,
                    new_id=lambda: f"id{next(ids)}")
    backend = RemoteNodeBackend()
    return PoolService(core, backend), backend


async def test_the_service_ticks_at_the_deadlines_and_not_in_between() -> None:
    service, _ = make_timed_service()
    await service.start()
    try:
        await asyncio.sleep(0.3)
        assert service.ticks == 0  # nothing due: no tick at all
        lease = service.request_lease("ada", parse_gpu_spec("a100"), idle_timeout=0.4)
        await settle(service)
        assert lease.state == GRANTED and lease.granted_at is not None
        granted = time.monotonic()
        while lease.state == GRANTED and time.monotonic() - granted < 5:
            await asyncio.sleep(0.01)
        assert lease.reason == REASON_IDLE
        assert 0.4 <= time.monotonic() - granted < 1.0  # ended at its deadline, give or take the loop
        assert service.ticks <= 2  # one at the deadline (two if the timer fires a hair early)
    finally:
        await service.stop(REASON_GATEWAY_RESTART)


async def test_activity_pushes_the_idle_deadline_back() -> None:
    service, _ = make_timed_service()
    await service.start()
    try:
        lease = service.request_lease("ada", parse_gpu_spec("a100"), idle_timeout=0.3)
        await settle(service)
        assert lease.kernel_id is not None
        service.kernel_activity(lease.kernel_id, busy=True)
        await asyncio.sleep(0.5)
        assert lease.state == GRANTED  # busy past its idle timeout
        service.kernel_activity(lease.kernel_id, busy=False)
        went_idle = time.monotonic()
        while lease.state == GRANTED and time.monotonic() - went_idle < 5:
            await asyncio.sleep(0.01)
        assert lease.reason == REASON_IDLE and 0.3 <= time.monotonic() - went_idle < 0.9
    finally:
        await service.stop(REASON_GATEWAY_RESTART)


async def test_a_lost_node_ends_its_lease_for_the_listeners_and_a_new_node_serves_the_next() -> None:
    service, backend = make_service()
    ended_for: list[str | None] = []

    def listener(action: Action) -> None:
        if isinstance(action, LeaseEnded):
            ended_for.append(action.lease.reason)

    service.listeners.append(listener)
    await service.start()
    try:
        lease = service.request_lease("ada", parse_gpu_spec("a100"))
        await settle(service)
        backend.departed = True  # its kill will raise, as a departed node's does
        assert service.remove_node("node-1") == [lease]
        await settle(service)
        assert ended_for == [REASON_NODE_LOST] and lease.reason == REASON_NODE_LOST
        assert service.core.slots == {} and service.kernels == {}

        backend.departed = False
        service.add_devices([Device("gpu-9", "a100", 9, "NVIDIA A100", 81920, True, "node-2")])
        after = service.request_lease("grace", parse_gpu_spec("a100"))
        await settle(service)
        assert after.state == GRANTED and after.gpu_indices == (9,)
    finally:
        await service.stop(REASON_GATEWAY_RESTART)


async def test_a_kernel_counts_as_warm_only_after_after_start_and_kernel_gone_hears_each_end() -> None:
    ids = itertools.count(1)
    devices = [Device(f"gpu-{i}", "a100", i, "NVIDIA A100", 81920, True, "node-1") for i in range(2)]
    core = PoolCore(devices, PoolPolicy(min_warm=1), clock=lambda: 0.0, new_id=lambda: f"id{next(ids)}")
    backend = RemoteNodeBackend()
    service = PoolService(core, backend)
    connected = asyncio.Event()
    connecting: list[str] = []
    gone: list[str] = []

    async def after_start(kernel_id: str) -> None:  # the gateway connecting to it
        connecting.append(kernel_id)
        await connected.wait()

    service.after_start = after_start
    service.kernel_gone = gone.append
    await service.start()
    try:
        await asyncio.sleep(0.01)
        [first] = connecting
        assert service.core.summaries()[0].warm == 0  # started, not yet connected: not warm
        lease = service.request_lease("ada", parse_gpu_spec("a100"))
        await asyncio.sleep(0.01)
        assert lease.state != GRANTED  # no lease gets a kernel the gateway is still connecting to
        connected.set()
        await settle(service)
        assert lease.state == GRANTED and lease.kernel_id == first
        await settle(service)
        [warm] = [k for k in backend.alive if k != first]
        backend._on_death(warm, None)  # the warm one dies by itself
        service.end_lease(lease.id, REASON_DELETED)  # the leased one is killed
        await settle(service)
        assert sorted(gone) == sorted([warm, first])
    finally:
        await service.stop(REASON_GATEWAY_RESTART)
