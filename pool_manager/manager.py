"""``PoolManager``: the pool's operator settings (traitlets) and the objects they build."""

from __future__ import annotations

import time
import uuid

from traitlets import Dict, Float, Int, Unicode
from traitlets.config import LoggingConfigurable

from jupyter_gpu.protocol import HELPER_BOOT

from .backend import LocalKernelBackend
from .core import PoolCore, PoolPolicy
from .inventory import build_inventory
from .prices import list_price, lookup
from .service import PoolService


class PoolManager(LoggingConfigurable):
    """Settings of the GPU pool, e.g. ``c.PoolManager.idle_timeout = 600``."""

    inventory = Unicode(
        "",
        help="Declared GPUs when the machine has none, e.g. 'a100=2,h100=1'. They are emulated "
        "(no real GPU behind them) and every listing says so. Empty: discover with NVML.",
    ).tag(config=True)
    cpu_slots = Int(2, help="CPU-only kernels offered as type 'cpu' (0 for none).").tag(config=True)
    min_warm = Int(1, help="Kernels kept started and warmed ahead, per GPU type.").tag(config=True)
    idle_timeout = Float(600.0, help="Seconds without execution after which a lease ends (default).").tag(config=True)
    max_idle_timeout = Float(3600.0, help="The largest idle timeout a user may ask for.").tag(config=True)
    max_lease_duration = Float(0.0, help="Seconds after which any lease ends; 0 for no limit.").tag(config=True)
    max_gpus_per_user = Int(0, help="GPUs one user may hold at once; 0 for no limit.").tag(config=True)
    warmup_code = Unicode(
        "", help="Code each kernel runs before it counts as warm, e.g. 'import torch; torch.cuda.init()'."
    ).tag(config=True)
    kernel_name = Unicode("python3", help="The kernelspec the pooled kernels run.").tag(config=True)
    staging_dir = Unicode(
        "",
        help="Where large pushed values are staged for the kernel to map without a copy: a directory, "
        "'' for /dev/shm where writable (else the temp dir), or 'off' to send everything over the websocket.",
    ).tag(config=True)
    price_per_gpu_hour = Dict(
        {},
        help="Price of one GPU-hour per type, e.g. {'a100': 2.5}. Types not listed cost their cloud list price "
        "(pool_manager/prices.py: a100, a100-80gb, h100, v100, a10g, l40s, l4, t4), emulated ones too, "
        "else default_price.",
    ).tag(config=True)
    default_price = Float(
        1.0, help="Price of one GPU-hour for types neither in price_per_gpu_hour nor with a known list price."
    ).tag(config=True)
    cpu_price = Float(0.0, help="Price of one hour of a CPU kernel.").tag(config=True)

    def price(self, gpu_type: str | None) -> float:
        if gpu_type is None:
            return 0.0
        if gpu_type == "cpu":
            return float(self.cpu_price)
        configured = lookup(gpu_type, {str(k): float(v) for k, v in self.price_per_gpu_hour.items()})
        if configured is not None:
            return configured
        known = list_price(gpu_type)
        return float(self.default_price) if known is None else known

    def build_service(self) -> PoolService:
        devices = build_inventory(self.inventory or None, self.cpu_slots, self.log)
        policy = PoolPolicy(
            min_warm=self.min_warm,
            idle_timeout=self.idle_timeout,
            max_idle_timeout=self.max_idle_timeout,
            max_lease_duration=self.max_lease_duration,
            max_gpus_per_user=self.max_gpus_per_user,
        )
        # Kernel ids in the dashed UUID form: stock Jupyter servers route /api/kernels/{id}/channels
        # only for ids of that shape, so a hex id made their gateway client's websocket answer 404.
        core = PoolCore(devices, policy, clock=time.time, new_id=lambda: str(uuid.uuid4()))
        # Every pooled kernel loads the helper that receives pushed variables and sends
        # bound ones back; the operator's warm-up code runs after it.
        warmup = "\n".join(code for code in (HELPER_BOOT, self.warmup_code) if code)
        backend = LocalKernelBackend(
            kernel_name=self.kernel_name,
            warmup_code=warmup,
            staging_root=None if self.staging_dir in ("", "off") else self.staging_dir,
            staging=self.staging_dir != "off",
        )
        return PoolService(core, backend)
