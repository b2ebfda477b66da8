"""Each pooled kernel in a sandbox of its own: bubblewrap namespaces, its own uid, limits.

A kernel is a stranger's code. Started through :meth:`Sandbox.command`, it runs with

- its own pid namespace (it sees and can signal only its own processes; /proc is its own),
- its own mount namespace: the system and the Python environment read-only, a private /tmp and
  /dev/shm, its own home, runtime (connection file, ZMQ sockets) and staging directories
  writable; nothing of the gateway's state (database, users file, other kernels' directories),
- a /dev with only its own GPUs' device nodes (none for emulated GPUs or CPU kernels),
- where the gateway runs as root, a uid of its own from a configured range (so even a file it
  could name is not its to read), no capabilities and no way to gain any (no_new_privs),
- optional memory and CPU limits in a control group of its own (:mod:`pool_manager.cgroups`),
  else an address-space rlimit for memory.

The network namespace stays shared: users download data and install packages. Its ZMQ sockets
are unix sockets in its private runtime directory instead of loopback ports, so another
kernel cannot even connect to them (loopback ports are open to every process of the machine,
and an IOPub socket hands its output to any subscriber, key or not).

Nothing here touches asyncio or the pool: a Ray slot actor builds the same command on its node.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cgroups import CgroupError, CgroupLimiter, KernelCgroup, KernelLimits
from .scratch import locked_root

SANDBOX_MODES = ("auto", "required", "off")
KERNELS_PREFIX = "jupyter-gpu-kernels-"

#: Kept from the gateway's environment; everything else (tokens, cloud credentials, the
#: gateway's own settings) is the gateway's business, not a user's kernel's.
ENV_KEPT = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME")
ENV_KEPT_PREFIXES = ("LC_", "NVIDIA_", "CUDA_", "OMP_", "MKL_")

#: Read-only system directories a Python kernel needs (symlinks stay symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/sys")

#: GPU device nodes every CUDA process needs besides its own /dev/nvidia<N>.
NVIDIA_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")

#: The kernel's first process joins its groups, applies an rlimit if asked, then execs the
#: rest: whatever it starts later inherits both. Arguments: group files, "--", command.
JOIN_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; {ulimit}exec "$@"'

#: Without root, bubblewrap needs a user namespace of its own to mount anything.
_USERNS = ("--unshare-user",) if os.geteuid() != 0 else ()

MAX_UIDS = 65536

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class SandboxUnavailable(ValueError):
    """A sandbox was required and cannot be set up here."""


def parse_memory(text: str) -> int:
    """``'64G'`` -> bytes; ``''`` or ``'0'`` -> 0 (no limit)."""
    if not text.strip():
        return 0
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise ValueError(f"kernel memory {text!r} is not a size: write e.g. '64G', '512M' or '' for no limit")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def parse_uid_range(text: str) -> range:
    """``'60000-60999'`` -> range(60000, 61000)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or not 0 < int(match.group(1)) <= int(match.group(2)) < int(match.group(1)) + MAX_UIDS:
        raise ValueError(f"kernel uids {text!r} is not a range of unprivileged uids (at most {MAX_UIDS:,}): "
                         "write e.g. '60000-60999'")
    return range(int(match.group(1)), int(match.group(2)) + 1)


@dataclass
class Isolation:
    """What the sandbox in force does, as ``/api/gpu/info`` and ``/api/gpu/types`` say it."""

    mechanism: str = "none"
    uid_separation: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False
    memory_limit_bytes: int = 0
    cpu_limit: float = 0.0
    limits_enforced_by: str = "none"
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """One short line, e.g. ``bubblewrap, own uid, pid+mount namespaces, memory 64 GiB (cgroup v1)``."""
        if self.mechanism == "none":
            parts = ["none: kernels run as the gateway's user and can read each other's files"]
        else:
            parts = [self.mechanism, "own uid" if self.uid_separation else "gateway's uid", "pid+mount namespaces"]
        limits = []
        if self.memory_limit_bytes:
            limits.append(f"memory {_size(self.memory_limit_bytes)}")
        if self.cpu_limit:
            limits.append(f"{self.cpu_limit:g} CPUs")
        if limits:
            parts.append(f"{', '.join(limits)} ({self.limits_enforced_by})")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "summary": self.summary,
            "uid_separation": self.uid_separation,
            "pid_namespace": self.pid_namespace,
            "mount_namespace": self.mount_namespace,
            "limits": {"memory_bytes": self.memory_limit_bytes or None, "cpus": self.cpu_limit or None,
                       "enforced_by": self.limits_enforced_by},
            "warnings": list(self.warnings),
        }


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.3g} MiB"


@dataclass
class KernelSandbox:
    """The per-kernel part: its directories, uid and control group."""

    kernel_id: str
    root: Path  # owned by the kernel's uid, mode 0700; bound at the same path inside
    uid: int | None
    gid: int | None
    cgroup: KernelCgroup | None = None
    staging_dir: str | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def runtime(self) -> Path:
        """Connection file and ZMQ unix sockets."""
        return self.root / "run"

    @property
    def connection_file(self) -> str:
        return str(self.runtime / "kernel.json")

    def give(self, path: str) -> None:
        """Hand a file the gateway wrote (the connection file) to the kernel's uid."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_kills() > 0


class UidPool:
    """Unprivileged uids for kernels: each held by one running kernel of this machine at a time.

    A uid is held with a lock file in ``lock_dir``, so every gateway and every Ray slot actor
    of the machine hands each uid to one kernel at a time; the least recently used goes first.
    Uids of real accounts are skipped.
    """

    def __init__(self, uids: range, lock_dir: str | None = None) -> None:
        self._free = deque(uids)
        self._range = uids
        self._lock_dir = Path(lock_dir or default_uid_lock_dir())
        self._lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._held: dict[int, int] = {}  # uid -> its lock's file descriptor
        self._lock = threading.Lock()  # a Ray actor may start kernels from threads

    def take(self) -> int:
        with self._lock:
            for _ in range(len(self._free)):
                uid = self._free.popleft()
                if _uid_exists(uid):
                    continue  # never again
                lock = os.open(self._lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # another gateway's kernel has it
                    os.close(lock)
                    self._free.append(uid)
                    continue
                self._held[uid] = lock
                return uid
        raise RuntimeError(f"no free kernel uid in {self._range.start}-{self._range.stop - 1}: every one runs a "
                           "kernel. Widen --kernel-uids")

    def give_back(self, uid: int) -> None:
        with self._lock:
            lock = self._held.pop(uid, None)
            if lock is not None:
                os.close(lock)
                self._free.append(uid)


def default_uid_lock_dir() -> str:
    """Shared by every gateway of the machine: /run where root can write, else the temp dir."""
    parent = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    return os.path.join(parent, "jupyter-gpu-kernel-uids")


def _uid_exists(uid: int) -> bool:
    """A uid of a real account (e.g. in /etc/passwd) must never run a stranger's kernel."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def python_paths() -> list[str]:
    """Where the kernel's Python lives: the interpreter's prefixes and every import path."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    # `python -m` puts the gateway's working directory first on its path (an operator's home,
    # say): the kernel starts in its own home and has no use for it
    cwd = os.getcwd()
    paths += [p for p in sys.path if p and os.path.abspath(p) != cwd]
    paths += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    found = []
    for path in paths:
        if not path:
            continue
        path = os.path.abspath(path)
        if os.path.isfile(path):  # a zip on sys.path
            path = os.path.dirname(path)
        if os.path.isdir(path):
            found.append(path)
    return found


def outermost(paths: Iterable[str]) -> list[str]:
    """The paths that are not inside another one of them, sorted."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


class Sandbox:
    """Builds and tears down kernel sandboxes on one node."""

    def __init__(
        self,
        isolation: Isolation,
        bwrap: str | None,
        read_only: Sequence[str],
        hidden: Sequence[str],
        uids: UidPool | None,
        limits: KernelLimits,
        limiter: CgroupLimiter | None,
        real_gpus: bool,
        parent_dir: str | None = None,
    ) -> None:
        self.isolation = isolation
        self.bwrap = bwrap
        self.read_only = outermost(read_only)
        self.hidden = list(hidden)
        self.uids = uids
        self.limits = limits
        self.limiter = limiter
        self.real_gpus = real_gpus
        self._parent_dir = parent_dir
        self._root: Path | None = None
        self._root_lock = -1

    @property
    def enabled(self) -> bool:
        return self.bwrap is not None

    @classmethod
    def probe(
        cls,
        mode: str,
        uid_range: str = "60000-60999",
        memory: str = "",
        cpus: float = 0.0,
        real_gpus: bool = False,
        hidden: Sequence[str] = (),
        parent_dir: str | None = None,
    ) -> Sandbox:
        """The best sandbox this machine allows under ``mode`` (auto, required, off).

        ``required`` raises SandboxUnavailable where any part is missing; ``auto`` falls
        back and lists what is missing in ``isolation.warnings``.
        """
        if mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox {mode!r} is not one of {', '.join(SANDBOX_MODES)}")
        limits = KernelLimits(parse_memory(memory), float(cpus))
        if limits.cpus < 0:
            raise ValueError(f"kernel cpus {cpus!r} must be 0 (no limit) or more")
        isolation = Isolation(memory_limit_bytes=limits.memory_bytes, cpu_limit=limits.cpus)
        problems: list[str] = []
        limiter: CgroupLimiter | None = None
        if limits:
            try:
                limiter = CgroupLimiter.probe(limits)
                isolation.limits_enforced_by = limiter.description
            except CgroupError as exc:
                if limits.cpus:
                    problems.append(f"no control group for kernel limits ({exc}): the CPU limit is not enforced")
                isolation.limits_enforced_by = "rlimit (address space)" if limits.memory_bytes else "none"
                if limits.memory_bytes:
                    problems.append(f"no control group for kernel limits ({exc}): memory is bounded by an "
                                    "address-space rlimit, which CUDA's large mappings may hit early")
        bwrap = None
        uids = None
        if mode != "off":
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                problems.append("bubblewrap (bwrap) is not installed: kernels are not sandboxed "
                                "(apt-get install bubblewrap)")
            else:
                failure = _try_bwrap(bwrap)
                if failure:
                    problems.append(f"bubblewrap cannot create namespaces here: {failure}")
                    bwrap = None
            if os.geteuid() == 0:
                uids = UidPool(parse_uid_range(uid_range))
        if bwrap is not None:
            isolation.mechanism = "bubblewrap"
            isolation.pid_namespace = isolation.mount_namespace = True
            isolation.uid_separation = uids is not None
        if mode == "required" and problems:
            raise SandboxUnavailable("--sandbox required, but " + "; ".join(problems))
        isolation.warnings = problems
        if bwrap is None:
            uids = None
        return cls(isolation, bwrap, SYSTEM_DIRS + tuple(python_paths()), hidden, uids, limits, limiter,
                   real_gpus, parent_dir)

    # --- one kernel ---------------------------------------------------------------------

    def prepare(self, kernel_id: str, staging_dir: str | None) -> KernelSandbox:
        """Directories, uid and control group for a new kernel."""
        if self._root is None:
            # 0700: bubblewrap binds each kernel's own directory into its sandbox
            path, self._root_lock = locked_root(self._parent_dir or tempfile.gettempdir(), KERNELS_PREFIX)
            self._root = Path(path)
        uid = self.uids.take() if self.uids is not None else None
        kernel = KernelSandbox(kernel_id, self._root / kernel_id, uid, uid, staging_dir=staging_dir)
        try:
            for directory in (kernel.root, kernel.home, kernel.runtime):
                directory.mkdir(mode=0o700)
                kernel.give(str(directory))
            if staging_dir is not None:
                kernel.give(staging_dir)  # the gateway's uploads land there; files take its owner
            if self.limiter is not None:
                kernel.cgroup = self.limiter.create(kernel_id, self.limits)
        except BaseException:
            self.release(kernel)
            raise
        return kernel

    def release(self, kernel: KernelSandbox) -> None:
        """After the kernel's processes are gone: its directories, group and uid go back."""
        shutil.rmtree(kernel.root, ignore_errors=True)
        if kernel.cgroup is not None:
            kernel.cgroup.remove()
        if kernel.uid is not None and self.uids is not None:
            self.uids.give_back(kernel.uid)

    def environment(self, kernel: KernelSandbox, env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
        """The kernel's environment: a few harmless settings of the gateway's, then ``extra``."""
        if not self.enabled:  # no sandbox: the caller scrubbed the gateway's own settings already
            return {**env, **extra}
        kept = {k: v for k, v in env.items() if k in ENV_KEPT or k.startswith(ENV_KEPT_PREFIXES)}
        return {**kept, "HOME": str(kernel.home), "TMPDIR": "/tmp", "USER": "jupyter", **extra}

    def command(self, kernel: KernelSandbox, argv: Sequence[str], gpu_indices: Sequence[int]) -> list[str]:
        """``argv`` wrapped so that it runs inside ``kernel``'s sandbox."""
        command = list(argv)
        if self.bwrap is not None:
            command = self._bwrap(kernel, gpu_indices) + self._drop_privileges(kernel) + command
        joins = kernel.cgroup.procs_files if kernel.cgroup is not None else []
        ulimit = ""
        if self.limits.memory_bytes and self.limiter is None:
            ulimit = f"ulimit -v {self.limits.memory_bytes // 1024} && "
        if joins or ulimit:
            script = JOIN_SCRIPT.format(ulimit=ulimit)
            command = ["/bin/sh", "-c", script, "jupyter-gpu-kernel", *joins, "--", *command]
        return command

    def _drop_privileges(self, kernel: KernelSandbox) -> list[str]:
        # bwrap runs as root to mount what root alone may read (a Python under /root), then
        # the kernel becomes its own uid with no capabilities; bwrap sets no_new_privs, so no
        # setuid program can give any back.
        if kernel.uid is None:
            return []
        return ["setpriv", f"--reuid={kernel.uid}", f"--regid={kernel.gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--"]

    def _bwrap(self, kernel: KernelSandbox, gpu_indices: Sequence[int]) -> list[str]:
        assert self.bwrap is not None
        args = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--hostname", "jupyter-gpu-kernel",
                # The gateway's pid means nothing in the kernel's pid namespace: ipykernel would
                # take its parent for dead and exit. 1 turns its parent poller off; bubblewrap
                # ends the kernel with the gateway instead (--die-with-parent).
                "--setenv", "JPY_PARENT_PID", "1", *_USERNS]
        made: set[str] = {"/"}

        def parents(path: str) -> list[str]:
            # bwrap makes missing parents 0700 (unreadable to a kernel's own uid): make them 0755
            out = []
            for parent in reversed(Path(path).parents):
                name = str(parent)
                if name not in made:
                    made.add(name)
                    out += ["--perms", "0755", "--dir", name]
            made.add(path)
            return out

        # /tmp and /dev/shm are the kernel's own, in memory (so they count against its limit);
        # first, so that a Python environment below /tmp is bound over it, not hidden by it
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
                 "--perms", "1777", "--tmpfs", "/dev/shm"]
        made |= {"/proc", "/dev", "/tmp", "/dev/shm"}
        for path in self.read_only:
            if os.path.islink(path) and os.path.dirname(path) == "/":
                args += ["--symlink", os.readlink(path), path]
                made.add(path)
            elif os.path.exists(path):
                args += [*parents(path), "--ro-bind", path, path]
        args += self._masks()  # before the kernel's own directories, which may lie below a mask
        if self.real_gpus:
            nodes = [f"/dev/nvidia{i}" for i in gpu_indices] + list(NVIDIA_SHARED_NODES)
            args += [arg for node in nodes if os.path.exists(node) for arg in ("--dev-bind", node, node)]
        for path in self._writable(kernel):
            args += [*parents(path), "--bind", path, path]
        args += ["--chdir", str(kernel.home), "--"]
        return args

    def _writable(self, kernel: KernelSandbox) -> list[str]:
        return [str(kernel.root)] + ([kernel.staging_dir] if kernel.staging_dir else [])

    def _masks(self) -> list[str]:
        """Gateway state that happens to lie inside a read-only directory is covered up."""
        masks = []
        for path in self.hidden + ([str(self._root)] if self._root else []):
            if not any(path.startswith(ro.rstrip("/") + "/") for ro in self.read_only):
                continue
            if os.path.isdir(path) and not any(ro.startswith(path.rstrip("/") + "/") for ro in self.read_only):
                masks += ["--tmpfs", path]
            elif os.path.isfile(path):  # (/dev/null would be a device node, refused on a nodev mount)
                masks += ["--ro-bind", str(self._empty_file()), path]
        return masks

    def _empty_file(self) -> Path:
        assert self._root is not None
        empty = self._root / "empty"
        if not empty.exists():
            empty.touch(0o444)
        return empty

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            os.close(self._root_lock)
        if self.limiter is not None:
            self.limiter.close()


def _try_bwrap(bwrap: str) -> str:
    """'' if bwrap can create the namespaces a kernel needs here, else its complaint."""
    args = [bwrap, *_USERNS, "--unshare-pid", "--unshare-ipc", "--ro-bind", "/", "/", "--proc", "/proc",
            "--dev", "/dev", "--die-with-parent", "--", "true"]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        result = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return "" if result.returncode == 0 else (result.stderr.strip() or f"exit status {result.returncode}")
    return "it could not be run"
