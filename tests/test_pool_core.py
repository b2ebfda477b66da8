"""The pool's sans-I/O core, driven by hand: a fake clock, deterministic ids, no processes.

Each test feeds events to :class:`PoolCore` and checks what an operator or a user would see:
the kernels it starts or kills, the leases it grants or ends and why, queue positions, usage.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from jupyter_gpu.protocol import (
    GRANTED,
    QUEUED,
    REASON_CANCELLED,
    REASON_DELETED,
    REASON_GATEWAY_RESTART,
    REASON_IDLE,
    REASON_KERNEL_DIED,
    REASON_MAX_DURATION,
    REASON_NODE_LOST,
    RELEASED,
    parse_gpu_spec,
)
from pool_manager.core import NO_CAPACITY, LeaseRequestError, PoolCore, PoolPolicy
from pool_manager.model import (
    Action,
    Device,
    KillKernel,
    Lease,
    LeaseEnded,
    LeaseGranted,
    StartKernel,
)

# --- helpers ------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        self.now = float(now)


def inventory(spec: str, emulated: bool = False) -> list[Device]:
    """Devices from the config syntax ``a100=2,h100=1``; GPU indices run across types, cpu has none."""
    devices = []
    index = 0
    for part in spec.split(","):
        gpu_type, _, count = part.partition("=")
        for n in range(int(count)):
            if gpu_type == "cpu":
                devices.append(Device(f"cpu-{n}", "cpu", None, "CPU", 0, emulated))
                continue
            devices.append(Device(f"gpu-{index}", gpu_type, index, f"NVIDIA {gpu_type.upper()}", 81920, emulated))
            index += 1
    return devices


def make_pool(spec: str = "a100=2,h100=1", emulated: bool = False, **policy: Any) -> tuple[PoolCore, FakeClock]:
    """A pool over ``spec`` with the given :class:`PoolPolicy` knobs; ids are id1, id2, ... in order of creation."""
    clock = FakeClock()
    ids = itertools.count(1)
    core = PoolCore(inventory(spec, emulated), PoolPolicy(**policy), clock, new_id=lambda: f"id{next(ids)}")
    return core, clock


def request(core: PoolCore, user: str, spec: str, idle_timeout: float | None = None) -> Lease:
    return core.request_lease(user, parse_gpu_spec(spec), idle_timeout=idle_timeout)


def starts(actions: list[Action]) -> list[StartKernel]:
    return [a for a in actions if isinstance(a, StartKernel)]


def kills(actions: list[Action]) -> list[str]:
    return [a.slot_id for a in actions if isinstance(a, KillKernel)]


def granted(actions: list[Action]) -> list[str]:
    return [a.lease.id for a in actions if isinstance(a, LeaseGranted)]


def ended(actions: list[Action]) -> dict[str, str | None]:
    """Lease id -> reason, for every LeaseEnded."""
    return {a.lease.id: a.lease.reason for a in actions if isinstance(a, LeaseEnded)}


def warm_up(core: PoolCore) -> list[StartKernel]:
    """First tick of the service: start the warm kernels and report them all ready."""
    core.tick()
    started = starts(core.pop_actions())
    for start in started:
        core.kernel_ready(start.slot_id)
    assert core.pop_actions() == []
    return started


def hold(core: PoolCore, user: str, spec: str, idle_timeout: float | None = None) -> Lease:
    """A granted lease on a pool without warm kernels: request it, then its kernel becomes ready."""
    lease = request(core, user, spec, idle_timeout)
    assert lease.state == QUEUED and lease.slot_id is not None
    core.kernel_ready(lease.slot_id)
    assert lease.state == GRANTED
    core.pop_actions()
    return lease


def release(core: PoolCore, lease: Lease) -> list[Action]:
    """The user deletes the lease and its kernel finishes dying; returns what the pool did."""
    slot_id = lease.slot_id
    assert slot_id is not None
    core.end_lease(lease.id, REASON_DELETED)
    actions = core.pop_actions()
    assert slot_id in kills(actions)
    core.kernel_stopped(slot_id)
    return actions + core.pop_actions()


def summary(core: PoolCore, gpu_type: str) -> dict[str, object]:
    row = next(r for r in core.summaries() if r.gpu_type == gpu_type)
    return {"total": row.total, "free": row.free, "warm": row.warm, "queued": row.queued, "emulated": row.emulated}


# --- warm pool ------------------------------------------------------------------------------


def test_start_up_starts_one_warm_kernel_per_type_on_a_single_gpu() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    core.tick()
    started = starts(core.pop_actions())
    assert sorted((s.gpu_type, s.gpu_indices) for s in started) == [("a100", (0,)), ("h100", (2,))]
    assert len({s.slot_id for s in started}) == 2


def test_request_is_granted_from_the_warm_kernel_and_a_replacement_starts_at_once() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm = {s.gpu_type: s for s in warm_up(core)}

    lease = request(core, "alice", "a100")
    actions = core.pop_actions()

    assert lease.state == GRANTED
    assert granted(actions) == [lease.id]
    assert lease.slot_id == warm["a100"].slot_id and lease.gpu_indices == (0,)
    replacement = starts(actions)
    assert [(s.gpu_type, s.gpu_indices) for s in replacement] == [("a100", (1,))]
    assert replacement[0].slot_id != lease.slot_id


def test_request_while_the_warm_kernel_is_still_starting_is_granted_when_it_is_ready() -> None:
    core, _ = make_pool("a100=2", min_warm=1)
    core.tick()
    (warm,) = starts(core.pop_actions())

    lease = request(core, "alice", "a100")
    assert lease.state == QUEUED and lease.slot_id == warm.slot_id
    assert [s.gpu_indices for s in starts(core.pop_actions())] == [(1,)]  # the next spare

    core.kernel_ready(warm.slot_id)
    assert granted(core.pop_actions()) == [lease.id]


# --- multi-GPU leases -----------------------------------------------------------------------


def test_two_gpus_preempt_the_warm_kernel_and_start_only_after_it_stopped() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm = {s.gpu_type: s for s in warm_up(core)}

    lease = request(core, "alice", "a100:2")
    actions = core.pop_actions()
    assert kills(actions) == [warm["a100"].slot_id]
    assert starts(actions) == []  # its GPU is still held by the dying warm kernel

    core.kernel_stopped(warm["a100"].slot_id)
    (start,) = starts(core.pop_actions())
    assert start.slot_id == lease.slot_id
    assert sorted(start.gpu_indices) == [0, 1]

    core.kernel_ready(start.slot_id)
    assert granted(core.pop_actions()) == [lease.id]
    assert lease.count == 2 and sorted(lease.gpu_indices) == [0, 1]


def test_cancelled_two_gpu_request_starts_nothing_on_a_gpu_whose_kernel_is_still_dying() -> None:
    core, _ = make_pool("a100=2", min_warm=1)
    (warm,) = warm_up(core)
    lease = request(core, "alice", "a100:2")
    assert kills(core.pop_actions()) == [warm.slot_id]

    core.end_lease(lease.id, REASON_DELETED)
    actions = core.pop_actions()
    assert ended(actions) == {lease.id: REASON_CANCELLED} and starts(actions) == []
    assert summary(core, "a100")["free"] == 0  # busy until the preempted kernel is gone

    core.kernel_stopped(warm.slot_id)
    assert [s.gpu_indices for s in starts(core.pop_actions())] == [(0,)]  # the warm spare comes back
    assert summary(core, "a100")["free"] == 2


def test_two_gpus_on_free_gpus_kill_nothing() -> None:
    core, _ = make_pool("a100=2", min_warm=0)
    lease = request(core, "alice", "a100:2")
    actions = core.pop_actions()
    assert kills(actions) == []
    assert [sorted(s.gpu_indices) for s in starts(actions)] == [[0, 1]]
    assert lease.slot_id == starts(actions)[0].slot_id


# --- specs: fallbacks, type names, errors ---------------------------------------------------


def test_fallback_takes_the_first_type_with_capacity() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm_up(core)
    request(core, "bob", "h100")
    core.pop_actions()

    lease = request(core, "alice", "h100|a100")
    assert lease.state == GRANTED and lease.gpu_type == "a100"


def test_fallback_prefers_the_first_type_when_both_are_free() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "h100|a100")
    assert lease.state == GRANTED and lease.gpu_type == "h100"


def test_queued_fallback_takes_the_first_type_that_frees() -> None:
    core, _ = make_pool("a100=1,h100=1", min_warm=0)
    on_a100 = hold(core, "bob", "a100")
    hold(core, "carol", "h100")
    waiting = request(core, "alice", "h100|a100")
    assert waiting.state == QUEUED and core.pop_actions() == []

    (start,) = starts(release(core, on_a100))
    assert start.gpu_type == "a100" and waiting.slot_id == start.slot_id
    core.kernel_ready(start.slot_id)
    assert waiting.state == GRANTED and waiting.gpu_type == "a100"


def test_a_fallback_behind_a_waiting_lease_still_takes_the_type_that_frees() -> None:
    # h100 and a100 both held; queue: h100, h100|a100, a100. When the a100 frees, the
    # fallback takes it: the lease ahead waits only for an h100.
    core, _ = make_pool("a100=1,h100=1", min_warm=0)
    on_a100 = hold(core, "bob", "a100")
    hold(core, "carol", "h100")
    first = request(core, "alice", "h100")
    fallback = request(core, "dave", "h100|a100")
    last = request(core, "erin", "a100")
    core.pop_actions()
    (start,) = starts(release(core, on_a100))
    assert fallback.slot_id == start.slot_id and start.gpu_type == "a100"
    assert first.state == QUEUED and last.state == QUEUED


def test_a_warm_kernel_of_a_matching_type_beats_one_still_starting() -> None:
    core, _ = make_pool("a100-40gb=2,a100-80gb=1", min_warm=1)
    warm_up(core)
    hold_first = request(core, "alice", "a100-40gb")  # takes the warm 40gb; its replacement starts
    assert hold_first.state == GRANTED
    core.pop_actions()
    lease = request(core, "bob", "a100")
    assert lease.state == GRANTED and lease.gpu_type == "a100-80gb"


def test_short_type_matches_a_longer_device_type() -> None:
    core, _ = make_pool("a100-80gb=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "a100")
    assert lease.state == GRANTED and lease.gpu_type == "a100-80gb"


def test_any_takes_a_gpu_type_but_never_a_cpu_kernel_when_gpus_exist() -> None:
    core, _ = make_pool("a100=1,cpu=2", min_warm=1)
    warm_up(core)
    first = request(core, "alice", "any")
    assert first.state == GRANTED and first.gpu_type == "a100"

    second = request(core, "bob", "any")
    assert second.state == QUEUED and second.slot_id is None  # waits for the a100, not a cpu kernel
    assert summary(core, "cpu")["queued"] == 0 and summary(core, "a100")["queued"] == 1


def test_any_takes_a_cpu_kernel_when_cpu_is_the_only_type() -> None:
    core, _ = make_pool("cpu=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "any")
    assert lease.state == GRANTED and lease.gpu_type == "cpu" and lease.gpu_indices == ()


def test_unknown_type_is_refused_with_the_types_offered() -> None:
    core, _ = make_pool("a100=2,h100=1")
    with pytest.raises(LeaseRequestError, match=r"'v100'.*a100, h100") as error:
        request(core, "alice", "v100")
    assert error.value.reason == "unknown_type"
    assert core.leases == {} and core.pop_actions() == []


def test_more_gpus_than_any_node_has_is_refused_with_the_maximum() -> None:
    core, _ = make_pool("a100=2,h100=1")
    with pytest.raises(LeaseRequestError, match="at most 2") as error:
        request(core, "alice", "a100:3")
    assert error.value.reason == "too_many_gpus"
    assert core.leases == {}


def test_a_fallback_that_fits_makes_an_oversized_choice_acceptable() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "h100:4|a100")
    assert lease.state == GRANTED and lease.gpu_type == "a100"


# --- the queue ------------------------------------------------------------------------------


def test_requests_queue_in_order_when_nothing_is_free() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    request(core, "alice", "a100")
    core.pop_actions()

    queued = [request(core, user, "a100") for user in ("bob", "carol", "dave")]
    assert [core.queue_position(lease) for lease in queued] == [1, 2, 3]
    assert all(lease.state == QUEUED for lease in queued)
    assert core.pop_actions() == []


def test_an_ended_lease_kernel_is_killed_and_the_head_of_the_queue_gets_a_fresh_one() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    first = request(core, "alice", "a100")
    old_slot = first.slot_id
    core.pop_actions()
    bob, carol = request(core, "bob", "a100"), request(core, "carol", "a100")

    core.end_lease(first.id, REASON_DELETED)
    actions = core.pop_actions()
    assert kills(actions) == [old_slot] and ended(actions) == {first.id: REASON_DELETED}
    assert starts(actions) == [] and bob.state == QUEUED  # the GPU is busy until the kill finished

    assert old_slot is not None
    core.kernel_stopped(old_slot)
    (start,) = starts(core.pop_actions())
    assert start.slot_id != old_slot and bob.slot_id == start.slot_id

    core.kernel_ready(start.slot_id)
    assert granted(core.pop_actions()) == [bob.id]
    assert carol.state == QUEUED and core.queue_position(carol) == 1


def test_a_late_ready_of_a_killed_kernel_grants_nothing() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    first = request(core, "alice", "a100")
    assert first.slot_id is not None
    waiting = request(core, "bob", "a100")
    core.end_lease(first.id, REASON_DELETED)
    core.pop_actions()

    core.kernel_ready(first.slot_id)
    assert core.pop_actions() == [] and waiting.state == QUEUED


def test_cancelling_a_queued_lease_moves_the_others_up() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    request(core, "alice", "a100")
    bob, carol, dave = (request(core, user, "a100") for user in ("bob", "carol", "dave"))
    core.pop_actions()

    returned = core.end_lease(carol.id, REASON_DELETED)
    assert returned is carol
    assert carol.state == RELEASED and carol.reason == REASON_CANCELLED
    assert ended(core.pop_actions()) == {carol.id: REASON_CANCELLED}
    assert core.queue_position(carol) == 0
    assert [core.queue_position(lease) for lease in (bob, dave)] == [1, 2]
    assert summary(core, "a100")["queued"] == 2


def test_ending_an_unknown_lease_changes_nothing() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    assert core.end_lease("nope", REASON_DELETED) is None
    assert core.pop_actions() == []


# --- per-user cap ---------------------------------------------------------------------------


def test_user_over_the_cap_waits_without_blocking_the_next_user() -> None:
    core, _ = make_pool("a100=2", min_warm=0, max_gpus_per_user=1)
    hold(core, "alice", "a100")

    extra = request(core, "alice", "a100")
    assert extra.state == QUEUED and extra.slot_id is None and core.pop_actions() == []

    other = request(core, "bob", "a100")
    assert [s.gpu_indices for s in starts(core.pop_actions())] == [(1,)] and other.slot_id is not None


def test_user_cap_counts_a_lease_whose_kernel_is_still_starting() -> None:
    core, _ = make_pool("a100=2", min_warm=0, max_gpus_per_user=1)
    first = request(core, "alice", "a100")
    assert first.slot_id is not None
    extra = request(core, "alice", "a100")
    assert extra.slot_id is None and len(starts(core.pop_actions())) == 1


def test_user_waiting_on_the_cap_is_placed_once_their_own_lease_ends() -> None:
    core, _ = make_pool("a100=2", min_warm=0, max_gpus_per_user=1)
    first = hold(core, "alice", "a100")
    extra = request(core, "alice", "a100")
    assert extra.slot_id is None

    (start,) = starts(release(core, first))
    assert extra.slot_id == start.slot_id


def test_request_above_the_cap_by_itself_is_refused() -> None:
    core, _ = make_pool("a100=2", min_warm=0, max_gpus_per_user=1)
    with pytest.raises(LeaseRequestError, match="max_gpus_per_user") as error:
        request(core, "alice", "a100:2")
    assert error.value.reason == "too_many_gpus"


def test_cap_skips_a_fallback_choice_that_would_exceed_it() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=0, max_gpus_per_user=1)
    lease = request(core, "alice", "a100:2|h100")
    assert lease.gpu_type == "h100" and lease.count == 1
    assert [s.gpu_type for s in starts(core.pop_actions())] == ["h100"]


# --- idle release and maximum duration ------------------------------------------------------


def test_idle_lease_is_released_at_its_timeout_not_before() -> None:
    core, clock = make_pool("a100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "a100", idle_timeout=10)
    core.pop_actions()

    clock.set(9)
    core.tick()
    assert core.pop_actions() == [] and lease.state == GRANTED

    clock.set(10)
    core.tick()
    actions = core.pop_actions()
    assert ended(actions) == {lease.id: REASON_IDLE} and kills(actions) == [lease.slot_id]


def test_busy_kernel_keeps_its_lease_past_the_idle_timeout() -> None:
    core, clock = make_pool("a100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "a100", idle_timeout=10)
    assert lease.slot_id is not None
    clock.set(5)
    core.kernel_activity(lease.slot_id, busy=True)

    clock.set(100)
    core.tick()
    assert lease.state == GRANTED and ended(core.pop_actions()) == {}


def test_idle_time_counts_from_the_end_of_execution() -> None:
    core, clock = make_pool("a100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "a100", idle_timeout=10)
    assert lease.slot_id is not None
    core.pop_actions()
    clock.set(5)
    core.kernel_activity(lease.slot_id, busy=True)
    clock.set(30)
    core.kernel_activity(lease.slot_id, busy=False)

    clock.set(39)
    core.tick()
    assert lease.state == GRANTED

    clock.set(40)
    core.tick()
    assert ended(core.pop_actions()) == {lease.id: REASON_IDLE}


def test_idle_timeout_above_the_policy_maximum_is_capped() -> None:
    core, clock = make_pool("a100=1", min_warm=1, max_idle_timeout=60)
    warm_up(core)
    lease = request(core, "alice", "a100", idle_timeout=10_000)
    assert lease.idle_timeout == 60

    clock.set(60)
    core.tick()
    assert lease.reason == REASON_IDLE


def test_default_idle_timeout_comes_from_the_policy() -> None:
    core, _ = make_pool("a100=1", min_warm=1, idle_timeout=42)
    warm_up(core)
    assert request(core, "alice", "a100").idle_timeout == 42


def test_non_positive_idle_timeout_is_refused() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    with pytest.raises(LeaseRequestError) as error:
        request(core, "alice", "a100", idle_timeout=0)
    assert error.value.reason == "bad_idle_timeout"


def test_maximum_duration_ends_even_a_busy_lease() -> None:
    core, clock = make_pool("a100=1", min_warm=1, max_lease_duration=100)
    warm_up(core)
    clock.set(50)
    lease = request(core, "alice", "a100")
    assert lease.slot_id is not None
    core.kernel_activity(lease.slot_id, busy=True)
    core.pop_actions()

    clock.set(149)
    core.tick()
    assert lease.state == GRANTED

    clock.set(150)
    core.tick()
    actions = core.pop_actions()
    assert ended(actions) == {lease.id: REASON_MAX_DURATION} and kills(actions) == [lease.slot_id]


# --- kernel failures --------------------------------------------------------------------------


def test_kernel_death_ends_the_lease_and_a_replacement_warm_kernel_starts() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    warm_up(core)
    lease = request(core, "alice", "a100")
    dead = lease.slot_id
    assert dead is not None
    core.pop_actions()

    core.kernel_died(dead)
    actions = core.pop_actions()
    assert ended(actions) == {lease.id: REASON_KERNEL_DIED}
    assert kills(actions) == []  # nothing left to kill
    (start,) = starts(actions)
    assert start.gpu_indices == (0,) and start.slot_id != dead


def test_death_of_a_warm_kernel_starts_a_replacement() -> None:
    core, _ = make_pool("a100=1", min_warm=1)
    (warm,) = warm_up(core)
    core.kernel_died(warm.slot_id)
    (start,) = starts(core.pop_actions())
    assert start.gpu_indices == (0,) and start.slot_id != warm.slot_id


def test_failed_start_keeps_the_lease_first_in_line_and_backs_off() -> None:
    core, clock = make_pool("a100=1", min_warm=0, start_failure_backoff=5)
    first = request(core, "alice", "a100")
    second = request(core, "bob", "a100")
    failed = first.slot_id
    assert failed is not None
    core.pop_actions()

    clock.set(1)
    core.kernel_failed(failed)
    assert core.pop_actions() == []  # no immediate retry: the backoff applies
    assert first.state == QUEUED and first.slot_id is None
    assert [core.queue_position(first), core.queue_position(second)] == [1, 2]

    clock.set(5.9)
    core.tick()
    assert core.pop_actions() == []

    clock.set(6)
    core.tick()
    (retry,) = starts(core.pop_actions())
    assert retry.slot_id != failed and first.slot_id == retry.slot_id
    core.kernel_ready(retry.slot_id)
    assert granted(core.pop_actions()) == [first.id] and second.state == QUEUED


def test_failed_warm_start_backs_off_before_the_next_warm_start() -> None:
    core, clock = make_pool("a100=1", min_warm=1, start_failure_backoff=5)
    core.tick()
    (start,) = starts(core.pop_actions())
    core.kernel_failed(start.slot_id)
    assert core.pop_actions() == []

    clock.set(5)
    core.tick()
    assert [s.gpu_indices for s in starts(core.pop_actions())] == [(0,)]


# --- shutdown ---------------------------------------------------------------------------------


def test_shutdown_ends_every_lease_and_kills_every_kernel() -> None:
    core, _ = make_pool("a100=2,h100=1", min_warm=1)
    warm_up(core)
    leases = [request(core, "alice", "a100"), request(core, "bob", "h100"), request(core, "carol", "h100")]
    assert [lease.state for lease in leases] == [GRANTED, GRANTED, QUEUED]
    core.pop_actions()
    live = set(core.slots)  # two leased kernels and the new a100 spare

    core.shutdown(REASON_GATEWAY_RESTART)
    actions = core.pop_actions()
    assert len(live) == 3 and sorted(kills(actions)) == sorted(live)
    assert ended(actions) == {lease.id: REASON_GATEWAY_RESTART for lease in leases}
    assert core.leases == {} and starts(actions) == [] and granted(actions) == []


def test_no_warm_kernel_starts_after_shutdown() -> None:
    core, clock = make_pool("a100=2,h100=1", min_warm=1)
    warm_up(core)
    request(core, "alice", "a100")
    core.pop_actions()
    core.shutdown(REASON_GATEWAY_RESTART)
    killed = kills(core.pop_actions())

    for slot_id in killed:
        core.kernel_stopped(slot_id)
    clock.set(1000)
    core.tick()
    assert core.pop_actions() == [] and core.slots == {}


# --- metering and estimates -------------------------------------------------------------------


def test_gpu_seconds_are_held_seconds_times_count() -> None:
    core, clock = make_pool("a100=2", min_warm=0)
    lease = request(core, "alice", "a100:2")
    assert lease.slot_id is not None
    clock.set(10)
    core.kernel_ready(lease.slot_id)  # metering starts at the grant, not at the request
    clock.set(40)
    core.end_lease(lease.id, REASON_DELETED)
    clock.set(100)
    assert lease.gpu_seconds(clock()) == 60


def test_cancelled_queued_lease_costs_nothing() -> None:
    core, clock = make_pool("a100=1", min_warm=1)
    warm_up(core)
    request(core, "alice", "a100")
    waiting = request(core, "bob", "a100:1")
    clock.set(30)
    core.end_lease(waiting.id, REASON_DELETED)
    assert waiting.gpu_seconds(clock()) == 0 and waiting.count == 0


def test_expected_wait_grows_with_queue_position() -> None:
    core, clock = make_pool("a100=2", min_warm=0)
    hold(core, "alice", "a100", idle_timeout=100)
    hold(core, "bob", "a100", idle_timeout=200)
    first, second = request(core, "carol", "a100"), request(core, "dave", "a100")

    clock.set(20)
    assert 0 < core.expected_wait(first) < core.expected_wait(second)
    assert core.expected_wait(first) == pytest.approx(80 + 2)  # alice goes idle, then a kernel start


def test_expected_wait_of_a_lease_whose_kernel_is_starting_is_the_start_time_left() -> None:
    core, clock = make_pool("a100=1", min_warm=0)
    lease = request(core, "alice", "a100")
    clock.set(0.5)
    assert core.expected_wait(lease) == pytest.approx(1.5)


# --- summaries --------------------------------------------------------------------------------


def test_summaries_count_total_free_warm_and_queued_per_type() -> None:
    core, _ = make_pool("a100=2,h100=1", emulated=True, min_warm=1)
    warm_up(core)
    request(core, "alice", "h100")
    request(core, "bob", "h100")
    core.pop_actions()

    assert summary(core, "a100") == {"total": 2, "free": 2, "warm": 1, "queued": 0, "emulated": True}
    assert summary(core, "h100") == {"total": 1, "free": 0, "warm": 0, "queued": 1, "emulated": True}


def test_summaries_say_real_gpus_are_not_emulated() -> None:
    core, _ = make_pool("a100=1")
    assert [r.emulated for r in core.summaries()] == [False]


# --- clocks ------------------------------------------------------------------------------------


def test_a_wall_clock_step_neither_expires_nor_stretches_a_lease() -> None:
    clock, wall = FakeClock(), FakeClock()
    wall.set(1_700_000_000)
    core = PoolCore(inventory("a100=2"), PoolPolicy(min_warm=0), clock, wall_clock=wall)
    lease = request(core, "alice", "a100", idle_timeout=600)
    assert lease.slot_id is not None
    core.kernel_ready(lease.slot_id)
    core.pop_actions()
    assert lease.granted_at == 1_700_000_000  # shown and metered in wall time

    wall.set(1_700_000_000 + 3600)  # NTP (or a resumed VM) jumps an hour ahead
    core.tick()
    assert lease.state == GRANTED and ended(core.pop_actions()) == {}
    assert core.idle_remaining(lease) == 600

    wall.set(1_700_000_000 - 3600)  # and back
    clock.set(600)
    core.tick()
    assert ended(core.pop_actions()) == {lease.id: REASON_IDLE}
    assert lease.released_at == 1_700_000_000 - 3600


# --- the indexes behind listings ---------------------------------------------------------------


def rescanned(core: PoolCore) -> dict[str, object]:
    """What the listings say, worked out the slow way: from every slot and lease."""
    queued = [core.leases[i] for i in core.queued_ids()]
    rows = {}
    for gpu_type in core.types:
        slots = [s for s in core.slots.values() if s.gpu_type == gpu_type]
        leased = sum(len(s.devices) for s in slots if s.lease_id is not None or s.state.value == "draining")
        warm = sum(1 for s in slots if s.lease_id is None and s.state.value == "warm")
        waiting = sum(1 for lease in queued if gpu_type in core._matching_types(lease.choices))
        rows[gpu_type] = (leased, warm, waiting)
    positions = {}
    for lease in queued:
        wanted = core._matching_types(lease.choices)
        ahead = queued[: queued.index(lease)]
        positions[lease.id] = 1 + sum(1 for other in ahead if wanted & core._matching_types(other.choices))
    users = {lease.user for lease in core.leases.values()}
    mine = {user: [lease.id for lease in core.leases.values() if lease.user == user] for user in users}
    return {"types": rows, "positions": positions, "mine": mine}


def indexed(core: PoolCore) -> dict[str, object]:
    rows = {r.gpu_type: (r.leased, r.warm, r.queued) for r in core.summaries()}
    positions = {i: core.queue_position(core.leases[i]) for i in core.queued_ids()}
    users = {lease.user for lease in core.leases.values()}
    return {"types": rows, "positions": positions, "mine": {u: [x.id for x in core.leases_of(u)] for u in users}}


def placement_rescanned(core: PoolCore) -> dict[str, object]:
    """Free GPUs per type and usable GPUs per node, worked out from every device and slot."""
    held = {key: slot for slot in core.slots.values() for key in slot.devices}
    free = {t: [k for k, d in core.devices.items() if d.gpu_type == t and d.healthy and k not in held]
            for t in core.types}
    usable: dict[tuple[str, str], int] = {}
    for key, device in core.devices.items():
        slot = held.get(key)
        if device.healthy and (slot is None or (slot.lease_id is None and slot.state.value != "draining")):
            usable[(device.gpu_type, device.node)] = usable.get((device.gpu_type, device.node), 0) + 1
    return {"free": free, "usable": {k: v for k, v in usable.items() if v}}


def placement_indexed(core: PoolCore) -> dict[str, object]:
    placement = core._placement
    free = {t: [d.key for d in placement.free_devices(t, 10**6)] for t in core.types}
    return {"free": free, "usable": {k: v for k, v in placement._usable.items() if v}}


def test_listings_from_the_indexes_match_a_rescan_through_a_random_day() -> None:
    import random

    rng = random.Random(7)
    core, clock = node_pool(node("n0", "a100", 4), node("n1", "h100", 2), node("n2", "l4", 2),
                            min_warm=1, max_gpus_per_user=3)
    specs = ["a100", "h100|a100", "l4", "a100:2", "any", "h100:2"]
    joined = itertools.count(3)
    for step in range(300):
        clock.set(step)
        roll = rng.random()
        starting = [s for s in core.slots.values() if s.start_requested and s.state.value == "starting"]
        draining = [s for s in core.slots.values() if s.state.value == "draining" and s.start_requested]
        nodes = sorted({d.node for d in core.devices.values()})
        if roll < 0.3:
            try:
                request(core, f"user{rng.randrange(4)}", rng.choice(specs), idle_timeout=rng.choice([5, 30]))
            except LeaseRequestError as refused:
                assert refused.reason in ("no_capacity", "too_many_gpus")  # the nodes of a type left
        elif roll < 0.5 and starting:
            core.kernel_ready(rng.choice(starting).id)
        elif roll < 0.65 and draining:
            core.kernel_stopped(rng.choice(draining).id)
        elif roll < 0.72 and core.leases:
            core.end_lease(rng.choice(sorted(core.leases)), REASON_DELETED)
        elif roll < 0.75 and core.slots:
            core.kernel_died(rng.choice(sorted(core.slots)))
        elif roll < 0.79:
            core.add_devices(node(f"n{next(joined)}", rng.choice(["a100", "h100", "l4"]), rng.choice([1, 2, 4])))
        elif roll < 0.82 and nodes:
            core.remove_node(rng.choice(nodes))
        elif roll < 0.87 and core.devices:
            core.set_device_health(rng.choice(sorted(core.devices)), rng.random() < 0.5)
        else:
            core.tick()
        core.pop_actions()
        assert indexed(core) == rescanned(core), f"step {step}"
        assert placement_indexed(core) == placement_rescanned(core), f"step {step}"


def test_an_empty_pool_summarises_nothing_and_refuses_requests_as_no_capacity() -> None:
    core = PoolCore([], PoolPolicy(), FakeClock())
    core.tick()
    assert core.summaries() == [] and core.pop_actions() == []
    with pytest.raises(LeaseRequestError, match="no GPU type") as refused:
        request(core, "alice", "any")
    assert refused.value.reason == NO_CAPACITY


def test_events_carry_the_lease_as_it_was_at_the_event() -> None:
    import dataclasses

    core, clock = make_pool("a100=1", min_warm=0)
    lease = request(core, "alice", "a100")
    assert lease.slot_id is not None
    clock.set(5)
    core.kernel_ready(lease.slot_id)
    grant = next(a for a in core.pop_actions() if isinstance(a, LeaseGranted))
    clock.set(9)
    core.end_lease(lease.id, REASON_DELETED)
    end = next(a for a in core.pop_actions() if isinstance(a, LeaseEnded))

    # A listener that looks at the grant later still sees the grant, not the ended lease.
    assert (grant.lease.state, grant.lease.reason, grant.lease.released_at) == (GRANTED, None, None)
    assert (end.lease.state, end.lease.reason, end.lease.released_at) == (RELEASED, REASON_DELETED, 9)
    assert grant.lease.gpu_seconds(100) == 95 and end.lease.gpu_seconds(100) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        grant.lease.state = RELEASED  # type: ignore[misc]


def test_a_snapshot_has_exactly_the_fields_of_a_lease() -> None:
    import dataclasses

    from pool_manager.model import LeaseSnapshot

    assert [f.name for f in dataclasses.fields(LeaseSnapshot)] == [f.name for f in dataclasses.fields(Lease)]
    lease = Lease("l1", "alice", tuple(parse_gpu_spec("a100")), 10.0, 5.0)
    assert dataclasses.asdict(lease.snapshot()) == dataclasses.asdict(lease)


# --- membership: nodes join and leave, devices fail ----------------------------------------------


def node(name: str, gpu_type: str, count: int, first_index: int = 0) -> list[Device]:
    return [
        Device(f"{name}-{i}", gpu_type, first_index + i, f"NVIDIA {gpu_type.upper()}", 81920, True, name)
        for i in range(count)
    ]


def node_pool(*nodes: list[Device], **policy: Any) -> tuple[PoolCore, FakeClock]:
    clock = FakeClock()
    ids = itertools.count(1)
    devices = [device for devices in nodes for device in devices]
    return PoolCore(devices, PoolPolicy(**policy), clock, new_id=lambda: f"id{next(ids)}"), clock


def test_a_joining_node_takes_the_queue_and_brings_its_type() -> None:
    core, _ = node_pool(node("n1", "a100", 1), min_warm=0)
    hold(core, "alice", "a100")
    waiting = request(core, "bob", "a100")
    any_gpu = request(core, "carol", "any")
    with pytest.raises(LeaseRequestError, match="unknown GPU type 'h100'"):
        request(core, "dave", "h100")
    assert core.pop_actions() == []

    core.add_devices(node("n2", "a100", 1) + node("n3", "h100", 1))
    started = {s.node: s for s in starts(core.pop_actions())}
    assert core.types == ["a100", "h100"]
    assert waiting.slot_id == started["n2"].slot_id
    assert any_gpu.slot_id == started["n3"].slot_id  # "any" now matches the type that joined
    assert summary(core, "h100")["total"] == 1
    request(core, "dave", "h100")  # offered now: queued, not refused


def test_a_joining_node_gets_its_warm_kernels() -> None:
    core, _ = node_pool(node("n1", "a100", 1), min_warm=1)
    warm_up(core)
    core.add_devices(node("n2", "l4", 2))
    assert [(s.gpu_type, s.node) for s in starts(core.pop_actions())] == [("l4", "n2")]


def test_a_lost_node_ends_its_leases_and_its_waiting_lease_is_placed_elsewhere() -> None:
    core, _ = node_pool(node("n1", "a100", 2), node("n2", "a100", 1), min_warm=0)
    on_n1 = hold(core, "alice", "a100")
    second = hold(core, "bob", "a100")
    assert {core.slots[x.slot_id or ""].node for x in (on_n1, second)} == {"n1"}
    starting = request(core, "carol", "a100")  # a kernel starts for it on n2
    first_slot = starting.slot_id
    assert first_slot is not None and core.slots[first_slot].node == "n2"
    queued = request(core, "dave", "a100")
    core.pop_actions()

    ended_leases = core.remove_node("n2")
    actions = core.pop_actions()
    assert ended_leases == []  # nothing was granted there
    assert kills(actions) == [first_slot]  # the backend drops what it started there
    assert starting.state == QUEUED and starting.slot_id is None
    assert core.queued_ids() == [starting.id, queued.id]  # carol keeps her place ahead of dave

    lost = core.remove_node("n1", REASON_NODE_LOST)
    actions = core.pop_actions()
    assert {x.id for x in lost} == {on_n1.id, second.id}
    assert ended(actions) == {on_n1.id: REASON_NODE_LOST, second.id: REASON_NODE_LOST}
    assert sorted(kills(actions)) == sorted([on_n1.slot_id, second.slot_id])
    assert starts(actions) == [] and core.slots == {}
    assert summary(core, "a100") == {"total": 0, "free": 0, "warm": 0, "queued": 2, "emulated": False}

    core.add_devices(node("n3", "a100", 1))  # a replacement joins: the first in line gets it
    assert [s.node for s in starts(core.pop_actions())] == ["n3"] and starting.slot_id is not None


def test_a_lost_node_never_starts_the_multi_gpu_kernel_that_waited_there() -> None:
    core, _ = node_pool(node("n1", "a100", 2), node("n2", "a100", 2), min_warm=1)
    warm_up(core)
    big = request(core, "alice", "a100:2")  # preempts the warm kernel on n1, waits for it to stop
    assert big.slot_id is not None and core.slots[big.slot_id].waiting_for
    core.pop_actions()
    core.remove_node("n1")
    actions = core.pop_actions()
    assert all(s.node == "n2" for s in starts(actions))
    assert big.state == QUEUED and (big.slot_id is None or core.slots[big.slot_id].node == "n2")


def test_an_unhealthy_device_gets_no_kernel_and_its_spare_is_killed() -> None:
    core, _ = node_pool(node("n1", "a100", 2), min_warm=1)
    (warm,) = warm_up(core)
    key = core.slots[warm.slot_id].devices[0]
    core.set_device_health(key, False)
    actions = core.pop_actions()
    assert kills(actions) == [warm.slot_id]
    assert [s.gpu_indices for s in starts(actions)] == [(1,)]  # the replacement goes to the healthy GPU
    core.kernel_stopped(warm.slot_id)
    assert summary(core, "a100")["total"] == 1

    core.set_device_health(key, True)
    assert summary(core, "a100")["total"] == 2
    held = hold(core, "alice", "a100:2")
    assert held.count == 2


def test_an_unhealthy_device_under_a_lease_keeps_the_lease_running() -> None:
    core, _ = node_pool(node("n1", "a100", 1), min_warm=0)
    lease = hold(core, "alice", "a100")
    core.set_device_health("n1-0", False)
    assert core.pop_actions() == [] and lease.state == GRANTED
    release(core, lease)
    assert core.pop_actions() == [] and summary(core, "a100")["total"] == 0


def test_a_device_that_joins_twice_is_refused_by_name() -> None:
    core, _ = node_pool(node("n1", "a100", 1))
    with pytest.raises(ValueError, match="n1-0"):
        core.add_devices(node("n1", "a100", 1))


def test_next_deadline_is_the_earliest_idle_end_or_backoff() -> None:
    core, clock = node_pool(node("n1", "a100", 2), min_warm=0, start_failure_backoff=5)
    assert core.next_deadline() is None
    lease = hold(core, "alice", "a100", idle_timeout=30)
    assert core.next_deadline() == 30
    assert lease.slot_id is not None
    clock.set(10)
    core.kernel_activity(lease.slot_id, busy=True)
    assert core.next_deadline() is None  # a busy kernel keeps its lease: nothing is due
    core.kernel_activity(lease.slot_id, busy=False)
    assert core.next_deadline() == 40
    failing = request(core, "bob", "a100")
    assert failing.slot_id is not None
    core.kernel_failed(failing.slot_id)
    assert core.next_deadline() == 15  # the backoff of the failed start ends first
    clock.set(15)
    core.tick()
    assert core.next_deadline() == 40


# --- kernel ids -------------------------------------------------------------------------------------


def test_each_kernel_start_gets_its_own_kernel_id_apart_from_the_slot() -> None:
    core, _ = make_pool("a100=1", min_warm=0)
    lease = request(core, "alice", "a100")
    (start,) = starts(core.pop_actions())
    assert start.kernel_id != start.slot_id
    assert core.lease_for_kernel(start.kernel_id) is lease and core.slot_for_kernel(start.kernel_id) == start.slot_id
    core.kernel_ready(start.slot_id)
    assert lease.kernel_id == start.kernel_id  # what the API reports and the backend keys by

    core.end_lease(lease.id, REASON_DELETED)
    (kill,) = [a for a in core.pop_actions() if isinstance(a, KillKernel)]
    assert (kill.slot_id, kill.kernel_id) == (start.slot_id, start.kernel_id)
    core.kernel_stopped(kill.slot_id)
    assert core.lease_for_kernel(start.kernel_id) is None and core.slot_for_kernel(start.kernel_id) is None

    second = request(core, "bob", "a100")
    (restart,) = starts(core.pop_actions())
    assert restart.kernel_id not in (start.kernel_id, start.slot_id)  # kernels are never reused
    assert core.lease_for_kernel(restart.kernel_id) is second
