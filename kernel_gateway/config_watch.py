"""Budgets changed without a restart: the gateway looks at its config files every few seconds
and, when one changed, reads them again and puts the new ``c.Budgets`` in force.

Only budgets are taken from a re-read file (the pool's other settings are built into running
objects: ports, inventory, sandbox); a file that no longer parses, budgets that do not check,
or a file that is gone are logged and the budgets in force stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from traitlets.config import Config
from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

from pool_manager.budget_settings import Budgets
from pool_manager.budgets import BudgetConfig, Limits

log = logging.getLogger(__name__)

Stamp = tuple[int, int] | None  # (mtime_ns, size), None: no such file


def read_config(paths: Sequence[str], command_line: Config) -> Config:
    """The files' settings, in order, under those of the command line (as at start)."""
    config = Config()
    for path in paths:
        if not os.path.exists(path):
            continue
        loader_class = JSONFileConfigLoader if path.endswith(".json") else PyFileConfigLoader
        loader = loader_class(os.path.basename(path), os.path.dirname(path) or ".", log=log)
        config.merge(loader.load_config())
    config.merge(command_line)
    return config


def read_budgets(paths: Sequence[str], command_line: Config) -> BudgetConfig:
    return Budgets(config=read_config(paths, command_line)).build()


class ConfigWatcher:
    """Calls ``apply`` with the budgets of ``paths`` each time one of them changes."""

    def __init__(self, paths: Sequence[str], command_line: Config, apply: Callable[[BudgetConfig], None],
                 interval: float = 2.0) -> None:
        self.paths = list(paths)
        self.command_line = command_line
        self.apply = apply
        self.interval = interval
        self._stamps = self._read_stamps()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.paths and self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def check(self) -> bool:
        """Re-read the files if one changed since last time; whether new budgets went into force."""
        stamps = self._read_stamps()
        if stamps == self._stamps:
            return False
        gone = [path for path, before, now in zip(self.paths, self._stamps, stamps, strict=True)
                if before is not None and now is None]
        self._stamps = stamps
        if gone:
            # Moved away, or an editor between removing it and writing the new one: read without
            # it, every budget in it would be lifted (and a deleted file is no way to say "none").
            log.error("config file %s is gone: the budgets in force stay until it is back (to lift budgets, write "
                      "it with c.Budgets.users = {} and the like)", ", ".join(gone))
            return False
        try:
            budgets = read_budgets(self.paths, self.command_line)
        except Exception as exc:  # a half-written or broken file: keep what is in force
            log.error("config changed but was not applied, the budgets in force stay: %s", exc)
            return False
        self.apply(budgets)
        log.info("config changed: budgets now %d user(s), %d group(s)%s", len(budgets.users), len(budgets.groups),
                 ", a default" if budgets.default != Limits() else "")
        return True

    def _read_stamps(self) -> list[Stamp]:
        stamps: list[Stamp] = []
        for path in self.paths:
            try:
                info = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_mtime_ns, info.st_size))
        return stamps

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # the watch goes on whatever one look hit
                log.exception("config check failed")
