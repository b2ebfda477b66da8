"""What budgets cost the pool core per lease: request, grant, a cell's busy and idle, release.

The core alone on a fake clock, 200 leases held at any time by 50 users who are all in one
group, three ways: no budgets (the trace simulator's case), budgets configured but empty (a
gateway nobody set budgets on), and a default user budget plus a group budget that every
lease counts against (the group is the costly case: each grant and release looks at all its
leases). Prints microseconds per lease, the best of three runs.

    python benchmarks/budget_cost.py
"""

from __future__ import annotations

import itertools
import time

from jupyter_gpu.protocol import REASON_DELETED, parse_gpu_spec
from pool_manager.admission import Admission
from pool_manager.budgets import BudgetConfig, BudgetPolicy
from pool_manager.core import PoolCore, PoolPolicy
from pool_manager.model import Device

LEASES, USERS, HELD = 4000, 50, 200


def per_lease_us(budgets: BudgetPolicy | None) -> float:
    clock = [1.79e9]
    ids = itertools.count()
    devices = [Device(f"d{i}", "a100", i, "A100", 1) for i in range(HELD + 50)]
    core = PoolCore(devices, PoolPolicy(min_warm=0, max_idle_timeout=1e9), lambda: clock[0],
                    new_id=lambda: f"i{next(ids)}", admission=Admission(budgets=budgets))
    spec = parse_gpu_spec("a100")
    held = []
    began = time.perf_counter()
    for n in range(LEASES):
        clock[0] += 1.0
        lease = core.request_lease(f"u{n % USERS}", spec, idle_timeout=1e8, groups=("lab",))
        assert lease.slot_id is not None
        core.kernel_ready(lease.slot_id)
        for busy in (True, False):  # a cell: the pool asks for its next deadline after each
            core.kernel_activity(lease.slot_id, busy)
            core.next_deadline()
        held.append(lease)
        if len(held) > HELD:
            old = held.pop(0)
            slot = old.slot_id
            assert slot is not None
            core.end_lease(old.id, REASON_DELETED)
            core.kernel_stopped(slot)
        core.pop_actions()
    return (time.perf_counter() - began) / LEASES * 1e6


def main() -> None:
    configured = BudgetConfig.parse({}, {"lab": {"gpu_hours_per_day": 1e6, "money_per_month": 1e9}},
                                    {"gpus": 1000, "gpu_hours_per_day": 1e6})
    for name, make in (("no budgets", lambda: None), ("budgets configured, none set", BudgetPolicy),
                       ("a user and a group budget", lambda: BudgetPolicy(configured, price=lambda _: 4.0))):
        print(f"{name:<30} {min(per_lease_us(make()) for _ in range(3)):8.1f} us per lease ({HELD} held)")


if __name__ == "__main__":
    main()
