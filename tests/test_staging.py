"""Staging areas: a dead gateway's root is removed, a live one's never; abandoned uploads go."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from jupyter_gpu import kernel_helper
from jupyter_gpu.transfer import STAGING_DIR_ENV
from pool_manager.backend import STAGING_PREFIX
from pool_manager.scratch import LOCK, remove_abandoned


def make_root(parent: Path, name: str) -> tuple[Path, int]:
    root = parent / f"{STAGING_PREFIX}{name}"
    (root / "slot-1").mkdir(parents=True)
    (root / "slot-1" / "upload").write_bytes(b"x")
    lock = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    return root, lock


def test_only_roots_whose_gateway_is_gone_are_removed(tmp_path: Path) -> None:
    # pid 1 is alive, so a pid in the name would wrongly keep the dead one and the other way round
    dead, dead_lock = make_root(tmp_path, "1-dead")
    alive, alive_lock = make_root(tmp_path, "999999-alive")
    fcntl.flock(alive_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as its gateway holds it
    os.close(dead_lock)  # its gateway exited without cleaning up
    unrelated = tmp_path / "something-else"
    unrelated.mkdir()
    remove_abandoned(str(tmp_path), STAGING_PREFIX)
    assert not dead.exists()
    assert (alive / "slot-1" / "upload").exists() and unrelated.exists()
    os.close(alive_lock)


def test_uploads_nobody_claimed_are_removed_after_a_while(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STAGING_DIR_ENV, str(tmp_path))
    helper = kernel_helper.KernelHelper(shell=None)
    old, fresh = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    stale = time.time() - kernel_helper.ABANDONED_UPLOAD_SECONDS - 5
    os.utime(old, (stale, stale))
    helper._remove_abandoned_uploads()
    assert not old.exists() and fresh.exists()
