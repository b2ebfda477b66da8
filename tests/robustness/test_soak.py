"""A shortened soak in CI (benchmarks/soak.py; the 2,000-lease run is `scripts/bench soak`):
leases from 20 concurrent clients, the gateway's RSS, fds, threads and children within bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).parents[2] / "benchmarks" / "soak.py"
LEASES, CLIENTS = 100, 20


@pytest.mark.timeout(600)
def test_many_leases_from_concurrent_clients_leave_the_gateway_as_it_was() -> None:
    done = subprocess.run([sys.executable, str(SOAK), "--leases", str(LEASES), "--clients", str(CLIENTS)],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout.split("BENCH-RESULT ", 1)[1])
    assert done.returncode == 0, result
    assert result["failed"] == 0 and result["exceeded"] == []
    assert result["after"]["children"] == result["after"]["warm_kernels"]  # no kernel outlived its lease
