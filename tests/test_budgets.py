"""Budgets in the pool's sans-I/O core, on a fake clock: requests refused past a budget, running
leases warned at 90% and ended at 100% with reason ``budget``, groups sharing one budget, resets
at the day's and the month's turn, and budgets changed while leases run."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from jupyter_gpu.protocol import GRANTED, REASON_BUDGET, REASON_DELETED, RELEASED, parse_gpu_spec
from pool_manager.admission import Admission
from pool_manager.budgets import BudgetConfig, BudgetPolicy, Limits, Scope
from pool_manager.core import LeaseRequestError, PoolCore, PoolPolicy
from pool_manager.model import Lease, LeaseEnded, LeaseNoticed
from tests.test_pool_core import FakeClock, inventory

#: Sunday 2026-11-29 10:00 UTC
T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC).timestamp()
PRICES = {"a100": 4.0, "h100": 8.0, "cpu": 0.0}


def make_pool(users: dict[str, Any] | None = None, groups: dict[str, Any] | None = None,
              default: dict[str, Any] | None = None, spec: str = "a100=4,h100=1",
              start: float = T0) -> tuple[PoolCore, FakeClock]:
    clock = FakeClock()
    clock.set(start)
    ids = itertools.count(1)
    policy = BudgetPolicy(BudgetConfig.parse(users or {}, groups or {}, default or {}), price=PRICES.__getitem__)
    # idle timeouts longer than any test: only budgets end leases here
    core = PoolCore(inventory(spec), PoolPolicy(min_warm=0, max_idle_timeout=10**7), clock,
                    new_id=lambda: f"id{next(ids)}", admission=Admission(budgets=policy))
    return core, clock


def hold(core: PoolCore, user: str, spec: str = "a100", groups: tuple[str, ...] = ()) -> Lease:
    lease = core.request_lease(user, parse_gpu_spec(spec), idle_timeout=10**6, groups=groups)
    assert lease.slot_id is not None
    core.kernel_ready(lease.slot_id)
    assert lease.state == GRANTED
    core.pop_actions()
    return lease


def refusal(core: PoolCore, user: str, spec: str = "a100", groups: tuple[str, ...] = ()) -> str:
    with pytest.raises(LeaseRequestError) as caught:
        core.request_lease(user, parse_gpu_spec(spec), groups=groups)
    assert caught.value.reason == REASON_BUDGET
    return str(caught.value)


def run_until_deadline(core: PoolCore, clock: FakeClock) -> tuple[list[str], dict[str, str | None]]:
    """Move the clock to the core's next deadline and tick: (warnings, lease id -> end reason)."""
    deadline = core.next_deadline()
    assert deadline is not None
    clock.set(deadline)
    core.tick()
    actions = core.pop_actions()
    warnings = [f"{a.lease.id}: {a.notice.text}" for a in actions
                if isinstance(a, LeaseNoticed) and a.notice.kind == REASON_BUDGET]
    return warnings, {a.lease.id: a.lease.reason for a in actions if isinstance(a, LeaseEnded)}


def test_a_running_lease_is_warned_at_90_percent_and_ended_at_100_with_reason_budget() -> None:
    core, clock = make_pool(users={"alice": {"gpu_hours_per_day": 1}})
    lease = hold(core, "alice")

    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(3240)  # 0.9 GPU-hours
    assert ends == {}
    assert warnings == [f"{lease.id}: user alice has used 90% of budget gpu_hours_per_day: 0.90 of 1.00 GPU-hours "
                        "used today (UTC). It runs out at this rate at 2026-11-29 11:00 UTC; then its leases end, "
                        "keeping their variables"]
    # a lease notice, which the magic prints before the notebook's next cell, saying when the end comes
    assert [n.when for n in lease.notices] == [pytest.approx(T0 + 3600)]

    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(3600)
    assert warnings == []  # warned once
    assert ends == {lease.id: REASON_BUDGET}
    assert lease.state == RELEASED
    assert "budget gpu_hours_per_day of user alice is used up (1.00 of 1.00 GPU-hours used today (UTC))" in \
        lease.reason_message
    assert "resets at 2026-11-30 00:00 UTC" in lease.reason_message
    assert core.next_deadline() is None  # nothing runs: nothing more to do


def test_a_request_past_a_used_up_budget_is_refused_naming_it_the_usage_and_the_reset() -> None:
    core, clock = make_pool(users={"alice": {"gpu_hours_per_day": 1}})
    hold(core, "alice")
    run_until_deadline(core, clock)
    run_until_deadline(core, clock)

    message = refusal(core, "alice")
    assert message == ("budget gpu_hours_per_day of user alice is used up: 1.00 of 1.00 GPU-hours used today (UTC); "
                       "it resets at 2026-11-30 00:00 UTC (ask the operator to raise c.Budgets.users['alice'])")
    assert hold(core, "bob").state == GRANTED  # no budget of bob's is touched

    clock.set(datetime(2026, 11, 30, 0, 0, tzinfo=UTC).timestamp())  # the day turns
    assert hold(core, "alice").state == GRANTED


def test_gpus_at_once_count_held_and_queued_leases_and_free_as_leases_end() -> None:
    core, _ = make_pool(default={"gpus": 2}, spec="a100=1")
    first = hold(core, "alice")
    queued = core.request_lease("alice", parse_gpu_spec("a100"))  # the only a100 is taken: it waits
    assert queued.state != GRANTED

    assert refusal(core, "alice") == (
        "budget gpus of user alice does not allow 1 more: 2 of 2 GPUs held or waited for; it frees as leases end "
        "(%gpu release) (ask the operator to raise c.Budgets.users['alice'])")
    with pytest.raises(LeaseRequestError, match="no node has more than 1"):  # too big for any node: said first
        core.request_lease("alice", parse_gpu_spec("a100:2"))
    core.end_lease(first.id, REASON_DELETED)
    core.end_lease(queued.id, REASON_DELETED)
    assert core.request_lease("alice", parse_gpu_spec("a100")).user == "alice"


def test_a_fallback_to_more_gpus_cannot_take_more_than_the_gpus_budget() -> None:
    """The pool tries choices in order: a small last choice must not let a large first one past the cap."""
    core, _ = make_pool(users={"alice": {"gpus": 2}}, spec="a100=4")
    assert refusal(core, "alice", "a100:4|a100") == (
        "budget gpus of user alice does not allow 4 more (a request counts its largest choice): 0 of 2 GPUs held or "
        "waited for; it frees as leases end (%gpu release) (ask the operator to raise c.Budgets.users['alice'])")
    assert "does not allow 3 more" in refusal(core, "alice", "h100|a100:3")  # a type the pool lacks changes nothing
    # one that fits holds its largest choice while it waits, so a second cannot add to it
    busy = hold(core, "bob", "a100:4")
    waiting = core.request_lease("alice", parse_gpu_spec("a100:2|a100"))
    assert "does not allow 1 more: 2 of 2 GPUs" in refusal(core, "alice")
    core.end_lease(busy.id, REASON_DELETED)
    assert busy.slot_id is not None
    core.kernel_stopped(busy.slot_id)  # its GPUs come free once its kernel is gone
    assert waiting.slot_id is not None
    core.kernel_ready(waiting.slot_id)
    assert waiting.state == GRANTED and waiting.count == 2


def test_a_group_budget_is_shared_by_its_members_and_ends_all_their_leases() -> None:
    core, clock = make_pool(groups={"physics": {"gpu_hours_per_day": 1, "members": ["alice"]}})
    alice = hold(core, "alice")  # a member by the budget config
    bob = hold(core, "bob", groups=("physics",))  # a member by his identity (a Hub group)
    carol = hold(core, "carol", groups=("chemistry",))

    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(1620)  # two GPUs together: 0.9 GPU-hours in 27 min
    assert sorted(w.split(":")[0] for w in warnings) == sorted([alice.id, bob.id])
    assert all("group physics has used 90% of budget gpu_hours_per_day" in w for w in warnings)

    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(1800)
    assert ends == {alice.id: REASON_BUDGET, bob.id: REASON_BUDGET}
    assert carol.state == GRANTED
    assert "budget gpu_hours_per_day of group physics is used up" in refusal(core, "bob", groups=("physics",))
    assert "c.Budgets.groups['physics']" in refusal(core, "alice")


def test_money_per_month_counts_each_type_at_its_price_and_resets_with_the_month() -> None:
    core, clock = make_pool(users={"alice": {"money_per_month": 10}})
    a100 = hold(core, "alice", "a100")  # $4 an hour
    h100 = hold(core, "alice", "h100")  # $8 an hour: $12 an hour together, $10 in 50 min

    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(2700)
    assert "$9.00 of $10.00 used this month (UTC)" in warnings[0]
    warnings, ends = run_until_deadline(core, clock)
    assert clock.now - T0 == pytest.approx(3000)
    assert ends == {a100.id: REASON_BUDGET, h100.id: REASON_BUDGET}
    assert refusal(core, "alice").endswith("it resets at 2026-12-01 00:00 UTC "
                                           "(ask the operator to raise c.Budgets.users['alice'])")
    clock.set(datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp())
    assert hold(core, "alice").state == GRANTED


def test_a_lease_running_across_midnight_counts_only_todays_hours_after_it() -> None:
    start = datetime(2026, 11, 29, 23, 30, tzinfo=UTC).timestamp()
    core, clock = make_pool(users={"alice": {"gpu_hours_per_day": 1}}, start=start)
    lease = hold(core, "alice")
    assert core.next_deadline() == pytest.approx(start + 1800)  # the day turns before 0.9 h: look again then
    run_until_deadline(core, clock)
    warnings, ends = run_until_deadline(core, clock)
    # the half hour before midnight counts for the 29th; 0.9 h of the 30th is at 00:54
    assert clock.now == pytest.approx(datetime(2026, 11, 30, 0, 54, tzinfo=UTC).timestamp())
    assert [w.split(":")[0] for w in warnings] == [lease.id] and ends == {}


def test_a_budget_lowered_while_a_lease_runs_applies_at_once_and_a_raised_one_lets_requests_in() -> None:
    core, clock = make_pool(users={"alice": {"gpu_hours_per_day": 10}})
    lease = hold(core, "alice")
    clock.set(T0 + 1800)
    core.tick()
    assert core.pop_actions() == []

    core.configure_budgets(BudgetConfig.parse({"alice": {"gpu_hours_per_day": 0.5}}, {}, {}))
    assert {a.lease.id: a.lease.reason for a in core.pop_actions() if isinstance(a, LeaseEnded)} == {
        lease.id: REASON_BUDGET}
    refusal(core, "alice")
    core.configure_budgets(BudgetConfig.parse({"alice": {"gpu_hours_per_day": 2}}, {}, {}))
    assert hold(core, "alice").state == GRANTED


def test_usage_from_before_a_restart_counts_and_last_months_does_not() -> None:
    core, _ = make_pool(groups={"physics": {"money_per_month": 20}})
    policy = core.admission.budgets
    assert policy is not None
    policy.load("bob", {"physics"}, "a100", 1, 4.0, T0 - 5 * 3600, T0)  # $20 this month
    policy.load("bob", {"physics"}, "a100", 1, 4.0, T0 - 40 * 86400, T0 - 39 * 86400)  # October
    assert "$20.00 of $20.00 used this month" in refusal(core, "alice", groups=("physics",))
    standings = {s.budget: s.public() for s in policy.standings("alice", {"physics"}, T0)}
    assert standings["money_per_month"]["used"] == pytest.approx(20.0)
    assert standings["money_per_month"]["left"] == 0


def test_a_cancelled_request_and_a_queued_one_cost_nothing() -> None:
    core, clock = make_pool(users={"alice": {"gpu_hours_per_day": 1}}, spec="a100=1")
    hold(core, "bob")
    waiting = core.request_lease("alice", parse_gpu_spec("a100"))
    clock.set(T0 + 7200)
    core.tick()
    core.end_lease(waiting.id, REASON_DELETED)
    policy = core.admission.budgets
    assert policy is not None
    assert [s.used for s in policy.standings("alice", (), clock.now)] == [0.0]


@pytest.mark.parametrize(("users", "groups", "default", "error"), [
    ({"alice": {"gpu": 1}}, {}, {}, "Budgets.users['alice'] has unknown key(s) 'gpu'"),
    ({"alice": {"gpus": 1.5}}, {}, {}, "Budgets.users['alice']['gpus'] must be a whole number of GPUs"),
    ({}, {"lab": {"gpu_hours_per_day": -1}}, {}, "Budgets.groups['lab']['gpu_hours_per_day'] must be a number >= 0"),
    ({}, {"lab": {"members": "alice"}}, {}, "Budgets.groups['lab']['members'] must be a list of user names"),
    ({}, {}, 5, "Budgets.default must be a dict"),
    ({"alice": {"members": ["bob"]}}, {}, {}, "only a group has members"),
])
def test_a_bad_budget_config_is_refused_naming_the_entry(users: Any, groups: Any, default: Any, error: str) -> None:
    with pytest.raises(ValueError) as caught:
        BudgetConfig.parse(users, groups, default)
    assert error in str(caught.value)


def test_limits_parse_keeps_none_as_no_limit() -> None:
    assert Limits.parse("x", {"gpus": 2, "money_per_month": None}) == Limits(gpus=2)


def test_cpu_kernels_are_no_gpus_and_cost_only_their_price() -> None:
    core, clock = make_pool(users={"alice": {"gpus": 1, "gpu_hours_per_day": 1, "money_per_month": 1}},
                            spec="a100=1,cpu=3")
    hold(core, "alice", "cpu")
    hold(core, "alice", "cpu")  # two CPU kernels, no GPU: the cap of one GPU is not touched
    gpu = hold(core, "alice", "a100")
    clock.set(T0 + 900)  # $1 of a100 time at $4 an hour
    core.tick()
    assert {a.lease.id: a.lease.reason for a in core.pop_actions() if isinstance(a, LeaseEnded)} == {
        gpu.id: REASON_BUDGET}
    assert hold(core, "alice", "cpu").state == GRANTED  # free CPU kernels stay allowed
    assert "budget money_per_month of user alice is used up" in refusal(core, "alice", "a100")


def test_ended_leases_add_up_by_day_and_by_month_across_midnight() -> None:
    start = datetime(2026, 11, 29, 23, 0, tzinfo=UTC).timestamp()
    core, clock = make_pool(groups={"lab": {"gpu_hours_per_day": 100, "money_per_month": 1000}}, start=start)
    for _ in range(40):  # 40 leases of 3 min each, one after the other: 1 h before midnight, 1 h after
        lease = hold(core, "ana", "a100", groups=("lab",))
        clock.set(clock.now + 180)
        core.end_lease(lease.id, REASON_DELETED)
        assert lease.slot_id is not None
        core.kernel_stopped(lease.slot_id)
    policy = core.admission.budgets
    assert policy is not None
    standings = {s.budget: s.public() for s in policy.standings("bo", {"lab"}, clock.now)}
    assert standings["gpu_hours_per_day"]["used"] == pytest.approx(1.0)  # only the hour after midnight
    assert standings["money_per_month"]["used"] == pytest.approx(8.0)  # $4 an hour: both hours, the same month


def test_budgets_of_different_scopes_come_due_each_at_its_own_time() -> None:
    core, clock = make_pool(users={"ana": {"gpu_hours_per_day": 1}, "bo": {"gpu_hours_per_day": 2}},
                            groups={"lab": {"gpu_hours_per_day": 10, "members": ["ana", "bo"]}})
    ana, bo = hold(core, "ana"), hold(core, "bo")
    seen = []
    while (deadline := core.next_deadline()) is not None:
        warnings, ends = run_until_deadline(core, clock)
        seen += [(round((clock.now - T0) / 60), w.split(":")[0], "warned") for w in warnings]
        seen += [(round((clock.now - T0) / 60), lease_id, reason) for lease_id, reason in ends.items()]
        assert clock.now == pytest.approx(deadline)
    # the group's 10 hours are never near: each user's own budget ends their lease
    assert seen == [(54, ana.id, "warned"), (60, ana.id, REASON_BUDGET), (108, bo.id, "warned"),
                    (120, bo.id, REASON_BUDGET)]


def test_a_group_lease_that_ends_slows_the_groups_clock_for_the_others() -> None:
    core, clock = make_pool(groups={"lab": {"gpu_hours_per_day": 1, "members": ["ana", "bo"]}})
    ana, bo = hold(core, "ana"), hold(core, "bo")
    assert core.next_deadline() == pytest.approx(T0 + 27 * 60)  # two GPUs: 0.9 h in 27 min
    clock.set(T0 + 10 * 60)
    core.end_lease(bo.id, REASON_DELETED)  # 20 GPU-minutes used; ana alone from here
    assert core.next_deadline() == pytest.approx(T0 + 44 * 60)  # 34 more minutes to 54
    warnings, _ = run_until_deadline(core, clock)
    assert [w.split(":")[0] for w in warnings] == [ana.id]
    _, ends = run_until_deadline(core, clock)
    assert clock.now == pytest.approx(T0 + 50 * 60) and ends == {ana.id: REASON_BUDGET}


class EveryScope(BudgetPolicy):
    """The plain version: every scope with a running lease worked out afresh at every question."""

    def next_due(self, now: float) -> float | None:
        if self.config.empty:
            return None
        times = [self._scope_due(scope, limits, list(running.values()), now)
                 for scope, (limits, running) in self._running_index().items()]
        return min((when for when in times if when is not None), default=None)

    def _scopes_due(self, horizon: float) -> list[Scope]:
        due = [scope for scope, (limits, running) in self._running_index().items()
               if (when := self._scope_due(scope, limits, list(running.values()), horizon)) is not None
               and when <= horizon]
        return sorted(due, key=lambda scope: (scope.kind != "user", scope.name))


def test_next_due_and_due_say_what_the_plain_version_working_out_every_scope_says() -> None:
    """Budgets work out again only the scopes that changed; two random days and more of leases
    starting and ending (budgets changed twice on the way) gets the same answers as working out
    every scope at every question."""
    users = {"u0": {"gpu_hours_per_day": 0.01}, "u1": {"money_per_month": 30}, "u2": {"gpus": 2}}
    groups = {"g0": {"gpu_hours_per_day": 0.03, "members": ["u3"]}, "g1": {"money_per_month": 60}}
    configs = [BudgetConfig.parse(users, groups, {"gpu_hours_per_day": 0.05}),
               BudgetConfig.parse({**users, "u4": {"money_per_month": 10}}, groups, {}),
               BudgetConfig.parse(users, {"g1": {"gpu_hours_per_day": 0.02}}, {"money_per_month": 20})]
    quick, plain = BudgetPolicy(configs[0], PRICES.__getitem__), EveryScope(configs[0], PRICES.__getitem__)
    both = (quick, plain)
    rng = random.Random(20261129)
    now, running, ids, looked = T0, [], itertools.count(), 0
    for step in range(600):
        roll = rng.random()
        if roll < 0.3:
            lease_id, gpu_type = f"l{next(ids)}", rng.choice(["a100", "h100", "cpu"])
            user, in_groups = f"u{rng.randrange(6)}", [g for g in ("g0", "g1") if rng.random() < 0.4]
            choices = parse_gpu_spec(f"{gpu_type}:{rng.randint(1, 2)}")
            for policy in both:
                policy.requested(lease_id, user, choices, in_groups)
                policy.granted(lease_id, choices[0].count, gpu_type, now)
            running.append(lease_id)
        elif roll < 0.45 and running:
            lease_id = running.pop(rng.randrange(len(running)))
            for policy in both:
                policy.ended(lease_id, now)
        elif step in (200, 400):
            for policy in both:
                policy.configure(configs[step // 200])
        else:
            soonest = quick.next_due(now)
            now = soonest if soonest is not None and soonest > now and rng.random() < 0.6 else now + rng.uniform(1, 900)
        told = [policy.next_due(now) for policy in both]
        assert (told[0] is None) == (told[1] is None), (step, told)
        if told[0] is not None and told[1] is not None:  # both "now" when something is due already
            assert max(told[0], now) == pytest.approx(max(told[1], now), abs=1e-3), step
        (quick_warnings, quick_ends), (plain_warnings, plain_ends) = (policy.due(now) for policy in both)
        assert [(w.lease_id, w.message) for w in quick_warnings] == [(w.lease_id, w.message) for w in plain_warnings]
        assert [(o.lease_id, o.message) for o in quick_ends] == [(o.lease_id, o.message) for o in plain_ends]
        looked += len(quick_warnings) + len(quick_ends)
        for overrun in quick_ends:  # the core ends them
            running.remove(overrun.lease_id)
            for policy in both:
                policy.ended(overrun.lease_id, now)
    assert now - T0 > 86400 and looked > 20  # it went past midnight, and budgets had things to say
