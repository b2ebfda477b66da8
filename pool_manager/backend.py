"""Where kernels run: one small interface, and the local backend (this machine).

A backend starts a warm kernel pinned to some GPUs, kills it, interrupts it, and reports
kernels that died on their own. The pool core never sees a process; a Ray backend that
runs each slot as an actor on a remote node implements the same four methods.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu.protocol import REASON_OOM
from jupyter_gpu.transfer import STAGING_DIR_ENV

from .model import StartKernel
from .node_bulk import BulkEndpoint
from .sandbox import KernelSandbox, Sandbox
from .scratch import locked_root

log = logging.getLogger(__name__)


PRIVATE_ENV_PREFIXES = ("JUPYTER_GPU_",)

#: Pooled kernels are single-use, so IPython's on-disk history is never read back; writing
#: it costs 2-3 ms of every execute (a SQLite write per cell). Keep it in memory instead.
#: The kernel class and its stdout/stderr come from jupyter_gpu.pooled_kernel (named, not
#: imported here): less bookkeeping per execute, and a flush skips a thread round trip,
#: twice per stream per execute (~0.5 ms). ipykernel also sleeps 0.5 ms before every
#: execute_reply, so that output usually leaves before the reply on another socket; Jupyter
#: does not order messages across channels, and clients (the magic, JupyterLab, nbclient)
#: treat a cell as finished only at its idle status, which IOPub keeps after all output.
#: The pooled classes need the ipykernel they were written for (7.x); with another one the
#: kernels run stock, only slower.
KERNEL_ARGUMENTS = ("--HistoryManager.hist_file=:memory:",)
POOLED_KERNEL_ARGUMENTS = (
    "--IPKernelApp.outstream_class=jupyter_gpu.pooled_kernel.PooledOutStream",
    "--IPKernelApp.kernel_class=jupyter_gpu.pooled_kernel.PooledKernel",
    "--Kernel._execute_sleep=0",
)


def kernel_arguments() -> list[str]:
    from jupyter_gpu import pooled_kernel

    return [*KERNEL_ARGUMENTS, *(POOLED_KERNEL_ARGUMENTS if pooled_kernel.supported() else ())]


class KernelStartError(RuntimeError):
    """A kernel did not start or its warm-up code failed."""


@dataclass
class KernelInfo:
    """What the gateway needs to talk to a started kernel."""

    kernel_id: str
    connection_info: dict[str, Any]


#: Hears of a kernel that died without being killed: its id, and why where the backend knows
#: (``REASON_OOM``), else None.
DeathCallback = Callable[[str, str | None], None]


class KernelBackend(abc.ABC):
    """The seam between pool policy and kernel placement."""

    def __init__(self) -> None:
        self._on_death: DeathCallback = lambda kernel_id, reason: None

    def watch(self, on_death: DeathCallback) -> None:
        """Register who hears (by kernel id, with a reason or None) about kernels that died without being killed."""
        self._on_death = on_death

    @abc.abstractmethod
    async def start_kernel(self, request: StartKernel) -> KernelInfo:
        """Start a kernel pinned to ``request.gpu_indices``, run the warm-up code, return it."""

    @abc.abstractmethod
    async def kill_kernel(self, kernel_id: str) -> None:
        """Kill the kernel and wait until its process is gone (unknown ids are ignored)."""

    @abc.abstractmethod
    async def interrupt_kernel(self, kernel_id: str) -> None:
        """Interrupt whatever the kernel is executing (SIGINT for ipykernel)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill every kernel this backend started."""

    def staging_dir(self, kernel_id: str) -> str | None:
        """A directory the gateway may write uploads into and this kernel maps them from.

        None (the default) where the gateway and the kernel share no file system: pushed
        values then travel to its :meth:`bulk_endpoint`, or else over the kernel websocket.
        """
        return None

    def bulk_endpoint(self, kernel_id: str) -> BulkEndpoint | None:
        """Where the gateway relays this kernel's pushes and pulls when its staging directory is on
        another machine (its node's receiving end); None where there is none."""
        return None


class LocalKernelBackend(KernelBackend):
    """Kernels as ipykernel processes on this machine, started with jupyter_client."""

    def __init__(
        self,
        kernel_name: str = "python3",
        warmup_code: str = "",
        startup_timeout: float = 60.0,
        extra_env: dict[str, str] | None = None,
        poll_interval: float = 0.2,
        staging_root: str | None = None,
        staging: bool = True,
        sandbox: Sandbox | None = None,
        ip: str = "127.0.0.1",
        transport_encryption: str = "disabled",
        local_sockets: bool = True,
    ) -> None:
        super().__init__()
        #: sandboxed kernels talk over unix sockets in their runtime directory; False keeps
        #: TCP on ``ip`` for a gateway on another machine (a Ray slot actor)
        self.local_sockets = local_sockets
        #: where the kernel listens; a Ray node binds its own address so the gateway can reach it
        self.ip = ip
        #: CurveZMQ ('required' for kernels on other machines; see jupyter_client's KernelManager)
        self.transport_encryption = transport_encryption
        self.kernel_name = kernel_name
        self.warmup_code = warmup_code
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.poll_interval = poll_interval
        self._managers: dict[str, AsyncKernelManager] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._zmq_context = zmq.asyncio.Context()
        self._kernel_arguments = kernel_arguments()  # reads package metadata: once, not per kernel
        self._staging_parent = staging_root
        self._staging_enabled = staging
        self._staging_root: str | None = None
        self._staging_lock = -1
        self._staging: dict[str, str] = {}
        self.sandbox = sandbox
        self._sandboxes: dict[str, KernelSandbox] = {}

    def staging_dir(self, kernel_id: str) -> str | None:
        return self._staging.get(kernel_id)

    def _new_staging_dir(self, kernel_id: str) -> str:
        """A private directory (0700) for this kernel's uploads, in memory where possible."""
        if self._staging_root is None:
            parent = self._staging_parent or default_staging_parent()
            self._staging_root, self._staging_lock = locked_root(parent, STAGING_PREFIX)
        path = tempfile.mkdtemp(prefix=f"{kernel_id}-", dir=self._staging_root)
        self._staging[kernel_id] = path
        return path

    async def start_kernel(self, request: StartKernel) -> KernelInfo:
        # The gateway's own secrets (its token, user file settings) are no business of a
        # user's kernel.
        env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
        kernel_env = dict(self.extra_env)
        # Pin the kernel to its own GPUs before anything in it can initialise CUDA; a CPU
        # kernel sees none at all rather than every GPU of the machine.
        kernel_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in request.gpu_indices)
        # Our indices are NVML's (PCI bus order); CUDA's default order is fastest first.
        kernel_env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        kernel_env["JUPYTER_GPU_TYPE"] = request.gpu_type
        kernel_env["JUPYTER_GPU_SLOT"] = request.slot_id
        staging = self._new_staging_dir(request.kernel_id) if self._staging_enabled else None
        if staging is not None:
            kernel_env[STAGING_DIR_ENV] = staging
        manager: AsyncKernelManager
        try:
            if self.sandbox is None:
                env.update(kernel_env)
                # One ZMQ context for all kernel managers: each would otherwise start its own I/O
                # thread and allocator arenas, which stay with the gateway process after the kernel.
                manager = AsyncKernelManager(kernel_name=self.kernel_name, context=self._zmq_context, ip=self.ip,
                                             transport_encryption=self.transport_encryption)
            else:
                kernel = self.sandbox.prepare(request.kernel_id, staging)
                self._sandboxes[request.kernel_id] = kernel
                env = self.sandbox.environment(kernel, env, kernel_env)
                manager = SandboxedKernelManager(self.sandbox, kernel, request.gpu_indices,
                                                 local_sockets=self.local_sockets,
                                                 kernel_name=self.kernel_name, context=self._zmq_context,
                                                 ip=self.ip, transport_encryption=self.transport_encryption)
            self._managers[request.kernel_id] = manager
            await manager.start_kernel(env=env, extra_arguments=self._kernel_arguments)
            await self._warm_up(manager)
        except Exception as exc:
            await self.kill_kernel(request.kernel_id)
            raise KernelStartError(f"kernel for {request.gpu_type} {request.gpu_indices} did not start: {exc}") from exc
        self._ensure_watcher()
        connection_info = dict(manager.get_connection_info(session=False))
        # The kernel read its ports and key at start; a file left on disk would let any
        # other kernel of this machine read them and drive this one.
        manager.cleanup_connection_file()
        return KernelInfo(kernel_id=request.kernel_id, connection_info=connection_info)

    async def _warm_up(self, manager: AsyncKernelManager) -> None:
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=self.startup_timeout)
            if self.warmup_code:
                reply = await client.execute_interactive(
                    self.warmup_code, store_history=False, timeout=self.startup_timeout, output_hook=lambda msg: None
                )
                if reply["content"]["status"] != "ok":
                    content = reply["content"]
                    raise KernelStartError(f"warm-up code failed: {content.get('ename')}: {content.get('evalue')}")
        finally:
            client.stop_channels()

    async def kill_kernel(self, kernel_id: str) -> None:
        staging = self._staging.pop(kernel_id, None)
        if staging is not None:  # uploads nobody claimed; claimed ones are unlinked already
            shutil.rmtree(staging, ignore_errors=True)
        manager = self._managers.pop(kernel_id, None)
        if manager is not None:
            try:
                await manager.shutdown_kernel(now=True)
            except Exception:  # the process may already be gone; cleanup is best effort
                log.debug("kill of kernel %s raised", kernel_id, exc_info=True)
        kernel = self._sandboxes.pop(kernel_id, None)
        if kernel is not None and self.sandbox is not None:
            # its control group may take a moment to empty: wait for that off the event loop
            await asyncio.to_thread(self.sandbox.release, kernel)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        manager = self._managers.get(kernel_id)
        if manager is not None:
            await manager.interrupt_kernel()

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_deaths())

    async def _watch_deaths(self) -> None:
        # One loop for all kernels: a waitpid per kernel every poll_interval is cheap, and
        # jupyter_client's own restarter would restart a kernel we want dead instead.
        while self._managers:
            await asyncio.sleep(self.poll_interval)
            for kernel_id, manager in list(self._managers.items()):
                try:
                    alive = not manager.has_kernel or await manager.is_alive()
                except Exception:  # one odd kernel must not blind the watcher to all others
                    log.exception("could not check kernel %s", kernel_id)
                    continue
                # kill_kernel removes a kernel before killing it: a deliberate kill is no death
                if not alive and self._managers.get(kernel_id) is manager:
                    kernel = self._sandboxes.get(kernel_id)
                    # read before kill_kernel removes the kernel's control group
                    reason = REASON_OOM if kernel is not None and kernel.oom_killed() else None
                    log.warning("kernel %s died%s", kernel_id, " (out of memory)" if reason else "")
                    await self.kill_kernel(kernel_id)
                    self._on_death(kernel_id, reason)

    async def close(self) -> None:
        await asyncio.gather(*(self.kill_kernel(kernel_id) for kernel_id in list(self._managers)))
        if self._watcher is not None:
            self._watcher.cancel()
        self._zmq_context.destroy(linger=0)
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
            os.close(self._staging_lock)
        if self.sandbox is not None:
            self.sandbox.close()


class SandboxedKernelManager(AsyncKernelManager):
    """jupyter_client's manager with the kernel started in its sandbox.

    Its connection file lives in the kernel's private runtime directory, and so do its ZMQ
    sockets (unix sockets, not loopback ports) when ``local_sockets``: a Ray slot actor whose
    gateway is on another node passes False and keeps TCP (with CurveZMQ) instead.
    """

    def __init__(self, sandbox: Sandbox, kernel: KernelSandbox, gpu_indices: tuple[int, ...],
                 local_sockets: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sandbox = sandbox
        self.kernel_sandbox = kernel
        self.gpu_indices = gpu_indices
        self.connection_file = kernel.connection_file
        if sandbox.enabled and local_sockets:
            self.transport = "ipc"
            self.ip = str(kernel.runtime / "zmq")
        if sandbox.enabled and self.kernel_spec is not None:
            # SIGINT would reach only bubblewrap (the kernel has a session of its own) and end
            # it; the kernel interrupts itself on an interrupt_request instead.
            self.kernel_spec.interrupt_mode = "message"

    def write_connection_file(self, **kwargs: Any) -> None:
        super().write_connection_file(**kwargs)
        self.kernel_sandbox.give(self.connection_file)

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        argv = super().format_kernel_cmd(extra_arguments)
        return self.sandbox.command(self.kernel_sandbox, argv, self.gpu_indices)


STAGING_PREFIX = "jupyter-gpu-staging-"


#: A /dev/shm smaller than this (containers often get 64 MB) is not worth staging in.
MIN_SHM_BYTES = 2**30


def default_staging_parent() -> str:
    """/dev/shm where it is writable and large (uploads are then memory the kernel maps),
    else the temp dir."""
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
        usable = os.access(shm, os.W_OK | os.X_OK) and stat.f_blocks * stat.f_frsize >= MIN_SHM_BYTES
    except OSError:
        usable = False
    return shm if usable else tempfile.gettempdir()
