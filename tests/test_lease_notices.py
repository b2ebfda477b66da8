"""Lease notices: the pool or gateway tells the notebook something about a lease before it
ends. The core (a fake clock), the notebook's side (which ones are new), and the REST view
and the client against the real gateway in process, with a real kernel."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpu.gpu_client import GpuClient
from jupyter_gpu.notices import ENDED, LeaseNews, NoticeBoard, NoticeWatcher, format_notice
from pool_manager.model import LeaseNoticed, Notice
from tests.e2e.gateway_in_process import gateway_in_process
from tests.test_pool_core import hold, make_pool, request


def test_a_notice_on_a_granted_lease_is_numbered_stamped_and_announced() -> None:
    core, clock = make_pool("a100=1", min_warm=0)
    lease = hold(core, "alice", "a100")
    clock.set(100)
    first = core.notify(lease.id, "budget", "90% of your daily budget is spent", when=400.0)
    clock.set(130)
    second = core.notify(lease.id, "gpu_idle", "released in 60 s", when=190.0)
    assert first == Notice(1, "budget", "90% of your daily budget is spent", 100.0, 400.0)
    assert second is not None and second.seq == 2 and second.at == 130.0
    assert lease.notices == (first, second)
    announced = [a for a in core.pop_actions() if isinstance(a, LeaseNoticed)]
    assert [(a.lease.id, a.notice.seq) for a in announced] == [(lease.id, 1), (lease.id, 2)]
    # each event carries the lease as it was then: the first one knew of one notice only
    assert len(announced[0].lease.notices) == 1


def test_a_queued_or_ended_lease_takes_no_notice() -> None:
    core, _ = make_pool("a100=1", min_warm=0)
    holder = hold(core, "alice", "a100")
    queued = request(core, "bob", "a100")
    assert core.notify(queued.id, "budget", "x") is None
    core.end_lease(holder.id, "deleted")
    assert core.notify(holder.id, "budget", "x") is None
    assert core.notify("no-such-lease", "budget", "x") is None
    assert not any(isinstance(a, LeaseNoticed) for a in core.pop_actions())


def test_the_notebook_shows_each_notice_once_per_lease() -> None:
    board = NoticeBoard()
    one = {"seq": 1, "kind": "budget", "text": "90% spent", "at": 0.0, "when": None}
    two = {"seq": 2, "kind": "gpu_idle", "text": "released soon", "at": 1.0, "when": 61.0}
    assert board.unseen({"id": "L1", "notices": [one]}) == [one]
    assert board.unseen({"id": "L1", "notices": [one]}) == []
    assert board.unseen({"id": "L1", "notices": [one, two]}) == [two]
    assert board.unseen({"id": "L2", "notices": [one]}) == [one]  # another lease's own first
    assert board.unseen({"id": "L3"}) == []  # a released lease's row has none
    lease = {"gpu_type": "a100"}
    assert format_notice(lease, two, now=31.0) == "jupyter-gpu: a100 lease: released soon (in 30 s)"
    assert format_notice(lease, dict(two, when=601.0), now=1.0) == "jupyter-gpu: a100 lease: released soon (in 10 min)"
    assert format_notice(lease, one) == "jupyter-gpu: a100 lease: 90% spent"


def test_a_lease_ended_is_told_once_and_takes_no_notice_after() -> None:
    board = NoticeBoard()
    one = {"seq": 1, "kind": "gpu_idle", "text": "released soon", "at": 0.0, "when": None}
    assert board.end("L1") is True  # the first to hear of it tells the user
    assert board.end("L1") is False  # the other path does not tell it again
    assert board.ended("L1") and not board.ended("L2")
    assert board.unseen({"id": "L1", "notices": [one]}) == []  # what it announced is past


def _watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jupyter-gpu-notices"]


def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within 5 s"
        time.sleep(0.01)


def test_the_watcher_shows_news_while_a_lease_is_held_then_its_thread_ends() -> None:
    held = threading.Event()
    held.set()
    pending = [LeaseNews("L1", "gpu_idle", "released in 60 s"), LeaseNews("L1", ENDED, "ended (gpu_idle)")]
    shown: list[LeaseNews] = []

    def look() -> list[LeaseNews]:
        news = pending[:1]
        del pending[:1]
        if news and news[0].kind == ENDED:
            held.clear()  # the end was its last news: nothing is held any more
        return news

    watcher = NoticeWatcher(look, held.is_set, shown.append, interval=0.01)
    watcher.start()
    watcher.start()  # after the next cell: the one thread goes on
    assert len(_watcher_threads()) == 1
    _until(lambda: not watcher.running)  # it ended by itself once no lease was held
    assert [n.kind for n in shown] == ["gpu_idle", ENDED]
    _until(lambda: not _watcher_threads())
    watcher.start()  # nothing held: no thread
    assert not watcher.running and not _watcher_threads()


def test_a_stopped_watcher_leaves_no_thread_and_shows_nothing_more() -> None:
    shown: list[LeaseNews] = []
    watcher = NoticeWatcher(lambda: [LeaseNews("L1", "budget", "90% spent")], lambda: True, shown.append,
                            interval=0.01)
    watcher.start()
    _until(lambda: bool(shown))
    watcher.stop()
    assert not _watcher_threads()
    count = len(shown)
    time.sleep(0.05)
    assert len(shown) == count


def test_a_failing_look_does_not_end_the_watching() -> None:
    looks: list[int] = []

    def look() -> list[LeaseNews]:
        looks.append(1)
        if len(looks) == 1:
            raise RuntimeError("a bug")
        return []

    watcher = NoticeWatcher(look, lambda: True, lambda news: None, interval=0.01)
    watcher.start()
    _until(lambda: len(looks) >= 3)
    assert watcher.running
    watcher.stop()


class _Quiet:
    def __init__(self) -> None:
        self.ended_leases: list[str] = []

    def waiting(self, spec: str, lease: dict[str, Any]) -> None: ...
    def granted(self, spec: str, lease: dict[str, Any]) -> None: ...

    def ended(self, session: Any, lease: dict[str, Any]) -> None:
        self.ended_leases.append(session.lease_id)


@pytest.mark.asyncio
async def test_notices_reach_the_notebook_through_the_lease_view(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        notebook = GpuClient(running.client(), "nb.ipynb")
        session = await asyncio.to_thread(notebook.session, "cpu", None, False, _Quiet())
        assert await asyncio.to_thread(notebook.new_notices) == []
        when = running.gateway.service.core.wall_clock() + 300
        running.gateway.service.notify(session.lease_id, "budget", "90% of today's GPU budget is spent", when)
        view = await asyncio.to_thread(running.client().get_lease, session.lease_id)
        assert [(n["seq"], n["kind"], n["when"]) for n in view["notices"]] == [(1, "budget", when)]
        lines = await asyncio.to_thread(notebook.new_notices)
        assert lines == ["jupyter-gpu: cpu lease: 90% of today's GPU budget is spent (in 5 min)"]
        assert await asyncio.to_thread(notebook.new_notices) == []  # shown once
        await asyncio.to_thread(notebook.release_all)


@pytest.mark.asyncio
async def test_a_lease_ended_by_the_pool_is_told_once_by_whichever_path_hears_first(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        notebook = GpuClient(running.client(), "nb.ipynb")
        told = _Quiet()
        session = await asyncio.to_thread(notebook.session, "cpu", None, False, told)
        running.gateway.service.notify(session.lease_id, "gpu_idle", "released for GPU idleness soon")
        # the watcher's look and the next cell's look: the notice comes out of one of them only
        watched = await asyncio.to_thread(notebook.lease_news, 2.0, True)
        assert [(n.kind, n.text) for n in watched] == [("gpu_idle",
                                                        "jupyter-gpu: cpu lease: released for GPU idleness soon")]
        assert await asyncio.to_thread(notebook.new_notices) == []
        assert notebook.holds_lease
        running.gateway.service.end_lease(session.lease_id, "gpu_idle")
        ended = await asyncio.to_thread(notebook.lease_news, 2.0, True)
        assert [n.kind for n in ended] == [ENDED]
        assert ended[0].text.startswith("jupyter-gpu: the cpu lease ended (gpu_idle)")
        assert ended[0].text.endswith("The next %%gpu cell gets a fresh GPU kernel.")
        assert await asyncio.to_thread(notebook.lease_news, 2.0, True) == []  # told once
        assert not notebook.holds_lease  # the watcher's thread may end
        await asyncio.to_thread(_until, lambda: not session.alive)
        # the next cell finds the lease gone and takes a fresh one, without telling the end again
        fresh = await asyncio.to_thread(notebook.session, "cpu", None, False, told)
        assert fresh.lease_id != session.lease_id and told.ended_leases == []
        assert notebook.holds_lease
        await asyncio.to_thread(notebook.release_all)
        assert not notebook.holds_lease
