"""Stock Jupyter clients on pooled kernels: a real jupyter_server started with ``--gateway-url``
pointed at our gateway (what ``jupyter lab --gateway-url`` does), and nbclient batch runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from tornado.websocket import websocket_connect

from jupyter_gpu.protocol import TOKEN_ENV, URL_ENV

from .conftest import serve
from .gateway_process import GatewayProcess, KernelSocket, Reply, poll, stdout_text


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from serve(tmp_path_factory, "standard", "--inventory", "a100=1", "--cpu-slots", "1", "--min-warm", "1",
                     "--GatewayApp.kernel_request_timeout=5")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class JupyterServer:
    """``jupyter server --gateway-url=...``: every kernel it starts is a lease on our gateway."""

    proc: subprocess.Popen[str]
    url: str
    token: str
    log_path: Path

    @classmethod
    def start(cls, gateway: GatewayProcess, user: str, tmp: Path) -> JupyterServer:
        port, token = free_port(), uuid.uuid4().hex
        env = {key: value for key, value in os.environ.items() if key not in (URL_ENV, TOKEN_ENV)}
        env.update(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), PYTHONUNBUFFERED="1")
        log_path = tmp / "jupyter-server.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={tmp}", f"--gateway-url={gateway.url}",
             f"--GatewayClient.auth_token={gateway.tokens[user]}", "--GatewayClient.request_timeout=60"],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, text=True,
        )
        server = cls(proc, f"http://127.0.0.1:{port}", token, log_path)
        poll(lambda: server.ready(), 60, "jupyter_server to answer")
        return server

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyter_server exited:\n{self.log_path.read_text()}")
        try:
            return self.request("GET", "/api/status").status == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=90) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        return Reply(status, json.loads(payload) if payload.strip() else None)

    async def connect(self, kernel_id: str) -> KernelSocket:
        session_id = uuid.uuid4().hex
        ws_url = self.url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?session_id={session_id}"
        ws = await websocket_connect(f"{ws_url}&token={self.token}")
        # with a gateway, jupyter_server speaks the plain JSON protocol to its clients
        return KernelSocket(ws, session_id, binary=False)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def jupyter(pool: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    server = JupyterServer.start(pool, "alice", tmp_path_factory.mktemp("jupyter-server"))
    yield server
    server.stop()


def leases(gateway: GatewayProcess, user: str = "alice", everything: bool = False) -> list[dict[str, Any]]:
    return list(gateway.get(user, "/api/gpu/leases" + ("?released=1" if everything else "")).body)


@pytest.mark.asyncio
async def test_a_stock_jupyter_server_runs_interrupts_restarts_and_shuts_down_a_pooled_kernel(
    pool: GatewayProcess, jupyter: JupyterServer
) -> None:
    specs = jupyter.request("GET", "/api/kernelspecs").body["kernelspecs"]
    assert {"gpu-a100", "gpu-cpu"} <= set(specs)

    started = jupyter.request("POST", "/api/kernels", {"name": "gpu-a100"})
    assert started.status == 201, started
    kernel_id = started.body["id"]
    (lease,) = leases(pool)
    assert (lease["kernel_id"], lease["gpu_type"], lease["state"]) == (kernel_id, "a100", "granted")

    # execute: the websocket jupyter_server opens to the gateway (404 with hex kernel ids)
    socket = await jupyter.connect(kernel_id)
    reply, outputs = await socket.run("import os; kept = 42; print('GPU', os.environ['CUDA_VISIBLE_DEVICES'])")
    assert reply["content"]["status"] == "ok", reply
    assert stdout_text(outputs).strip() == f"GPU {lease['gpu_indices'][0]}"

    # the lease shows in the sidebar's API of this same server, with no JUPYTER_GPU_URL set
    sidebar = jupyter.request("GET", "/jupyter-gpu/state").body
    assert [held["kernel_id"] for held in sidebar["leases"]] == [kernel_id]

    # interrupt: the stop button
    msg_id = socket.execute("import time; time.sleep(60)")
    await socket.recv_until(lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "busy")
    assert jupyter.request("POST", f"/api/kernels/{kernel_id}/interrupt").status == 204
    reply, _ = await socket.collect(msg_id, timeout=20)
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    # restart: a new lease of the same type behind the same kernel id; the old one is billed and closed
    restarted = jupyter.request("POST", f"/api/kernels/{kernel_id}/restart")
    assert restarted.status == 200, restarted
    assert restarted.body["id"] == kernel_id
    socket.close()
    (new_lease,) = leases(pool)
    assert new_lease["id"] != lease["id"] and new_lease["gpu_type"] == "a100"
    assert new_lease["kernel_id"] == kernel_id
    old = pool.get("alice", f"/api/gpu/leases/{lease['id']}").body
    assert (old["state"], old["reason"]) == ("released", "restarted")
    socket = await jupyter.connect(kernel_id)
    reply, outputs = await socket.run("print('kept' in globals())")
    assert stdout_text(outputs).strip() == "False", outputs  # a fresh kernel: nothing of the old one
    assert [k["id"] for k in jupyter.request("GET", "/api/kernels").body] == [kernel_id]
    socket.close()

    # shutdown releases the lease
    assert jupyter.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
    assert leases(pool) == []
    ended = {row["id"]: row for row in leases(pool, everything=True)}
    assert ended[new_lease["id"]]["state"] == "released" and ended[new_lease["id"]]["reason"] == "deleted"
    pool.wait_warm()


def test_a_restart_that_finds_no_gpu_free_in_time_answers_503_and_holds_nothing(pool: GatewayProcess) -> None:
    held = pool.post("alice", "/api/kernels", {"name": "gpu-a100"}).body
    waiting = pool.lease("bob", "a100")  # in the queue first: he gets the GPU alice's restart frees
    assert waiting["state"] == "queued"
    restarted = pool.post("alice", f"/api/kernels/{held['id']}/restart")
    assert restarted.status == 503, restarted
    assert restarted.body["reason"] == "no_capacity" and "a100" in restarted.body["message"]
    assert pool.get("alice", "/api/kernels").body == [] and leases(pool) == []
    assert pool.get("alice", f"/api/kernels/{held['id']}").status == 404
    assert pool.get("bob", f"/api/gpu/leases/{waiting['id']}?wait=30").body["state"] == "granted"


def run_notebook(gateway: GatewayProcess, user: str, cells: list[str],
                 kernel_name: str) -> subprocess.CompletedProcess[str]:
    """nbclient with jupyter_server's gateway kernel manager as jupyter_gpu.batch fixes it (the gateway
    from JUPYTER_GPU_URL / JUPYTER_GPU_TOKEN); prints the executed notebook on success."""
    script = """
import json, sys
import nbformat
from nbclient import NotebookClient
from jupyter_gpu.batch import PooledKernelManager

nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in json.loads(sys.stdin.read())])
NotebookClient(nb, kernel_name=sys.argv[1], kernel_manager_class=PooledKernelManager, timeout=60).execute()
print(json.dumps(nb))
"""
    env = {**os.environ, URL_ENV: gateway.url, TOKEN_ENV: gateway.tokens[user]}
    return subprocess.run(
        [sys.executable, "-c", script, kernel_name],
        input=json.dumps(cells), capture_output=True, text=True, timeout=120, env=env,
    )


def test_nbclient_runs_a_whole_notebook_on_a_pooled_kernel_and_releases_it(pool: GatewayProcess) -> None:
    done = run_notebook(pool, "alice", [
        "import os\ngpu = os.environ['CUDA_VISIBLE_DEVICES']",
        "total = sum(range(10))\nprint('on GPU', gpu, 'total', total)",
        "{'total': total}",
    ], "gpu-a100")
    assert done.returncode == 0, done.stderr[-3000:]
    nb = nbformat.reads(done.stdout.strip().splitlines()[-1], as_version=4)
    assert nb.cells[1].outputs[0]["text"] == "on GPU 0 total 45\n"
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "{'total': 45}"
    # the batch run's kernel shut down with it: its lease ended and was metered
    poll(lambda: leases(pool) == [], 30, "the batch run's lease to end")
    (row,) = [r for r in leases(pool, everything=True) if r["gpu_type"] == "a100" and r["reason"] == "deleted"][:1]
    assert row["gpu_seconds"] > 0


def test_nbclient_fails_a_run_whose_cell_raises_with_the_remote_error(pool: GatewayProcess) -> None:
    done = run_notebook(pool, "alice", ["x = 1", "1 / 0", "print('never')"], "gpu-cpu")
    assert done.returncode != 0
    assert "ZeroDivisionError" in done.stderr and "never" not in done.stdout
    poll(lambda: leases(pool) == [], 30, "the failed run's lease to end")


@pytest.fixture(autouse=True)
def release_leases(pool: GatewayProcess) -> Iterator[None]:
    yield
    for user in pool.tokens:
        for lease in leases(pool, user):
            pool.delete(user, f"/api/gpu/leases/{lease['id']}")
    pool.wait_warm()
