"""``jupyter-gpu aws log``: the gateway's decisions about its machines, for operators: which
demand was stated, which node joined (launched) or left (terminated), which was drained and why,
which spot interruption ended leases. Read from the gateway (``GET /api/gpu/decisions``), found
as ``jupyter-gpu usage`` finds it; the gateway's log file has the same lines (``autoscale: ...``).
"""

from __future__ import annotations

import argparse
import json
import sys

from .client import GatewayClient, GatewayConfig, GatewayError


def log_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jupyter-gpu aws log",
                                     description="The gateway's scaling decisions, oldest first (operators).")
    parser.add_argument("--last", type=int, default=0, metavar="N", help="only the last N decisions")
    parser.add_argument("--json", action="store_true", help="the gateway's JSON as it is")
    args = parser.parse_args(argv)
    if args.last < 0:
        parser.error(f"--last must be 0 (all) or more, got {args.last}")
    try:
        data = GatewayClient(GatewayConfig.from_env()).request("GET", "/api/gpu/decisions")
    except GatewayError as exc:
        print(f"jupyter-gpu aws log: {exc}", file=sys.stderr)
        return 1
    decisions = data["decisions"][-args.last:] if args.last else data["decisions"]
    if args.json:
        print(json.dumps(decisions, indent=2))
    elif not decisions:
        print(f"no decisions yet (the gateway keeps the last {data['kept']}; its log file has them all)")
    else:
        print("\n".join(f"{entry['at']}  {entry['text']}" for entry in decisions))
    return 0
