"""Scratch directories a gateway holds for its life (staging areas, kernel sandboxes).

Each root holds a lock file for as long as its gateway lives; a root whose lock anyone can
take was left by a gateway that died without cleaning up, and the next one removes it.
A lock, not the pid in the name: a live gateway in another pid namespace sharing the
directory would look dead, and a reused pid would keep a dead one's root forever.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

LOCK = ".lock"


def locked_root(parent: str, prefix: str) -> tuple[str, int]:
    """A new private (0700) directory under ``parent`` and the lock that marks it in use."""
    remove_abandoned(parent, prefix)
    root = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    lock = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return root, lock


def remove_abandoned(parent: str, prefix: str) -> None:
    """Roots named ``prefix...`` under ``parent`` whose gateway is gone: their lock is free."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        root = os.path.join(parent, name)
        try:
            lock = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no lock yet (a gateway creating it this instant) or not ours to open
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that gateway is alive
            continue
        finally:
            os.close(lock)
        shutil.rmtree(root, ignore_errors=True)
