"""Where a 1 GB pull's time goes next to raw TCP: the value's new memory. Not part of the table.

``python benchmarks/pull_memory.py [ROUNDS]``: in one run, rounds taking turns, times

- the row 3 pull through ``%%gpu`` (``b = a`` on a 1 GB array, then ``del b``, in a notebook kernel),
- raw loopback TCP as ``baselines.raw_tcp`` measures it (a receiver reusing one buffer),
- the same TCP into new memory per transfer, faulted in first (MAP_POPULATE) and freed after,
- the same TCP into new memory faulted in just ahead of the receive, as a pull does (prefault),

and prints medians, each receiver's CPU per GB and the pull's ratio to each. A value that
arrives must live in memory of its own; how much that costs on the machine is the TCP
receiver's CPU with new memory minus with its reused buffer.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ours import OurGateway, magic_kernel

SIZE = 10**9
#: A receiver per way of getting its memory; prints its port, then per transfer one JSON line.
RECEIVER = r"""
import json, mmap, resource, socket, sys, time
from jupyter_gpu.prefault import PrefaultedBuffer
size, memory = int(sys.argv[1]), sys.argv[2]
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
reused = bytearray(size) if memory == "reused" else None
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
while True:
    conn, _ = server.accept()
    cpu_start, started, fresh = cpu(), time.perf_counter(), None
    if memory == "reused":
        buffer = reused
    elif memory == "populated":
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    else:
        fresh = PrefaultedBuffer(size).__enter__()
        buffer = fresh.buffer
    allocated = time.perf_counter()
    view, got = memoryview(buffer), 0
    while got < size:
        n = conn.recv_into(view[got : got + 32 * 2**20])
        if not n:
            sys.exit("the sender went away")
        got += n
        if fresh is not None:
            fresh.reached = got
    if fresh is not None:
        fresh.__exit__(None)
    received = time.perf_counter()
    view.release()
    if memory != "reused":
        buffer.close()
    freed = time.perf_counter()
    conn.sendall(b"k")
    conn.close()
    print(json.dumps({"alloc": allocated - started, "recv": received - allocated, "free": freed - received,
                      "cpu": cpu() - cpu_start}), flush=True)
"""
MEMORY = ("reused", "populated", "prefaulted")
PULL = ("_s = _t.perf_counter(); get_ipython().run_cell_magic('gpu', 'cpu --no-push a --pull-limit 4GB', 'b = a'); "
        "_m = _t.perf_counter(); del b; _e = _t.perf_counter()\n"
        "print(json.dumps({'total': _e - _s, 'free': _e - _m}))")


def main(rounds: int) -> None:
    receivers = {memory: subprocess.Popen([sys.executable, "-c", RECEIVER, str(SIZE), memory], stdout=subprocess.PIPE,
                                          text=True) for memory in MEMORY}
    results: dict[str, list[dict[str, Any]]] = {"pull": [], **{memory: [] for memory in MEMORY}}
    gateway = OurGateway(cpu_slots=2, min_warm=1)
    try:
        ports = {memory: int(receiver.stdout.readline()) for memory, receiver in receivers.items()}  # type: ignore[union-attr]
        data = np.ones(SIZE, dtype=np.uint8)
        kernel = magic_kernel(gateway)
        try:
            kernel.run(f"import json, time as _t, numpy as np\na = np.ones({SIZE}, dtype=np.uint8)")
            kernel.run("%%gpu cpu\nn = len(a)")
            for turn in range(rounds):
                results["pull"].append(kernel.value(PULL))
                for memory in MEMORY:
                    started = time.perf_counter()
                    with socket.create_connection(("127.0.0.1", ports[memory])) as sock:
                        sock.sendall(memoryview(data))
                        if sock.recv(1) != b"k":
                            raise RuntimeError("the receiver did not acknowledge")
                    line = receivers[memory].stdout.readline()  # type: ignore[union-attr]
                    results[memory].append({"total": time.perf_counter() - started, **json.loads(line)})
                print(f"round {turn + 1}/{rounds}: " + ", ".join(f"{name} {samples[-1]['total']:.2f} s"
                                                            for name, samples in results.items())
                      + f" (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        finally:
            kernel.close()
    finally:
        gateway.stop()
        for receiver in receivers.values():
            receiver.kill()
            receiver.wait()
    pull = statistics.median(sample["total"] for sample in results["pull"])
    for name, samples in results.items():
        median = statistics.median(sample["total"] for sample in samples)
        parts = ", ".join(f"{key} {statistics.median(sample[key] for sample in samples) * 1e3:.0f} ms"
                          for key in samples[0] if key != "total")
        label = "pull through %%gpu" if name == "pull" else f"raw TCP, {name} memory"
        print(f"{label:30s} {median * 1e3:6.0f} ms = {SIZE / median / 1e6:5.0f} MB/s; "
              f"the pull at {median / pull:.2f}x its rate; medians: {parts}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
