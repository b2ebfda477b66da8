"""Lease metering in an embedded SQLite file, so usage and cost survive gateway restarts.

One row per lease, upserted as the lease moves queued -> granted -> released. GPU-seconds are
computed by one SQL expression everywhere (rows, per-user totals, Prometheus totals), so the
numbers a user sees and the numbers the operator scrapes cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from jupyter_gpu.protocol import GRANTED, QUEUED, RELEASED, Reason
from pool_manager.model import Lease, LeaseSnapshot

_SCHEMA_VERSION = 3  # 2: the user's groups, for group budgets; 3: why a lease ended, in words

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    gpu TEXT NOT NULL,
    gpu_type TEXT,
    count INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT,
    queued_at REAL NOT NULL,
    granted_at REAL,
    released_at REAL,
    last_alive_at REAL,
    price_per_gpu_hour REAL NOT NULL DEFAULT 0,
    groups TEXT NOT NULL DEFAULT '[]',
    reason_message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS leases_user_queued ON leases (user, queued_at);
CREATE INDEX IF NOT EXISTS leases_state ON leases (state);
"""

# Open leases are counted up to :now; clamped at 0 so a clock step back never yields negative usage.
_GPU_SECONDS = (
    "(CASE WHEN granted_at IS NULL THEN 0.0 ELSE MAX(0.0, COALESCE(released_at, :now) - granted_at) * count END)"
)

_COLUMNS = (
    "id, user, gpu, gpu_type, count, state, reason, reason_message, queued_at, granted_at, released_at, "
    f"price_per_gpu_hour, {_GPU_SECONDS} AS gpu_seconds"
)

# The price is taken from each record() until the lease is granted, then frozen: a lease is billed
# at the price in force when it got its GPUs, whatever the operator configures later.
_UPSERT = """
INSERT INTO leases (id, user, gpu, gpu_type, count, state, reason, reason_message, queued_at, granted_at,
                    released_at, price_per_gpu_hour, groups)
VALUES (:id, :user, :gpu, :gpu_type, :count, :state, :reason, :reason_message, :queued_at, :granted_at,
        :released_at, :price, :groups)
ON CONFLICT (id) DO UPDATE SET
    gpu_type = excluded.gpu_type,
    count = excluded.count,
    state = excluded.state,
    reason = excluded.reason,
    reason_message = excluded.reason_message,
    granted_at = excluded.granted_at,
    released_at = excluded.released_at,
    price_per_gpu_hour = CASE WHEN leases.granted_at IS NULL THEN excluded.price_per_gpu_hour
                              ELSE leases.price_per_gpu_hour END
"""

# The gateway died: end each open lease at the last moment it was known alive (never before its
# grant, never after now), so a crash does not bill the downtime.
_CLOSE_ABANDONED = f"""
UPDATE leases SET
    state = '{RELEASED}',
    reason = '{Reason.GATEWAY_RESTART.value}',
    released_at = MIN(:now, MAX(COALESCE(last_alive_at, granted_at, queued_at), COALESCE(granted_at, queued_at)))
WHERE state IN ('{QUEUED}', '{GRANTED}')
"""


class MeteringStore:
    """Per-lease usage records in one SQLite file (WAL), safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock, self._conn:
            # WAL lets `jupyter-gpu usage` read the file while the gateway writes it.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(leases)")}
            if columns and "groups" not in columns:  # a version 1 file
                self._conn.execute("ALTER TABLE leases ADD COLUMN groups TEXT NOT NULL DEFAULT '[]'")
            if columns and "reason_message" not in columns:  # version 1 or 2: leases ended before say no more
                self._conn.execute("ALTER TABLE leases ADD COLUMN reason_message TEXT NOT NULL DEFAULT ''")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """The store's one connection, held under its lock, for another table of the same file
        (:class:`.instance_metering.InstanceHours`): one connection to the file, one lock for
        every thread that writes it."""
        with self._lock:
            yield self._conn

    def record(self, lease: Lease | LeaseSnapshot, price_per_gpu_hour: float) -> None:
        """Insert the lease on first sight, else update what changes as it moves through its states."""
        params = {
            "id": lease.id,
            "user": lease.user,
            "gpu": lease.spec,
            "gpu_type": lease.gpu_type,
            "count": lease.count,
            "state": lease.state,
            "reason": lease.reason,
            "reason_message": lease.reason_message,
            "queued_at": lease.queued_at,
            "granted_at": lease.granted_at,
            "released_at": lease.released_at,
            "price": float(price_per_gpu_hour),
            "groups": json.dumps(sorted(lease.groups)),
        }
        with self._lock, self._conn:
            self._conn.execute(_UPSERT, params)

    def heartbeat(self, lease_ids: list[str], now: float) -> None:
        """Mark open leases alive, so a crash can be billed up to here and no further."""
        if not lease_ids:
            return
        rows = [(now, lease_id) for lease_id in lease_ids]
        with self._lock, self._conn:
            self._conn.executemany(
                f"UPDATE leases SET last_alive_at = ? WHERE id = ? AND state IN ('{QUEUED}', '{GRANTED}')", rows
            )

    def close_abandoned(self, now: float) -> int:
        """Release leases a previous gateway left open; call once at start. Returns how many."""
        with self._lock, self._conn:
            return self._conn.execute(_CLOSE_ABANDONED, {"now": now}).rowcount

    def get(self, lease_id: str, *, now: float | None = None) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE id = :id", {"id": lease_id, "now": _now(now)}
            ).fetchone()
        return None if row is None else _lease_dict(row)

    def list_for_user(self, user: str, limit: int = 200, *, now: float | None = None) -> list[dict[str, Any]]:
        """The user's leases, newest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE user = :user ORDER BY queued_at DESC, rowid DESC LIMIT :limit",
                {"user": user, "limit": limit, "now": _now(now)},
            ).fetchall()
        return [_lease_dict(row) for row in rows]

    def usage(self, user: str, limit: int = 200, *, now: float | None = None) -> dict[str, Any]:
        """The user's newest ``limit`` leases, with totals over all of their leases (not just those listed)."""
        now = _now(now)
        leases = self.list_for_user(user, limit, now=now)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT gpu_type, SUM({_GPU_SECONDS}) AS seconds, "
                f"SUM({_GPU_SECONDS} * price_per_gpu_hour / 3600.0) AS cost "
                "FROM leases WHERE user = :user AND gpu_type IS NOT NULL GROUP BY gpu_type ORDER BY gpu_type",
                {"user": user, "now": now},
            ).fetchall()
        by_type = {row["gpu_type"]: {"gpu_seconds": float(row["seconds"]), "cost": float(row["cost"])} for row in rows}
        return {
            "user": user,
            "leases": leases,
            "total_gpu_seconds": sum((entry["gpu_seconds"] for entry in by_type.values()), 0.0),
            "total_cost": sum((entry["cost"] for entry in by_type.values()), 0.0),
            "by_type": by_type,
        }

    def totals(self, *, now: float | None = None) -> dict[str, float]:
        """GPU-seconds per type over all users, open leases counted up to now (a Prometheus counter)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT gpu_type, SUM({_GPU_SECONDS}) AS seconds FROM leases "
                "WHERE gpu_type IS NOT NULL GROUP BY gpu_type ORDER BY gpu_type",
                {"now": _now(now)},
            ).fetchall()
        return {row["gpu_type"]: float(row["seconds"]) for row in rows}

    def spent_since(self, since: float) -> list[dict[str, Any]]:
        """Ended leases that held GPUs at or after ``since``: what budgets count after a restart."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, user, groups, gpu_type, count, granted_at, released_at, price_per_gpu_hour FROM leases "
                "WHERE granted_at IS NOT NULL AND released_at >= :since",
                {"since": since},
            ).fetchall()
        return [{"id": row["id"], "user": row["user"], "groups": json.loads(row["groups"]),
                 "gpu_type": row["gpu_type"], "count": row["count"],
                 "granted_at": row["granted_at"], "released_at": row["released_at"],
                 "price_per_gpu_hour": row["price_per_gpu_hour"]} for row in rows]

    def list_all(self, limit: int = 1000, *, now: float | None = None) -> list[dict[str, Any]]:
        """Every user's leases, newest first (for operators)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM leases ORDER BY queued_at DESC, rowid DESC LIMIT :limit",
                {"limit": limit, "now": _now(now)},
            ).fetchall()
        return [_lease_dict(row) for row in rows]

    def usage_by_user_and_group(self, *, now: float | None = None) -> dict[str, Any]:
        """GPU-seconds, cost and lease count per user and per group, and the totals.

        A lease counts in the groups its user had when they took it (what group budgets count),
        so a user in two groups counts in both and groups need not add up to the total. A user's
        ``groups`` are those of their newest lease.
        """
        with self._lock:
            rows = self._conn.execute(
                f"SELECT user, groups, COUNT(*) AS leases, SUM({_GPU_SECONDS}) AS seconds, "
                f"SUM({_GPU_SECONDS} * price_per_gpu_hour / 3600.0) AS cost, MAX(queued_at) AS newest "
                "FROM leases GROUP BY user, groups ORDER BY user, newest",
                {"now": _now(now)},
            ).fetchall()
        by_user: dict[str, dict[str, Any]] = {}
        by_group: dict[str, dict[str, Any]] = {}
        for row in rows:
            groups = json.loads(row["groups"])
            used = {"gpu_seconds": float(row["seconds"]), "cost": float(row["cost"]), "leases": int(row["leases"])}
            user = by_user.setdefault(row["user"], {"gpu_seconds": 0.0, "cost": 0.0, "leases": 0})
            user["groups"] = groups  # rows come oldest first: the newest lease's groups stay
            _add(user, used)
            for group in groups:
                total = by_group.setdefault(group, {"gpu_seconds": 0.0, "cost": 0.0, "leases": 0, "users": []})
                _add(total, used)
                if row["user"] not in total["users"]:
                    total["users"].append(row["user"])
        return {
            "by_user": by_user,
            "by_group": dict(sorted(by_group.items())),
            "total_gpu_seconds": sum((e["gpu_seconds"] for e in by_user.values()), 0.0),
            "total_cost": sum((e["cost"] for e in by_user.values()), 0.0),
        }

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _add(total: dict[str, Any], used: dict[str, float]) -> None:
    for key, value in used.items():
        total[key] += value


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _lease_dict(row: sqlite3.Row) -> dict[str, Any]:
    gpu_seconds = float(row["gpu_seconds"])
    price = float(row["price_per_gpu_hour"])
    return {
        "id": row["id"],
        "user": row["user"],
        "gpu": row["gpu"],
        "gpu_type": row["gpu_type"],
        "count": row["count"],
        "state": row["state"],
        "reason": row["reason"],
        # why it ended, in words, where the reason alone does not say (which budget)
        "reason_message": row["reason_message"],
        "queued_at": row["queued_at"],
        "granted_at": row["granted_at"],
        "released_at": row["released_at"],
        "gpu_seconds": gpu_seconds,
        "cost": gpu_seconds / 3600.0 * price,
        "price_per_gpu_hour": price,
    }
