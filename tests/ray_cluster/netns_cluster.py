"""A Ray cluster of several "machines" on one host: Linux network namespaces on a bridge.

Measured facts behind every choice here are in shared/notes/ray-on-one-machine.md:
Ray never runs on the host network (it would register the host's real address); the bridge
lives in a namespace of its own so the host gets no address on it; every node has its own
temp dir, HOME and address; token auth is explicit with one shared token file; each node
is told how many CPUs and how much object store it may take (else each claims the whole
machine); and processes are stopped by pid, namespace by namespace, never with
``ray stop`` (which kills Ray processes by name, machine-wide).

Needs root (``ip netns``). :func:`namespaces_unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pool_manager.ray_nodes import EMULATED_RESOURCE, accelerator_resource

RAY_PORT = 6379
SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the namespace cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the Ray cluster tests need root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "the Ray cluster tests need iproute2's `ip` to create network namespaces"
    probe = f"jg-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be created here ({made.stderr.strip()}); Ray cluster tests skipped"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    try:
        import ray  # noqa: F401
    except ImportError:
        return 'Ray is not installed: pip install "jupyter-gpu[ray]" to run the Ray cluster tests'
    return None


#: ``ray start`` flag -> (the port file the raylet waits for, the fixed port). Each node has its
#: own network namespace, so fixed ports never collide.
AGENT_PORTS = {
    "dashboard-agent-listen-port": ("dashboard_agent_listen_port", 52365),
    "dashboard-agent-grpc-port": ("metrics_agent_port", 52366),
    "metrics-export-port": ("metrics_export_port", 52367),
    "runtime-env-agent-port": ("runtime_env_agent_port", 52368),
}


def _announce_agent_ports(temp_dir: Path, node_id: str, stop: threading.Event) -> None:
    """Write the agent port files the raylet waits for, before the agents themselves can.

    The raylet gives its Python agents ~15 s to write their ports and aborts otherwise, and
    `ray start` gives the node 30 s; on a 2-core machine busy with other work the agents take
    longer just to import. The ports are fixed (``AGENT_PORTS``), so the files can be written
    as soon as the session directory exists; the agents bind those ports when they are up
    and rewrite the same files.
    """
    while not stop.is_set():
        for session in temp_dir.glob("session_2*"):
            for file_name, port in AGENT_PORTS.values():
                path = session / f"{file_name}_{node_id}"
                if not path.exists():
                    staging = path.with_suffix(".tmp")
                    staging.write_text(str(port))
                    staging.rename(path)
        stop.wait(0.05)


@dataclass
class Node:
    name: str
    namespace: str
    ip: str
    gpus: dict[str, int] = field(default_factory=dict)
    ray_started: bool = False


class NamespaceCluster:
    """Namespaces ``<prefix>br`` (the bridge) and one per node; Ray started in some of them."""

    def __init__(self, root: Path, health_check: dict[str, int] | None = None) -> None:
        self.root = root
        self.prefix = f"jg{os.getpid() % 100000}{secrets.token_hex(2)}-"
        self.bridge = self.prefix + "br"
        self.nodes: dict[str, Node] = {}
        self.token_path = root / "auth_token"
        self.health_check = health_check or {}
        self._host = -1  # the host's own network namespace, kept open to come back to

    @property
    def head_address(self) -> str:
        return f"{SUBNET}.11:{RAY_PORT}"

    # --- network ---------------------------------------------------------------------------

    def up(self) -> NamespaceCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self._ip("netns", "add", self.bridge)
        self._ip("-n", self.bridge, "link", "set", "lo", "up")
        self._ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.bridge, "link", "set", "br0", "up")
        return self

    def add_machine(self, name: str, host: int) -> Node:
        """A namespace with address SUBNET.host on the bridge and no route anywhere else."""
        ns, ip = self.prefix + name, f"{SUBNET}.{host}"
        self._ip("netns", "add", ns)
        self.nodes[name] = Node(name, ns, ip)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v-{name}", "netns", self.bridge)
        self._ip("-n", self.bridge, "link", "set", f"v-{name}", "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        return self.nodes[name]

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    # --- processes in a namespace ------------------------------------------------------------

    def env(self, name: str) -> dict[str, str]:
        """The environment of a process of node ``name``: its own HOME, the shared token."""
        home = self.root / f"home-{name}"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "JUPYTER_GPU_"))}
        env.update(
            HOME=str(home),
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
            # the worker processes Ray starts import the slot actor from this checkout
            PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def run_in(self, name: str, *command: str, timeout: float = 180.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        return subprocess.run(["ip", "netns", "exec", node.namespace, *command], env={**self.env(name), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def _renice(self, name: str) -> None:
        """Back to this process's own priority once up: kernels started there later compete
        fairly with the gateway's and the local backend's (a niced test run stays niced)."""
        own = os.getpriority(os.PRIO_PROCESS, 0)
        for pid in self.pids(name):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, pid, own)

    @staticmethod
    def _first(command: list[str]) -> list[str]:
        """Ahead of other work on the machine: `ray start` gives a node 30 s to come up, and
        its half-dozen Python services (each importing aiohttp, grpc, ...) miss that on a
        busy 2-core machine. Root may raise priority; it is lowered again once the node is up."""
        return ["nice", "-n", "-15", *command] if os.geteuid() == 0 else command

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.nodes[name].namespace], capture_output=True, text=True)
        # this test process counts as in the namespace its main thread entered (see inside())
        return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]

    # --- Ray -----------------------------------------------------------------------------------

    def start_ray(self, name: str, gpus: dict[str, int], head: bool = False, attempts: int = 3,
                  extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> float:
        """``ray start`` on node ``name`` with declared (emulated) GPUs; returns seconds taken.

        A node declares its GPUs the way Ray names real ones (``GPU`` and
        ``accelerator_type:A100``) and marks them emulated with :data:`EMULATED_RESOURCE`.
        ``extra``: more ``ray start`` flags (a head with ``--autoscaling-config`` runs Ray's
        autoscaler); ``env``: more environment for the node's processes.
        """
        node = self.nodes[name]
        node.gpus = dict(gpus)
        resources: dict[str, float] = {}
        for gpu_type in gpus:
            resources[accelerator_resource(gpu_type)] = 1
        if gpus:
            resources[EMULATED_RESOURCE] = 1
        command = [
            str(Path(sys.executable).parent / "ray"), "start", f"--node-ip-address={node.ip}",
            "--num-cpus=1", f"--num-gpus={sum(gpus.values())}", f"--resources={json.dumps(resources)}",
            "--object-store-memory=100000000", f"--temp-dir={self.root / f'ray-{name}'}",
            "--disable-usage-stats",
            # Python services a test cluster does not use: each costs seconds of imports at start.
            "--include-log-monitor=false",
        ]
        if head:
            command += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
            if not any(flag.startswith("--autoscaling-config") for flag in extra):
                command.append("--no-monitor")
            if self.health_check:
                command.append(f"--system-config={json.dumps(self.health_check)}")
        else:
            command.append(f"--address={self.head_address}")
        command += [f"--{flag}={port}" for flag, (_, port) in AGENT_PORTS.items()]
        command += extra
        began = time.monotonic()
        for _ in range(attempts):
            node_id = secrets.token_hex(28)
            temp_dir = self.root / f"ray-{name}"
            stop = threading.Event()
            writer = threading.Thread(target=_announce_agent_ports, args=(temp_dir, node_id, stop), daemon=True)
            writer.start()
            try:
                done = self.run_in(name, *self._first(command),
                                   env={**(env or {}), "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id})
            finally:
                stop.set()
                writer.join()
            if done.returncode == 0:
                node.ray_started = True
                self._renice(name)
                return time.monotonic() - began
            # `ray start` gives a node 30 s to register; on a loaded 2-core machine its Python
            # agents can take longer to import. Clear the half-started node and try again.
            self.stop_machine(name)
            shutil.rmtree(self.root / f"ray-{name}", ignore_errors=True)
        raise RuntimeError(f"ray start on {name} failed {attempts} times ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def kill_machine(self, name: str) -> int:
        """SIGKILL every process of node ``name`` at once, as a power cut would; returns how many."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop_machine(self, name: str, grace: float = 5.0) -> list[int]:
        """SIGTERM the node's processes, SIGKILL what is left after ``grace``; returns survivors (none)."""
        for pid in self.pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill_machine(name)
        deadline = time.monotonic() + grace
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.pids(name)

    # --- the test process's own network namespace ----------------------------------------------

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Run this thread (and the processes it starts) inside node ``name``'s network.

        A network namespace belongs to a thread: sockets and child processes made by this
        thread meanwhile live in the node's network, so a gateway started here listens on
        that node's loopback and this thread's clients reach it.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.nodes[name].namespace}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
            try:
                yield
            finally:
                if libc.setns(host, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the host network")
        finally:
            os.close(target)
            os.close(host)

    def netns_inode(self, name: str) -> int:
        return os.stat(f"/run/netns/{self.nodes[name].namespace}").st_ino

    # --- teardown ------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every process in every namespace by pid, delete the namespaces and files.

        Returns what could not be cleaned (empty when all went).
        """
        problems: list[str] = []
        for name in list(self.nodes):
            left = self.stop_machine(name)
            if left:
                problems.append(f"{name}: pids {left} survived SIGKILL")
                continue
            subprocess.run(["ip", "netns", "del", self.nodes[name].namespace], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        return problems
