"""Lease notices: the pool or gateway tells the notebook something about a lease before it
ends. The core (a fake clock), the notebook's side (which ones are new), and the REST view
and the client against the real gateway in process, with a real kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpu.gpu_client import GpuClient
from jupyter_gpu.notices import NoticeBoard, format_notice
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


class _Quiet:
    def waiting(self, spec: str, lease: dict[str, Any]) -> None: ...
    def granted(self, spec: str, lease: dict[str, Any]) -> None: ...
    def ended(self, session: Any, lease: dict[str, Any]) -> None: ...


@pytest.mark.asyncio
async def test_notices_reach_the_notebook_through_the_lease_view(tmp_path: Path) -> None:
    async with gateway_in_process(tmp_path) as running:
        await running.wait_warm()
        notebook = GpuClient(running.client(), "nb.ipynb")
        session = await asyncio.to_thread(notebook.session, "cpu", None, False, _Quiet())
        assert await asyncio.to_thread(notebook.new_notices) == []
        when = running.gateway.service.core.wall_clock() + 300
        running.gateway.service.notify(session.lease_id, "budget", "90% of today's GPU budget is spent", when)
        view = await running.client().aget_lease(session.lease_id)
        assert [(n["seq"], n["kind"], n["when"]) for n in view["notices"]] == [(1, "budget", when)]
        lines = await asyncio.to_thread(notebook.new_notices)
        assert lines == ["jupyter-gpu: cpu lease: 90% of today's GPU budget is spent (in 5 min)"]
        assert await asyncio.to_thread(notebook.new_notices) == []  # shown once
        await asyncio.to_thread(notebook.release_all)
