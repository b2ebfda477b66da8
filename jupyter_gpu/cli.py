"""``jupyter-gpu``: one command for the operator's tasks (also ``jupyter gpu ...``)."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: jupyter-gpu COMMAND [options]

commands:
  gateway     serve the GPU pool over the Jupyter kernel API (jupyter-gpu gateway --help-all)
  token       manage user tokens: token add NAME | token list | token remove NAME [--users FILE]
  usage       GPU-hours and cost metered by the gateway: yours, or with --all (operators) every user's
              and every group's
  simulate    replay a notebook GPU trace through the pool core: GPU-hours, waits and cost per
              release policy (jupyter-gpu simulate --help)
  aws         the pool on AWS: aws catalog (GPU instance types and prices) | aws cluster-config
              | aws log (the gateway's scaling decisions, operators)
"""


def token_main(argv: list[str]) -> int:
    from kernel_gateway import auth
    from kernel_gateway.app import default_users_file

    parser = argparse.ArgumentParser(prog="jupyter-gpu token", description="Manage the gateway's user tokens.")
    parser.add_argument("action", choices=["add", "list", "remove"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--users", default=default_users_file(), help="users file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            print("\n".join(auth.list_users(args.users)))
            return 0
        if not args.name:
            parser.error(f"'token {args.action}' needs a user NAME")
        if args.action == "add":
            token = auth.add_user(args.users, args.name)
            print(token)
            print(f"token for {args.name!r} stored (as a hash) in {args.users}; it is shown only once", file=sys.stderr)
            return 0
        if not auth.remove_user(args.users, args.name):
            print(f"no user {args.name!r} in {args.users}", file=sys.stderr)
            return 1
        return 0
    except ValueError as exc:
        print(f"jupyter-gpu token: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "gateway":
        from kernel_gateway.app import GatewayApp

        GatewayApp.launch_instance(rest)
        return 0
    if command == "token":
        return token_main(rest)
    if command == "usage":
        from .usage_report import usage_main

        return usage_main(rest)
    if command == "simulate":
        from pool_manager.simulate import main as simulate_main

        return simulate_main(rest)
    if command == "aws" and rest[:1] == ["log"]:  # read from the gateway, as usage is
        from .decision_log import log_main

        return log_main(rest[1:])
    if command == "aws":
        from pool_manager.aws.cli import main as aws_main

        return aws_main(rest)
    print(f"jupyter-gpu: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
