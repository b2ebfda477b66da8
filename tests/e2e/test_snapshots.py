"""Kept state end to end: a notebook's variables outlive an idle release and come back on
its next lease of another GPU type, through the magic, against the real gateway process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import make_gateway
from .gateway_process import GatewayProcess, poll

NOTEBOOK = "work/analysis.ipynb"


@pytest.fixture(scope="module")
def keeping_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("snapshots")
    process = make_gateway(tmp, "--inventory", "a100=1,h100=1", "--cpu-slots", "1", "--min-warm", "1",
                           "--snapshot-store", str(tmp / "store")).start()
    yield process
    process.stop()


def run(gateway: GatewayProcess, user: str, *cells: str, notebook: str = NOTEBOOK) -> list[Any]:
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(source) for source in ("%load_ext jupyter_gpu", *cells)]
    # jupyter_server tells a notebook's kernel its path in JPY_SESSION_NAME
    env = {**os.environ, "JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens[user],
           "JPY_SESSION_NAME": notebook}
    NotebookClient(book, timeout=120, kernel_name="python3").execute(env=env)
    return list(book.cells[1:])


def text(cell: Any, name: str) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def wait_until_released(gateway: GatewayProcess, user: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Until the user holds no lease and their kept snapshot is listed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not gateway.get(user, "/api/gpu/leases").body:
            kept = [item for item in gateway.get(user, "/api/gpu/snapshots").body if item["state"] == "kept"]
            if kept:
                return kept
        time.sleep(0.2)
    raise TimeoutError(gateway.log_text())


MAKE_STATE = """%%gpu a100 --idle 2 --no-pull
import io, os
import numpy as np
import torch

class Particle:
    def __init__(self, mass):
        self.mass = mass

    def energy(self):
        return self.mass * 9

big = np.arange(2_000_000, dtype=np.float64)
t = torch.ones(3, 4) * 2
p = Particle(2.5)
weights = {"a": np.full(10, 7.0), "b": np.zeros(3)}
log = open(os.devnull, "w")
gen = (i for i in range(3))
print("made")
"""

USE_STATE = """%%gpu h100 --no-pull
print("state:", big.sum(), t.sum().item(), p.energy(), weights["a"].sum(), sorted(weights))
"""


def test_variables_outlive_an_idle_release_and_come_back_on_another_type(keeping_gateway: GatewayProcess) -> None:
    gateway = keeping_gateway
    # The first notebook run: state made on an a100 lease that is then released for idleness.
    cells = run(gateway, "alice", MAKE_STATE, "import time; time.sleep(4)", "%gpu snapshots")
    assert "made" in text(cells[0], "stdout")
    (kept,) = wait_until_released(gateway, "alice")
    assert kept["notebook"] == NOTEBOOK and kept["gpu_type"] == "a100"
    assert {"big", "t", "p", "weights", "Particle", "np", "torch"} <= set(kept["names"])
    assert set(kept["unsaved"]) == {"log", "gen"} and kept["nbytes"] > 16_000_000
    assert kept["expires_in"] > 23 * 3600

    # Another user cannot list, restore or delete it, even naming the same notebook.
    assert gateway.get("bob", "/api/gpu/snapshots").body == []
    assert gateway.delete("bob", f"/api/gpu/snapshots/{kept['id']}").status == 404
    bobs = gateway.post("bob", "/api/gpu/leases", {"gpu": "cpu", "notebook": NOTEBOOK}).body
    assert "restore" not in bobs
    gateway.delete("bob", f"/api/gpu/leases/{bobs['id']}")
    assert [k["id"] for k in gateway.get("alice", "/api/gpu/snapshots").body] == [kept["id"]]

    # The same notebook, run again in a fresh local kernel (nothing to push: the values are
    # not here), reads them on an h100: restored from the snapshot before the cell ran.
    cells = run(gateway, "alice", USE_STATE)
    assert "state: 1999999000000.0 24.0 22.5 70.0 ['a', 'b']" in text(cells[0], "stdout"), cells[0].outputs
    note = text(cells[0], "stderr")
    assert "jupyter-gpu: restored" in note and "big" in note and "MB in" in note
    assert "not restored: gen (" in note and "log (TypeError: an open file" in note
    # restoring moved it into the kernel: nothing is kept until that lease ends
    assert gateway.get("alice", "/api/gpu/snapshots").body == []


def test_remote_values_in_the_notebook_follow_to_the_next_lease(keeping_gateway: GatewayProcess) -> None:
    """RemoteRefs of the released lease point at the new one: the cell runs as if the GPU
    had never been given back, and ``%gpu release`` keeps, ``--forget`` does not."""
    cells = run(gateway := keeping_gateway, "alice",
                "%%gpu a100 --no-pull\nimport numpy as np\nkept_remote = np.ones(1000)",
                "%gpu release",
                "%gpu snapshots",
                "%%gpu h100\nprint('total', kept_remote.sum())",
                "%%gpu h100 --no-pull\nother = 5",
                "%gpu release --forget",
                "%gpu snapshots",
                notebook="work/refs.ipynb")
    assert "their variables are kept" in text(cells[1], "stdout")
    # listed at once, while the kernel may still be writing it
    assert "work/refs.ipynb (this notebook)" in text(cells[2], "stdout")
    # the h100 was granted at once, while the a100 still saved: its restore waited for that
    assert "total 1000.0" in text(cells[3], "stdout"), cells[3].outputs
    assert "restored" in text(cells[3], "stderr")
    assert "keeping nothing" in text(cells[5], "stdout")
    assert "no variables are kept" in text(cells[6], "stdout")
    assert gateway.get("alice", "/api/gpu/snapshots").body == []


def test_a_gateway_restart_keeps_snapshots(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--cpu-slots", "1", "--snapshot-store", str(tmp_path / "store")).start()
    try:
        run(gateway, "alice", "%%gpu cpu --no-pull\nsurvivor = [1, 2, 3]", "%gpu release", notebook="nb.ipynb")
        (kept,) = wait_until_released(gateway, "alice")
        gateway.stop()
        gateway.start()
        assert [k["id"] for k in gateway.get("alice", "/api/gpu/snapshots").body] == [kept["id"]]
        cells = run(gateway, "alice", "%%gpu cpu\nprint('back', survivor)", notebook="nb.ipynb")
        assert "back [1, 2, 3]" in text(cells[0], "stdout"), cells[0].outputs
    finally:
        gateway.stop()




@pytest.mark.asyncio
async def test_release_mid_cell_interrupts_and_keeps_kernel_death_keeps_nothing(
        keeping_gateway: GatewayProcess) -> None:
    gateway = keeping_gateway
    lease = gateway.lease("alice", "cpu", notebook="work/busy.ipynb")
    socket = await gateway.connect("alice", lease["kernel_id"])
    socket.execute("progress = 41\nimport time\ntime.sleep(60)")
    await socket.recv(5)  # the cell is running
    time.sleep(0.5)
    ended = gateway.delete("alice", f"/api/gpu/leases/{lease['id']}").body
    assert ended["snapshot"]["state"] == "saving"  # the release answers at once; the save follows
    def saved() -> Any:
        kept = gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body["snapshot"]
        return kept if kept["state"] != "saving" else None

    outcome = poll(saved, 30, "the snapshot of a busy kernel")
    assert outcome["state"] == "kept" and "progress" in outcome["names"], outcome
    socket.close()

    # A kernel that dies keeps nothing (there is nothing left to ask), and says so by saying nothing.
    dying = gateway.lease("alice", "cpu", notebook="work/dies.ipynb")
    dying = gateway.get("alice", f"/api/gpu/leases/{dying['id']}?wait=30").body  # its kernel was the one saving
    socket = await gateway.connect("alice", dying["kernel_id"])
    socket.execute("lost = 1\nimport os\nos._exit(1)")
    row = poll(lambda: (r := gateway.get("alice", f"/api/gpu/leases/{dying['id']}").body)["state"] == "released"
               and r, 20, "the dead kernel's lease to end")
    assert row["reason"] == "kernel_died" and "snapshot" not in row
    socket.close()
    notebooks = {k["notebook"] for k in gateway.get("alice", "/api/gpu/snapshots").body}
    assert "work/busy.ipynb" in notebooks and "work/dies.ipynb" not in notebooks
    gateway.delete("alice", "/api/gpu/snapshots?notebook=work/busy.ipynb")
    poll(lambda: any(t["name"] == "cpu" and t["warm"] for t in gateway.get("alice", "/api/gpu/types").body), 30,
         "a warm cpu kernel again")
