"""Trace-driven simulation of the pool: the real :class:`~pool_manager.core.PoolCore` with a
fake clock, replaying notebook workloads under different release policies.

``main`` is the ``jupyter-gpu simulate`` command; the modules are usable on their own
(``benchmarks/pool_sim.py`` drives the core through :func:`simulate`).
"""

from .cli import main
from .driver import Outcome, Timing, pool_devices, simulate
from .policies import Policy, parse_policy
from .workload import Cell, Session, Workload

__all__ = ["Cell", "Outcome", "Policy", "Session", "Timing", "Workload", "main", "parse_policy", "pool_devices",
           "simulate"]
