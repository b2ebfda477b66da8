"""GPU idleness end to end, through the magic against the real gateway process: the notebook
is told before its idle GPU is taken back, the lease ends with reason ``gpu_idle``, and its
variables come back with the next ``%%gpu`` cell. Emulated GPUs: the kernel's busy/idle
status stands in for NVML.

Both the warning and the end reach the notebook while it runs no ``%%gpu`` cell, from the
notice watcher's thread in the notebook's kernel. What a user sees, two ways:

- a notebook whose last cell has finished (nothing runs at all): read as JupyterLab reads it,
  from the kernel's IOPub channel with jupyter_client: the messages must be addressed to the
  last cell's request (JupyterLab keeps only that one listening once it is done);
- a notebook busy in a local cell (``time.sleep``: for the gateway the GPU is idle all the
  same): run with nbclient, the news must land in that running cell's output, and the next
  cells must not say it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from .conftest import serve
from .gateway_process import GatewayProcess
from .test_snapshots import run, text

WARNING = "its GPUs did no work and no cell ran for 2 s"
ENDED_NOTE = "the a100 lease ended (gpu_idle); its variables were kept"
WATCH_OFTEN = "import jupyter_gpu.magic\njupyter_gpu.magic.NOTICE_WATCH_INTERVAL = 0.5"


@pytest.fixture(scope="module")
def idle_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    store = tmp_path_factory.mktemp("gpu-idle-store")
    yield from serve(tmp_path_factory, "gpu-idle", "--inventory", "a100=1", "--cpu-slots", "0", "--min-warm", "1",
                     "--gpu-idle-timeout", "6", "--gpu-idle-warning", "4", "--snapshot-store", str(store))


def displayed(cell: Any) -> str:
    return "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs if o.output_type == "display_data")


def test_a_notebook_busy_in_a_local_cell_is_told_in_that_cell(idle_gateway: GatewayProcess) -> None:
    cells = run(idle_gateway, "alice",
                WATCH_OFTEN,
                "%%gpu a100 --no-pull\nimport numpy as np\nkept = np.arange(10)",
                "import time; time.sleep(4)",  # the warning comes at 2 s of GPU idleness
                "time.sleep(5)",  # the release at 6 s
                "%%gpu a100\nprint('back', kept.sum())",
                notebook="work/idle.ipynb")
    # the warning shows live in the cell that runs when it is posted, once
    warning = displayed(cells[2])
    assert f"jupyter-gpu: a100 lease: {WARNING}" in warning, cells[2].outputs
    assert "released for GPU idleness" in warning and "(in " in warning
    # and so does the end: in the next cell, on a line of its own
    ended = displayed(cells[3])
    assert ENDED_NOTE in ended and "The next %%gpu cell gets a fresh GPU kernel." in ended, cells[3].outputs
    assert "GPU idleness" not in ended
    # nothing of it is said again by the path that prints before the next cells
    later = text(cells[3], "stderr") + text(cells[4], "stderr") + displayed(cells[4])
    assert "GPU idleness" not in later and "lease ended" not in later, cells[4].outputs
    # the next %%gpu cell gets its variables back on a fresh lease
    assert "jupyter-gpu: restored" in text(cells[4], "stderr"), cells[4].outputs
    assert "back 45" in text(cells[4], "stdout"), cells[4].outputs
    released = idle_gateway.get("alice", "/api/gpu/leases?released=1").body
    # the first lease ended for GPU idleness; the second when the notebook's kernel shut down
    assert [row["reason"] for row in sorted(released, key=lambda row: row["queued_at"])] == ["gpu_idle", "deleted"]


class Notebook:
    """A notebook's kernel driven over jupyter_client, as JupyterLab drives it."""

    def __init__(self, gateway: GatewayProcess, user: str, notebook: str) -> None:
        env = {**os.environ, "JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens[user],
               "JPY_SESSION_NAME": notebook}
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 60.0) -> tuple[str, list[dict[str, Any]]]:
        """Run a cell to its end: its request's id and the IOPub messages addressed to it."""
        outputs: list[dict[str, Any]] = []
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
        assert reply["content"]["status"] == "ok", (code, reply["content"], outputs)
        return str(reply["parent_header"]["msg_id"]), outputs

    def listen(self, until: Any, timeout: float) -> list[dict[str, Any]]:
        """IOPub messages while no cell runs, up to the one ``until`` accepts."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not seen or not until(seen[-1]):
            assert time.monotonic() < deadline, f"not within {timeout} s: {seen}"
            try:
                seen.append(self.kc.get_iopub_msg(timeout=0.5))
            except Exception:  # queue.Empty: nothing yet
                continue
        return seen

    def quiet_for(self, seconds: float) -> list[dict[str, Any]]:
        """IOPub messages during ``seconds`` while no cell runs."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                seen.append(self.kc.get_iopub_msg(timeout=0.2))
            except Exception:  # queue.Empty: nothing yet
                continue
        return seen

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def _text(msg: dict[str, Any]) -> str:
    return str(msg["content"].get("data", {}).get("text/plain", ""))


WATCHER_THREADS = ("import threading, time\n"
                   "for _ in range(50):\n"
                   "    watching = [t for t in threading.enumerate() if t.name == 'jupyter-gpu-notices']\n"
                   "    if not watching: break\n"
                   "    time.sleep(0.1)\n"
                   "print('watcher threads:', len(watching))")


def test_an_idle_notebook_is_told_in_its_last_cell_and_no_thread_is_left(idle_gateway: GatewayProcess) -> None:
    notebook = Notebook(idle_gateway, "bob", "work/idle-jc.ipynb")
    try:
        notebook.execute(f"%load_ext jupyter_gpu\n{WATCH_OFTEN}")
        notebook.execute("%%gpu a100 --no-pull\nimport numpy as np\nkept = np.arange(10)")
        last, _ = notebook.execute("y = 2")  # a local cell: the last one the notebook ran
        notebook.kc.complete("ke", reply=True, timeout=10)  # the user types: the kernel's last request is not a cell
        # Nothing runs from now on: the warning, then the end, come on their own.
        heard = notebook.listen(lambda msg: ENDED_NOTE in _text(msg), timeout=20)
        shown = [msg for msg in heard if msg["msg_type"] in ("display_data", "update_display_data")]
        assert [msg["msg_type"] for msg in shown] == ["display_data", "update_display_data"], heard
        warning, end = shown
        assert WARNING in _text(warning) and "released for GPU idleness" in _text(warning)
        # addressed to the last cell, where JupyterLab shows it, and the end replaces the warning in place
        assert {msg["parent_header"]["msg_id"] for msg in shown} == {last}
        display_id = warning["content"]["transient"]["display_id"]
        assert end["content"]["transient"]["display_id"] == display_id
        assert WARNING not in _text(end) and "The next %%gpu cell gets a fresh GPU kernel." in _text(end)
        assert not [msg for msg in heard if msg["msg_type"] == "stream"], heard  # printed nowhere else
        # no lease held: the watcher's thread has ended by itself
        _, outputs = notebook.execute(WATCHER_THREADS)
        assert "watcher threads: 0" in "".join(m["content"].get("text", "") for m in outputs), outputs
        # the next %%gpu cell: variables back on a fresh lease, the end not told again
        _, outputs = notebook.execute("%%gpu a100\nprint('back', kept.sum())")
        streams = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "back 45" in streams and "jupyter-gpu: restored" in streams, outputs
        assert "lease ended" not in streams
        # a lease held again: a thread watches it; %unload_ext stops it and ends the lease
        _, outputs = notebook.execute(WATCHER_THREADS.replace("if not watching", "if watching"))
        assert "watcher threads: 1" in "".join(m["content"].get("text", "") for m in outputs), outputs
        notebook.execute("%unload_ext jupyter_gpu")
        _, outputs = notebook.execute(WATCHER_THREADS)
        assert "watcher threads: 0" in "".join(m["content"].get("text", "") for m in outputs), outputs
        assert idle_gateway.get("bob", "/api/gpu/leases").body == []
        _, outputs = notebook.execute("print('gpu' in get_ipython().magics_manager.magics['cell'])")
        assert "False" in "".join(m["content"].get("text", "") for m in outputs)
    finally:
        notebook.close()


def test_a_kernel_that_died_in_a_cell_is_told_by_that_cell_and_the_next_not_by_the_watcher(
        idle_gateway: GatewayProcess) -> None:
    notebook = Notebook(idle_gateway, "bob", "work/died.ipynb")
    try:
        notebook.execute(f"%load_ext jupyter_gpu\n{WATCH_OFTEN}")
        notebook.execute("%%gpu a100\nx = 1")
        outputs: list[dict[str, Any]] = []
        reply = notebook.kc.execute_interactive("%%gpu a100\nimport os, time; time.sleep(0.5); os._exit(1)",
                                                timeout=60, output_hook=outputs.append)
        assert reply["content"]["ename"] == "KernelDied", reply["content"]
        # the cell's error said it: while no cell runs, the watcher (a look every 0.5 s) says nothing more
        heard = notebook.quiet_for(3.0)
        assert not [msg for msg in heard if msg["msg_type"] in ("display_data", "update_display_data", "stream")]
        # the next cell says it again as it takes a fresh kernel
        _, outputs = notebook.execute("%%gpu a100\nprint('fresh')")
        streams = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "the a100 lease ended (kernel_died)" in streams and "fresh" in streams, outputs
    finally:
        notebook.close()
