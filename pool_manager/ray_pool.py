"""``RayPool``: settings of the pool on a Ray cluster (``jupyter-gpu gateway --ray ADDRESS``).

Ray itself is imported only when a Ray address is configured (``pip install "jupyter-gpu[ray]"``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Int, Unicode
from traitlets.config import LoggingConfigurable

from .admission import Admission
from .core import PoolCore, PoolPolicy
from .ray_autoscale import NodeKind
from .ray_nodes import NodeTable, devices_of
from .sandbox import Isolation

if TYPE_CHECKING:  # ray_membership imports ray: only where a Ray pool is built
    from .ray_membership import RayPoolService

log = logging.getLogger(__name__)

#: Ray's GCS settings that decide how fast a dead node is noticed.
HEALTH_CHECK_KEYS = ("health_check_period_ms", "health_check_timeout_ms", "health_check_failure_threshold")


def open_cluster_warnings(address: str, token_auth: bool | None, sandbox_mode: str) -> list[str]:
    """What a Ray cluster without token auth leaves open to kernels, for the isolation listing.

    Kernels share their node's network (they listen on it for the gateway): a cluster that takes
    no token lets a cell submit a job or task (Ray's job agent on every node, its GCS on the
    head) that runs as Ray's user outside every sandbox, on any node, with other users' kernels.
    ``token_auth`` None: unknown (a Ray without token auth support). ``--sandbox required``
    refuses to start on such a cluster (ValueError).
    """
    if token_auth is not False:
        return []
    problem = (f"the Ray cluster at {address} takes no token (RAY_AUTH_MODE is not 'token'): any cell can run code "
               "through Ray outside its sandbox on every node, other users' kernels included. Start every Ray "
               "node and the gateway with RAY_AUTH_MODE=token and one shared token (RAY_AUTH_TOKEN_PATH)")
    if sandbox_mode == "required":
        raise ValueError(f"--sandbox required, but {problem}")
    log.critical("KERNEL ISOLATION: %s", problem)
    return [problem]


def _token_auth() -> bool | None:
    """Whether this driver uses Ray's token auth (None: unknown). A driver without it that joined
    the cluster proves the cluster takes no token; one with it cannot tell whether every node checks
    tokens (a node started without RAY_AUTH_MODE=token would not), so that stays the operator's."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return None
    return bool(is_token_auth_enabled())


class RayPool(LoggingConfigurable):
    """The pool's GPUs are a Ray cluster's, e.g. ``c.RayPool.address = "10.0.0.1:6379"``."""

    address = Unicode(
        "",
        help="Address of the Ray cluster's head (HOST:PORT), or 'auto' for the cluster this machine "
        "belongs to. Empty: kernels run on this machine (the local backend).",
    ).tag(config=True)
    namespace = Unicode("jupyter_gpu", help="Ray namespace of the slot actors.").tag(config=True)
    poll_interval = Float(0.5, help="Seconds between two reads of Ray's node table (joins and losses).").tag(
        config=True
    )
    transport_encryption = Unicode(
        "required",
        help="CurveZMQ between the gateway and kernels on other machines: 'required' (default), 'auto' "
        "or 'disabled' (jupyter_client's KernelManager.transport_encryption).",
    ).tag(config=True)
    bulk_transfers = Bool(
        True,
        help="Large pushes and pulls travel between the gateway and each kernel's node on a port of its slot "
        "actor, authenticated per kernel but not encrypted (fast). False: they travel the kernel's CurveZMQ "
        "channel (encrypted, slower) for networks between gateway and nodes that are not trusted.",
    ).tag(config=True)
    # Ray's defaults (3 s, 10 s, 5) see a killed node after ~13 s and a silent one after ~50 s.
    # These see a killed node (its port refuses at once) after ~5 s and a silent one after
    # ~10 s, and still let a busy but live node answer late four times in a row.
    health_check_period_ms = Int(1000, help="Ray GCS: how often each node is health-checked.").tag(config=True)
    health_check_timeout_ms = Int(2000, help="Ray GCS: how long one health check may take.").tag(config=True)
    health_check_failure_threshold = Int(
        5, help="Ray GCS: failed checks in a row after which a node counts as dead."
    ).tag(config=True)

    cluster_config = Unicode(
        "",
        help="The cluster's Ray config (the YAML `ray up` took, e.g. from `jupyter-gpu aws cluster-config`): "
        "its GPU node types are offered before any node of them is up, and queued leases become demand for "
        "Ray's autoscaler. Empty: the pool is the nodes that joined.",
    ).tag(config=True)
    max_queue_wait = Float(
        0.0, help="With a cluster config: seconds a lease may wait for a node before it ends with reason "
        "no_capacity (0: no limit).").tag(config=True)
    autoscale_interval = Float(1.0, help="Seconds between two updates of the autoscaler's demand.").tag(config=True)

    def system_config(self) -> dict[str, int]:
        """What the head must be started with (``ray start --head --system-config=...``)."""
        return {key: int(getattr(self, key)) for key in HEALTH_CHECK_KEYS}

    def node_loss_seconds(self, settings: dict[str, int] | None = None) -> float:
        """About how long after a node's death Ray marks it dead, plus our poll of the table."""
        s = settings or self.system_config()
        check = max(s["health_check_period_ms"], s["health_check_timeout_ms"]) / 1000
        return s["health_check_failure_threshold"] * check + self.poll_interval

    def connect(self) -> None:
        import ray

        ray.init(address=self.address, namespace=self.namespace, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
        self._check_health_settings()

    def _cluster_health_settings(self) -> dict[str, int] | None:
        """The cluster's GCS health check settings, as the driver got them at ray.init."""
        try:
            from ray._raylet import Config  # type: ignore[attr-defined]

            return {key: int(getattr(Config, key)()) for key in HEALTH_CHECK_KEYS}
        except Exception:  # a private API: without it we can only state our wish
            log.debug("could not read Ray's health check settings", exc_info=True)
            return None

    def _check_health_settings(self) -> None:
        """Ray's GCS settings are the cluster's, fixed when its head started: say what they mean."""
        actual = self._cluster_health_settings()
        if actual is None:
            return
        wanted = self.node_loss_seconds()
        seen = self.node_loss_seconds(actual)
        if seen > wanted + 0.5:
            log.warning(
                "this Ray cluster notices a dead node after about %.0f s (%s); for %.0f s start its head with "
                "ray start --head --system-config='%s'", seen, actual, wanted, json.dumps(self.system_config()))

    def build_service(self, policy: PoolPolicy, kernel_name: str, warmup_code: str,
                      sandbox: dict[str, Any] | None = None, isolation: Isolation | None = None,
                      admission: Admission | None = None) -> RayPoolService:
        """Connect to Ray, read its GPU nodes, and build the pool service over them.

        ``sandbox``: the kernels' sandbox settings (SlotSettings' fields of the same names), set
        up by each slot actor on its node; ``isolation`` is kept up to date with what they found.
        """
        from .ray_backend import RayKernelBackend
        from .ray_membership import RayPoolService
        from .ray_slot import SlotSettings

        try:
            self.connect()
        except Exception as exc:
            raise ValueError(
                f"could not join the Ray cluster at {self.address!r}: {exc}. Start it with `ray start --head` "
                "(and `ray start --address=HEAD` on each GPU machine), or drop --ray for this machine's GPUs"
            ) from exc
        nodes = NodeTable()
        devices = [device for node in nodes.update(_read_nodes()).joined for device in devices_of(node)]
        settings = SlotSettings(kernel_name=kernel_name, warmup_code=warmup_code,
                                transport_encryption=self.transport_encryption, bulk_transfers=self.bulk_transfers,
                                **(sandbox or {}))
        kinds = self._node_kinds()
        core = PoolCore(devices, policy, clock=time.monotonic, wall_clock=time.time,
                        launchable={gpu_type: kind.gpus for gpu_type, kind in kinds.items()},
                        admission=admission)
        cluster_warnings = open_cluster_warnings(self.address, _token_auth(), settings.sandbox)
        backend = RayKernelBackend(nodes, settings, isolation=isolation, cluster_warnings=cluster_warnings)
        membership: dict[str, Any] = {"poll_interval": self.poll_interval,
                                      "node_loss_grace": self.node_loss_seconds(self._cluster_health_settings())}
        if kinds:
            from .ray_autoscale import DemandPlanner, IdleNodes
            from .ray_autoscale_service import AutoscaledRayPoolService
            from .scaler import NodeGroup, Scaler

            planner = DemandPlanner(kinds, time.time, self.max_queue_wait)
            groups = {gpu_type: NodeGroup(kind.gpus, kind.min_nodes) for gpu_type, kind in kinds.items()}
            idle_nodes = IdleNodes(Scaler(groups, time.monotonic))
            return AutoscaledRayPoolService(core, backend, _read_nodes, planner, idle_nodes,
                                            interval=self.autoscale_interval, **membership)
        return RayPoolService(core, backend, read_nodes=_read_nodes, **membership)

    def _node_kinds(self) -> dict[str, NodeKind]:
        """The GPU node types of the cluster config, if one is given."""
        if not self.cluster_config:
            return {}
        import yaml

        from .aws.cluster_config import validate
        from .ray_autoscale import node_kinds

        try:
            with open(self.cluster_config) as f:
                config = yaml.safe_load(f)
            validate(config)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"--RayPool.cluster_config {self.cluster_config}: {exc}") from exc
        kinds = node_kinds(config)
        if not kinds:
            raise ValueError(f"--RayPool.cluster_config {self.cluster_config}: no node type with resources GPU and "
                             "accelerator_type:X (e.g. written by `jupyter-gpu aws cluster-config`)")
        return kinds


def _read_nodes() -> list[dict[str, Any]]:
    import ray

    rows: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return rows
