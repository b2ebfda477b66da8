"""The staging area fills up in the middle of an upload: the client is told why, the partial file
is gone, and the kernel takes the next upload once there is room (a 16 MiB tmpfs the test mounts)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np

from tests.e2e.test_uploads import UPGRADE, client_for, granted_kernel

from .conftest import make_gateway
from .test_disk_full import fill, small_disk  # noqa: F401  # the fixture

MB = 2**20


def staged(disk: Path) -> list[Path]:
    """Files in the kernels' staging directories (jupyter-gpu-staging-PID-*/KERNEL/...)."""
    return sorted(f for f in disk.glob("jupyter-gpu-staging-*/*/*") if f.is_file())


def test_an_upload_that_fills_the_staging_area_fails_in_words_and_leaves_nothing(small_disk: Path,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    gateway = make_gateway(tmp_path / "gateway", "--cpu-slots", "1", "--min-warm", "1",
                           "--staging-dir", str(small_disk)).start()
    try:
        kernel_id = granted_kernel(gateway, "alice")
        url = urllib.parse.urlsplit(gateway.url)
        with socket.create_connection((url.hostname or "", url.port or 80), timeout=30) as sock:
            headers = {"Host": url.netloc, **UPGRADE, "Authorization": f"token {gateway.tokens['alice']}"}
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock.sendall(f"GET /api/kernels/{kernel_id}/upload?nbytes={8 * MB} HTTP/1.1\r\n{head}\r\n".encode())
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += sock.recv(65536)
            assert reply.split(b" ", 2)[1] == b"101"  # 8 MiB fit when it asked
            filler = fill(small_disk)  # ... and then the staging area filled up
            try:
                sock.sendall(b"x" * (8 * MB))
            except OSError:
                pass  # the gateway may stop reading once its write failed
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        told = json.loads(answer.partition(b"\r\n\r\n")[2] or answer)
        assert told["reason"] == "no_space" and f"{8 * MB:,} bytes" in told["message"]
        assert staged(small_disk) == []
        filler.unlink()
        upload = client_for(gateway, "alice").upload(kernel_id, np.ones(4 * MB, dtype=np.uint8))
        assert [f.name for f in staged(small_disk)] == [upload]
    finally:
        gateway.stop()
