"""``jupyter-gpu aws log``: the gateway's decisions about its machines, for operators: which
demand was stated, which node joined (launched) or left (terminated), which was drained and why,
which spot interruption ended leases. Read from the gateway (``GET /api/gpu/decisions``), found
as ``jupyter-gpu usage`` finds it; the gateway's log file has the same lines (``autoscale: ...``).
"""

from __future__ import annotations

from .gateway_command import as_json, command_parser, fetch


def log_main(argv: list[str]) -> int:
    parser = command_parser("jupyter-gpu aws log", "The gateway's scaling decisions, oldest first (operators).")
    parser.add_argument("--last", type=int, default=0, metavar="N", help="only the last N decisions")
    args = parser.parse_args(argv)
    if args.last < 0:
        parser.error(f"--last must be 0 (all) or more, got {args.last}")
    data = fetch(parser.prog, "/api/gpu/decisions")
    if data is None:
        return 1
    decisions = data["decisions"][-args.last:] if args.last else data["decisions"]
    if args.json:
        print(as_json(decisions))
    elif not decisions:
        print(f"no decisions yet (the gateway keeps the last {data['kept']}; its log file has them all)")
    else:
        print("\n".join(f"{entry['at']}  {entry['text']}" for entry in decisions))
    return 0
