"""Leases, auth, metering and faults, end to end: what a user or an operator would notice.

Every test talks to a real gateway process on loopback with real ipykernel kernels and a real
SQLite file. Waits are bounded: each poll loop has a deadline and says what it waited for.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from .conftest import make_gateway
from .gateway_process import GatewayProcess, apoll, kernel_host_pid, pid_alive, poll, stdout_text

# --- helpers ----------------------------------------------------------------------------------


def granted(gateway: GatewayProcess, user: str, gpu: str = "cpu", **extra: Any) -> dict[str, Any]:
    """A granted lease; if the previous test's kernels are still being replaced, wait for one."""
    lease = gateway.lease(user, gpu, **extra)
    if lease["state"] == "queued":
        lease = gateway.get(user, f"/api/gpu/leases/{lease['id']}?wait=30").body
    assert lease["state"] == "granted", lease
    return lease


def lease_now(gateway: GatewayProcess, user: str, lease_id: str) -> dict[str, Any]:
    reply = gateway.get(user, f"/api/gpu/leases/{lease_id}")
    assert reply.status == 200, reply
    return dict(reply.body)


def released(gateway: GatewayProcess, user: str, lease_id: str) -> dict[str, Any] | None:
    lease = lease_now(gateway, user, lease_id)
    return lease if lease["state"] == "released" else None


def warm(gateway: GatewayProcess, gpu_type: str) -> int:
    types = {t["name"]: t for t in gateway.get(next(iter(gateway.tokens)), "/api/gpu/types").body}
    return int(types[gpu_type]["warm"])




def db_row(db: Path, lease_id: str) -> dict[str, Any] | None:
    """The lease's row as the operator would read the SQLite file (gateway running or not)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
    finally:
        conn.close()
    return None if row is None else dict(row)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``jupyter-gpu`` command the way an operator types it."""
    script = Path(sys.executable).parent / "jupyter-gpu"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jupyter_gpu.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env)


def ws_url(gateway: GatewayProcess, kernel_id: str, token: str | None) -> str:
    url = gateway.url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
    return url + (f"&token={token}" if token else "")


def metric_samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, checking every line is valid Prometheus text format."""
    samples: dict[str, float] = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) (\S+)$')
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = sample.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


# --- 1. auth ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_or_wrong_token_is_401_with_a_json_reason(gateway: GatewayProcess) -> None:
    for token, what in ((None, "no token given"), ("not-a-real-token", "the token is not valid")):
        for method, path in (("GET", "/api/gpu/leases"), ("POST", "/api/gpu/leases"), ("GET", "/metrics")):
            reply = gateway.request(None, method, path, body={"gpu": "cpu"} if method == "POST" else None, token=token)
            assert reply.status == 401, (method, path, reply)
            assert set(reply.body) == {"message", "reason"} and reply.body["reason"] == "unauthorized"
            assert what in reply.body["message"] and "jupyter-gpu token add" in reply.body["message"]
    lease = granted(gateway, "alice")
    for token in (None, "not-a-real-token"):
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(ws_url(gateway, lease["kernel_id"], token))
        assert refused.value.code == 401
    assert gateway.get("alice", "/api/gpu/types").status == 200  # still serving


@pytest.mark.asyncio
async def test_another_users_lease_and_kernel_look_like_they_do_not_exist(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice")
    lease_id, kernel_id = lease["id"], lease["kernel_id"]
    made_up = uuid.uuid4().hex

    def not_found(method: str, path: str, real: str, fake: str) -> None:
        seen = gateway.request("bob", method, path.format(real))
        absent = gateway.request("bob", method, path.format(fake))
        assert seen.status == 404, (method, path, seen)
        # Byte for byte what a made-up id gets: nothing tells bob that alice's exists.
        assert seen.body == {**absent.body, "message": absent.body["message"].replace(fake, real)}
        assert seen.body["reason"] == "not_found"

    not_found("GET", "/api/gpu/leases/{}", lease_id, made_up)
    not_found("DELETE", "/api/gpu/leases/{}", lease_id, made_up)
    not_found("GET", "/api/kernels/{}", kernel_id, made_up)
    not_found("DELETE", "/api/kernels/{}", kernel_id, made_up)
    not_found("POST", "/api/kernels/{}/interrupt", kernel_id, made_up)
    with pytest.raises(HTTPClientError) as refused:
        await gateway.connect("bob", kernel_id)
    assert refused.value.code == 404

    assert gateway.get("bob", "/api/gpu/leases").body == []
    assert gateway.get("bob", "/api/kernels").body == []
    assert lease_id not in {row["id"] for row in gateway.get("bob", "/api/gpu/leases?released=1").body}
    # bob's DELETEs did nothing: alice still holds her kernel and can use it.
    assert lease_now(gateway, "alice", lease_id)["state"] == "granted"
    assert [k["id"] for k in gateway.get("alice", "/api/kernels").body] == [kernel_id]
    socket = await gateway.connect("alice", kernel_id)
    reply, _ = await socket.run("1 + 1")
    assert reply["content"]["status"] == "ok"
    socket.close()


# --- 2. bad input -----------------------------------------------------------------------------


def test_bad_requests_get_a_400_that_says_what_to_do(gateway: GatewayProcess) -> None:
    def rejected(reply: Any, reason: str | None = None) -> str:
        assert reply.status == 400, reply
        assert set(reply.body) == {"message", "reason"}
        if reason is not None:
            assert reply.body["reason"] == reason, reply
        # ... and the gateway keeps serving.
        assert gateway.get("alice", "/api/gpu/types").status == 200
        return str(reply.body["message"])

    rejected(gateway.request("alice", "POST", "/api/gpu/leases", raw=b'{"gpu": "cpu",'), "bad_json")
    rejected(gateway.request("alice", "POST", "/api/gpu/leases", raw=b'["cpu"]'), "bad_json")

    message = rejected(gateway.post("alice", "/api/gpu/leases", {"gpu": "tpu"}), "unknown_type")
    assert "'tpu'" in message and "a100, cpu, h100" in message

    message = rejected(gateway.post("alice", "/api/gpu/leases", {"gpu": "a100:3"}), "too_many_gpus")
    assert "a100:3" in message and "at most 2" in message

    for bad in ("soon", -5, 0, True):
        message = rejected(gateway.post("alice", "/api/gpu/leases", {"gpu": "cpu", "idle_timeout": bad}))
        assert "idle_timeout" in message
    # Python's json accepts NaN; a NaN idle timeout would never expire and hold the GPU forever.
    nan = gateway.request("alice", "POST", "/api/gpu/leases", raw=b'{"gpu": "cpu", "idle_timeout": NaN}')
    assert "idle_timeout" in rejected(nan, "bad_idle_timeout")
    rejected(gateway.post("alice", "/api/gpu/leases", {"gpu": "a100::"}), "bad_spec")
    rejected(gateway.post("alice", "/api/kernels", {"name": "python3"}), "bad_spec")

    assert gateway.get("alice", "/api/gpu/leases").body == []  # nothing half-created
    assert granted(gateway, "alice")["state"] == "granted"


# --- 3. queue ---------------------------------------------------------------------------------


def test_queue_positions_long_poll_and_cancel(gateway: GatewayProcess) -> None:
    holders = [granted(gateway, "alice"), granted(gateway, "alice")]  # both cpu slots

    third = gateway.lease("alice", "cpu")
    assert third["state"] == "queued" and third["kernel_id"] is None
    assert third["queue_position"] == 1 and third["expected_wait"] > 0
    fourth = gateway.lease("alice", "cpu")
    assert fourth["state"] == "queued" and fourth["queue_position"] == 2
    assert fourth["expected_wait"] >= third["expected_wait"]
    assert {t["name"]: t["queued"] for t in gateway.get("alice", "/api/gpu/types").body}["cpu"] == 2

    cancelled = gateway.delete("alice", f"/api/gpu/leases/{third['id']}")
    assert cancelled.status == 200
    assert cancelled.body["state"] == "released" and cancelled.body["reason"] == "cancelled"
    assert cancelled.body["gpu_seconds"] == 0
    assert lease_now(gateway, "alice", fourth["id"])["queue_position"] == 1  # moved up

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(gateway.get, "alice", f"/api/gpu/leases/{fourth['id']}?wait=30")
        time.sleep(0.2)
        # A second client polling the same lease with a shorter wait gives up first ...
        impatient = gateway.get("alice", f"/api/gpu/leases/{fourth['id']}?wait=0.5")
        assert impatient.body["state"] == "queued" and impatient.body["queue_position"] == 1
        assert not waiting.done(), "a long poll of a queued lease answered before anything changed"
        freed = time.monotonic()
        gateway.delete("alice", f"/api/gpu/leases/{holders[0]['id']}")
        reply = waiting.result(timeout=40)
    # ... and the patient one still answers as soon as the lease is granted (a kernel start),
    # not when its own 30 s run out.
    assert time.monotonic() - freed < 15
    assert reply.status == 200
    assert reply.body["state"] == "granted" and reply.body["kernel_id"], reply.body


def test_per_user_cap_queues_only_that_user(tmp_path: Path) -> None:
    capped = make_gateway(tmp_path, "--inventory", "a100=2", "--cpu-slots", "0", "--max-gpus-per-user", "1")
    capped.start()
    try:
        first = granted(capped, "alice", "a100")
        second = capped.lease("alice", "a100")
        assert second["state"] == "queued" and second["queue_position"] == 1
        bobs = granted(capped, "bob", "a100")  # alice's waiting request does not hold bob up
        assert bobs["gpu_type"] == "a100"
        assert lease_now(capped, "alice", second["id"])["state"] == "queued"

        too_many = capped.post("alice", "/api/gpu/leases", {"gpu": "a100:2"})
        assert too_many.status == 400 and too_many.body["reason"] == "too_many_gpus"
        assert "at most 1" in too_many.body["message"] and "max_gpus_per_user" in too_many.body["message"]

        capped.delete("alice", f"/api/gpu/leases/{first['id']}")
        now = capped.get("alice", f"/api/gpu/leases/{second['id']}?wait=30").body
        assert now["state"] == "granted", now
    finally:
        assert capped.stop() == 0


# --- 5. idle release --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_idle_leases_end_their_kernel_dies_and_a_warm_one_returns(gateway: GatewayProcess) -> None:
    # h100 has one GPU, so a warm h100 kernel afterwards can only be a fresh replacement.
    untouched = granted(gateway, "alice", "a100", idle_timeout=2)
    vanished = granted(gateway, "alice", "h100", idle_timeout=2)
    socket = await gateway.connect("alice", vanished["kernel_id"])
    pid = await kernel_host_pid(gateway, socket, vanished["kernel_id"])
    assert pid in gateway.kernel_pids()
    socket.close()  # the client goes away without a DELETE

    ended = [
        await apoll(lambda lid=lease["id"]: released(gateway, "alice", lid), 10, f"lease {lease['gpu']} to idle out")
        for lease in (untouched, vanished)
    ]
    assert [lease["reason"] for lease in ended] == ["idle", "idle"]
    assert 2.0 <= ended[0]["gpu_seconds"] < 4.5  # billed for the idle timeout and not much more
    assert gateway.get("alice", "/api/kernels").body == []
    assert gateway.get("alice", f"/api/kernels/{vanished['kernel_id']}").status == 404

    await apoll(lambda: not pid_alive(pid), 10, f"kernel process {pid} to exit")
    await apoll(lambda: warm(gateway, "h100") >= 1, 30, "a new warm h100 kernel")
    assert pid not in gateway.kernel_pids()


@pytest.mark.asyncio
async def test_a_busy_kernel_is_not_idle_until_its_cell_ends(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice", "cpu", idle_timeout=2)
    socket = await gateway.connect("alice", lease["kernel_id"])
    msg_id = socket.execute("import time; time.sleep(4)")
    await asyncio.sleep(3.0)  # past the idle timeout, in the middle of the cell
    during = lease_now(gateway, "alice", lease["id"])
    assert during["state"] == "granted" and during["busy"] is True
    assert during["idle_remaining"] == 2

    reply, _ = await socket.collect(msg_id, timeout=15)
    cell_ended = time.time()
    assert reply["content"]["status"] == "ok"
    after = await apoll(lambda: released(gateway, "alice", lease["id"]), 10, "the lease to idle out")
    assert after["reason"] == "idle"
    assert 1.5 <= after["released_at"] - cell_ended <= 3.5, after["released_at"] - cell_ended
    # The client still connected is told why its socket closes.
    while await socket.recv(10) is not None:
        pass
    assert socket.ws.close_code == 1000 and "idle" in (socket.ws.close_reason or "")


# --- 6. kernel death --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_kernel_dying_mid_cell_tells_the_client_and_ends_the_lease(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice", "h100")
    socket = await gateway.connect("alice", lease["kernel_id"])
    # The short sleep lets the kernel's IOPub thread send the print before the process vanishes.
    msg_id = socket.execute("print('about to die', flush=True)\nimport os, time; time.sleep(0.5); os._exit(1)")
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while (msg := await socket.recv(max(0.1, deadline - time.monotonic()))) is not None:
        received.append(msg)
    mine = [m for m in received if m["parent_header"].get("msg_id") == msg_id]

    assert "about to die" in stdout_text(mine)
    errors = [m["content"] for m in mine if m["msg_type"] == "error"]
    replies = [m["content"] for m in mine if m["channel"] == "shell" and m["msg_type"] == "execute_reply"]
    assert len(errors) == 1 and len(replies) == 1, mine
    assert errors[0]["ename"] == "KernelDied" and replies[0]["ename"] == "KernelDied"
    assert replies[0]["status"] == "error"
    assert "died" in errors[0]["evalue"] and lease["id"] in errors[0]["evalue"]
    assert "Run the cell again" in errors[0]["evalue"]
    assert any(m["msg_type"] == "status" and m["content"]["execution_state"] == "dead" for m in received)
    assert socket.ws.close_code == 1011 and "died" in (socket.ws.close_reason or "")

    ended = lease_now(gateway, "alice", lease["id"])
    assert ended["state"] == "released" and ended["reason"] == "kernel_died"
    await apoll(lambda: warm(gateway, "h100") >= 1, 30, "a new warm h100 kernel after the death")


# --- 7. usage and metering --------------------------------------------------------------------


def test_usage_is_metered_per_user_and_exported_to_prometheus(gateway: GatewayProcess) -> None:
    lease = granted(gateway, "alice", "a100")
    bob = {"Authorization": f"token {gateway.tokens['bob']}"}
    request = urllib.request.Request(gateway.url + "/metrics", headers=bob)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    for family in ("jupyter_gpu_leases", "jupyter_gpu_queue_length", "jupyter_gpu_warm_kernels",
                   "jupyter_gpu_gpu_seconds_total"):
        assert f"# TYPE {family} " in text
    held = metric_samples(text)
    assert held['jupyter_gpu_leases{state="granted"}'] == 1
    assert held['jupyter_gpu_queue_length{gpu_type="a100"}'] == 0
    assert held['jupyter_gpu_warm_kernels{gpu_type="h100"}'] == 1

    time.sleep(1.0)
    assert gateway.delete("alice", f"/api/gpu/leases/{lease['id']}").body["reason"] == "deleted"

    usage = gateway.get("alice", "/api/gpu/usage").body
    (row,) = [row for row in usage["leases"] if row["id"] == lease["id"]]
    price = {t["name"]: t["price_per_gpu_hour"] for t in gateway.get("alice", "/api/gpu/types").body}["a100"]
    assert price > 0 and row["price_per_gpu_hour"] == price
    assert row["state"] == "released" and row["reason"] == "deleted" and row["user"] == "alice"
    assert 1.0 <= row["gpu_seconds"] < 5.0
    assert row["cost"] == pytest.approx(row["gpu_seconds"] / 3600 * price)
    assert usage["by_type"]["a100"]["gpu_seconds"] >= row["gpu_seconds"]
    assert usage["total_gpu_seconds"] >= row["gpu_seconds"] and usage["total_cost"] >= row["cost"]

    bobs = gateway.get("bob", "/api/gpu/usage").body
    assert bobs["user"] == "bob" and lease["id"] not in {r["id"] for r in bobs["leases"]}
    assert all(r["user"] == "bob" for r in bobs["leases"])

    after = metric_samples(gateway.get("alice", "/metrics").body)
    assert after['jupyter_gpu_gpu_seconds_total{gpu_type="a100"}'] >= row["gpu_seconds"]
    assert after['jupyter_gpu_leases{state="granted"}'] == 0


# --- 8. the stock kernel API ------------------------------------------------------------------


def test_kernels_api_starts_interrupts_restarts_and_deletes_a_leased_kernel(gateway: GatewayProcess) -> None:
    created = gateway.post("alice", "/api/kernels", {"name": "gpu-cpu"})
    assert created.status == 201, created
    kernel = created.body
    assert kernel["name"] == "gpu-cpu" and kernel["id"] and kernel["lease_id"]
    assert kernel["execution_state"] == "idle" and kernel["connections"] == 0 and kernel["last_activity"]
    assert [k["id"] for k in gateway.get("alice", "/api/kernels").body] == [kernel["id"]]
    assert gateway.get("alice", f"/api/kernels/{kernel['id']}").body["id"] == kernel["id"]
    assert lease_now(gateway, "alice", kernel["lease_id"])["kernel_id"] == kernel["id"]

    assert gateway.post("alice", f"/api/kernels/{kernel['id']}/interrupt").status == 204
    # someone else's restart finds nothing, and alice's lease is untouched
    assert gateway.post("bob", f"/api/kernels/{kernel['id']}/restart").status == 404
    assert lease_now(gateway, "alice", kernel["lease_id"])["state"] == "granted"
    # a restart is a new lease of the same type behind the same kernel id (kernels are single-use)
    restart = gateway.post("alice", f"/api/kernels/{kernel['id']}/restart")
    assert restart.status == 200, restart
    assert restart.body["id"] == kernel["id"] and restart.body["lease_id"] != kernel["lease_id"]
    assert restart.body["name"] == "gpu-cpu"
    old = lease_now(gateway, "alice", kernel["lease_id"])
    assert (old["state"], old["reason"]) == ("released", "restarted")
    assert lease_now(gateway, "alice", restart.body["lease_id"])["kernel_id"] == kernel["id"]
    assert [k["id"] for k in gateway.get("alice", "/api/kernels").body] == [kernel["id"]]

    assert gateway.delete("alice", f"/api/kernels/{kernel['id']}").status == 204
    ended = lease_now(gateway, "alice", restart.body["lease_id"])
    assert ended["state"] == "released" and ended["reason"] == "deleted"
    assert gateway.get("alice", f"/api/kernels/{kernel['id']}").status == 404


# --- 9. lifecycle -----------------------------------------------------------------------------


def test_sigterm_ends_leases_kills_kernels_and_usage_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    first = make_gateway(tmp_path, "--cpu-slots", "1").start()
    second: GatewayProcess | None = None
    try:
        lease = granted(first, "alice")
        kernels = first.kernel_pids()
        assert kernels
        began = time.monotonic()
        assert first.stop(signal.SIGTERM, timeout=20) == 0
        assert time.monotonic() - began < 10
        assert [pid for pid in kernels if pid_alive(pid)] == []
        assert "stopped" in first.log_text()

        row = db_row(db, lease["id"])
        assert row is not None
        assert row["state"] == "released" and row["reason"] == "gateway_restart"
        assert row["released_at"] >= row["granted_at"]

        second = make_gateway(tmp_path, "--cpu-slots", "1").start()
        usage = second.get("alice", "/api/gpu/usage").body
        (kept,) = [r for r in usage["leases"] if r["id"] == lease["id"]]
        assert kept["reason"] == "gateway_restart" and kept["gpu_seconds"] > 0
        assert kept["gpu_seconds"] == pytest.approx(row["released_at"] - row["granted_at"])
        assert usage["by_type"]["cpu"]["gpu_seconds"] >= kept["gpu_seconds"]
    finally:
        for process in (first, second):
            if process is not None and process.proc is not None:
                process.stop()


def test_sigkill_lease_is_closed_at_restart_at_its_last_heartbeat(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    first = make_gateway(tmp_path, "--cpu-slots", "1").start()
    second: GatewayProcess | None = None
    kernels: set[int] = set()
    try:
        lease = granted(first, "alice")
        kernels = first.kernel_pids()
        assert kernels
        # The gateway marks open leases alive every 5 s; wait for one mark, then kill it hard.
        poll(lambda: (db_row(db, lease["id"]) or {}).get("last_alive_at"), 12, "a metering heartbeat")
        first.stop(signal.SIGKILL)
        killed_at = time.time()
        before = db_row(db, lease["id"])
        assert before is not None and before["state"] == "granted" and before["released_at"] is None

        # Orphaned kernels: ipykernel's parent poller sees its parent change and exits within ~1 s.
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in kernels) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in kernels if pid_alive(pid)]
        assert orphans == [], f"kernels {orphans} outlived a SIGKILLed gateway by 5 s"

        second = make_gateway(tmp_path, "--cpu-slots", "1").start()
        assert "closed 1 lease(s) left open" in second.log_text()
        row = db_row(db, lease["id"])
        assert row is not None and row["state"] == "released" and row["reason"] == "gateway_restart"
        assert row["released_at"] == before["last_alive_at"]  # the last heartbeat, not the restart
        assert row["released_at"] < killed_at
        shown = lease_now(second, "alice", lease["id"])
        assert shown["reason"] == "gateway_restart"
        assert shown["gpu_seconds"] == pytest.approx(before["last_alive_at"] - before["granted_at"])
    finally:
        for pid in kernels:  # never leave an orphan behind, whatever was asserted
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for process in (first, second):
            if process is not None and process.proc is not None:
                process.stop()


# --- 10. operator commands --------------------------------------------------------------------


def test_gateway_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    env.pop("JUPYTER_GPU_TOKEN", None)
    done = cli("gateway", "--ip", "0.0.0.0", "--no-auth", "--port", "0", "--db", str(tmp_path / "u.sqlite"), env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "refusing to serve 0.0.0.0 without tokens" in output
    assert "Traceback" not in output


def test_token_added_while_the_gateway_runs_works_at_once(gateway: GatewayProcess) -> None:
    users = str(gateway.tmp / "users.json")
    added = cli("token", "add", "carol", "--users", users)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert "carol" in added.stderr and "shown only once" in added.stderr
    assert token not in Path(users).read_text()  # only its hash is stored
    try:
        mine = gateway.request(None, "GET", "/api/gpu/usage", token=token)
        assert mine.status == 200 and mine.body["user"] == "carol"
        assert gateway.request(None, "GET", "/api/gpu/leases", token=token).body == []
    finally:
        assert cli("token", "remove", "carol", "--users", users).returncode == 0
    assert gateway.request(None, "GET", "/api/gpu/leases", token=token).status == 401
    assert gateway.get("alice", "/api/gpu/leases").status == 200
