"""GPUs on demand, end to end: Ray's autoscaler with its AWS node provider against moto's EC2.

One cluster for the module. The head (``n1``, 10.77.0.11) runs Ray's autoscaler with a config
written by :mod:`pool_manager.aws.cluster_config` and moto's server (EC2); the gateway runs in
``gw`` with ``--cluster-config``. A watcher plays the EC2 machines: every new moto instance
"boots" into a real Ray worker in a namespace of its own at the instance's private IP (moto's
subnet lies inside the test bridge), and is stopped when the instance is terminated. Capacity
errors are injected into RunInstances by ``tests/aws/refuse`` (a botocore hook in the head's
processes). The GPUs are declared; Ray, moto, the actors and the kernels are real.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.gateway_process import GatewayProcess, poll, stdout_text

from pool_manager.aws import cluster_config as cc
from pool_manager.aws.catalog import offers_from_answers

from .conftest import TEST_HEALTH_CHECK, ray_gateway
from .netns_cluster import SUBNET, NamespaceCluster, namespaces_unavailable

boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.timeout(900)

MOTO = f"http://{SUBNET}.11:5055"
CLUSTER = "jgpu-test"
REFUSE_DIR = Path(__file__).parents[1] / "aws" / "refuse"
RECORDED = Path(__file__).parents[1] / "aws" / "data" / "describe_instance_types.json"
IDLE_MINUTES = 0.3
MAX_QUEUE_WAIT = 45


def ec2_client() -> Any:
    return boto3.client("ec2", endpoint_url=MOTO, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


@dataclass
class Machines:
    """Boots moto's instances into Ray nodes and stops them when they are terminated."""

    cluster: NamespaceCluster
    gpus_of: dict[str, tuple[str, int]]  # Ray node type -> (GPU type, GPUs)
    booted: dict[str, str] = field(default_factory=dict)  # instance id -> machine name
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance id -> its last description
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.cluster.inside("gw"):
            ec2 = ec2_client()
            while not self.stop.wait(0.5):
                try:
                    self.step(ec2)
                except Exception as exc:  # reported by the tests, which then fail
                    self.errors.append(repr(exc))

    def step(self, ec2: Any) -> None:
        for reservation in ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if tags.get("ray-cluster-name") != CLUSTER:
                    continue
                iid, state = instance["InstanceId"], instance["State"]["Name"]
                self.seen[iid] = {**instance, "TagMap": tags}
                if state == "running" and iid not in self.booted:
                    self.boot(iid, instance["PrivateIpAddress"], tags["ray-user-node-type"])
                elif state in ("shutting-down", "terminated") and iid in self.booted:
                    self.halt(self.booted.pop(iid))

    def boot(self, iid: str, ip: str, node_type: str) -> None:
        """What an instance's own startup does: join the head as a Ray node (Ray's installer
        sets these two variables on a cloud instance)."""
        name = f"i{ip.rsplit('.', 1)[1]}"
        self.booted[iid] = name
        self.cluster.add_machine(name, int(ip.rsplit(".", 1)[1]))
        gpu_type, gpus = self.gpus_of[node_type]
        self.cluster.start_ray(name, {gpu_type: gpus}, env={"RAY_CLOUD_INSTANCE_ID": iid,
                                                            "RAY_NODE_TYPE_NAME": node_type})

    def halt(self, name: str) -> None:
        left = self.cluster.stop_machine(name)
        if left:
            self.errors.append(f"{name}: {left} survived")
            return
        subprocess.run(["ip", "netns", "del", self.cluster.nodes.pop(name).namespace], capture_output=True)

    def instances(self, **tags: str) -> list[dict[str, Any]]:
        return [i for i in self.seen.values() if all(i["TagMap"].get(k) == v for k, v in tags.items())]


@dataclass
class AwsTestbed:
    cluster: NamespaceCluster
    gateway: GatewayProcess
    machines: Machines
    refuse_file: Path

    def autoscaler_log(self) -> str:
        """The tail of Ray's autoscaler log on the head, for failure messages."""
        logs = sorted((self.cluster.root / "ray-n1").glob("session_*/logs/monitor.*"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.suffix in (".log", ".err", ".out"))

    def refuse(self, *pairs: tuple[str, str]) -> None:
        self.refuse_file.write_text(json.dumps({"refuse": [list(p) for p in pairs]}))


def moto_network(cluster: NamespaceCluster) -> tuple[str, str]:
    """A VPC whose subnet lies in the test bridge's range (moto hands out .132, .133, ...)."""
    with cluster.inside("gw"):
        ec2 = poll(lambda: _reachable(), 60, "moto's server")
        vpc = ec2.create_vpc(CidrBlock=f"{SUBNET}.0/24")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{SUBNET}.128/25",
                                   AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
        image = ec2.describe_images()["Images"][0]["ImageId"]
    return subnet, image


def _reachable() -> Any:
    ec2 = ec2_client()
    try:
        ec2.describe_vpcs()
    except Exception:
        return None
    return ec2


def autoscaler_config(root: Path, subnet: str, image: str) -> tuple[Path, dict[str, tuple[str, int]]]:
    """The config ``jupyter-gpu aws cluster-config`` writes, with what ``ray up`` would add for
    this network (image, subnet) and what a machine without SSH needs (no node updaters)."""
    offers = {o.instance_type: o for o in offers_from_answers([json.loads(RECORDED.read_text())], "us-east-1")}
    plan = cc.plan_cluster([("h100", "p5.48xlarge"), ("a10g", "g5.xlarge")], offers, spot=True,
                           max_nodes={"h100": 1, "a10g": 1})
    config = cc.cluster_config(plan, "us-east-1", CLUSTER, idle_minutes=IDLE_MINUTES)
    config["provider"].update(use_internal_ips=True, disable_node_updaters=True)
    config["upscaling_speed"] = 1.0
    for name, node_type in config["available_node_types"].items():
        if name != cc.HEAD_NODE_TYPE:
            node_type["node_config"].update(ImageId=image, SubnetIds=[subnet])
    path = root / "cluster.yaml"
    # Ray's defaults filled in, as `ray up` leaves it on the head (~/ray_bootstrap_config.yaml)
    path.write_text(yaml.safe_dump(cc.validate(config)))
    return path, {t.name: (t.gpu_type, t.gpus) for t in cc.gpu_node_types(config)}


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsTestbed]:
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    cluster = NamespaceCluster(Path(tempfile.mkdtemp(prefix="jgaws-")), TEST_HEALTH_CHECK)
    gateway: GatewayProcess | None = None
    machines: Machines | None = None
    watcher: threading.Thread | None = None
    try:
        cluster.up()
        cluster.add_machine("gw", 10)
        cluster.add_machine("n1", 11)
        moto = subprocess.Popen(["ip", "netns", "exec", cluster.nodes["n1"].namespace,
                                 str(Path(sys.executable).parent / "moto_server"), "-H", "0.0.0.0", "-p", "5055"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subnet, image = moto_network(cluster)
        config, gpus_of = autoscaler_config(cluster.root, subnet, image)
        refuse_file = cluster.root / "refuse.json"
        refuse_file.write_text('{"refuse": []}')
        aws_env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:5055", "AWS_ACCESS_KEY_ID": "test",
                   "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        head_env = {**aws_env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "JUPYTER_GPU_TEST_REFUSE": str(refuse_file),
                    cc.SCORER_ENV.split("=")[0]: cc.SCORER_ENV.split("=")[1],
                    "PYTHONPATH": os.pathsep.join((str(REFUSE_DIR), cluster.env("n1")["PYTHONPATH"]))}
        cluster.start_ray("n1", {}, head=True, extra=(f"--autoscaling-config={config}",), env=head_env)
        machines = Machines(cluster, gpus_of)
        watcher = threading.Thread(target=machines.run, daemon=True)
        watcher.start()
        with cluster.inside("gw"):
            gateway = ray_gateway(cluster, cluster.root / "gateway", "--cluster-config", str(config),
                                  "--max-queue-wait", str(MAX_QUEUE_WAIT), "--log-level", "INFO",
                                  "--TokenIdentityProvider.operators=bob")
            yield AwsTestbed(cluster, gateway, machines, refuse_file)
            gateway.stop()
        assert moto.poll() is None  # it lives in n1 and goes with it
    finally:
        if machines is not None:
            machines.stop.set()
        if watcher is not None:
            watcher.join(10)
        if gateway is not None and gateway.proc is not None and gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait()
        problems = cluster.down()
        assert not problems, problems


def lease_state(aws: AwsTestbed, lease_id: str, wait: int = 5) -> dict[str, Any]:
    body: dict[str, Any] = aws.gateway.get("alice", f"/api/gpu/leases/{lease_id}?wait={wait}").body
    return body


def wait_granted(aws: AwsTestbed, lease: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while lease["state"] == "queued" and time.monotonic() < deadline:
        lease = lease_state(aws, lease["id"], 10)
    assert lease["state"] == "granted", (lease, aws.machines.errors, aws.gateway.log_text()[-3000:])
    return lease


def test_a_queued_h100_launches_a_spot_p5_that_joins_and_runs_the_cell(aws: AwsTestbed) -> None:
    lease = aws.gateway.lease("alice", "h100")
    assert lease["state"] == "queued"
    note = poll(lambda: lease_state(aws, lease["id"], 1)["capacity_note"], 30, "a capacity note")
    assert note == "starting a p5.48xlarge for h100: usually 3-5 min"
    try:
        instance = poll(lambda: aws.machines.instances(**{"ray-user-node-type": "h100-spot"}), 60, "a RunInstances")[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{aws.autoscaler_log()}\n{aws.gateway.log_text()[-3000:]}") from None
    assert instance["InstanceType"] == "p5.48xlarge"
    assert instance.get("InstanceLifecycle") == "spot"
    assert instance["TagMap"][cc.GPU_TYPE_TAG] == "h100" and instance["TagMap"][cc.POOL_TAG] == CLUSTER
    lease = wait_granted(aws, lease)
    assert lease["gpu_type"] == "h100"
    assert lease["node"] == instance["PrivateIpAddress"]

    async def run() -> str:
        socket = await aws.gateway.connect("alice", lease["kernel_id"])
        try:
            # read inside the kernel: its pid is its sandbox's own, not the host's
            reply, outputs = await socket.run("import os; print(os.stat('/proc/self/ns/net').st_ino)")
            assert reply["content"]["status"] == "ok", reply
            return stdout_text(outputs).strip()
        finally:
            socket.close()

    net_inode = int(asyncio.run(run()))
    machine = aws.machines.booted[instance["InstanceId"]]
    assert net_inode == aws.cluster.netns_inode(machine)
    assert "autoscale: demand h100: 1 GPU(s) queued -> p5.48xlarge nodes (h100-spot, h100)" in aws.gateway.log_text()
    aws.gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


def test_the_idle_node_is_drained_and_terminated(aws: AwsTestbed) -> None:
    instance = aws.machines.instances(**{"ray-user-node-type": "h100-spot"})[0]
    iid = instance["InstanceId"]
    poll(lambda: aws.machines.seen[iid]["State"]["Name"] == "terminated", IDLE_MINUTES * 60 + 90,
         "the idle node's termination")
    poll(lambda: iid not in aws.machines.booted, 30, "the machine to stop")
    # its warm kernel kept Ray from seeing it idle until the pool drained it
    assert f"autoscale: drain {instance['PrivateIpAddress']}: idle and not needed" in aws.gateway.log_text()
    types = {t["name"]: t for t in aws.gateway.get("alice", "/api/gpu/types").body}
    assert types["h100"]["total"] == 0  # still offered: another node can be launched
    # metered: the p5 was paid for from its join to its termination, and partly leased
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in aws.gateway.get("alice", "/metrics").body
               .splitlines() if line and not line.startswith("#")}
    paid = metrics['jupyter_gpu_paid_gpu_seconds_total{gpu_type="h100"}']
    assert paid >= 8 * IDLE_MINUTES * 60  # 8 GPUs for at least the idle time
    cost = metrics['jupyter_gpu_paid_cost_dollars_total{gpu_type="h100"}']
    assert cost == pytest.approx(paid / 8 / 3600 * 55.04, rel=1e-4)  # /metrics writes 6 digits
    assert 0 < metrics['jupyter_gpu_paid_utilization{gpu_type="h100"}'] < 1
    # the operator (bob) reads the same in `usage --all`, and why it came and went in the decision log
    h100 = aws.gateway.get("bob", "/api/gpu/usage?all=1").body["paid"]["by_type"]["h100"]
    assert h100["launched_gpu_seconds"] >= 8 * IDLE_MINUTES * 60 and 0 < h100["utilization"] < 1
    assert h100["cost"] == pytest.approx(h100["launched_gpu_seconds"] / 8 / 3600 * 55.04, rel=1e-6)
    ip = instance["PrivateIpAddress"]

    def decisions() -> list[str]:
        return [entry["text"] for entry in aws.gateway.get("bob", "/api/gpu/decisions").body["decisions"]]

    log = poll(lambda: (d := decisions()) and any(t.startswith(f"node {ip} left") for t in d) and d, 30,
               "the node's departure in the decision log")
    order = [next(i for i, text in enumerate(log) if text.startswith(start)) for start in (
        "demand h100: 1 GPU(s) queued", f"node {ip} joined: p5.48xlarge for h100 (8 GPUs, $55.04/h on demand)",
        f"drain {ip}: idle and not needed", f"node {ip} left")]
    assert order == sorted(order), log
    assert aws.gateway.get("alice", "/api/gpu/decisions").status == 403
    assert not aws.machines.errors


def test_refused_spot_launches_on_demand_and_refused_types_fall_back(aws: AwsTestbed) -> None:
    aws.refuse(("p5.48xlarge", "spot"), ("p5.48xlarge", "on-demand"))
    lease = aws.gateway.lease("alice", "h100|a10g")
    # both h100 node types are refused in turn; the demand moves to the lease's fallback
    note = poll(lambda: (n := lease_state(aws, lease["id"], 1)["capacity_note"]) and "a10g" in n and n, 120,
                "the fallback")
    assert note.startswith("no h100 (InsufficientInstanceCapacity), starting a g5.xlarge")
    lease = wait_granted(aws, lease)
    assert lease["gpu_type"] == "a10g"
    assert not aws.machines.instances(**{"ray-user-node-type": "h100"})  # no on-demand p5 was launched
    aws.gateway.delete("alice", f"/api/gpu/leases/{lease['id']}")


def test_no_capacity_anywhere_ends_the_wait_with_a_reason(aws: AwsTestbed) -> None:
    aws.refuse(("p5.48xlarge", "any"), ("g5.xlarge", "any"))
    lease = aws.gateway.lease("alice", "h100")
    ended = poll(lambda: (s := lease_state(aws, lease["id"], 5))["state"] == "released" and s,
                 MAX_QUEUE_WAIT + 60, "the end of the wait")
    assert ended["reason"] == "no_capacity"
    assert ended["capacity_note"].startswith(f"no h100 within --max-queue-wait {MAX_QUEUE_WAIT} s (no capacity: "
                                             "h100: InsufficientInstanceCapacity")
    assert "InsufficientInstanceCapacity" in ended["capacity_note"]
    assert f"lease {lease['id']} ended no_capacity" in aws.gateway.log_text()
