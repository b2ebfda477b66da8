"""``jupyter-gpu aws``: the operator's commands for a pool on AWS.

boto3 finds credentials and endpoints as the AWS CLI does (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``
for a stand-in such as moto's server, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .catalog import InstanceOffer, fetch_catalog, fetch_offers

USAGE = """usage: jupyter-gpu aws COMMAND [options]

commands:
  catalog         the region's GPU instance types in the pool's type names, with prices
  cluster-config  write the Ray cluster config (for `ray up`) of an autoscaled pool; --check FILE
                  checks one edited by hand
  log             what the running gateway decided and why (demand, launches, drains, terminations,
                  spot interruptions); for operators, read from the gateway as `usage --all` is
"""


def _region(args: argparse.Namespace) -> str:
    region: str | None = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        import boto3

        region = boto3.session.Session().region_name
    if not region:
        raise SystemExit("jupyter-gpu aws: no region: pass --region (e.g. --region us-east-1) or set AWS_REGION")
    return region


def _ec2(region: str) -> Any:
    import boto3

    return boto3.client("ec2", region_name=region)


def _money(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.4f}".rstrip("0").rstrip(".") if value >= 0.01 else f"{value:.2g}"


def catalog_table(offers: list[InstanceOffer]) -> str:
    header = ("GPU TYPE", "INSTANCE", "GPUS", "GPU MEM", "VCPUS", "ON-DEMAND $/H", "SPOT $/H", "PRICES FROM")
    rows = [header] + [
        (o.gpu_type, o.instance_type, str(o.gpus), f"{o.gpu_memory_mib / 1024:.0f} GiB", str(o.vcpus),
         _money(o.on_demand_per_hour), _money(o.spot_per_hour),
         f"on-demand: {o.on_demand_source}; spot: {o.spot_source}")
        for o in offers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in rows)


def catalog_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jupyter-gpu aws catalog",
                                     description="List the GPU instance types of a region (EC2 DescribeInstanceTypes).")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the AWS profile's)")
    parser.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    args = parser.parse_args(argv)
    region = _region(args)
    try:
        offers = fetch_catalog(_ec2(region), region)
    except Exception as exc:  # botocore's errors: no credentials, no route, access denied
        print(f"jupyter-gpu aws catalog: could not read {region}'s instance types: {exc}. Check the AWS "
              "credentials (AWS_PROFILE) and that they allow ec2:DescribeInstanceTypes and "
              "ec2:DescribeSpotPriceHistory", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([offer.as_json() for offer in offers], indent=1))
    else:
        print(catalog_table(offers))
    return 0


def cluster_config_main(argv: list[str]) -> int:
    import yaml

    from ..ray_pool import RayPool
    from . import cluster_config as cc

    parser = argparse.ArgumentParser(
        prog="jupyter-gpu aws cluster-config",
        description="Write a Ray cluster config (the YAML `ray up` takes) whose GPU node types are the pool's "
        "GPU types; Ray's autoscaler launches them on demand and terminates them when idle.")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the AWS profile's)")
    parser.add_argument("--types", help="GPU type = instance type, e.g. h100=p5.48xlarge,a10g=g5.xlarge")
    parser.add_argument("--min-nodes", default="", help="nodes kept up per type, e.g. a10g=1 (default 0)")
    parser.add_argument("--max-nodes", default="",
                        help=f"most nodes per type, e.g. h100=2 (default {cc.DEFAULT_MAX_NODES}, or what the cost cap "
                        "allows)")
    parser.add_argument("--idle-minutes", type=float, default=10.0, help="idle minutes before a node is terminated")
    parser.add_argument("--spot", action="store_true", help="spot instances first, on-demand when spot is refused")
    parser.add_argument("--max-cost-per-hour", type=float, help="dollars per hour the GPU nodes may never exceed")
    parser.add_argument("--price", default="", help="on-demand $/h of types the catalog has no price for, "
                        "e.g. g5.12xlarge=5.672")
    parser.add_argument("--head-type", default="m5.large", help="instance type of the head (gateway, no GPUs)")
    parser.add_argument("--cluster-name", default="jupyter-gpu")
    parser.add_argument("-o", "--output", help="file to write (default: standard output)")
    parser.add_argument("--check", metavar="FILE", help="check a config (e.g. edited by hand) with Ray's validation "
                        "and list its GPU node types; needs no AWS")
    args = parser.parse_args(argv)
    try:
        if args.check:
            with open(args.check) as f:
                config = yaml.safe_load(f)
            cc.validate(config)
            for t in cc.gpu_node_types(config):
                market = "spot" if t.spot else "on-demand"
                print(f"{t.name}: {t.gpu_type} on {t.instance_type} ({t.gpus} GPUs, {market}), "
                      f"{t.min_nodes}-{t.max_nodes} nodes")
            return 0
        if not args.types:
            parser.error("--types is needed, e.g. --types h100=p5.48xlarge,a10g=g5.xlarge")
        types = cc.parse_assignments(args.types, "--types", "TYPE=INSTANCE_TYPE")
        gpu_types = [gpu_type for gpu_type, _ in types]
        prices = {k: _dollars(v) for k, v in cc.parse_assignments(args.price, "--price", "INSTANCE_TYPE=DOLLARS")
                  } if args.price else {}
        region = _region(args)
        try:
            offers = fetch_offers(_ec2(region), region, sorted({instance for _, instance in types}))
        except Exception as exc:
            raise ValueError(f"could not read the instance types {args.types} in {region}: {exc}. Check the names "
                             "(`jupyter-gpu aws catalog`) and the AWS credentials") from exc
        plan = cc.plan_cluster(types, offers, cc.node_counts(args.min_nodes, "--min-nodes", gpu_types),
                               cc.node_counts(args.max_nodes, "--max-nodes", gpu_types), args.spot,
                               args.max_cost_per_hour, prices)
        config = cc.cluster_config(plan, region, args.cluster_name, args.idle_minutes, args.head_type,
                                   system_config=RayPool().system_config())
        cc.validate(config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"jupyter-gpu aws cluster-config: {exc}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}: start it with `ray up {args.output}`", file=sys.stderr)
    else:
        print(text, end="")
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _dollars(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--price: {text!r} is not dollars per hour (e.g. 5.672)") from None
    if not value > 0:
        raise ValueError(f"--price: {text!r} must be more than 0")
    return value


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "catalog":
        return catalog_main(rest)
    if command == "cluster-config":
        return cluster_config_main(rest)
    print(f"jupyter-gpu aws: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
