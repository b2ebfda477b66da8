"""Budgets end to end: the real gateway with budgets in its config file, real kernels, the
``%%gpu`` magic in a notebook run by nbclient.

Prices are set so that budgets run out in seconds: an a100 costs $3,600 an hour ($1 a second).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import make_gateway
from .gateway_process import GatewayProcess, poll

NOTEBOOK = "work/budget.ipynb"
USERS = ("alice", "bob", "carol", "dave")
PRICES = 'c.PoolManager.price_per_gpu_hour = {"a100": 3600.0}  # $1 a second\n'
BUDGETS = """c.Budgets.users = {"alice": {"money_per_month": 15}}
c.Budgets.groups = {"lab": {"gpu_hours_per_day": 6 / 3600, "members": ["bob", "carol"]}}
"""


@pytest.fixture(scope="module")
def budget_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("budgets")
    (tmp / "config").mkdir()
    (tmp / "config" / "jupyter_gpu_config.py").write_text(PRICES + BUDGETS)
    process = make_gateway(tmp, "--inventory", "a100=2", "--cpu-slots", "2", "--min-warm", "1",
                           "--GatewayApp.config_check_interval=0.3", users=USERS).start()
    yield process
    process.stop()


def write_config(gateway: GatewayProcess, text: str) -> None:
    path = gateway.tmp / "config" / "jupyter_gpu_config.py"
    path.write_text(text)
    stamp = time.time() + 1  # a new mtime even within the filesystem's timestamp granularity
    os.utime(path, (stamp, stamp))




class Notebook:
    """A notebook whose cells the test runs one at a time, in a real local kernel (as nbclient does)."""

    def __init__(self, gateway: GatewayProcess, user: str) -> None:
        self.book = nbformat.v4.new_notebook()
        self.client = NotebookClient(self.book, timeout=120, kernel_name="python3", allow_errors=True)
        self.env = {**os.environ, "JUPYTER_GPU_URL": gateway.url, "JUPYTER_GPU_TOKEN": gateway.tokens[user],
                    "JPY_SESSION_NAME": NOTEBOOK}

    def run(self, source: str) -> str:
        """The cell's output: its streams, and its error as 'Name: message'."""
        cell = nbformat.v4.new_code_cell(source)
        self.book.cells.append(cell)
        self.client.execute_cell(cell, len(self.book.cells) - 1)
        parts = []
        for output in cell.outputs:
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type == "error":
                parts.append(f"{output.ename}: {output.evalue}")
        return "".join(parts)


def test_a_money_budget_warns_in_the_notebook_ends_the_lease_keeping_its_variables_and_refuses_the_next(
        budget_gateway: GatewayProcess) -> None:
    gateway = budget_gateway
    notebook = Notebook(gateway, "alice")
    with notebook.client.setup_kernel(env=notebook.env):
        # The path that tells before the next cell, alone: the watcher that tells an idle
        # notebook at once is tested in test_gpu_idle.py.
        notebook.run("%load_ext jupyter_gpu\nimport jupyter_gpu.magic\njupyter_gpu.magic.NOTICE_WATCH_INTERVAL = None")
        assert "made x" in notebook.run("%%gpu a100 --no-pull\nx = 41\nprint('made x')")

        # $13.50 of a100 time later, the lease has its warning; the notebook's next cell shows it
        def warned() -> dict[str, Any] | None:
            leases = gateway.get("alice", "/api/gpu/leases").body
            return next((lease for lease in leases if lease["notices"]), None)

        lease = poll(warned, 30, "the 90% notice")
        assert [n["kind"] for n in lease["notices"]] == ["budget"]
        text = notebook.run("print('thinking')")
        # $13.50 at the tick, plus what the tick comes late ($1 a second: a loaded 2-core machine
        # wakes the gateway up to a few hundred milliseconds late)
        assert re.search(r"jupyter-gpu: a100 lease: user alice has used 90% of budget money_per_month: "
                         r"\$13\.[5-9]\d of \$15\.00 used this month \(UTC\)\. It runs out at this rate at ",
                         text), text
        assert " UTC; then its leases end, keeping their variables (in " in text, text

        # at $15 it ends, with reason budget, after its variables were saved
        ended = poll(lambda: (row := gateway.get("alice", f"/api/gpu/leases/{lease['id']}").body)["state"]
                     == "released" and row, 10, "the lease's end at 100%")
        assert ended["reason"] == "budget"
        assert ended["gpu_seconds"] == pytest.approx(15.4, abs=0.5)  # due at 15 s; the tick may come late
        kept = poll(lambda: [s["names"] for s in gateway.get("alice", "/api/gpu/snapshots").body
                             if s["state"] == "kept" and s["notebook"] == NOTEBOOK], 10, "the kept snapshot")
        assert kept == [["x"]]

        text = notebook.run("%%gpu a100\nprint(x + 1)")
        # the lease's end, said when the notebook next used it: which budget, and that x was kept
        # (what the tick came late is charged too: $15.00 and up to a few tens of cents more)
        assert re.search(r"the a100 lease ended \(budget\): budget money_per_month of user alice is used up "
                         r"\(\$15\.\d\d of \$15\.00 used this month \(UTC\)\), so the lease ended", text), text
        assert "its variables were kept and come back with the next lease" in text
        # the new lease is refused: the budget, what is used, when it resets
        assert re.search(r"UsageError: budget money_per_month of user alice is used up: \$15\.\d\d of \$15\.00 used "
                         r"this month \(UTC\); it resets at ", text), text
        assert "-01 00:00 UTC (ask the operator to raise c.Budgets.users['alice'])" in text

        usage = notebook.run("%gpu usage")
        assert re.search(r"user alice: money_per_month \$15\.\d\d of \$15\.00 this month used, \$0\.00 left, resets ",
                         usage), usage
        assert "<- used up" in usage

    reply = gateway.post("alice", "/api/gpu/leases", {"gpu": "cpu"})  # cpu kernels cost nothing here
    assert reply.status == 201
    reply = gateway.post("alice", "/api/gpu/leases", {"gpu": "a100"})
    assert reply.status == 403 and reply.body["reason"] == "budget", reply
    assert reply.body["message"].startswith("budget money_per_month of user alice is used up")


def test_a_group_budget_is_shared_by_two_users_and_ends_both_leases(budget_gateway: GatewayProcess) -> None:
    gateway = budget_gateway
    bobs = gateway.lease("bob", "a100")
    carols = gateway.lease("carol", "a100")

    def both_ended() -> list[dict[str, Any]] | None:
        leases = [gateway.get(user, f"/api/gpu/leases/{lease['id']}").body
                  for user, lease in (("bob", bobs), ("carol", carols))]
        return leases if all(lease["state"] == "released" for lease in leases) else None

    ended = poll(both_ended, 20, "both leases to end")
    assert [lease["reason"] for lease in ended] == ["budget", "budget"]
    assert all("budget gpu_hours_per_day of group lab is used up" in lease["reason_message"] for lease in ended)
    # 6 GPU-seconds between them, whichever got its kernel first
    assert sum(lease["gpu_seconds"] for lease in ended) == pytest.approx(6.0, abs=1.0)

    reply = gateway.post("carol", "/api/gpu/leases", {"gpu": "a100"})
    assert reply.status == 403
    assert reply.body["message"].startswith("budget gpu_hours_per_day of group lab is used up: ")
    assert "it resets at " in reply.body["message"] and " 00:00 UTC" in reply.body["message"]
    budgets = gateway.get("bob", "/api/gpu/budgets").body  # what the sidebar polls
    assert budgets == gateway.get("bob", "/api/gpu/usage").body["budgets"]
    group = next(b for b in budgets if b["scope"] == "group")
    assert (group["name"], group["budget"], group["left"]) == ("lab", "gpu_hours_per_day", 0)
    assert group["resets_at"].endswith("T00:00:00Z")
    # dave is in no group: untouched
    assert gateway.get("dave", "/api/gpu/usage").body["budgets"] == []


def test_budgets_change_without_a_restart(budget_gateway: GatewayProcess) -> None:
    gateway = budget_gateway
    held = gateway.lease("dave", "a100")
    second = gateway.lease("dave", "a100")  # no budget yet: a second one is fine
    gateway.delete("dave", f"/api/gpu/leases/{second['id']}")

    write_config(gateway, PRICES + BUDGETS + 'c.Budgets.users["dave"] = {"gpus": 1}\n')

    def refused() -> dict[str, Any] | None:
        reply = gateway.post("dave", "/api/gpu/leases", {"gpu": "a100"})
        if reply.status == 201:  # not re-read yet
            gateway.delete("dave", f"/api/gpu/leases/{reply.body['id']}")
            return None
        return dict(reply.body)

    body = poll(refused, 10, "the new budget to refuse")
    assert body["message"].startswith("budget gpus of user dave does not allow 1 more: 1 of 1 GPUs held or "
                                      "waited for; it frees as leases end")

    # A broken file changes nothing: the budgets in force stay.
    write_config(gateway, "c.Budgets.users = {\n")
    poll(lambda: "config changed but was not applied" in gateway.log_text(), 10, "the broken file to be logged")
    assert gateway.post("dave", "/api/gpu/leases", {"gpu": "a100"}).status == 403

    # A budget lowered under what a running lease used ends it at once.
    write_config(gateway, PRICES + 'c.Budgets.users = {"dave": {"gpu_hours_per_day": 0.0001}}\n')
    lease = poll(lambda: (row := gateway.get("dave", f"/api/gpu/leases/{held['id']}").body)["state"]
                 == "released" and row, 10, "the lease to end under the lowered budget")
    assert lease["reason"] == "budget"


def test_a_restart_gives_nobody_a_fresh_budget(budget_gateway: GatewayProcess) -> None:
    """Usage comes back from the metering database: alice's money and group lab's hours stay spent."""
    gateway = budget_gateway
    write_config(gateway, PRICES + BUDGETS)  # the last test left other budgets in the file
    gateway.stop()
    gateway.start()
    refused = gateway.post("alice", "/api/gpu/leases", {"gpu": "a100"})
    assert refused.status == 403 and re.search(r"\$15\.\d\d of \$15\.00 used this month", refused.body["message"]), \
        refused
    refused = gateway.post("carol", "/api/gpu/leases", {"gpu": "a100"})
    assert refused.status == 403 and "of group lab is used up" in refused.body["message"], refused
    # bob's lease that group lab's budget ended still says why, from the metering file
    ended = [row for row in gateway.get("bob", "/api/gpu/leases?released=1").body if row["reason"] == "budget"]
    assert ended and all("budget gpu_hours_per_day of group lab is used up" in row["reason_message"]
                         for row in ended), ended
    again = gateway.get("bob", f"/api/gpu/leases/{ended[0]['id']}").body
    assert again["reason_message"] == ended[0]["reason_message"]


def test_a_bad_budget_stops_the_gateway_at_start_naming_the_entry(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "jupyter_gpu_config.py").write_text('c.Budgets.groups = {"lab": {"gpu_hours": 5}}\n')
    process = make_gateway(tmp_path, "--inventory", "a100=1", "--min-warm", "0")
    with pytest.raises(RuntimeError, match="gateway exited 2"):
        process.start(wait_warm=False)
    assert "Budgets.groups['lab'] has unknown key(s) 'gpu_hours': use gpus, gpu_hours_per_day, money_per_month" \
        in process.log_text()
