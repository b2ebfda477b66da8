"""Replaced values are freed on the reaper thread, and values still in use are left alone."""

from __future__ import annotations

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
    kept = Tracked()
    reaper.release_later(kept)
    time.sleep(0.1)
    assert weakref.ref(kept)() is kept
