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

from .catalog import InstanceOffer, fetch_catalog

USAGE = """usage: jupyter-gpu aws COMMAND [options]

commands:
  catalog         the region's GPU instance types in the pool's type names, with prices
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "catalog":
        return catalog_main(rest)
    print(f"jupyter-gpu aws: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
