"""Admission: how many GPUs a user may take, as one policy object the scheduler consults.

It knows one limit of its own, GPUs held at once per user (``max_gpus_per_user``: a request
past it waits for the user's own leases), and carries the operator's budgets
(:class:`~.budgets.BudgetPolicy`: GPUs, GPU-hours per day, money per month, per user or group;
a request past one is refused, a running lease that uses one up ends), which the core consults
on requests, grants, ends and ticks. It answers two questions: is a request one no amount of waiting can admit
(:meth:`Admission.refusal`), and how many more GPUs may a user take now (:meth:`Admission.room`).
"""

from __future__ import annotations

from jupyter_gpu.protocol import GpuChoice

from .budgets import BudgetPolicy


class Admission:
    def __init__(self, max_gpus_per_user: int = 0, budgets: BudgetPolicy | None = None) -> None:
        #: 0 means no per-user cap
        self.max_gpus_per_user = max_gpus_per_user
        #: None: no budgets (the trace simulator, a pool nobody pays for)
        self.budgets = budgets

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
