"""The disk holding the usage database fills up: new leases are refused in words, running ones carry
on, and every grant and release is written once there is room again (nothing already written is lost).

The disk is a 1 MiB tmpfs the test mounts and removes (root only; skipped elsewhere).
"""

from __future__ import annotations

import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.gateway_process import poll

from .conftest import make_gateway


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root only): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk says it is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def row(db: Path, lease_id: str) -> tuple[str, float | None] | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        found = conn.execute("SELECT state, released_at FROM leases WHERE id = ?", (lease_id,)).fetchone()
    return None if found is None else (found[0], found[1])


def test_a_full_database_disk_refuses_new_leases_in_words_and_loses_no_record(small_disk: Path,
                                                                               tmp_path: Path) -> None:
    db = small_disk / "usage.sqlite"
    gateway = make_gateway(tmp_path / "gateway", "--inventory", "a100=2", "--cpu-slots", "0", "--min-warm", "1")
    gateway.args[gateway.args.index("--db") + 1] = str(db)
    gateway.start()
    try:
        running = gateway.lease("alice", "a100")
        assert running["state"] == "granted" and row(db, running["id"]) == ("granted", None)
        filler = fill(small_disk)

        refused = gateway.post("bob", "/api/gpu/leases", {"gpu": "a100"})
        assert refused.status == 507, refused
        assert refused.body["reason"] == "metering_unavailable"
        assert str(db) in refused.body["message"] and "free space" in refused.body["message"]
        assert gateway.get("bob", "/api/gpu/leases").body == []  # nothing held, nothing billed
        assert gateway.post("bob", "/api/kernels", {"name": "gpu-a100"}).status == 507

        # the running lease carries on and ends as usual; its end waits in memory for room
        ended = gateway.delete("alice", f"/api/gpu/leases/{running['id']}").body
        assert ended["state"] == "released"
        assert gateway.get("alice", f"/api/gpu/leases/{running['id']}").body["state"] == "released"
        assert row(db, running["id"]) == ("granted", None)  # not written yet: the disk is full

        filler.unlink()
        written = poll(lambda: (r := row(db, running["id"])) and r[0] == "released" and r, 15,
                       "the release to be written at a heartbeat")
        assert written[1] == pytest.approx(ended["released_at"])  # billed to its real end, not a heartbeat
        assert gateway.lease("bob", "a100")["state"] in ("granted", "queued")
        assert "Traceback" not in gateway.log_text().split("metering heartbeat failed")[0]
    finally:
        gateway.stop()
