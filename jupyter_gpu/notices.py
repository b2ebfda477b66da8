"""Lease notices on the notebook's side: what the gateway says about a lease before it ends
(a release for GPU idleness coming, a budget nearly spent), each shown once.

The gateway lists a granted lease's notices in its JSON (``notices``: ``seq``, ``kind``,
``text``, ``at``, ``when``); the notebook remembers the last ``seq`` it showed per lease.
"""

from __future__ import annotations

import time
from typing import Any


class NoticeBoard:
    """Which notices of which lease the notebook has shown already."""

    def __init__(self) -> None:
        self._shown: dict[str, int] = {}  # lease id -> the highest seq shown

    def unseen(self, lease: dict[str, Any]) -> list[dict[str, Any]]:
        """The lease's notices not shown yet, oldest first; they count as shown from now on."""
        lease_id = str(lease.get("id"))
        last = self._shown.get(lease_id, 0)
        new = [notice for notice in lease.get("notices") or [] if int(notice["seq"]) > last]
        if new:
            self._shown[lease_id] = max(int(notice["seq"]) for notice in new)
        return new

    def forget(self, lease_id: str) -> None:
        """The lease ended: nothing more will be posted on it."""
        self._shown.pop(lease_id, None)


def format_notice(lease: dict[str, Any], notice: dict[str, Any], now: float | None = None) -> str:
    """One line: which lease, what the gateway says, and how soon it happens."""
    line = f"jupyter-gpu: {lease.get('gpu_type')} lease: {notice['text']}"
    when = notice.get("when")
    if when is not None:
        seconds = max(0.0, float(when) - (time.time() if now is None else now))
        line += f" (in {seconds:.0f} s)" if seconds < 120 else f" (in {seconds / 60:.0f} min)"
    return line
