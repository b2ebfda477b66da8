"""Budgets re-read from the config file while the gateway runs: a file that is gone (moved away,
or an editor between removing and rewriting it) lifts no budget; one written back applies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from traitlets.config import Config

from kernel_gateway.config_watch import ConfigWatcher
from pool_manager.budgets import BudgetConfig, Limits


def write(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))  # a new mtime for each version, however fast the test writes


def test_a_config_file_that_is_gone_lifts_no_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jupyter_gpu_config.py"
    write(path, 'c.Budgets.default = {"gpus": 1}\n', 10**18)
    applied: list[BudgetConfig] = []
    watcher = ConfigWatcher([str(path)], Config(), applied.append, interval=0)

    path.unlink()
    assert watcher.check() is False and applied == []
    assert "is gone: the budgets in force stay" in caplog.text

    write(path, 'c.Budgets.default = {"gpus": 2}\n', 2 * 10**18)  # back, changed: in force
    assert watcher.check() is True
    assert applied[-1].default == Limits(gpus=2)
    write(path, "c.Budgets.default = {}\n", 3 * 10**18)  # lifting them is said in the file
    assert watcher.check() is True and applied[-1].empty
