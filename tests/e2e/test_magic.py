"""``%%gpu`` end to end: a real local ipykernel runs the magic against the real gateway.

Notebooks in tests/notebooks are executed by nbclient, as a user's "Run All" would; the
interactive parts (Ctrl-C, input()) drive a local kernel with jupyter_client.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from .conftest import serve
from .gateway_process import GatewayProcess

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.fixture(scope="module")
def cpu_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from serve(tmp_path_factory, "magic", "--inventory", "a100=1", "--cpu-slots", "3", "--min-warm", "2")


def kernel_env(gateway: GatewayProcess, user: str) -> dict[str, str]:
    return {**os.environ, "JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens[user]}


def run_notebook(path: Path, env: dict[str, str], timeout: int = 120) -> nbformat.NotebookNode:
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=timeout, kernel_name="python3").execute(env=env)
    return book


def texts(cell: nbformat.NotebookNode, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def test_basics_notebook_runs_end_to_end(cpu_gateway: GatewayProcess) -> None:
    book = run_notebook(NOTEBOOKS / "basics.ipynb", kernel_env(cpu_gateway, "alice"))
    cells = book.cells
    # the remote cell saw its pin (cpu kernels see no GPU) and a notebook-defined class worked
    assert "pinned to: ''" in texts(cells[2])
    assert cells[2].outputs[-1].output_type == "execute_result"
    assert cells[2].outputs[-1].data["text/plain"] == str(3 * sum(range(1_000_000)) * 1.0)
    assert "local total" in texts(cells[3])  # the pulled values were there locally
    assert any("image/png" in o.get("data", {}) for o in cells[4].outputs), cells[4].outputs  # matplotlib inline
    # 500 updates of one display id leave one output showing the last state, not 500 copies
    bar_outputs = [o for o in cells[5].outputs if o.output_type == "display_data"]
    assert len(bar_outputs) == 1 and bar_outputs[0].data["text/plain"] == "'500/500'"
    assert "500/500" in texts(cells[6], "stderr")  # tqdm's bar arrived
    error = cells[7].outputs[-1]
    assert error.output_type == "error" and error.ename == "ZeroDivisionError"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
    assert "----> 2 1 / 0" in plain and "magic" not in plain  # the remote traceback, not the magic's
    # labelled with where it ran, as ipyparallel labels an engine's errors
    assert plain.startswith("[the cpu kernel of lease ") and " on node 127.0.0.1]" in plain.splitlines()[0]
    refused = texts(cells[9], "stderr")  # a UsageError: the cell failed before anything ran remotely
    assert "variable 'lock' (a _thread.lock) cannot be sent" in refused and "--no-push lock" in refused
    assert cells[10].outputs == []  # --no-push let it run
    assert "RemoteRef('kept_remote': numpy.ndarray, shape=(10000,)" in texts(cells[12])
    assert "pull limit" in texts(cells[12])
    assert "kept_sum 10000.0" in texts(cells[14])  # the remote object was used in place
    assert "cpu GPU" in texts(cells[15]) and "granted" in texts(cells[15])
    # tqdm.notebook draws one widget bar that updates in place: one view, its model ends at 500
    views = [o for o in cells[16].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1
    state = book.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["state"].get("value") == 500 and m["state"].get("max") == 500 for m in state.values())


def test_quickstart_notebook_runs(cpu_gateway: GatewayProcess) -> None:
    book = run_notebook(NOTEBOOKS.parent.parent / "examples" / "quickstart.ipynb", kernel_env(cpu_gateway, "alice"))
    outputs = {i: texts(cell) for i, cell in enumerate(book.cells) if cell.cell_type == "code"}
    assert "running on GPU index 0" in outputs[4]
    assert "batch is still here: (64, 1000)" in outputs[8]
    assert "RemoteRef('activations'" in book.cells[11].outputs[0].data["text/plain"]
    assert "released 1 lease(s)" in outputs[14]
    # %gpu usage prints what `jupyter-gpu usage` prints, in the units of a bill (GPU-hours, cents)
    cli = subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", "usage"], env=kernel_env(cpu_gateway, "alice"),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert cli.startswith("usage of alice\ntype") and "\na100 " in cli and "no budget limits you" in cli, cli
    assert cli in outputs[14], (cli, outputs[14])
    assert re.search(r"^total: \d+\.\d{3} GPU-hours, \$\d+\.\d\d$", cli, re.MULTILINE), cli


def test_large_array_round_trip_and_unchanged_array_is_not_resent(cpu_gateway: GatewayProcess) -> None:
    book = run_notebook(NOTEBOOKS / "large_array.ipynb", kernel_env(cpu_gateway, "alice"), timeout=240)
    assert "bytes sent on the re-run:" in texts(book.cells[5])


def test_two_users_notebooks_at_once_see_only_their_own(cpu_gateway: GatewayProcess) -> None:
    results: dict[str, Any] = {}

    def run(user: str) -> None:
        book = nbformat.v4.new_notebook()
        book.cells = [
            nbformat.v4.new_code_cell("%load_ext jupyter_gpu"),
            nbformat.v4.new_code_cell(f"who = {user!r}"),
            nbformat.v4.new_code_cell("%%gpu cpu\nimport time\ntime.sleep(1)\nprint('I am', who)\nmine = who * 2"),
            nbformat.v4.new_code_cell("print(mine)"),
        ]
        try:
            NotebookClient(book, timeout=120, kernel_name="python3").execute(env=kernel_env(cpu_gateway, user))
            results[user] = book
        except Exception as exc:  # surfaced by the assertions below
            results[user] = exc

    threads = [threading.Thread(target=run, args=(user,)) for user in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for user in ("alice", "bob"):
        book = results[user]
        assert not isinstance(book, Exception), book
        assert texts(book.cells[2]) == f"I am {user}\n"
        assert texts(book.cells[3]) == f"{user * 2}\n"
    # shutting the local kernels down released their leases
    for user in ("alice", "bob"):
        assert cpu_gateway.get(user, "/api/gpu/leases").body == []


# --- interactive: a local kernel driven directly ---------------------------------------------


class LocalKernel:
    def __init__(self, env: dict[str, str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60, stdin: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        outputs: list[dict[str, Any]] = []
        reply = self.kc.execute_interactive(
            code, timeout=timeout, output_hook=outputs.append, stdin_hook=stdin, allow_stdin=stdin is not None
        )
        return reply["content"], outputs

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture
def local_kernel(cpu_gateway: GatewayProcess) -> Iterator[LocalKernel]:
    kernel = LocalKernel(kernel_env(cpu_gateway, "bob"))
    kernel.run("%load_ext jupyter_gpu")
    yield kernel
    kernel.close()


def streamed(outputs: list[dict[str, Any]], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def test_interrupt_stops_the_remote_cell_and_the_lease_stays_usable(local_kernel: LocalKernel) -> None:
    local_kernel.run("%%gpu cpu\nstate = 'kept'")

    def interrupt_soon() -> None:
        time.sleep(2)
        local_kernel.km.interrupt_kernel()

    threading.Thread(target=interrupt_soon).start()
    started = time.monotonic()
    reply, _ = local_kernel.run("%%gpu cpu\nimport time\ntime.sleep(60)")
    assert time.monotonic() - started < 20
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(state)")
    assert reply["status"] == "ok" and streamed(outputs) == "kept\n"


def test_timeout_interrupts_and_says_so(local_kernel: LocalKernel) -> None:
    reply, _ = local_kernel.run("%%gpu cpu --timeout 1\nimport time\ntime.sleep(30)")
    assert reply["ename"] == "TimeoutError" and "--timeout 1" in reply["evalue"]


def test_input_prompts_in_the_local_notebook(local_kernel: LocalKernel) -> None:
    def answer(msg: dict[str, Any]) -> None:
        assert msg["content"]["prompt"] == "name? "
        local_kernel.kc.input("Ada")

    reply, outputs = local_kernel.run("%%gpu cpu\nname = input('name? ')\nprint('hello', name)", stdin=answer)
    assert reply["status"] == "ok" and "hello Ada" in streamed(outputs)


def test_idle_release_then_next_cell_gets_a_fresh_kernel(
    local_kernel: LocalKernel, cpu_gateway: GatewayProcess
) -> None:
    # The next cell's note alone: the watcher that tells an idle notebook at once is tested in
    # tests/e2e/test_gpu_idle.py.
    local_kernel.run("import jupyter_gpu.magic\njupyter_gpu.magic.NOTICE_WATCH_INTERVAL = None")
    local_kernel.run("%%gpu cpu --idle 1 --pull-limit 1\nonly_remote = [1, 2, 3]")
    lease = cpu_gateway.get("bob", "/api/gpu/leases").body[0]
    deadline = time.monotonic() + 20
    while cpu_gateway.get("bob", f"/api/gpu/leases/{lease['id']}").body["state"] != "released":
        assert time.monotonic() < deadline, "the lease did not idle out"
        time.sleep(0.2)
    reply, outputs = local_kernel.run("%%gpu cpu\nimport os\nprint(os.getpid())")
    assert reply["status"] == "ok"
    notice = streamed(outputs, "stderr")
    assert "lease ended (idle)" in notice and "only_remote" in notice
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(only_remote)")
    assert reply["status"] == "error" and "re-run the cell that made it" in reply["evalue"]


def test_unknown_type_lists_what_the_gateway_offers(local_kernel: LocalKernel) -> None:
    reply, _ = local_kernel.run("%%gpu b200\nx = 1")
    assert reply["status"] == "error" and "b200" in reply["evalue"] and "cpu" in reply["evalue"]


def test_missing_settings_or_dead_gateway_fail_at_once_naming_what_to_fix() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_GPU_")}
    kernel = LocalKernel(env)
    try:
        kernel.run("%load_ext jupyter_gpu")
        reply, _ = kernel.run("%%gpu cpu\nx = 1")
        assert "JUPYTER_GPU_URL" in reply["evalue"]
        kernel.run("import os; os.environ.update(JUPYTER_GPU_URL='http://127.0.0.1:9', JUPYTER_GPU_TOKEN='t')")
        reply, _ = kernel.run("%%gpu cpu\nx = 1")
        assert "http://127.0.0.1:9" in reply["evalue"] and "does not answer" in reply["evalue"]
    finally:
        kernel.close()


def hold_every_cpu(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Alice takes all three CPU slots (waiting for kernels still warming up)."""
    held = [gateway.lease("alice", "cpu") for _ in range(3)]
    held = [gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=30").body for lease in held]
    assert all(lease["state"] == "granted" for lease in held)
    return held


def test_help_is_there(local_kernel: LocalKernel) -> None:
    reply, _ = local_kernel.run("%%gpu?")
    pages = "".join(p.get("data", {}).get("text/plain", "") for p in reply.get("payload", []))
    assert "--pull-limit" in pages and "h100|a100" in pages


def test_value_of_a_module_missing_locally_stays_remote_and_is_used_there(local_kernel: LocalKernel) -> None:
    # A module only the GPU kernel can import stands in for torch on a CPU-only notebook.
    reply, outputs = local_kernel.run(
        "%%gpu cpu\nimport sys, tempfile, pathlib\nhome = tempfile.mkdtemp()\n"
        "pathlib.Path(home, 'remote_only_lib.py').write_text('class Model:\\n    weight = 7\\n')\n"
        "sys.path.insert(0, home)\nimport remote_only_lib\nmodel = remote_only_lib.Model()"
    )
    assert reply["status"] == "ok"
    _, outputs = local_kernel.run("print(repr(model))")
    text = streamed(outputs)
    assert "RemoteRef('model': remote_only_lib.Model" in text and "remote_only_lib is not installed" in text
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(model.weight)")
    assert reply["status"] == "ok" and streamed(outputs) == "7\n"


def test_new_takes_a_fresh_lease_and_kernel(local_kernel: LocalKernel) -> None:
    # the kernel's id, not its pid: every sandboxed kernel is pid 2 in its own namespace
    local_kernel.run("%%gpu cpu\nimport os\nfirst = os.environ['JUPYTER_GPU_SLOT']")
    local_kernel.run("%%gpu cpu --new\nimport os\nsecond = os.environ['JUPYTER_GPU_SLOT']")
    _, outputs = local_kernel.run("print(first != second)")
    assert streamed(outputs) == "True\n"


def test_queued_cell_shows_its_place_and_runs_when_a_gpu_frees(
    local_kernel: LocalKernel, cpu_gateway: GatewayProcess
) -> None:
    held = hold_every_cpu(cpu_gateway)

    def free_one_soon() -> None:
        time.sleep(3)
        cpu_gateway.delete("alice", f"/api/gpu/leases/{held[0]['id']}")

    threading.Thread(target=free_one_soon).start()
    reply, outputs = local_kernel.run("%%gpu cpu\nprint('finally')", timeout=60)
    assert reply["status"] == "ok" and streamed(outputs) == "finally\n"
    shown = [m["content"]["data"].get("text/plain", "") for m in outputs
             if m["msg_type"] in ("display_data", "update_display_data")]
    assert any("position 1 in the queue" in text for text in shown)
    assert "got cpu after waiting" in shown[-1]


def test_interrupt_while_queued_cancels_the_request(local_kernel: LocalKernel, cpu_gateway: GatewayProcess) -> None:
    hold_every_cpu(cpu_gateway)
    threading.Thread(target=lambda: (time.sleep(2), local_kernel.km.interrupt_kernel())).start()
    reply, _ = local_kernel.run("%%gpu cpu\nprint('never')", timeout=60)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert cpu_gateway.get("bob", "/api/gpu/leases").body == []  # the queued request is gone


def test_torch_tensors_made_remotely_come_back_as_tensors(local_kernel: LocalKernel) -> None:
    reply, _ = local_kernel.run("%%gpu cpu\nimport torch\nt = torch.linspace(0, 1, 1000)\nt.device")
    assert reply["status"] == "ok"
    _, outputs = local_kernel.run("print(type(t).__name__, t.device, float(t.sum()))")
    assert streamed(outputs) == "Tensor cpu 500.0\n"


def test_a_value_changed_in_place_remotely_is_sent_again(local_kernel: LocalKernel) -> None:
    local_kernel.run("import numpy as np\nx = np.zeros(5)")
    local_kernel.run("%%gpu cpu\nx.fill(7)  # changes the kernel's copy, not the notebook's")
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(x.sum())")
    # the notebook's x (zeros) is what the cell reads, not the kernel's stale 7s
    assert reply["status"] == "ok" and streamed(outputs) == "0.0\n"


def test_no_pull_leaves_remote_refs_that_later_cells_use(local_kernel: LocalKernel) -> None:
    local_kernel.run("%%gpu cpu --no-pull\nweights = [1, 2, 3]")
    _, outputs = local_kernel.run("print(type(weights).__name__)")
    assert streamed(outputs) == "RemoteRef\n"
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(sum(weights))")
    assert reply["status"] == "ok" and streamed(outputs) == "6\n"


def test_a_remote_ref_from_another_kernel_fails_without_touching_either_lease(
    local_kernel: LocalKernel, cpu_gateway: GatewayProcess
) -> None:
    local_kernel.run("%%gpu cpu --no-pull\nstate = {'step': 1}")
    reply, _ = local_kernel.run("%%gpu a100\nprint(state)")
    assert reply["status"] == "error" and "lives only on the cpu kernel" in reply["evalue"]
    leases = cpu_gateway.get("bob", "/api/gpu/leases").body
    assert [lease["gpu_type"] for lease in leases] == ["cpu"]  # no extra lease taken, none dropped
    reply, outputs = local_kernel.run("%%gpu cpu\nprint(state['step'])")
    assert reply["status"] == "ok" and streamed(outputs) == "1\n"


def test_shell_escapes_and_magics_inside_a_gpu_cell(local_kernel: LocalKernel) -> None:
    reply, outputs = local_kernel.run("%%gpu cpu\n!echo from-the-gpu-kernel\n%time small = [1]\nsmall_len = len(small)")
    assert reply["status"] == "ok" and "from-the-gpu-kernel" in streamed(outputs)
    _, outputs = local_kernel.run("print(small_len)")
    assert streamed(outputs) == "1\n"


#: In a %%gpu cell: what came with the kernel message that runs it (the push, when it rode along).
CARRIED = ("parent = get_ipython().kernel.get_parent('shell')\n"
           "print(sorted(parent['metadata']), len(parent['buffers']))\n")


def test_pushed_values_ride_in_the_cells_own_message_once_the_kernel_said_it_takes_them(
    local_kernel: LocalKernel,
) -> None:
    local_kernel.run("import numpy as np\nx = np.arange(100_000)\nname = 'first'")
    # The first cell of a lease pushes on the helper's comm (its hello has not been read yet) ...
    reply, outputs = local_kernel.run("%%gpu cpu\n" + CARRIED + "print(x.sum(), name)")
    assert reply["status"] == "ok", reply
    assert streamed(outputs) == f"['jupyter_gpu_pull'] 0\n{sum(range(100_000))} first\n"
    # ... later ones in the execute_request itself (x: its pickle and its buffer; name: its pickle):
    # one kernel message per cell, values intact.
    local_kernel.run("x = x * 2\nname = 'second'")
    reply, outputs = local_kernel.run("%%gpu cpu\n" + CARRIED + "print(x.sum(), name, x.flags.writeable)")
    assert reply["status"] == "ok", reply
    assert streamed(outputs) == f"['jupyter_gpu_pull', 'jupyter_gpu_push'] 3\n{2 * sum(range(100_000))} second True\n"
    # A cell calling run_cell does not get its values pushed a second time (its changes stay).
    local_kernel.run("name = 'third'")
    reply, outputs = local_kernel.run("%%gpu cpu\nname = 'changed'\nget_ipython().run_cell('pass')\nprint(name)")
    assert reply["status"] == "ok" and streamed(outputs) == "changed\n", (reply, outputs)


def test_a_pushed_value_the_kernel_cannot_rebuild_fails_its_cell_naming_it(
    local_kernel: LocalKernel, tmp_path: Path
) -> None:
    (tmp_path / "only_here.py").write_text("class Point:\n    pass\n")
    local_kernel.run("%%gpu cpu\nwarm = 1")  # the helper's hello is in: pushes ride in the execute_request
    local_kernel.run(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport only_here\np = only_here.Point()")
    reply, _ = local_kernel.run("%%gpu cpu\nprint('ran')\nq = p")
    assert reply["status"] == "error" and reply["ename"] == "PushError", reply
    assert "'p' could not be rebuilt on the GPU kernel" in reply["evalue"] and "only_here" in reply["evalue"]
    reply, outputs = local_kernel.run("%%gpu cpu\nprint('next cell runs')")  # the lease is fine
    assert reply["status"] == "ok" and streamed(outputs) == "next cell runs\n"


def test_pulled_arrays_are_writable(local_kernel: LocalKernel) -> None:
    local_kernel.run("%%gpu cpu\nimport numpy as np\nsmall = np.zeros(10)")
    reply, outputs = local_kernel.run("small[0] = 5\nprint(small[0])")
    assert reply["status"] == "ok" and streamed(outputs) == "5.0\n"


def test_a_dropped_connection_mid_cell_reconnects_and_loses_no_output(local_kernel: LocalKernel) -> None:
    local_kernel.run("%%gpu cpu\nready = True")
    # Cut the notebook's TCP connection to the gateway one second into the next cell.
    local_kernel.run(
        "import socket, threading\n"
        "session = get_ipython().magics_manager.registry['GpuMagics'].sessions['cpu']\n"
        "threading.Timer(1.0, lambda: session.channel.sock.shutdown(socket.SHUT_RDWR)).start()"
    )
    reply, outputs = local_kernel.run(
        "%%gpu cpu\nimport time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)\nafter = 'kept'"
    )
    assert reply["status"] == "ok"
    assert [int(line) for line in streamed(outputs).split()] == list(range(30))
    _, outputs = local_kernel.run("print(after)")
    assert streamed(outputs) == "kept\n"  # the values still came back over the new connection
