"""The gateway's REST API against its OpenAPI description: served, committed, and fuzzed live.

schemathesis generates requests from kernel_gateway/openapi.json (valid and invalid ones) and
checks every answer: never a server error, status codes, content types and bodies as described.
A fixed seed and a small number of examples per operation keep the run short and repeatable.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_gateway.openapi import DESCRIPTION
from tests.e2e.gateway_process import GatewayProcess

from .conftest import make_gateway

EXAMPLES_PER_OPERATION = 12


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # No warm kernels and a short wait for one: the fuzzer asks for many leases.
    process = make_gateway(tmp_path_factory.mktemp("fuzzed"), "--inventory", "a100=1", "--cpu-slots", "1",
                           "--min-warm", "0", "--GatewayApp.kernel_request_timeout=0.5").start(wait_warm=False)
    yield process
    process.stop()


def test_the_gateway_serves_the_committed_description(fuzzed: GatewayProcess) -> None:
    served = fuzzed.request(None, "GET", "/api/gpu/openapi.json")  # no token needed
    assert served.status == 200
    assert served.body == json.loads(DESCRIPTION.read_text())
    assert {"/api/kernels", "/api/gpu/leases/{lease_id}", "/api/gpu/usage", "/metrics"} <= set(served.body["paths"])


def test_fuzzing_finds_no_server_error_and_no_answer_unlike_the_description(
    fuzzed: GatewayProcess, tmp_path: Path
) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is in the test extra: pip install -e '.[test]'"
    run = subprocess.run(
        [st, "run", f"{fuzzed.url}/api/gpu/openapi.json", "--url", fuzzed.url,
         "-H", f"Authorization: token {fuzzed.tokens['alice']}",
         "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "14", "--generation-database", "none",
         "--request-timeout", "30", "--workers", "1", "--no-color", "--phases", "coverage,fuzzing",
         # 503 "no GPU free in time" is an answer, not a failure: server errors are checked in the log below
         "--checks", "status_code_conformance,content_type_conformance,response_schema_conformance"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    log = fuzzed.log_text()
    assert "internal error" not in log and "Traceback" not in log
    statuses = [int(code) for code in re.findall(r"tornado.access\] (\d{3}) ", log)]
    assert len(statuses) > 100  # the fuzzer really talked to it
    assert [code for code in statuses if code >= 500 and code != 503] == []
    # the gateway still serves, and what the fuzzer leased can be ended
    for lease in fuzzed.get("alice", "/api/gpu/leases").body:
        assert fuzzed.delete("alice", f"/api/gpu/leases/{lease['id']}").status == 200
    assert fuzzed.get("alice", "/api/gpu/leases").body == []
