"""Lease notices on the notebook's side: what the gateway says about a lease before it ends
(a release for GPU idleness coming, a budget nearly spent), each shown once, and the end of a
lease the notebook did not end itself, told once.

The gateway lists a granted lease's notices in its JSON (``notices``: ``seq``, ``kind``,
``text``, ``at``, ``when``); the notebook remembers the last ``seq`` it showed per lease.
Two paths show them: the magic before the notebook's next cell, and a :class:`NoticeWatcher`
thread while the notebook runs no cell; the :class:`NoticeBoard` makes sure only one of them
shows each.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: The kind of the news that a lease ended (the notices' own kinds are the gateway's).
ENDED = "ended"


@dataclasses.dataclass(frozen=True)
class LeaseNews:
    """One thing to show about one lease: a notice (its kind), or its end (:data:`ENDED`)."""

    lease_id: str
    kind: str
    text: str


class NoticeBoard:
    """Which notices of which lease the notebook has shown already, and which leases' ends.

    Thread-safe: the watcher thread and the cell's thread both ask, and only one gets each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shown: dict[str, int] = {}  # lease id -> the highest seq shown
        self._ended: set[str] = set()

    def unseen(self, lease: dict[str, Any]) -> list[dict[str, Any]]:
        """The lease's notices not shown yet, oldest first; they count as shown from now on."""
        lease_id = str(lease.get("id"))
        with self._lock:
            if lease_id in self._ended:  # what it announced has happened, or the notebook ended it
                return []
            last = self._shown.get(lease_id, 0)
            new = [notice for notice in lease.get("notices") or [] if int(notice["seq"]) > last]
            if new:
                self._shown[lease_id] = max(int(notice["seq"]) for notice in new)
        return new

    def end(self, lease_id: str) -> bool:
        """The lease ended: nothing more will be posted on it. True for the first caller only,
        who tells the user (the notebook ending it itself tells nobody)."""
        with self._lock:
            self._shown.pop(lease_id, None)
            first = lease_id not in self._ended
            self._ended.add(lease_id)
        return first

    def ended(self, lease_id: str) -> bool:
        with self._lock:
            return lease_id in self._ended


def format_notice(lease: dict[str, Any], notice: dict[str, Any], now: float | None = None) -> str:
    """One line: which lease, what the gateway says, and how soon it happens."""
    line = f"jupyter-gpu: {lease.get('gpu_type')} lease: {notice['text']}"
    when = notice.get("when")
    if when is not None:
        seconds = max(0.0, float(when) - (time.time() if now is None else now))
        line += f" (in {seconds:.0f} s)" if seconds < 120 else f" (in {seconds / 60:.0f} min)"
    return line


class NoticeWatcher:
    """A daemon thread that looks for lease news every ``interval`` seconds while the notebook
    holds a lease, and shows them: a notebook that runs no cell still hears that its GPU is
    about to be released, and that it was.

    ``look`` asks the gateway (bounded in time; a gateway that does not answer means no news
    now); ``holding`` says whether any lease is still worth watching; the thread ends by
    itself once none is, and :meth:`start` after the next grant starts a new one.
    """

    def __init__(self, look: Callable[[], list[LeaseNews]], holding: Callable[[], bool],
                 show: Callable[[LeaseNews], None], interval: float) -> None:
        self._look = look
        self._holding = holding
        self._show = show
        self.interval = interval
        self._lock = threading.Lock()  # one thread at a time: its start and end are decided under it
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def start(self) -> None:
        """Watch from now on, if a lease is held and no thread watches yet (cheap: called after every cell)."""
        with self._lock:
            if self._thread is not None or not self._holding():
                return
            # Each thread its own stop event: one stopped but not yet out cannot be revived.
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,), name="jupyter-gpu-notices",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and wait for the thread to be out (its look is bounded in time)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                for news in self._look():
                    if stop.is_set():
                        return
                    self._show(news)
            except Exception:  # a bug here must not end the watching quietly for good, nor reach a cell
                log.exception("jupyter-gpu: looking for lease notices failed")
            with self._lock:
                if stop.is_set():
                    return
                if not self._holding():
                    self._thread = None
                    return
