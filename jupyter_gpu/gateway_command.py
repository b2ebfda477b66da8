"""What the CLI commands that read one resource from the gateway share (``jupyter-gpu usage``,
``jupyter-gpu aws log``): a parser with ``--json``, and one GET whose failure is one line on
stderr and exit status 1 rather than a traceback.

The gateway is found as the magic finds it (``JUPYTER_GPU_URL`` / ``JUPYTER_GPU_TOKEN``, or the
JupyterHub this runs under), so these work in a Hub terminal with no set-up as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import GatewayClient, GatewayConfig, GatewayError


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", action="store_true", help="the gateway's JSON as it is")
    return parser


def fetch(prog: str, path: str) -> Any | None:
    """The gateway's JSON at ``path``; None once the reason it could not be read is on stderr."""
    try:
        return GatewayClient(GatewayConfig.from_env()).request("GET", path)
    except GatewayError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2)
