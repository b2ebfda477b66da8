"""When a notebook holds a GPU: the release policies the simulator compares."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEDICATED = "dedicated"
IDLE = "idle"
PER_CELL = "per-cell"
DEFAULT_POLICIES = ("dedicated", "idle:30m", "idle:10m", "idle:2m", "per-cell")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*$")
_UNIT = {"s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Policy:
    """``dedicated``: a GPU from the first moment of the session to its end (one per
    notebook, today's common practice). ``idle``: a lease per cell shape, released by the
    pool after ``idle_s`` without a running cell; the variables on it are lost.
    ``per-cell``: a lease for each cell, released as it ends; the state is snapshotted and
    restored into the next lease, which adds ``restore_s`` to that next cell's wait."""

    name: str
    kind: str
    idle_s: float = 0.0
    restore_s: float = 0.0


def parse_duration(text: str, what: str) -> float:
    """``90``, ``90s``, ``10m`` or ``2h`` in seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{what} {text!r} is not a duration: write e.g. 90s, 10m or 2h")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_policy(text: str, restore_s: float) -> Policy:
    name = text.strip().lower()
    if name == DEDICATED:
        return Policy(name, DEDICATED)
    if name == PER_CELL:
        return Policy(name, PER_CELL, restore_s=restore_s)
    if name.startswith(IDLE + ":"):
        idle_s = parse_duration(name.partition(":")[2], "idle timeout")
        if not idle_s > 0:
            raise ValueError(f"idle timeout in {text!r} must be positive")
        return Policy(name, IDLE, idle_s=idle_s)
    raise ValueError(f"unknown policy {text!r}: use dedicated, idle:T (e.g. idle:10m) or per-cell")
