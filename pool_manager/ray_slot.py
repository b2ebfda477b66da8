"""The kernel slot actor: runs on a GPU node, holds its GPUs and owns one pooled kernel.

Ray places the actor (``num_gpus``, ``accelerator_type``, pinned to the node the pool core
chose) and keeps its GPUs reserved while it lives; the actor starts the ipykernel with the
same code as the local backend, bound to the node's own address and with CurveZMQ
transport encryption, in the same bubblewrap sandbox as the local backend's kernels (probed
on this node: its bubblewrap, uids and control groups), and answers the gateway's kill,
interrupt and "tell me when it dies". It also serves the kernel's staging directory to the
gateway for bulk bytes (:mod:`pool_manager.node_bulk`): pushes and pulls of large values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import ray

from .backend import KernelInfo, LocalKernelBackend
from .model import StartKernel
from .node_bulk import BulkEndpoint, NodeReceiver
from .sandbox import Isolation, Sandbox


@dataclass(frozen=True)
class SlotSettings:
    """What every slot actor needs to start its kernel (sent once per actor)."""

    kernel_name: str = "python3"
    warmup_code: str = ""
    startup_timeout: float = 60.0
    transport_encryption: str = "required"
    extra_env: dict[str, str] = field(default_factory=dict)
    #: the kernels' sandbox, as PoolManager's settings of the same names say
    sandbox: str = "auto"
    kernel_uids: str = "60000-60999"
    kernel_memory: str = ""
    kernel_cpus: float = 0.0
    #: serve the kernel's staging directory on the node's address for the gateway's bulk bytes
    bulk_transfers: bool = True


def ray_private_paths() -> list[str]:
    """What of Ray's a kernel on its node must not read: the cluster's auth token and Ray's
    own state (the sandbox gives each kernel a private /tmp, which covers Ray's default temp
    dir; these cover the places that may lie inside a directory the kernel sees)."""
    paths = [os.path.expanduser("~/.ray")]
    token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token:
        paths.append(token)
    return paths


def on_gpus_ray_reserved(request: StartKernel, ray_gpu_ids: list[Any], real_gpus: bool) -> StartKernel:
    """The start request with the GPUs Ray reserved for this actor, where they are real.

    The pool core picks GPU indices on a node, but Ray reserves whole GPUs for each actor by its
    own ids: on a node of real GPUs, pinning the kernel to the core's indices could put two
    kernels on one GPU while another stays idle. Ray's ids are what is held, so the kernel's
    CUDA_VISIBLE_DEVICES and its sandbox's device nodes follow them. Emulated GPUs have no
    devices to pin: the core's indices stay, which is what the listings show.
    """
    if not real_gpus or not ray_gpu_ids:
        return request
    return dataclasses.replace(request, gpu_indices=tuple(int(gpu) for gpu in ray_gpu_ids))


class KernelSlot:
    """One kernel on this node (a Ray async actor: its methods run on the actor's event loop)."""

    def __init__(self, settings: SlotSettings, real_gpus: bool) -> None:
        self.node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.real_gpus = real_gpus
        # Probed here, on the kernel's node: its bubblewrap, uid range and control groups.
        # SandboxUnavailable (sandbox 'required' on a node without one) fails this actor,
        # and with it the kernel's start, saying why.
        sandbox = Sandbox.probe(settings.sandbox, settings.kernel_uids, settings.kernel_memory,
                                settings.kernel_cpus, real_gpus=real_gpus, hidden=ray_private_paths())
        self.isolation = sandbox.isolation
        self.backend = LocalKernelBackend(
            kernel_name=settings.kernel_name,
            warmup_code=settings.warmup_code,
            startup_timeout=settings.startup_timeout,
            extra_env=settings.extra_env,
            # The gateway is on another machine: the kernel's staging directory is here, served
            # to the gateway by this actor's NodeReceiver (without it, bulk bytes travel the websocket).
            staging=settings.bulk_transfers,
            ip=self.node_ip,
            transport_encryption=settings.transport_encryption,
            sandbox=sandbox if sandbox.enabled or sandbox.limits else None,
            # The gateway is on another machine: the kernel keeps TCP ports (CurveZMQ), not
            # unix sockets in its runtime directory.
            local_sockets=False,
        )
        self.kernel_id = ""
        self.receiver: NodeReceiver | None = None
        self._died = asyncio.Event()
        self.backend.watch(lambda kernel_id, reason: self._died.set())

    async def start(self, request: StartKernel) -> tuple[KernelInfo, Isolation]:
        """The started kernel, and how isolated it is on this node (the gateway lists it)."""
        self.kernel_id = request.kernel_id
        # Ray runs an async actor's methods on a thread that blocks signals, and a child
        # inherits its parent thread's mask: the kernel would never see the SIGINT of an
        # interrupt. Unblock them in the thread that starts it.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        request = on_gpus_ray_reserved(request, ray.get_gpu_ids(), self.real_gpus)
        return await self.backend.start_kernel(request), self.isolation

    async def bulk_endpoint(self) -> BulkEndpoint | None:
        """Where the gateway sends and fetches the started kernel's bulk bytes (None: over the websocket)."""
        staging = self.backend.staging_dir(self.kernel_id)
        if staging is not None and self.receiver is None:
            self.receiver = NodeReceiver(self.node_ip, staging)
        return None if self.receiver is None else self.receiver.endpoint

    async def interrupt(self) -> None:
        await self.backend.interrupt_kernel(self.kernel_id)

    async def wait_until_died(self) -> str:
        """Returns when the kernel died on its own (not killed through :meth:`stop`)."""
        await self._died.wait()
        return self.kernel_id

    async def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        await self.backend.close()


#: The actor class; options (GPUs, node) are given per slot by the Ray backend.
KernelSlotActor: Any = ray.remote(max_restarts=0, max_task_retries=0)(KernelSlot)
