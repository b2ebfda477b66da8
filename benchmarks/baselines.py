"""The floors every system is measured against: a kernel straight over ZMQ, raw loopback TCP."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from common import LocalKernel, in_kernel_loop, summarize

#: The receiving end of the raw TCP measurement: its own process, as a kernel would be.
RECEIVER = r"""
import socket, sys
size, count = int(sys.argv[1]), int(sys.argv[2])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
buffer = bytearray(size)
view = memoryview(buffer)
for _ in range(count):
    conn, _ = server.accept()
    got = 0
    while got < size:
        n = conn.recv_into(view[got:], size - got)
        if not n:
            raise SystemExit("sender went away")
        got += n
    conn.sendall(b"k")
    conn.close()
"""


def direct_zmq(repeats: int, warmup: int) -> dict[str, Any]:
    """A notebook frontend executing ``x = 1`` straight on an ipykernel (jupyter_client, ZMQ)."""
    kernel = LocalKernel()
    try:
        for _ in range(warmup):
            kernel.execute("x = 1")
        samples = [kernel.execute("x = 1")["elapsed"] for _ in range(repeats)]
        local = kernel.value(in_kernel_loop("get_ipython().run_cell('x = 1')", repeats))
    finally:
        kernel.close()
    return {"zmq_execute": summarize(samples), "local_run_cell": summarize(local)}


def raw_tcp(size: int, count: int, host: str = "127.0.0.1", launch: tuple[str, ...] = ()) -> dict[str, Any]:
    """Seconds to send ``size`` bytes from one process to another over TCP (until acked): over
    loopback by default, or to a receiver started with ``launch`` in front of its command (e.g.
    ``ip netns exec NS``), listening on every address, reached at ``host``."""
    import socket

    import numpy as np

    code = RECEIVER if not launch else RECEIVER.replace('"127.0.0.1"', '"0.0.0.0"')
    receiver = subprocess.Popen([*launch, sys.executable, "-c", code, str(size), str(count)], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        data = np.ones(size, dtype=np.uint8)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            with socket.create_connection((host, port)) as sock:
                sock.sendall(memoryview(data))
                if sock.recv(1) != b"k":
                    raise RuntimeError("receiver did not acknowledge")
            samples.append(time.perf_counter() - started)
        receiver.wait(30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return summarize(samples)
