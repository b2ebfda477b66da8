"""What JupyterHub identity costs a request (needs configurable-http-proxy, as tests/e2e/test_hub.py):

    .venv/bin/python benchmarks/hub_auth.py [--rounds 5] [--requests 100]

Starts the Hub of tests/e2e/test_hub.py with the gateway as its managed service (no notebook
servers) and times ``GET /api/gpu/types`` on one kept-alive connection, interleaved: with the
gateway's own token, with a Hub token the gateway has seen (its cached answer, at most 30 s old),
and the first use of a fresh Hub token (the gateway asks the Hub). One JSON line per row, ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from e2e.hub_process import SERVICE, HubProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="fresh Hub tokens (each one's first use is timed)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per round and token kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hub-auth-") as tmp:
        hub = HubProcess(Path(tmp), ["--inventory", "a100=1", "--min-warm", "0"], 30)
        try:
            hub.start()
            found = re.search(r"JUPYTER_GPU_TOKEN=(\S+)", hub.log_text())  # the managed gateway's generated token
            assert found, "the gateway did not log its generated token"
            rows = measure(hub, found.group(1), args.rounds, args.requests)
        finally:
            hub.stop()
    for row in rows:
        print(json.dumps(row))


def measure(hub: HubProcess, own_token: str, rounds: int, requests: int) -> list[dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.gateway_url.rsplit(":", 1)[1]))

    def get(token: str) -> float:
        start = time.perf_counter()
        conn.request("GET", "/api/gpu/types", headers={"Authorization": f"token {token}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        return (time.perf_counter() - start) * 1000

    first: list[float] = []
    cached: list[float] = []
    own: list[float] = []
    for _ in range(rounds):
        token, _ = hub.token_for("alice", [f"access:services!service={SERVICE}"])
        first.append(get(token))
        for _ in range(requests):
            cached.append(get(token))
            own.append(get(own_token))
    conn.close()
    return [summary("gateway_token", own), summary("hub_token_cached", cached), summary("hub_token_first_use", first)]


def summary(row: str, samples: list[float]) -> dict[str, object]:
    ordered = sorted(samples)
    return {"row": row, "n": len(ordered), "median_ms": round(statistics.median(ordered), 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2)}


if __name__ == "__main__":
    main()
