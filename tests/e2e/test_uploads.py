"""Large pushed values go to the kernel's staging area over an upgraded HTTP connection.

The kernel maps the staged file (no copy); everything else about a push stays as it was.
The protocol's refusals and a client that vanishes mid-upload are checked on raw sockets.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jupyter_gpu.client import GatewayClient, GatewayConfig, GatewayError

from .conftest import make_gateway, serve
from .gateway_process import GatewayProcess, poll
from .test_magic import LocalKernel, kernel_env, streamed

LIMIT = 100_000_000


@pytest.fixture(scope="module")
def upload_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from serve(tmp_path_factory, "uploads", "--cpu-slots", "2", "--min-warm", "1",
                     "--max-upload-size", str(LIMIT))


def staged_files(gateway: GatewayProcess) -> list[Path]:
    """Every file in the gateway's staging directories (named after its pid)."""
    assert gateway.proc is not None
    roots = [p for p in Path("/dev/shm").glob(f"jupyter-gpu-staging-{gateway.proc.pid}-*")]
    return sorted(f for root in roots for f in root.glob("*/*") if f.is_file())


def kernel_staging_dirs(gateway: GatewayProcess) -> list[Path]:
    assert gateway.proc is not None
    return sorted(d for root in Path("/dev/shm").glob(f"jupyter-gpu-staging-{gateway.proc.pid}-*")
                  for d in root.iterdir() if d.is_dir())


def client_for(gateway: GatewayProcess, user: str) -> GatewayClient:
    return GatewayClient(GatewayConfig(gateway.url, gateway.tokens[user]))


def granted_kernel(gateway: GatewayProcess, user: str) -> str:
    lease = gateway.lease(user)
    for _ in range(100):
        if lease["state"] == "granted":
            return str(lease["kernel_id"])
        lease = gateway.get(user, f"/api/gpu/leases/{lease['id']}?wait=5").body
    raise AssertionError(f"lease not granted: {lease}")


def raw_upload(gateway: GatewayProcess, path: str, headers: dict[str, str], send: bytes = b"") -> tuple[int, bytes]:
    """Status and everything the gateway sent back, for requests the real client never makes."""
    url = urllib.parse.urlsplit(gateway.url)
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": url.netloc, **headers}.items())
        sock.sendall(f"GET {path} HTTP/1.1\r\n{head}\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        head_bytes, _, rest = reply.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        if status != 101:  # a JSON error of Content-Length bytes
            length = int(next(line.split(b":", 1)[1] for line in head_bytes.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += sock.recv(65536)
            return status, rest
        if send:
            sock.sendall(send)
            sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            rest += chunk
        return status, rest


PUSHED = "print(get_ipython().magics_manager.registry['GpuMagics'].sessions['cpu'].bytes_pushed)"
UPGRADE = {"Connection": "Upgrade", "Upgrade": "jupyter-gpu-upload"}


def test_a_large_pushed_array_is_mapped_from_the_staging_area(upload_gateway: GatewayProcess) -> None:
    kernel = LocalKernel(kernel_env(upload_gateway, "alice"))
    try:
        kernel.run("%load_ext jupyter_gpu\nimport numpy as np\na = np.arange(5_000_000, dtype=np.float64)")
        reply, outputs = kernel.run(
            "%%gpu cpu\n"
            "import os\n"
            "staging = os.environ['JUPYTER_GPU_STAGING_DIR']\n"
            "mapped = [l for l in open('/proc/self/maps') if staging in l]\n"
            "print(a.sum(), a.flags.writeable, len(mapped) > 0, all('(deleted)' in l for l in mapped))\n"
            "a[0] = -1.0\n"
            "total = float(a.sum())"
        )
        assert reply["status"] == "ok", reply
        # the right numbers, a writable array, and its memory is the staged file (unlinked)
        assert streamed(outputs) == f"{float(sum(range(5_000_000)))} True True True\n"
        _, outputs = kernel.run("print(total, a[0])")
        assert streamed(outputs) == f"{float(sum(range(5_000_000))) - 1.0} 0.0\n"  # the notebook's a is untouched
        assert staged_files(upload_gateway) == []  # claimed uploads leave nothing behind
    finally:
        kernel.close()


def test_without_staging_large_values_travel_over_the_websocket(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--cpu-slots", "1", "--min-warm", "1", "--staging-dir", "off").start()
    kernel = LocalKernel(kernel_env(gateway, "alice"))
    try:
        kernel.run("%load_ext jupyter_gpu\nimport numpy as np\na = np.arange(5_000_000, dtype=np.float64)")
        reply, outputs = kernel.run("%%gpu cpu\nimport os\nprint(a.sum(), 'JUPYTER_GPU_STAGING_DIR' in os.environ)")
        assert reply["status"] == "ok", reply
        assert streamed(outputs) == f"{float(sum(range(5_000_000)))} False\n"
    finally:
        kernel.close()
        gateway.stop()


def test_upload_lands_whole_in_the_kernels_staging_area(upload_gateway: GatewayProcess) -> None:
    kernel_id = granted_kernel(upload_gateway, "alice")
    data = np.random.default_rng(1).integers(0, 255, 12_000_000, dtype=np.uint8)
    upload = client_for(upload_gateway, "alice").upload(kernel_id, data)
    [staged] = staged_files(upload_gateway)
    assert staged.name == upload and staged.stat().st_mode & 0o777 == 0o600
    assert staged.read_bytes() == data.tobytes()


def test_upload_refusals_name_what_to_do(upload_gateway: GatewayProcess) -> None:
    kernel_id = granted_kernel(upload_gateway, "alice")
    path = f"/api/kernels/{kernel_id}/upload?nbytes=1000"
    alice = {"Authorization": f"token {upload_gateway.tokens['alice']}"}
    bob = {"Authorization": f"token {upload_gateway.tokens['bob']}"}

    status, body = raw_upload(upload_gateway, path, {**UPGRADE, "Authorization": "token wrong"})
    assert status == 401 and b"token is not valid" in body
    status, body = raw_upload(upload_gateway, path, {**UPGRADE, **bob})
    assert status == 404  # another user's kernel looks like no kernel at all
    status, body = raw_upload(upload_gateway, path, alice)
    assert status == 400 and b"Upgrade: jupyter-gpu-upload" in body
    status, body = raw_upload(upload_gateway, f"/api/kernels/{kernel_id}/upload?nbytes=lots", {**UPGRADE, **alice})
    assert status == 400 and b"nbytes='lots'" in body
    with pytest.raises(GatewayError) as refused:
        client_for(upload_gateway, "alice").upload(kernel_id, np.zeros(LIMIT + 8, dtype=np.uint8))
    assert refused.value.status == 413 and f"{LIMIT:,}" in str(refused.value)
    assert "max_upload_size" in str(refused.value)
    assert staged_files(upload_gateway) == []


def test_a_client_gone_mid_upload_leaves_nothing_and_the_kernel_carries_on(upload_gateway: GatewayProcess) -> None:
    kernel_id = granted_kernel(upload_gateway, "alice")
    headers = {**UPGRADE, "Authorization": f"token {upload_gateway.tokens['alice']}"}
    status, reply = raw_upload(upload_gateway, f"/api/kernels/{kernel_id}/upload?nbytes=20000000", headers,
                               send=b"x" * 5_000_000)  # then closes its side
    assert status == 101
    answer = json.loads(reply)
    assert answer["reason"] == "upload_failed" and "5,000,000 of 20,000,000" in answer["message"]
    poll(lambda: not staged_files(upload_gateway), 10, "the half-uploaded file to be removed")
    # the same kernel takes the next upload
    upload = client_for(upload_gateway, "alice").upload(kernel_id, np.ones(5_000_000, dtype=np.uint8))
    assert [f.name for f in staged_files(upload_gateway)] == [upload]


def test_a_kernels_staging_directory_goes_with_its_lease(upload_gateway: GatewayProcess) -> None:
    kernel_id = granted_kernel(upload_gateway, "bob")
    client_for(upload_gateway, "bob").upload(kernel_id, np.ones(5_000_000, dtype=np.uint8))
    assert any(f.parent.name.startswith(f"{kernel_id}-") for f in staged_files(upload_gateway))
    for each in upload_gateway.get("bob", "/api/gpu/leases").body:
        upload_gateway.delete("bob", f"/api/gpu/leases/{each['id']}")
    poll(lambda: not any(d.name.startswith(f"{kernel_id}-") for d in kernel_staging_dirs(upload_gateway)), 10,
         "the kernel's staging directory to go with its lease")


def test_a_large_value_changed_in_place_remotely_is_sent_again(upload_gateway: GatewayProcess) -> None:
    """The kernel trusts the pushed digest only until the cell writes to the array."""
    kernel = LocalKernel(kernel_env(upload_gateway, "alice"))
    try:
        kernel.run("%load_ext jupyter_gpu\nimport numpy as np\nx = np.zeros(10_000_000)")  # 80 MB: tracked
        reply, _ = kernel.run("%%gpu cpu\nx[9_999_999] = 7.0  # the kernel's copy only")
        assert reply["status"] == "ok", reply
        reply, outputs = kernel.run("%%gpu cpu\nprint(x[9_999_999], x.sum())")
        assert reply["status"] == "ok" and streamed(outputs) == "0.0 0.0\n"  # the notebook's x was sent again
        pushed = int(streamed(kernel.run(PUSHED)[1]))
        assert pushed >= 2 * 80_000_000
        reply, outputs = kernel.run("%%gpu cpu\nprint(x.sum())")  # the same on both sides now: not sent
        assert reply["status"] == "ok" and streamed(outputs) == "0.0\n"
        assert int(streamed(kernel.run(PUSHED)[1])) == pushed
    finally:
        kernel.close()


def test_a_stalled_upload_does_not_hold_up_a_stopping_gateway(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "--cpu-slots", "1", "--min-warm", "1").start()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    try:
        kernel_id = granted_kernel(gateway, "alice")
        url = urllib.parse.urlsplit(gateway.url)
        with socket.create_connection((url.hostname or "", url.port or 80), timeout=30) as sock:
            sock.sendall((f"GET /api/kernels/{kernel_id}/upload?nbytes=10000000 HTTP/1.1\r\nHost: {url.netloc}\r\n"
                          f"Authorization: token {gateway.tokens['alice']}\r\nConnection: Upgrade\r\n"
                          "Upgrade: jupyter-gpu-upload\r\n\r\n").encode())
            assert b" 101 " in sock.recv(65536)
            sock.sendall(b"x" * 1000)  # and then nothing: the client hangs
            time.sleep(0.5)
            started = time.monotonic()
            assert gateway.stop(timeout=20) == 0
            assert time.monotonic() - started < 10  # not the 30 s stall timeout
    finally:
        gateway.stop()
    assert not list(Path("/dev/shm").glob(f"jupyter-gpu-staging-{pid}-*"))  # nothing left in memory


def open_upgrade(gateway: GatewayProcess, user: str, kernel_id: str, nbytes: int) -> socket.socket:
    """An upload whose client answers the 101 and then sends nothing."""
    url = urllib.parse.urlsplit(gateway.url)
    sock = socket.create_connection((url.hostname or "", url.port or 80), timeout=30)
    sock.sendall((f"GET /api/kernels/{kernel_id}/upload?nbytes={nbytes} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                  f"Authorization: token {gateway.tokens[user]}\r\nConnection: Upgrade\r\n"
                  "Upgrade: jupyter-gpu-upload\r\n\r\n").encode())
    assert b" 101 " in sock.recv(65536)
    return sock


def test_stalled_uploads_take_no_more_than_their_share_and_pushes_fall_back(upload_gateway: GatewayProcess) -> None:
    kernel_id = granted_kernel(upload_gateway, "bob")
    stalled = [open_upgrade(upload_gateway, "bob", kernel_id, 10_000_000) for _ in range(2)]
    try:
        with pytest.raises(GatewayError) as busy:
            client_for(upload_gateway, "bob").upload(kernel_id, np.ones(5_000_000, dtype=np.uint8))
        assert busy.value.status == 503 and busy.value.reason == "busy" and "at most 2" in str(busy.value)
        # another user is not held up
        alice_kernel = granted_kernel(upload_gateway, "alice")
        assert client_for(upload_gateway, "alice").upload(alice_kernel, np.ones(5_000_000, dtype=np.uint8))
        # and bob's own cell still runs, on a new lease: its value goes over the websocket
        # (his two stalled uploads still hold both of his upload slots)
        for lease in upload_gateway.get("bob", "/api/gpu/leases").body:
            upload_gateway.delete("bob", f"/api/gpu/leases/{lease['id']}")
        kernel = LocalKernel(kernel_env(upload_gateway, "bob"))
        try:
            kernel.run("%load_ext jupyter_gpu\nimport numpy as np\na = np.arange(2_000_000, dtype=np.float64)")
            reply, outputs = kernel.run("%%gpu cpu\nprint(a.sum())")
            assert reply["status"] == "ok" and streamed(outputs) == f"{float(sum(range(2_000_000)))}\n"
        finally:
            kernel.close()
    finally:
        for sock in stalled:
            sock.close()
