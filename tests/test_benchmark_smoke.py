"""The benchmark (benchmarks/run.py) runs end to end in its tiny mode and fills every row.

No timing is judged here: figures belong in the benchmark's report, not in pass/fail. The
peers are measured only where scripts/bench already set up their venvs (.bench/ipp,
.bench/kg); this test never installs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS_READY = all((REPO / ".bench" / name / "bin" / "python").exists() for name in ("ipp", "kg"))

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_benchmark_runs_in_smoke_mode_and_reports_all_nine_rows(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(tmp_path)]
    if not PEERS_READY:
        command.append("--no-peers")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=230, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads((tmp_path / "latest-smoke.json").read_text())
    assert {row["row"] for row in result["table"]} == set(range(1, 10))
    for part in ("pool_sim", "pool_scaling", "zmq", "tcp", "ours", "snapshots",
                 *(("ipp", "kg") if PEERS_READY else ())):
        assert "error" not in result[part] and "skipped" not in result[part], result[part]
    ours = result["ours"]
    assert ours["warm"]["gpu_e2e"]["n"] == result["settings"]["repeats"]
    # every printed line arrived, through the magic and through the gateway alone
    for path in ("flood_magic", "flood_ws"):
        assert {cell: out["lines"] for cell, out in ours[path].items()} == result["settings"]["flood_lines"]
    assert ours["transfer"]["rerun"]["bytes_pushed"]["max"] == 0  # an unchanged array is not sent again
    assert result["pool_sim"]["finished"] and result["pool_sim"]["granted"] == result["pool_sim"]["requests"]
    assert (tmp_path / "latest-smoke.md").read_text().count("\n| ") >= 20
