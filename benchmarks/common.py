"""Shared by every part of the benchmark, in every virtual environment it runs in.

Standard library plus jupyter_client only: this file is imported by the driver (the
project's .venv) and by the peer scripts (.bench/ipp, .bench/kg), so it must not import
anything of jupyter-gpu.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

RESULT_MARK = "BENCH-RESULT "


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, p99 (nearest rank), min and max of a list of seconds (or of anything)."""
    if not samples:
        return {"n": 0, "median": None, "p99": None, "min": None, "max": None}
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.99 * len(ordered)))
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p99": ordered[rank - 1],
        "min": ordered[0],
        "max": ordered[-1],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far, by every process on the machine."""
    with open("/proc/net/dev") as dev:
        for line in dev:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmit bytes
    return 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


def emit(result: Any) -> None:
    """How a peer script hands its results to the driver: one marked line of JSON on stdout."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_emitted(output: str) -> Any:
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise ValueError("no result line in the output")


class LocalKernel:
    """An ipykernel of this virtual environment, driven over ZMQ with jupyter_client.

    ``execute`` times one request as a notebook frontend sees it: from sending the
    execute_request until both its execute_reply and the kernel's return to idle arrived.
    """

    def __init__(self, env: dict[str, str] | None = None, startup_timeout: float = 60) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env={**os.environ, **(env or {})})
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=startup_timeout)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float = 120.0, keep_stream: bool = False) -> dict[str, Any]:
        """Run ``code``; returns elapsed seconds, the reply content and what came on IOPub."""
        kc = self.kc
        started = time.perf_counter()
        msg_id = kc.execute(code, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        idle = False
        stdout: list[str] = []
        stderr: list[str] = []
        lines = 0
        errors: list[dict[str, Any]] = []
        while reply is None or not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {code[:40]!r} within {timeout:.0f} s")
            if not idle:
                try:
                    msg = kc.get_iopub_msg(timeout=remaining)
                except Exception:
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif kind == "stream":
                    text = msg["content"]["text"]
                    if msg["content"]["name"] == "stdout":
                        lines += text.count("\n")
                        if keep_stream:
                            stdout.append(text)
                    else:
                        stderr.append(text)
                elif kind == "error":
                    errors.append(msg["content"])
            else:
                msg = kc.get_shell_msg(timeout=remaining)
                if msg["parent_header"].get("msg_id") == msg_id:
                    reply = msg["content"]
            if reply is None and idle:
                continue
        elapsed = time.perf_counter() - started
        return {"elapsed": elapsed, "reply": reply, "stdout": "".join(stdout), "stderr": "".join(stderr),
                "lines": lines, "errors": errors}

    def run(self, code: str, timeout: float = 300.0) -> dict[str, Any]:
        """Execute set-up code; raise with the remote traceback if it failed."""
        result = self.execute(code, timeout=timeout, keep_stream=True)
        if result["reply"]["status"] != "ok":
            reply = result["reply"]
            raise RuntimeError(f"{reply.get('ename')}: {reply.get('evalue')}\n{result['stderr'][-2000:]}")
        return result

    def value(self, code: str, timeout: float = 600.0) -> Any:
        """Run ``code``, which must print one JSON document as its last stdout line; return it."""
        out = self.run(code, timeout=timeout)["stdout"].strip().splitlines()
        if not out:
            raise RuntimeError(f"no output from {code[:60]!r}")
        return json.loads(out[-1])

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)


#: Installs timing hooks in a local kernel: the kernel-side duration of every cell.
CELL_TIMER = """
import time as _bt
_bench_cells = []
def _bench_pre(info=None):
    globals()['_bench_t0'] = _bt.perf_counter()
def _bench_post(result=None):
    _bench_cells.append(_bt.perf_counter() - globals()['_bench_t0'])
get_ipython().events.register('pre_run_cell', _bench_pre)
get_ipython().events.register('post_run_cell', _bench_post)
"""

#: Drop the timings recorded so far (the set-up cells).
CELL_TIMER_RESET = "_bench_cells.clear()"

#: Prints the kernel-side durations of the cells run since the last reset: the first entry
#: is the reset cell itself, and this cell's own entry is added only after it printed.
CELL_TIMER_READ = "import json as _bj; print(_bj.dumps(_bench_cells[1:]))"


def in_kernel_loop(statement: str, repeats: int) -> str:
    """Code that times ``statement`` ``repeats`` times inside the kernel and prints the list."""
    return (
        "import time as _bt, json as _bj\n"
        "_samples = []\n"
        f"for _i in range({repeats}):\n"
        "    _t = _bt.perf_counter()\n"
        f"    {statement}\n"
        "    _samples.append(_bt.perf_counter() - _t)\n"
        "print(_bj.dumps(_samples))\n"
    )
