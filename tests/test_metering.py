"""MeteringStore against a real SQLite file: lifecycle, persistence, crash recovery, per-user isolation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from jupyter_gpu.protocol import GRANTED, QUEUED, REASON_DELETED, REASON_GATEWAY_RESTART, RELEASED, GpuChoice
from kernel_gateway.metering import MeteringStore
from pool_manager.model import Lease

T0 = 1_700_000_000.0


def make_lease(lease_id: str = "l1", user: str = "alice", count: int = 1) -> Lease:
    return Lease(id=lease_id, user=user, choices=(GpuChoice("a100", count),), idle_timeout=600.0, queued_at=T0)


def grant(lease: Lease, at: float) -> None:
    lease.state = GRANTED
    lease.gpu_type = "a100"
    lease.count = lease.choices[0].count
    lease.granted_at = at


def release(lease: Lease, at: float, reason: str = REASON_DELETED) -> None:
    lease.state = RELEASED
    lease.reason = reason
    lease.released_at = at


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "metering.sqlite")


def test_lifecycle_gives_gpu_seconds_and_cost(db: str) -> None:
    store = MeteringStore(db)
    lease = make_lease(count=2)
    store.record(lease, price_per_gpu_hour=3.0)
    row = store.get("l1", now=T0 + 50)
    assert row is not None
    assert row["state"] == QUEUED and row["gpu"] == "a100:2"
    assert row["gpu_seconds"] == 0.0 and row["cost"] == 0.0

    grant(lease, T0 + 10)
    store.record(lease, price_per_gpu_hour=4.0)
    row = store.get("l1", now=T0 + 70)
    assert row is not None
    assert row["state"] == GRANTED
    assert row["gpu_seconds"] == pytest.approx(120.0)  # open lease counted up to now, times 2 GPUs

    release(lease, T0 + 1810)
    store.record(lease, price_per_gpu_hour=99.0)  # the price at grant time sticks
    row = store.get("l1")
    assert row is not None
    assert row["state"] == RELEASED and row["reason"] == REASON_DELETED
    assert row["gpu_type"] == "a100" and row["count"] == 2
    assert (row["queued_at"], row["granted_at"], row["released_at"]) == (T0, T0 + 10, T0 + 1810)
    assert row["gpu_seconds"] == pytest.approx(3600.0)
    assert row["price_per_gpu_hour"] == 4.0
    assert row["cost"] == pytest.approx(4.0)
    assert store.get("missing") is None
    store.close()


def test_usage_survives_reopen(db: str) -> None:
    store = MeteringStore(db)
    lease = make_lease()
    store.record(lease, 2.0)
    grant(lease, T0)
    store.record(lease, 2.0)
    release(lease, T0 + 1800)
    store.record(lease, 2.0)
    store.close()

    reopened = MeteringStore(db)
    usage = reopened.usage("alice")
    assert usage["user"] == "alice"
    assert [entry["id"] for entry in usage["leases"]] == ["l1"]
    assert usage["total_gpu_seconds"] == pytest.approx(1800.0)
    assert usage["total_cost"] == pytest.approx(1.0)
    assert usage["by_type"] == {"a100": {"gpu_seconds": pytest.approx(1800.0), "cost": pytest.approx(1.0)}}
    assert reopened.totals() == {"a100": pytest.approx(1800.0)}
    reopened.close()


def test_close_abandoned_ends_open_leases_at_last_heartbeat(db: str) -> None:
    store = MeteringStore(db)
    alive = make_lease("alive")
    grant(alive, T0 + 5)
    store.record(alive, 1.0)
    silent = make_lease("silent")
    grant(silent, T0 + 20)
    store.record(silent, 1.0)
    waiting = make_lease("waiting")
    store.record(waiting, 1.0)
    done = make_lease("done")
    grant(done, T0)
    release(done, T0 + 1)
    store.record(done, 1.0)
    store.heartbeat(["alive", "done"], T0 + 305)
    store.close()

    store = MeteringStore(db)
    assert store.close_abandoned(now=T0 + 10_000) == 3
    rows = {lease_id: store.get(lease_id) for lease_id in ("alive", "silent", "waiting", "done")}
    for lease_id in ("alive", "silent", "waiting"):
        row = rows[lease_id]
        assert row is not None
        assert row["state"] == RELEASED and row["reason"] == REASON_GATEWAY_RESTART
    assert rows["alive"] is not None and rows["alive"]["released_at"] == T0 + 305
    assert rows["alive"]["gpu_seconds"] == pytest.approx(300.0)
    assert rows["silent"] is not None and rows["silent"]["released_at"] == T0 + 20  # never heartbeated
    assert rows["waiting"] is not None and rows["waiting"]["released_at"] == T0
    assert rows["done"] is not None
    assert (rows["done"]["reason"], rows["done"]["released_at"]) == (REASON_DELETED, T0 + 1)  # untouched
    assert store.close_abandoned(now=T0 + 20_000) == 0
    store.close()


def test_users_see_only_their_own_leases(db: str) -> None:
    store = MeteringStore(db)
    for lease_id, user, granted in (("a1", "alice", T0), ("b1", "bob", T0), ("a2", "alice", T0 + 100)):
        lease = make_lease(lease_id, user)
        lease.queued_at = granted
        grant(lease, granted)
        release(lease, granted + 60)
        store.record(lease, 1.0)

    assert [entry["id"] for entry in store.list_for_user("alice")] == ["a2", "a1"]  # newest first
    assert [entry["id"] for entry in store.list_for_user("alice", limit=1)] == ["a2"]
    assert [entry["id"] for entry in store.list_for_user("bob")] == ["b1"]
    assert store.usage("bob")["total_gpu_seconds"] == pytest.approx(60.0)
    assert store.usage("alice")["total_gpu_seconds"] == pytest.approx(120.0)
    assert store.usage("carol") == {
        "user": "carol",
        "leases": [],
        "total_gpu_seconds": 0.0,
        "total_cost": 0.0,
        "by_type": {},
    }
    assert store.totals() == {"a100": pytest.approx(180.0)}
    store.close()


def test_usage_by_user_and_group_for_operators(db: str) -> None:
    store = MeteringStore(db)
    taken = (("a1", "alice", 60, {"physics", "gpu-users"}), ("a2", "alice", 120, {"physics", "gpu-users"}),
             ("b1", "bob", 30, {"gpu-users"}), ("b2", "bob", 40, {"biology"}), ("c1", "carol", 10, set()))
    for order, (lease_id, user, seconds, groups) in enumerate(taken):
        lease = make_lease(lease_id, user)
        lease.queued_at = T0 + order  # in this order: bob's newest lease is b2
        lease.groups = frozenset(groups)
        grant(lease, T0)
        release(lease, T0 + seconds)
        store.record(lease, 3.6)
    usage = store.usage_by_user_and_group()
    assert usage["by_user"] == {
        "alice": {"gpu_seconds": 180.0, "cost": pytest.approx(0.18), "leases": 2, "groups": ["gpu-users", "physics"]},
        # each lease counts in the groups of when it was taken; the user's groups are their newest lease's
        "bob": {"gpu_seconds": 70.0, "cost": pytest.approx(0.07), "leases": 2, "groups": ["biology"]},
        "carol": {"gpu_seconds": 10.0, "cost": pytest.approx(0.01), "leases": 1, "groups": []},
    }
    # a user in two groups counts in both; groups need not add up to the total
    assert usage["by_group"] == {
        "biology": {"gpu_seconds": 40.0, "cost": pytest.approx(0.04), "leases": 1, "users": ["bob"]},
        "gpu-users": {"gpu_seconds": 210.0, "cost": pytest.approx(0.21), "leases": 3, "users": ["alice", "bob"]},
        "physics": {"gpu_seconds": 180.0, "cost": pytest.approx(0.18), "leases": 2, "users": ["alice"]},
    }
    assert usage["total_gpu_seconds"] == pytest.approx(260.0) and usage["total_cost"] == pytest.approx(0.26)
    assert sorted(row["id"] for row in store.list_all()) == ["a1", "a2", "b1", "b2", "c1"]
    store.close()


def test_groups_are_kept_and_this_months_spending_is_read_back(db: str) -> None:
    """What budgets count after a restart: ended leases of the period, with the groups they were recorded under."""
    store = MeteringStore(db)
    old, recent, open_one = make_lease("old"), make_lease("recent", "bob", count=2), make_lease("open")
    recent.groups = frozenset({"physics", "lab"})
    for lease, start, end in ((old, T0 - 86400, T0 - 80000), (recent, T0 + 10, T0 + 110), (open_one, T0, None)):
        grant(lease, start)
        if end is not None:
            release(lease, end)
        store.record(lease, price_per_gpu_hour=4.0)
    store.close()

    rows = MeteringStore(db).spent_since(T0)
    assert rows == [{"id": "recent", "user": "bob", "groups": ["lab", "physics"], "gpu_type": "a100", "count": 2,
                     "granted_at": T0 + 10, "released_at": T0 + 110, "price_per_gpu_hour": 4.0}]


def test_a_database_of_the_first_schema_gains_the_groups_column_and_keeps_its_rows(db: str) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE leases (id TEXT PRIMARY KEY, user TEXT NOT NULL, gpu TEXT NOT NULL, gpu_type TEXT,
            count INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT, queued_at REAL NOT NULL,
            granted_at REAL, released_at REAL, last_alive_at REAL, price_per_gpu_hour REAL NOT NULL DEFAULT 0);
        INSERT INTO leases VALUES ('v1', 'alice', 'a100', 'a100', 1, 'released', 'idle', 1, 2, 3602, 3602, 2.0);
        PRAGMA user_version=1;
    """)
    conn.close()
    store = MeteringStore(db)
    assert store.spent_since(0) == [{"id": "v1", "user": "alice", "groups": [], "gpu_type": "a100", "count": 1,
                                     "granted_at": 2, "released_at": 3602, "price_per_gpu_hour": 2.0}]
    assert store.usage("alice")["total_cost"] == pytest.approx(2.0)


def test_why_a_lease_ended_is_kept_across_a_reopen_and_shown_in_every_listing(db: str) -> None:
    lease = make_lease("budgeted", "bob")
    grant(lease, T0 + 1)
    lease.reason_message = "budget gpu_hours_per_day of group lab is used up (0.0017 of 0.0017 GPU-hours used today)"
    release(lease, T0 + 7, "budget")
    store = MeteringStore(db)
    store.record(lease, 1.0)
    store.close()

    store = MeteringStore(db)  # as a restarted gateway opens it
    get = store.get("budgeted")
    assert get is not None and get["reason_message"] == lease.reason_message
    assert [row["reason_message"] for row in store.list_for_user("bob")] == [lease.reason_message]  # ?released=1
    assert [row["reason_message"] for row in store.list_all()] == [lease.reason_message]  # operators' ?all=1


def test_a_database_of_the_second_schema_gains_the_reason_message_column_and_keeps_its_rows(db: str) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE leases (id TEXT PRIMARY KEY, user TEXT NOT NULL, gpu TEXT NOT NULL, gpu_type TEXT,
            count INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT, queued_at REAL NOT NULL,
            granted_at REAL, released_at REAL, last_alive_at REAL, price_per_gpu_hour REAL NOT NULL DEFAULT 0,
            groups TEXT NOT NULL DEFAULT '[]');
        INSERT INTO leases VALUES ('v2', 'alice', 'a100', 'a100', 1, 'released', 'idle', 1, 2, 3602, 3602, 2.0,
            '["lab"]');
        PRAGMA user_version=2;
    """)
    conn.close()
    store = MeteringStore(db)
    row = store.get("v2")
    assert row is not None and (row["reason"], row["reason_message"], row["gpu_seconds"]) == ("idle", "", 3600.0)
    assert store.spent_since(0)[0]["groups"] == ["lab"]
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    conn.close()
