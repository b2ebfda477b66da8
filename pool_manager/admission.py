"""Admission: how many GPUs a user may take, as one policy object the scheduler consults.

Today it knows one limit, GPUs held at once per user (``max_gpus_per_user``); budgets
(GPU-hours or money per day, per user or group) plug in here without another branch in the
scheduler. It answers two questions: is a request one no amount of waiting can admit
(:meth:`Admission.refusal`), and how many more GPUs may a user take now (:meth:`Admission.room`).
"""

from __future__ import annotations

from jupyter_gpu.protocol import GpuChoice


class Admission:
    def __init__(self, max_gpus_per_user: int = 0) -> None:
        #: 0 means no per-user cap
        self.max_gpus_per_user = max_gpus_per_user

    @property
    def limits(self) -> bool:
        """Whether :meth:`room` can ever say less than "anything" (the scheduler skips it if not)."""
        return self.max_gpus_per_user > 0

    def refusal(self, choice: GpuChoice) -> str | None:
        """Why the choice can never be admitted, or None."""
        if self.max_gpus_per_user and choice.count > self.max_gpus_per_user:
            return (
                f"{choice} asks for {choice.count} GPUs but each user may hold at most "
                f"{self.max_gpus_per_user} (max_gpus_per_user)"
            )
        return None

    def room(self, user: str, holding: int) -> int | None:
        """GPUs ``user`` may still take while ``holding`` (held or starting for them); None: no limit."""
        if not self.max_gpus_per_user:
            return None
        return self.max_gpus_per_user - holding
