"""Replaced values are freed on the reaper thread, and values still in use are left alone."""

from __future__ import annotations

import mmap
import threading
import time
import weakref

from jupyter_gpu import reaper


class Tracked:
    freed_on: str | None = None

    def __del__(self) -> None:
        Tracked.freed_on = threading.current_thread().name


def wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_a_released_value_is_freed_off_the_callers_thread() -> None:
    value = Tracked()
    ref = weakref.ref(value)
    reaper.release_later(value)
    del value
    assert wait_for(lambda: ref() is None)
    assert Tracked.freed_on == "jupyter-gpu-reaper"


def test_a_value_still_referenced_survives() -> None:
    """The reaper only lets its reference go: an mmap the cell still holds stays open and readable."""
    kept = mmap.mmap(-1, 4096)
    kept[:5] = b"alive"
    reaper.release_later(kept)
    marker = Tracked()
    ref = weakref.ref(marker)
    reaper.release_later(marker)  # queued behind it: once it is freed, the reaper is done with kept
    del marker
    assert wait_for(lambda: ref() is None)
    assert kept[:5] == b"alive"


class SmallArray:
    nbytes = 1000
    freed_on: str | None = None

    def __del__(self) -> None:
        SmallArray.freed_on = threading.current_thread().name


def test_a_small_value_is_freed_at_once_without_waking_the_reaper() -> None:
    value = SmallArray()
    reaper.release_later(value)
    del value
    assert SmallArray.freed_on == threading.current_thread().name
