"""Large pulled values leave the kernel through FIFOs the gateway splices past the websocket.

The kernel offers each large pulled buffer as a FIFO in its own staging directory; the
client fetches it over an upgraded HTTP connection and the gateway splices it across.
Checked here: the value comes back whole through the magic, only its owner can fetch it,
a file or link a kernel names is never served, and a kernel that dies before its pull was
fetched fails the cell with a clear error and leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpu.client import GatewayClient, GatewayError, KernelChannel
from jupyter_gpu.protocol import HELPER_COMM_TARGET, PULL_METADATA_KEY

from .conftest import serve
from .gateway_process import GatewayProcess, host_pid, poll
from .test_magic import LocalKernel, kernel_env, streamed
from .test_uploads import client_for, granted_kernel, kernel_staging_dirs, raw_upload


def staged_files(gateway: GatewayProcess) -> list[Path]:
    """Everything in the kernels' staging directories: files, FIFOs, links."""
    return sorted(entry for directory in kernel_staging_dirs(gateway) for entry in directory.iterdir())


SESSION = "get_ipython().magics_manager.registry['GpuMagics'].sessions['cpu']"


@pytest.fixture(scope="module")
def download_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from serve(tmp_path_factory, "downloads", "--cpu-slots", "2", "--min-warm", "1")


@pytest.fixture
def notebook(download_gateway: GatewayProcess) -> Iterator[LocalKernel]:
    kernel = LocalKernel(kernel_env(download_gateway, "alice"))
    kernel.run("%load_ext jupyter_gpu\nimport numpy as np")
    yield kernel
    kernel.close()


def staged_pull(gateway: GatewayProcess, user: str, code: str, kernel_id: str | None = None
                ) -> tuple[str, KernelChannel, dict[str, Any]]:
    """Run ``code`` on ``kernel_id`` (else a new lease of ``user``'s) the way the magic does,
    bringing ``b`` back as a download, and return the kernel id, the open channel and the
    ``pulled`` message's data (the download is not fetched)."""
    kernel_id = kernel_id or granted_kernel(gateway, user)
    channel = client_for(gateway, user).open_channel(kernel_id)
    comm_id = "c" * 32
    channel.send("shell", "comm_open", {"comm_id": comm_id, "target_name": HELPER_COMM_TARGET, "data": {}})
    pull = {"names": ["b"], "limit": 10**9, "missing_modules": [], "verify": [], "downloads": True}
    msg_id = channel.send("shell", "execute_request", {"code": code, "silent": False},
                          metadata={PULL_METADATA_KEY: pull})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = channel.recv(timeout=1)
        if msg is None or msg["parent_header"].get("msg_id") != msg_id:
            continue
        data = msg["content"].get("data") or {}
        if msg["header"]["msg_type"] == "comm_msg" and data.get("op") == "pulled":
            return kernel_id, channel, data
    raise AssertionError("no pulled message")


def download_path(kernel_id: str, download: str, nbytes: int) -> str:
    return f"/api/kernels/{kernel_id}/download/{download}?nbytes={nbytes}"


DOWNLOAD = {"Connection": "Upgrade", "Upgrade": "jupyter-gpu-download"}


def test_a_large_pulled_array_comes_back_past_the_websocket(notebook: LocalKernel,
                                                            download_gateway: GatewayProcess) -> None:
    reply, _ = notebook.run("%%gpu cpu\nb = np.arange(5_000_000, dtype=np.float64)\nsmall = np.arange(10)")
    assert reply["status"] == "ok", reply
    _, outputs = notebook.run(f"print(b.sum(), b.flags.writeable, small.sum(), {SESSION}.bytes_downloaded)")
    assert streamed(outputs) == f"{float(sum(range(5_000_000)))} True 45 40000000\n"
    assert staged_files(download_gateway) == []  # fetched files leave nothing behind
    # the pulled value is the notebook's own: writable, and the kernel's copy is untouched
    notebook.run("b[0] = -1.0")
    _, outputs = notebook.run("%%gpu cpu --no-pull\nprint(b[0])")
    assert streamed(outputs) == "-1.0\n"  # changed locally, so pushed back with the cell


def test_only_the_owner_can_fetch_a_pull_and_only_once(download_gateway: GatewayProcess) -> None:
    kernel_id, channel, pulled = staged_pull(download_gateway, "alice",
                                             "import numpy as np\nb = np.full(6_000_000, 7, dtype=np.uint8)")
    try:
        [(index, download)] = pulled["downloads"].items()
        nbytes = pulled["sizes"][int(index)]
        path = download_path(kernel_id, download, nbytes)
        status, body = raw_upload(download_gateway, path, {**DOWNLOAD, "Authorization": "token wrong"})
        assert status == 401
        bob = {**DOWNLOAD, "Authorization": f"token {download_gateway.tokens['bob']}"}
        status, body = raw_upload(download_gateway, path, bob)
        assert status == 404 and str(nbytes).encode() not in body  # bob learns nothing about alice's kernel
        with pytest.raises(GatewayError) as refused:
            client_for(download_gateway, "bob").download(kernel_id, download, nbytes)
        assert refused.value.status == 404
        alice = client_for(download_gateway, "alice")
        for bad in ("..", "pull-" + "0" * 32, download.upper()):
            with pytest.raises(GatewayError) as unknown:
                alice.download(kernel_id, bad, nbytes)
            assert unknown.value.status == 404, bad
        data = alice.download(kernel_id, download, nbytes)
        assert len(data) >= nbytes and data[:nbytes] == b"\x07" * nbytes
        assert staged_files(download_gateway) == []
        with pytest.raises(GatewayError) as again:
            alice.download(kernel_id, download, nbytes)
        assert again.value.status == 404 and "re-running the cell" in str(again.value)
    finally:
        channel.close()


def test_a_kernel_cannot_have_the_gateway_send_a_file_it_links_to(download_gateway: GatewayProcess) -> None:
    """A stranger's kernel names as its pull a link to the gateway's own database, a file
    (which could be a hard link to someone else's), or a FIFO with a second name."""
    database = download_gateway.tmp / "usage.sqlite"
    nbytes = database.stat().st_size
    kernel_id, channel, _ = staged_pull(
        download_gateway, "alice",
        "import os\n"
        "staging = os.environ['JUPYTER_GPU_STAGING_DIR']\n"
        f"os.symlink({str(database)!r}, os.path.join(staging, 'pull-' + 'a' * 32))\n"
        f"open(os.path.join(staging, 'pull-' + 'b' * 32), 'wb').write(b'x' * {nbytes})\n"
        "os.mkfifo(os.path.join(staging, 'pull-' + 'c' * 32))\n"
        "os.link(os.path.join(staging, 'pull-' + 'c' * 32), os.path.join(staging, 'pull-' + 'd' * 32))\n"
        "b = 1",
    )
    try:
        alice = client_for(download_gateway, "alice")
        for name in ("a", "b", "c", "d"):
            with pytest.raises(GatewayError) as refused:
                alice.download(kernel_id, "pull-" + name * 32, nbytes)
            assert refused.value.status == 404
    finally:
        channel.close()


def test_a_kernel_that_dies_before_its_pull_is_fetched_fails_the_cell_and_leaves_nothing(
        notebook: LocalKernel, download_gateway: GatewayProcess) -> None:
    notebook.run("%%gpu cpu\nx = 1")
    [lease] = download_gateway.get("alice", "/api/gpu/leases").body
    pid = host_pid(download_gateway, lease["kernel_id"])
    assert pid is not None
    # The notebook's next download starts only once the kernel is dead and the gateway knows it.
    notebook.run(
        "import os, signal, time\n"
        "from jupyter_gpu.client import GatewayClient\n"
        "_fetch = GatewayClient.download\n"
        "def _after_the_kernel_died(self, *args, **kwargs):\n"
        f"    os.kill({pid}, signal.SIGKILL)\n"
        "    deadline = time.monotonic() + 20\n"
        f"    while self.get_lease({lease['id']!r})['state'] == 'granted' and time.monotonic() < deadline:\n"
        "        time.sleep(0.1)\n"
        "    return _fetch(self, *args, **kwargs)\n"
        "GatewayClient.download = _after_the_kernel_died\n"
    )
    reply, outputs = notebook.run("%%gpu cpu\nb = np.ones(8_000_000)")
    assert reply["status"] == "error"
    message = reply["evalue"]
    assert "'b'" in message and "kernel_died" in message and "re-run the cell" in message, message
    _, outputs = notebook.run("print('b' in dir())")
    assert streamed(outputs) == "False\n"
    assert staged_files(download_gateway) == []
    poll(lambda: not any(d.name.startswith(f"{lease['kernel_id']}-") for d in kernel_staging_dirs(download_gateway)),
         10, "the dead kernel's staging directory to go")
    notebook.run("GatewayClient.download = _fetch")


def test_without_staging_large_pulls_travel_over_the_websocket(tmp_path: Path) -> None:
    from .conftest import make_gateway

    gateway = make_gateway(tmp_path, "--cpu-slots", "1", "--min-warm", "1", "--staging-dir", "off").start()
    kernel = LocalKernel(kernel_env(gateway, "alice"))
    try:
        kernel.run("%load_ext jupyter_gpu\nimport numpy as np")
        reply, _ = kernel.run("%%gpu cpu\nb = np.arange(5_000_000, dtype=np.float64)")
        assert reply["status"] == "ok", reply
        _, outputs = kernel.run(f"print(b.sum(), {SESSION}.bytes_downloaded)")
        assert streamed(outputs) == f"{float(sum(range(5_000_000)))} 0\n"
    finally:
        kernel.close()
        gateway.stop()


def test_client_download_names_the_gateway_when_it_is_not_there() -> None:
    from jupyter_gpu.client import GatewayConfig

    with pytest.raises(GatewayError) as unreachable:
        GatewayClient(GatewayConfig("http://127.0.0.1:9", "t")).download("k", "pull-" + "0" * 32, 10, timeout=2)
    assert "does not answer" in str(unreachable.value)
