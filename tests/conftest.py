"""Fixtures shared by more than one test module of this folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pool_manager.node_bulk import NodeReceiver


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NodeReceiver]:
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    node = NodeReceiver("127.0.0.1", str(staging))
    yield node
    node.close()
