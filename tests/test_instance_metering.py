"""Instance-hours of an autoscaled pool in a real SQLite file: rows per launched node, totals per
type with open nodes counted up to now, and rows left open by a gateway that stopped."""

from __future__ import annotations

import threading
from pathlib import Path

from jupyter_gpu.protocol import GRANTED, RELEASED, GpuChoice
from jupyter_gpu.usage_report import format_all
from kernel_gateway.instance_metering import InstanceHours, paid_capacity
from kernel_gateway.metering import MeteringStore
from pool_manager.model import Lease
from pool_manager.ray_autoscale import InstanceEvent


def event(node_id: str, joined: bool, at: float, gpu_type: str = "h100", gpus: int = 8,
          price: float | None = 55.04) -> InstanceEvent:
    return InstanceEvent(node_id, f"10.0.0.{len(node_id)}", gpu_type, "p5.48xlarge", gpus, price, joined, at)


def test_instance_hours_per_type_next_to_the_leases(tmp_path: Path) -> None:
    db = str(tmp_path / "usage.sqlite")
    metering = MeteringStore(db)  # the same file the leases are metered in, through its connection
    hours = InstanceHours(metering)
    hours.record(event("a", True, 1000.0))
    hours.record(event("a", False, 1000.0 + 1800))  # half an hour
    hours.record(event("b", True, 2000.0))  # still up
    hours.record(event("c", True, 1000.0, "a10g", 1, None))  # price unknown: costs nothing known
    hours.record(event("a", True, 5000.0))  # a repeated join changes nothing
    totals = hours.totals(now=2000.0 + 3600)
    seconds, gpu_seconds, cost = totals["h100"]
    assert seconds == 1800 + 3600 and gpu_seconds == 8 * (1800 + 3600)
    assert round(cost, 2) == round(55.04 * 1.5, 2)
    assert totals["a10g"] == (4600.0, 4600.0, 0.0)
    metering.close()


def test_rows_left_open_are_closed_when_a_gateway_starts(tmp_path: Path) -> None:
    db = str(tmp_path / "usage.sqlite")
    first = MeteringStore(db)
    InstanceHours(first).record(event("a", True, 1000.0))
    first.close()
    second = MeteringStore(db)  # the next gateway's
    again = InstanceHours(second)
    assert again.close_open(1600.0) == 1
    assert again.totals(now=99999.0)["h100"][0] == 600.0  # not counted on past the restart
    second.close()


def test_usage_all_shows_what_the_launched_instances_cost_and_how_much_leases_used(tmp_path: Path) -> None:
    """What ``jupyter-gpu usage --all`` prints for an autoscaled pool, from a real metering file."""
    db = str(tmp_path / "usage.sqlite")
    metering = MeteringStore(db)
    hours = InstanceHours(metering)
    lease = Lease(id="l1", user="ada", choices=(GpuChoice("h100", 2),), idle_timeout=600.0, queued_at=1000.0,
                  state=GRANTED, gpu_type="h100", count=2, granted_at=1000.0)
    metering.record(lease, 6.88)
    lease.state, lease.released_at = RELEASED, 1000.0 + 3600
    metering.record(lease, 6.88)
    hours.record(event("a", True, 1000.0))  # one p5.48xlarge (8 GPUs) up for the hour
    hours.record(event("a", False, 1000.0 + 3600))
    paid = paid_capacity(metering.totals(), hours.totals())
    h100 = paid["by_type"]["h100"]
    assert (h100["instance_seconds"], h100["launched_gpu_seconds"], h100["leased_gpu_seconds"]) == (3600, 28800, 7200)
    assert h100["utilization"] == paid["utilization"] == 0.25
    text = format_all({**metering.usage_by_user_and_group(), "paid": paid})
    assert "launched instances (cost at on-demand list price)" in text
    row = next(line for line in text.splitlines() if line.startswith("h100 "))
    assert row.split() == ["h100", "1.000", "8.000", "2.000", "25%", "$55.04"]
    assert text.endswith("paid: $55.04, utilization of paid GPUs 25%")
    metering.close()


def test_lease_records_and_instance_events_from_two_threads_share_the_one_connection(tmp_path: Path) -> None:
    """The gateway's loop records leases while instance events may come from another thread."""
    metering = MeteringStore(str(tmp_path / "usage.sqlite"))
    hours = InstanceHours(metering)

    def leases() -> None:
        for i in range(200):
            metering.record(Lease(id=f"l{i}", user="ada", choices=(GpuChoice("h100", 1),), idle_timeout=600.0,
                                  queued_at=1000.0 + i), 1.0)

    def nodes() -> None:
        for i in range(200):
            hours.record(event(f"n{i}", True, 1000.0 + i))

    threads = [threading.Thread(target=leases), threading.Thread(target=nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(metering.list_for_user("ada", limit=1000)) == 200
    assert hours.close_open(5000.0) == 200
    metering.close()
