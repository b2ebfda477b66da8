"""GPU idleness in the pool's core, with a fake clock: a lease whose GPUs did no work and whose
kernel ran no cell for ``gpu_idle_timeout`` ends (reason ``gpu_idle``), after a notice
``gpu_idle_warning`` before; a cell or GPU work starts the count again."""

from __future__ import annotations

from typing import Any

from jupyter_gpu.protocol import GRANTED, REASON_GPU_IDLE
from pool_manager.core import PoolCore
from pool_manager.model import Action, LeaseNoticed
from tests.test_pool_core import FakeClock, ended, hold, make_pool


def gpu_idle_pool(emulated: bool = True, **policy: Any) -> tuple[PoolCore, FakeClock]:
    settings = {"min_warm": 0, "idle_timeout": 1000.0, "gpu_idle_timeout": 100.0, "gpu_idle_warning": 30.0, **policy}
    return make_pool("a100=2", emulated=emulated, **settings)


def at(core: PoolCore, clock: FakeClock, now: float) -> list[Action]:
    clock.set(now)
    core.tick()
    return core.pop_actions()


def notices(actions: list[Action]) -> list[tuple[str, float | None]]:
    return [(a.notice.kind, a.notice.when) for a in actions if isinstance(a, LeaseNoticed)]


def test_an_idle_lease_is_warned_then_released_for_gpu_idleness() -> None:
    core, clock = gpu_idle_pool()
    lease = hold(core, "alice", "a100")
    assert core.next_deadline() == 70.0
    assert at(core, clock, 69.9) == []
    warned = at(core, clock, 70.0)
    assert notices(warned) == [(REASON_GPU_IDLE, 100.0)]  # when: the release, on the wall clock
    assert "no cell ran for 70 s" in lease.notices[0].text and "run a cell on it" in lease.notices[0].text
    assert core.next_deadline() == 100.0
    assert at(core, clock, 99.0) == []  # warned once
    assert ended(at(core, clock, 100.0)) == {lease.id: REASON_GPU_IDLE}


def test_a_cell_after_the_warning_keeps_the_lease_and_a_later_idle_spell_warns_again() -> None:
    core, clock = gpu_idle_pool()
    lease = hold(core, "alice", "a100")
    assert notices(at(core, clock, 70.0))
    clock.set(80)
    core.kernel_activity(lease.slot_id or "", busy=True)
    assert ended(at(core, clock, 150.0)) == {}  # a running cell: never GPU-idle, however long
    clock.set(160)
    core.kernel_activity(lease.slot_id or "", busy=False)
    assert at(core, clock, 200.0) == []
    assert notices(at(core, clock, 230.0)) == [(REASON_GPU_IDLE, 260.0)]
    assert ended(at(core, clock, 260.0)) == {lease.id: REASON_GPU_IDLE}


def test_gpu_work_between_cells_counts_as_use() -> None:
    core, clock = gpu_idle_pool(emulated=False)
    lease = hold(core, "alice", "a100")
    assert core.leases_on_local_gpus() == {lease.id: lease.gpu_indices}
    clock.set(60)
    core.gpu_used(lease.id)  # e.g. a training thread the last cell started
    assert at(core, clock, 100.0) == []
    assert notices(at(core, clock, 130.0)) == [(REASON_GPU_IDLE, 160.0)]
    assert ended(at(core, clock, 160.0)) == {lease.id: REASON_GPU_IDLE}


def test_only_real_local_gpus_are_sampled_and_only_when_gpu_idleness_is_on() -> None:
    core, _ = gpu_idle_pool(emulated=True)
    hold(core, "alice", "a100")
    assert core.leases_on_local_gpus() == {}  # the kernel's own activity stands in
    core, _ = gpu_idle_pool(emulated=False, gpu_idle_timeout=0.0)
    hold(core, "alice", "a100")
    assert core.leases_on_local_gpus() == {}


def test_off_by_default_and_the_users_longer_idle_timeout_does_not_stretch_it() -> None:
    core, clock = make_pool("a100=1", min_warm=0, idle_timeout=1000.0)
    lease = hold(core, "alice", "a100")
    assert at(core, clock, 999.0) == [] and lease.state == GRANTED

    core, clock = gpu_idle_pool(gpu_idle_warning=0.0)
    lease = hold(core, "alice", "a100", idle_timeout=3000.0)
    assert ended(at(core, clock, 100.0)) == {lease.id: REASON_GPU_IDLE}
    assert lease.notices == ()  # no warning asked for


def test_many_leases_end_in_the_order_they_went_idle() -> None:
    core, clock = gpu_idle_pool(gpu_idle_warning=0.0)
    first = hold(core, "alice", "a100")
    clock.set(10)
    second = hold(core, "bob", "a100")
    clock.set(20)
    core.kernel_activity(first.slot_id or "", busy=False)  # a cell of alice's ended at 20
    assert ended(at(core, clock, 110.0)) == {second.id: REASON_GPU_IDLE}
    assert ended(at(core, clock, 120.0)) == {first.id: REASON_GPU_IDLE}


def test_a_warning_not_shorter_than_the_timeout_comes_halfway() -> None:
    core, clock = gpu_idle_pool(gpu_idle_timeout=120.0, gpu_idle_warning=300.0)
    lease = hold(core, "alice", "a100")
    assert at(core, clock, 59.0) == []
    assert notices(at(core, clock, 60.0)) == [(REASON_GPU_IDLE, 120.0)]
    assert ended(at(core, clock, 120.0)) == {lease.id: REASON_GPU_IDLE}
