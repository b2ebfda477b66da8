"""Each pooled kernel in its own sandbox: attacks one user's cell makes on another's kernel.

Every attack is a real cell in alice's kernel aimed at bob's kernel or at the gateway, and must
fail; the same operations on alice's own data must still work. Paths and pids of the victims
are read from the host, as an attacker who guessed them would know them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pool_manager.cgroups import CgroupError, CgroupLimiter, KernelLimits
from pool_manager.sandbox import Sandbox

from .conftest import make_gateway
from .gateway_process import GatewayProcess, apoll, host_pid, stdout_text
from .test_uploads import client_for, granted_kernel

SECRET = "sandbox-test-secret-7f3a"
MEMORY_LIMIT = 300 * 2**20
AS_ROOT = os.geteuid() == 0


def sandbox_problem() -> str:
    """Why kernels cannot be sandboxed here ('' where they can)."""
    if shutil.which("bwrap") is None:
        return "needs bubblewrap (apt-get install bubblewrap)"
    sandbox = Sandbox.probe("auto")
    return "" if sandbox.enabled else "; ".join(sandbox.isolation.warnings)


def cgroup_problem() -> str:
    try:
        CgroupLimiter.probe(KernelLimits(memory_bytes=MEMORY_LIMIT)).close()
    except CgroupError as exc:
        return f"no control group for a memory limit here: {exc}"
    return ""


NO_SANDBOX, NO_CGROUPS = sandbox_problem(), cgroup_problem()
pytestmark = pytest.mark.skipif(bool(NO_SANDBOX), reason=NO_SANDBOX)


@pytest.fixture(scope="module")
def sandbox_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # A secret in the gateway's environment, as cloud credentials would be.
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    try:
        process = make_gateway(tmp_path_factory.mktemp("sandbox"), "--cpu-slots", "3", "--min-warm", "1",
                               "--kernel-memory", f"{MEMORY_LIMIT // 2**20}M").start()
    finally:
        del os.environ["AWS_SECRET_ACCESS_KEY"]
    yield process
    process.stop()


@pytest.fixture(scope="module")
def kernels(sandbox_gateway: GatewayProcess) -> dict[str, str]:
    """One leased kernel per user, for the whole module."""
    return {user: granted_kernel(sandbox_gateway, user) for user in ("alice", "bob")}


async def run(gateway: GatewayProcess, user: str, kernel_id: str, code: str) -> Any:
    """Run ``code`` in the user's kernel; it prints one JSON value, which is returned."""
    socket = await gateway.connect(user, kernel_id)
    try:
        reply, outputs = await socket.run(code)
    finally:
        socket.close()
    assert reply["content"]["status"] == "ok", reply["content"]
    return json.loads(stdout_text(outputs))


#: Defined in each attacking cell: the outcome of an operation, "ok" or the error's name.
TRY = """
import json, os
def attempt(operation):
    try:
        operation()
        return "ok"
    except Exception as exc:
        return type(exc).__name__
"""


def kernel_dir(kernel_id: str) -> Path:
    """The kernel's private directory (home, runtime) on the host."""
    [found] = Path(os.environ.get("TMPDIR", "/tmp")).glob(f"jupyter-gpu-kernels-*/{kernel_id}")
    return found


def sandboxed_pid(gateway: GatewayProcess, kernel_id: str) -> int:
    pid = host_pid(gateway, kernel_id)
    assert pid is not None, f"no process of the gateway runs kernel {kernel_id}"
    return pid


def test_info_says_which_sandbox_is_in_force(sandbox_gateway: GatewayProcess) -> None:
    info = sandbox_gateway.get("alice", "/api/gpu/info").body["sandbox"]
    assert info["mechanism"] == "bubblewrap" and info["pid_namespace"] and info["mount_namespace"]
    assert info["uid_separation"] is AS_ROOT
    assert info["limits"]["memory_bytes"] == MEMORY_LIMIT
    if not NO_CGROUPS:
        assert info["limits"]["enforced_by"].startswith("cgroup") and info["warnings"] == []
    [cpu] = sandbox_gateway.get("alice", "/api/gpu/types").body
    assert cpu["isolation"] == info["summary"] and "bubblewrap" in cpu["isolation"]


@pytest.mark.asyncio
async def test_another_kernels_connection_file_and_sockets_are_out_of_reach(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    # Bob's kernel tells us everything its connection file held, key included.
    bob = await run(sandbox_gateway, "bob", kernels["bob"], (
        "import json\nfrom ipykernel.kernelapp import IPKernelApp\napp = IPKernelApp.instance()\n"
        "print(json.dumps({'transport': app.transport, 'ip': app.ip, 'key': app.session.key.decode(),\n"
        "  'signature_scheme': app.session.signature_scheme, 'hb_port': app.hb_port, 'shell_port': app.shell_port,\n"
        "  'iopub_port': app.iopub_port, 'stdin_port': app.stdin_port, 'control_port': app.control_port}))"
    ))
    alice = await run(sandbox_gateway, "alice", kernels["alice"], (
        "import json\nfrom ipykernel.kernelapp import IPKernelApp\napp = IPKernelApp.instance()\n"
        "print(json.dumps({'transport': app.transport, 'ip': app.ip, 'hb_port': app.hb_port}))"
    ))
    assert bob["transport"] == "ipc"  # no loopback port another process of the machine could connect to
    marker = kernel_dir(kernels["bob"]) / "home" / "pwned"
    attack = TRY + f"""
import zmq
from jupyter_client import BlockingKernelClient
def ping(info):
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.linger = 0
    socket.connect(f"{{info['transport']}}://{{info['ip']}}-{{info['hb_port']}}")
    socket.send(b"ping")
    if not socket.poll(3000):
        raise TimeoutError("no heartbeat")
    return socket.recv()
def execute(info):
    client = BlockingKernelClient()
    client.load_connection_info(info)
    client.start_channels()
    try:
        client.execute_interactive("open({str(marker)!r}, 'w').write('x')", timeout=3)
    finally:
        client.stop_channels()
bob, alice = {json.dumps(bob)}, {json.dumps(alice)}
print(json.dumps({{
    "list runtime": attempt(lambda: os.listdir(os.path.dirname(bob["ip"]))),
    "read connection file": attempt(lambda: open(os.path.join(os.path.dirname(bob["ip"]), "kernel.json")).read()),
    "ping bob": attempt(lambda: ping(bob)),
    "execute in bob": attempt(lambda: execute(bob)),
    "ping own kernel": attempt(lambda: ping(alice)),
}}))
"""
    outcome = await run(sandbox_gateway, "alice", kernels["alice"], attack)
    assert outcome == {"list runtime": "FileNotFoundError", "read connection file": "FileNotFoundError",
                       "ping bob": "TimeoutError", "execute in bob": "TimeoutError", "ping own kernel": "ok"}
    assert not marker.exists()
    assert await run(sandbox_gateway, "bob", kernels["bob"], "print(1 + 1)") == 2  # bob's kernel is unharmed


@pytest.mark.asyncio
async def test_another_kernels_staged_upload_cannot_be_read(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    data = np.random.default_rng(7).integers(0, 255, 5_000_000, dtype=np.uint8)
    upload = client_for(sandbox_gateway, "bob").upload(kernels["bob"], data)
    assert sandbox_gateway.proc is not None
    [staged] = Path("/dev/shm").glob(f"jupyter-gpu-staging-{sandbox_gateway.proc.pid}-*/{kernels['bob']}-*/{upload}")
    assert staged.stat().st_mode & 0o777 == 0o600
    if AS_ROOT:  # the kernel's own uid, no one else's
        assert staged.stat().st_uid == staged.parent.stat().st_uid != 0
    digest = hashlib.sha256(data.tobytes()).hexdigest()
    read = "lambda: hashlib.sha256(open({!r}, 'rb').read()).hexdigest()"
    stolen = await run(sandbox_gateway, "alice", kernels["alice"], TRY + (
        f"import hashlib\nprint(json.dumps([attempt({read.format(str(staged))}), "
        f"attempt(lambda: os.listdir({str(staged.parent)!r}))]))"
    ))
    assert stolen == ["FileNotFoundError", "FileNotFoundError"]
    own = await run(sandbox_gateway, "bob", kernels["bob"], (
        f"import hashlib, json, os\npath = os.path.join(os.environ['JUPYTER_GPU_STAGING_DIR'], {upload!r})\n"
        "print(json.dumps(hashlib.sha256(open(path, 'rb').read()).hexdigest()))\nos.unlink(path)"
    ))
    assert own == digest


@pytest.mark.asyncio
async def test_the_gateways_database_and_users_file_cannot_be_read(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    db, users = sandbox_gateway.tmp / "usage.sqlite", sandbox_gateway.tmp / "users.json"
    assert db.exists() and users.exists()
    outcome = await run(sandbox_gateway, "alice", kernels["alice"], TRY + f"""
home = os.environ["HOME"]
def own_file():
    with open(os.path.join(home, "notes.txt"), "w") as file:
        file.write("mine")
    assert open(os.path.join(home, "notes.txt")).read() == "mine"
print(json.dumps([attempt(lambda: open({str(db)!r}, "rb").read()), attempt(lambda: open({str(users)!r}).read()),
                  attempt(lambda: os.listdir({str(db.parent)!r})), attempt(own_file)]))
""")
    assert outcome == ["FileNotFoundError", "FileNotFoundError", "FileNotFoundError", "ok"]


@pytest.mark.asyncio
async def test_proc_shows_neither_the_gateway_nor_another_kernel(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    assert sandbox_gateway.proc is not None
    targets = [sandbox_gateway.proc.pid, sandboxed_pid(sandbox_gateway, kernels["bob"])]
    outcome = await run(sandbox_gateway, "alice", kernels["alice"], TRY + f"""
def read(path):
    return open(path, "rb").read()
stolen = [attempt(lambda p=pid, f=file: read(f"/proc/{{p}}/{{f}}"))
          for pid in {targets} for file in ("environ", "cmdline")]
visible = [read(f"/proc/{{p}}/cmdline").decode(errors="replace") for p in os.listdir("/proc") if p.isdigit()]
own = read("/proc/self/environ").decode()
print(json.dumps({{"stolen": stolen, "visible": visible, "own": own, "environ": dict(os.environ)}}))
""")
    assert outcome["stolen"] == ["FileNotFoundError"] * 4
    seen = " ".join(outcome["visible"])
    assert kernels["bob"] not in seen and "jupyter_gpu.cli" not in seen
    assert kernels["alice"] in outcome["own"]  # its own /proc entries are there
    assert SECRET not in outcome["own"] and SECRET not in json.dumps(outcome["environ"])
    assert not [name for name in outcome["environ"] if name.startswith("AWS_") or name == "JUPYTER_GPU_TOKEN"]


@pytest.mark.asyncio
async def test_another_kernel_and_the_gateway_cannot_be_signalled_or_traced(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    assert sandbox_gateway.proc is not None
    bob_pid = sandboxed_pid(sandbox_gateway, kernels["bob"])
    outcome = await run(sandbox_gateway, "alice", kernels["alice"], TRY + f"""
import ctypes, signal, subprocess
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
def trace(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
def own_child():
    child = subprocess.Popen(["sleep", "30"])
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(5) == -signal.SIGTERM
print(json.dumps([attempt(lambda p=pid: os.kill(p, signal.SIGKILL)) for pid in ({bob_pid}, {sandbox_gateway.proc.pid})]
                 + [attempt(lambda p=pid: trace(p)) for pid in ({bob_pid}, {sandbox_gateway.proc.pid})]
                 + [attempt(own_child)]))
""")
    assert outcome == ["ProcessLookupError"] * 4 + ["ok"]  # ESRCH: not even there to be refused
    assert await run(sandbox_gateway, "bob", kernels["bob"], "print(2 + 2)") == 4


@pytest.mark.asyncio
async def test_a_kernel_writes_only_its_own_directories(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    bob_home = kernel_dir(kernels["bob"]) / "home"
    outside = [sys.prefix, os.path.dirname(os.__file__), "/etc", "/usr/local", str(Path(__file__).parent),
               str(bob_home), "/"]
    outcome = await run(sandbox_gateway, "alice", kernels["alice"], TRY + f"""
def write(directory):
    path = os.path.join(directory, "sandbox-escape")
    with open(path, "w") as file:
        file.write("x")
    os.unlink(path)
print(json.dumps({{
    "outside": [attempt(lambda d=d: write(d)) for d in {outside!r}],
    "own": [attempt(lambda d=d: write(d)) for d in (os.environ["HOME"], "/tmp", "/dev/shm",
                                                     os.environ["JUPYTER_GPU_STAGING_DIR"])],
}}))
""")
    assert all(result in ("OSError", "PermissionError", "FileNotFoundError") for result in outcome["outside"]), outcome
    assert outcome["own"] == ["ok"] * 4
    assert not (bob_home / "sandbox-escape").exists()


@pytest.mark.skipif(not AS_ROOT, reason="kernels get uids of their own only when the gateway runs as root")
@pytest.mark.asyncio
async def test_each_kernel_runs_as_an_unprivileged_uid_of_its_own(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    code = ("import json, os\nstatus = open('/proc/self/status').read().split('\\n')\n"
            "caps = [line for line in status if line.startswith('CapEff')]\n"
            "print(json.dumps([os.getuid(), os.getgid(), os.getgroups(), caps]))")
    alice = await run(sandbox_gateway, "alice", kernels["alice"], code)
    bob = await run(sandbox_gateway, "bob", kernels["bob"], code)
    assert alice[0] != bob[0] and all(60000 <= ids[0] <= 60999 and ids[1] == ids[0] for ids in (alice, bob))
    assert alice[2] in ([], [alice[1]]) and alice[3] == ["CapEff:\t0000000000000000"]


@pytest.mark.skipif(bool(NO_CGROUPS), reason=NO_CGROUPS)
@pytest.mark.asyncio
async def test_a_kernel_past_its_memory_limit_ends_its_lease_with_reason_oom(
    sandbox_gateway: GatewayProcess, kernels: dict[str, str]
) -> None:
    lease = sandbox_gateway.lease("alice")
    while lease["state"] != "granted":
        lease = sandbox_gateway.get("alice", f"/api/gpu/leases/{lease['id']}?wait=5").body
    socket = await sandbox_gateway.connect("alice", lease["kernel_id"])
    try:
        reply, _ = await socket.run(f"hog = b'x' * {2 * MEMORY_LIMIT}", timeout=60)
    finally:
        socket.close()
    assert reply["content"]["ename"] == "KernelDied" and "memory limit" in reply["content"]["evalue"]
    ended = await apoll(lambda: (lambda body: body if body["state"] == "released" else None)(
        sandbox_gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body), 10, "the lease to end")
    assert ended["reason"] == "oom"
    assert await run(sandbox_gateway, "bob", kernels["bob"], "print(3 + 3)") == 6  # others carry on


def test_sandbox_required_refuses_to_start_without_bubblewrap(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH without bwrap
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare), "JUPYTER_CONFIG_DIR": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "gateway", "--port", "0", "--no-auth", "--db",
         str(tmp_path / "usage.sqlite"), "--sandbox", "required"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--sandbox required" in result.stderr and "bubblewrap" in result.stderr


def test_without_bubblewrap_auto_warns_and_says_so(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    gateway = make_gateway(tmp_path, "--cpu-slots", "1", "--min-warm", "0")
    path = os.environ["PATH"]
    os.environ["PATH"] = str(bare)
    try:
        gateway.start(wait_warm=False)
    finally:
        os.environ["PATH"] = path
    try:
        info = gateway.get("alice", "/api/gpu/info").body["sandbox"]
        assert info["mechanism"] == "none" and "bubblewrap" in info["warnings"][0]
        assert gateway.get("alice", "/api/gpu/types").body[0]["isolation"].startswith("none")
        assert "KERNEL ISOLATION" in gateway.log_text()
    finally:
        gateway.stop()
