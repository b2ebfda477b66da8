"""The kernel slot actor: runs on a GPU node, holds its GPUs and owns one pooled kernel.

Ray places the actor (``num_gpus``, ``accelerator_type``, pinned to the node the pool core
chose) and keeps its GPUs reserved while it lives; the actor starts the ipykernel with the
same code as the local backend, bound to the node's own address and with CurveZMQ
transport encryption, and answers the gateway's kill, interrupt and "tell me when it dies".
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Any

import ray

from .backend import KernelInfo, LocalKernelBackend
from .model import StartKernel


@dataclass(frozen=True)
class SlotSettings:
    """What every slot actor needs to start its kernel (sent once per actor)."""

    kernel_name: str = "python3"
    warmup_code: str = ""
    startup_timeout: float = 60.0
    transport_encryption: str = "required"
    extra_env: dict[str, str] = field(default_factory=dict)


class KernelSlot:
    """One kernel on this node (a Ray async actor: its methods run on the actor's event loop)."""

    def __init__(self, settings: SlotSettings) -> None:
        self.node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.backend = LocalKernelBackend(
            kernel_name=settings.kernel_name,
            warmup_code=settings.warmup_code,
            startup_timeout=settings.startup_timeout,
            extra_env=settings.extra_env,
            # The gateway's staging directory is on another machine: pushes travel the websocket.
            staging=False,
            ip=self.node_ip,
            transport_encryption=settings.transport_encryption,
        )
        self.kernel_id = ""
        self._died = asyncio.Event()
        self.backend.watch(lambda kernel_id, reason: self._died.set())

    async def start(self, request: StartKernel) -> KernelInfo:
        self.kernel_id = request.kernel_id
        # Ray runs an async actor's methods on a thread that blocks signals, and a child
        # inherits its parent thread's mask: the kernel would never see the SIGINT of an
        # interrupt. Unblock them in the thread that starts it.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        return await self.backend.start_kernel(request)

    async def interrupt(self) -> None:
        await self.backend.interrupt_kernel(self.kernel_id)

    async def wait_until_died(self) -> str:
        """Returns when the kernel died on its own (not killed through :meth:`stop`)."""
        await self._died.wait()
        return self.kernel_id

    async def stop(self) -> None:
        await self.backend.close()


#: The actor class; options (GPUs, node) are given per slot by the Ray backend.
KernelSlotActor: Any = ray.remote(max_restarts=0, max_task_retries=0)(KernelSlot)
