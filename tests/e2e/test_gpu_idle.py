"""GPU idleness end to end, through the magic against the real gateway process: the notebook
is told before its idle GPU is taken back, the lease ends with reason ``gpu_idle``, and its
variables come back with the next ``%%gpu`` cell. Emulated GPUs: the kernel's busy/idle
status stands in for NVML."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import serve
from .gateway_process import GatewayProcess
from .test_snapshots import run, text


@pytest.fixture(scope="module")
def idle_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    store = tmp_path_factory.mktemp("gpu-idle-store")
    yield from serve(tmp_path_factory, "gpu-idle", "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "1",
                     "--gpu-idle-timeout", "6", "--gpu-idle-warning", "4", "--snapshot-store", str(store))


def test_an_idle_gpu_is_announced_then_released_and_its_variables_come_back(idle_gateway: GatewayProcess) -> None:
    cells = run(idle_gateway, "alice",
                "import jupyter_gpu.magic\njupyter_gpu.magic.NOTICE_CHECK_INTERVAL = 0  # look before every cell",
                "%%gpu a100 --no-pull\nimport numpy as np\nkept = np.arange(10)",
                "import time; time.sleep(3)",  # idle 3 s: the warning (at 2 s) is out
                "time.sleep(5)",  # the release comes at 6 s
                "%%gpu a100\nprint('back', kept.sum())",
                notebook="work/idle.ipynb")
    # the notice shows in the next cell, local as it is, once
    warning = text(cells[3], "stderr")
    assert "jupyter-gpu: a100 lease: its GPUs did no work and no cell ran for 2 s" in warning, cells[3].outputs
    assert "released for GPU idleness" in warning and "(in " in warning
    assert "GPU idleness" not in text(cells[4], "stderr") + text(cells[2], "stderr")
    # the next %%gpu cell says why the lease ended, and gets its variables back on a fresh one
    note = text(cells[4], "stderr")
    assert "the a100 lease ended (gpu_idle); its variables were kept" in note, cells[4].outputs
    assert "jupyter-gpu: restored" in note and "kept" in note
    assert "back 45" in text(cells[4], "stdout"), cells[4].outputs
    released = idle_gateway.get("alice", "/api/gpu/leases?all=1").body
    # the first lease ended for GPU idleness; the second when the notebook's kernel shut down
    assert [row["reason"] for row in sorted(released, key=lambda row: row["queued_at"])] == ["gpu_idle", "deleted"]
