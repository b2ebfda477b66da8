"""``PoolManager``: the pool's operator settings (traitlets) and the objects they build."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

from traitlets import Dict, Enum, Float, Instance, Int, Unicode
from traitlets.config import LoggingConfigurable

from jupyter_gpu.protocol import HELPER_BOOT

from .admission import Admission
from .backend import LocalKernelBackend
from .budget_settings import Budgets
from .budgets import BudgetPolicy
from .core import PoolCore, PoolPolicy
from .inventory import build_inventory
from .prices import list_price, lookup
from .ray_pool import RayPool
from .sandbox import SANDBOX_MODES, Isolation, Sandbox
from .service import PoolService
from .spot_notice import SpotWatch, read_spot_action


class PoolManager(LoggingConfigurable):
    """Settings of the GPU pool, e.g. ``c.PoolManager.idle_timeout = 600``."""

    inventory = Unicode(
        "",
        help="Declared GPUs when the machine has none, e.g. 'a100=2,h100=1'. They are emulated "
        "(no real GPU behind them) and every listing says so. Empty: discover with NVML.",
    ).tag(config=True)
    cpu_slots = Int(2, help="CPU-only kernels offered as type 'cpu' (0 for none).").tag(config=True)
    min_warm = Int(1, help="Kernels kept started and warmed ahead, per GPU type.").tag(config=True)
    idle_timeout = Float(
        120.0,
        help="Seconds without execution after which a lease ends (users may ask for up to max_idle_timeout). "
        "2 min because the lease's variables are kept and restored into the next one (about 1.2 s for 1 GB here): "
        "in `jupyter-gpu simulate`, 10 min -> 2 min cuts GPU-hours held per busy hour from 1.12 to 1.03 on the "
        "Adobe sessions trace and from 1.15 to 1.05 on the synthetic day, while 1 min saves only 1-2% more for "
        "27-36% more releases (restores). With --snapshot-store none a release loses the variables: raise it.",
    ).tag(config=True)
    max_idle_timeout = Float(3600.0, help="The largest idle timeout a user may ask for.").tag(config=True)
    max_lease_duration = Float(0.0, help="Seconds after which any lease ends; 0 for no limit.").tag(config=True)
    gpu_idle_timeout = Float(
        0.0,
        help="Seconds after which a lease whose GPUs did no work (NVML utilization, sampled where GPUs are real; "
        "on emulated GPUs the kernel's busy/idle status stands in) and whose kernel ran no cell ends, with reason "
        "'gpu_idle' and its variables kept like an idle release. Unlike idle_timeout, users cannot ask for more. "
        "0: never.",
    ).tag(config=True)
    gpu_idle_warning = Float(
        300.0, help="Seconds before a GPU-idleness release at which the notebook is told (a lease notice); "
        "half the timeout where it is not shorter than gpu_idle_timeout."
    ).tag(config=True)
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
    sandbox = Enum(
        list(SANDBOX_MODES),
        "auto",
        help="Run each kernel in a sandbox of its own (bubblewrap): 'auto' where it can be set up (else a "
        "loud warning), 'required' to refuse to start without one, 'off' to run kernels as the gateway's user.",
    ).tag(config=True)
    kernel_uids = Unicode(
        "60000-60999",
        help="Uids kernels run as, one each, when the gateway runs as root (uids of existing accounts are skipped).",
    ).tag(config=True)
    kernel_memory = Unicode(
        "", help="Memory limit per kernel, e.g. '64G'; past it the kernel is killed and its lease ends with "
        "reason 'oom'. Empty: no limit."
    ).tag(config=True)
    kernel_cpus = Float(0.0, help="CPU limit per kernel in cores, e.g. 8 or 0.5; 0 for no limit.").tag(config=True)
    spot_notice_url = Unicode(
        "", help="The instance metadata service that announces spot interruptions (http://169.254.169.254 on "
        "an EC2 spot instance; empty: not watched). On a notice the machine's leases end with reason "
        "spot_interrupted, their variables kept, and no new kernel goes there."
    ).tag(config=True)
    spot_notice_interval = Float(5.0, help="Seconds between two looks for a spot interruption notice.").tag(config=True)
    #: What the kernels' sandbox does, once build_service has set it up (listings show it).
    isolation = Instance(Isolation, args=())

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

    def build_sandbox(self, real_gpus: bool, hidden: Sequence[str] = ()) -> Sandbox:
        """The kernels' sandbox; warns loudly where one cannot be set up (SandboxUnavailable if required)."""
        sandbox = Sandbox.probe(self.sandbox, self.kernel_uids, self.kernel_memory, self.kernel_cpus,
                                real_gpus=real_gpus, hidden=hidden)
        self.isolation = sandbox.isolation
        for warning in sandbox.isolation.warnings:
            self.log.warning("KERNEL ISOLATION: %s", warning)
        if self.sandbox == "off":
            self.log.warning("KERNEL ISOLATION: --sandbox off: every kernel runs as the gateway's user and can read "
                             "the others' files, connection files and the gateway's state")
        else:
            self.log.info("kernel isolation: %s", sandbox.isolation.summary)
        return sandbox

    def build_admission(self) -> Admission:
        """The per-user cap and the budgets of ``c.Budgets`` (ValueError naming a bad entry)."""
        budgets = BudgetPolicy(Budgets(parent=self).build(), price=self.price)
        return Admission(self.max_gpus_per_user, budgets)

    def build_service(self, hidden: Sequence[str] = ()) -> PoolService:
        """The pool; ``hidden``: gateway state (database, users file) no kernel may see."""
        policy = PoolPolicy(
            min_warm=self.min_warm,
            idle_timeout=self.idle_timeout,
            max_idle_timeout=self.max_idle_timeout,
            max_lease_duration=self.max_lease_duration,
            max_gpus_per_user=self.max_gpus_per_user,
            gpu_idle_timeout=self.gpu_idle_timeout,
            gpu_idle_warning=self.gpu_idle_warning,
        )
        # Every pooled kernel loads the helper that receives pushed variables and sends
        # bound ones back; the operator's warm-up code runs after it.
        warmup = "\n".join(code for code in (HELPER_BOOT, self.warmup_code) if code)
        ray_pool = RayPool(parent=self)
        if ray_pool.address:  # the GPUs are a Ray cluster's: nodes join and leave
            # each slot actor sets the sandbox up on its own node
            self.isolation = Isolation()
            on_nodes = {"sandbox": self.sandbox, "kernel_uids": self.kernel_uids,
                        "kernel_memory": self.kernel_memory, "kernel_cpus": self.kernel_cpus}
            ray_service = ray_pool.build_service(policy, self.kernel_name, warmup, on_nodes, self.isolation,
                                                 admission=self.build_admission())
            if self.spot_notice_url:  # each node asks its own metadata service
                from .ray_spot import node_probes

                probes = node_probes(ray_service, self.spot_notice_url)
                ray_service.spot_watch = SpotWatch(ray_service, probes, self.spot_notice_interval)
            return ray_service
        devices = build_inventory(self.inventory or None, self.cpu_slots, self.log)
        sandbox = self.build_sandbox(any(not d.emulated and d.index is not None for d in devices), hidden)
        core = PoolCore(devices, policy, clock=time.monotonic, wall_clock=time.time, admission=self.build_admission())
        backend = LocalKernelBackend(
            kernel_name=self.kernel_name,
            warmup_code=warmup,
            staging_root=None if self.staging_dir in ("", "off") else self.staging_dir,
            staging=self.staging_dir != "off",
            sandbox=sandbox if sandbox.enabled or sandbox.limits else None,
        )
        service = PoolService(core, backend)
        if self.spot_notice_url:  # this machine is the one node: it asks its own metadata service
            probe = functools.partial(read_spot_action, self.spot_notice_url)
            service.spot_watch = SpotWatch(service, lambda: {"local": probe}, self.spot_notice_interval)
        return service
