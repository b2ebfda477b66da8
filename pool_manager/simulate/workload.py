"""What the simulator replays: notebook sessions, each a sequence of GPU cells.

Times are seconds from the start of the trace. A session is one notebook that someone has
open from ``start`` to ``end``; its cells run one after the other. The recorded gaps between
cells are the user's think time: when a cell has to wait for a GPU, the rest of the session
moves later by that wait (the user does not start the next cell before the last one ended).
"""

from __future__ import annotations

from dataclasses import dataclass

from jupyter_gpu.protocol import GpuChoice


@dataclass(frozen=True)
class Cell:
    """One GPU cell as recorded: asked for at ``start``, busy for ``duration`` seconds."""

    start: float
    duration: float
    choices: tuple[GpuChoice, ...]

    @property
    def gpus(self) -> int:
        return self.choices[0].count


@dataclass(frozen=True)
class Session:
    name: str
    user: str
    start: float
    end: float
    cells: tuple[Cell, ...]

    def dedicated_choices(self) -> tuple[GpuChoice, ...] | None:
        """What a GPU kept for the whole session must be: the largest thing any cell asks."""
        if not self.cells:
            return None
        return max((cell.choices for cell in self.cells), key=lambda choices: choices[0].count)


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]
    #: where it came from and how it was read, for the report
    source: str

    @property
    def users(self) -> int:
        return len({session.user for session in self.sessions})

    @property
    def cells(self) -> int:
        return sum(len(session.cells) for session in self.sessions)

    def gpu_types(self) -> set[str]:
        return {choice.gpu_type for s in self.sessions for c in s.cells for choice in c.choices}

    def largest_request(self, gpu_type: str) -> int:
        """The most GPUs of the type one cell asks for (a pool must have a node that big)."""
        counts = (choice.count for s in self.sessions for c in s.cells for choice in c.choices
                  if choice.gpu_type == gpu_type)
        return max(counts, default=0)

    def span(self) -> float:
        return max((s.end for s in self.sessions), default=0.0) - min((s.start for s in self.sessions), default=0.0)
