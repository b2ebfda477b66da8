"""``jupyter-gpu simulate``: trace readers, each release policy on traces small enough to work
out by hand (the numbers come from the real pool core), the pool search and the command."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from jupyter_gpu import cli
from jupyter_gpu.protocol import GpuChoice
from pool_manager.simulate.driver import Outcome, Timing, simulate
from pool_manager.simulate.metrics import percentile, summarize
from pool_manager.simulate.policies import parse_duration, parse_policy
from pool_manager.simulate.prices import load_prices
from pool_manager.simulate.sizing import smallest_pool
from pool_manager.simulate.synthetic import synthetic_workload
from pool_manager.simulate.traces import (
    TraceError,
    read_adobe_sessions,
    read_adobe_training,
    read_user_trace,
)
from pool_manager.simulate.workload import Cell, Session, Workload

A100 = (GpuChoice("a100"),)
TIMING = Timing(kernel_start_s=30.0, kernel_stop_s=2.0)


def alternating() -> Workload:
    """Two users taking turns on one GPU: A's cells at 100 and 500, B's at 300 and 700, 100 s each."""
    a = Session("a", "alice", 0.0, 1000.0, (Cell(100.0, 100.0, A100), Cell(500.0, 100.0, A100)))
    b = Session("b", "bob", 0.0, 1000.0, (Cell(300.0, 100.0, A100), Cell(700.0, 100.0, A100)))
    return Workload("alternating", (a, b), "by hand")


def run(policy: str, pool: int = 1, restore_s: float = 5.0, workload: Workload | None = None) -> Outcome:
    return simulate(workload or alternating(), parse_policy(policy, restore_s), {"a100": pool}, TIMING)


def waits(outcome: Outcome) -> list[float]:
    return [round(w, 3) for w in outcome.all_waits()]


# --- policies on the alternating trace ------------------------------------------------------


def test_dedicated_gpu_makes_the_second_user_wait_for_the_first_session_to_end() -> None:
    outcome = run("dedicated")
    # Alice holds the GPU 0..1000. Bob's lease gets it when her kernel has stopped (1002) and
    # his has started (1032): his first cell, asked at 300, waits 732 s; his second follows
    # 300 s of think time later, on the GPU he keeps until his session ends (1732).
    assert waits(outcome) == [0.0, 0.0, 732.0, 0.0]
    assert outcome.held_s["a100"] == pytest.approx(1000.0 + 700.0)
    assert outcome.busy_s["a100"] == 400.0
    assert outcome.lost_state == 0
    assert dict(outcome.ended) == {"deleted": 2}


def test_idle_release_shares_one_gpu_but_loses_the_variables_of_users_who_come_back() -> None:
    outcome = run("idle:60s")
    # Every lease: granted as its cell is asked for, released 60 s after the cell (160 s).
    # The kernel that replaces a released one is warm 32 s later, before the next user asks.
    assert waits(outcome) == [0.0, 0.0, 0.0, 0.0]
    assert outcome.held_s["a100"] == pytest.approx(4 * 160.0)
    assert outcome.held_s["a100"] / outcome.busy_s["a100"] == pytest.approx(1.6)
    # Alice's first lease ends at 260 and Bob's at 460, each before their own second cell.
    assert outcome.lost_state == 2
    assert dict(outcome.ended) == {"idle": 4}


def test_idle_timeout_longer_than_the_think_time_holds_the_gpu_like_a_dedicated_one() -> None:
    outcome = run("idle:10m")
    # Alice's lease is granted at her first cell (100) and never idle for 10 minutes before
    # her notebook closes (1000). Bob, asking at 300, gets the GPU at 1032 as with dedicated
    # GPUs; only Alice's first 100 s are no longer held.
    assert waits(outcome) == [0.0, 0.0, 732.0, 0.0]
    assert outcome.held_s["a100"] == pytest.approx(900.0 + 700.0)
    assert outcome.lost_state == 0
    assert dict(outcome.ended) == {"deleted": 2}


def test_per_cell_release_adds_the_restore_to_every_cell_after_the_first() -> None:
    outcome = run("per-cell", restore_s=5.0)
    # A lease per cell; each session's second cell first restores the snapshot (5 s).
    assert sorted(waits(outcome)) == [0.0, 0.0, 5.0, 5.0]
    assert outcome.held_s["a100"] == pytest.approx(100 + 100 + 105 + 105)
    assert outcome.lost_state == 0
    assert dict(outcome.ended) == {"deleted": 4}


def test_dedicated_holds_as_many_gpus_as_the_largest_cell_for_the_whole_session() -> None:
    cells = (Cell(100.0, 50.0, (GpuChoice("a100", 4),)), Cell(300.0, 50.0, A100))
    workload = Workload("wide", (Session("w", "wendy", 0.0, 600.0, cells),), "by hand")
    outcome = run("dedicated", pool=8, workload=workload)
    # The core keeps only 1-GPU kernels warm: the session's 4-GPU lease waits for four warm
    # kernels to stop (2 s) and its own to start (30 s), then holds 4 GPUs until 600.
    assert outcome.held_s["a100"] == pytest.approx(4 * (600.0 - 32.0))
    assert outcome.busy_s["a100"] == 4 * 50.0 + 50.0
    assert max(level for _, level in outcome.held_steps) == 4



def test_sessions_open_in_time_order_whatever_the_workload_lists_and_settling_gc_changes_nothing() -> None:
    # The replay feeds sessions from a sorted copy rather than queueing them all up front.
    made = synthetic_workload(20, 2, "a100", seed=3)
    # Notebooks that open with a cell: each session asks the core for a lease when it opens.
    workload = Workload(made.name, tuple(dataclasses.replace(s, start=s.cells[0].start) for s in made.sessions),
                        made.source)
    backwards = Workload(workload.name, workload.sessions[::-1], workload.source)
    outcomes = [simulate(w, parse_policy("idle:10m", 5.0), {"a100": 4}, TIMING, settle_gc=settle)
                for w, settle in ((workload, False), (backwards, False), (workload, True))]
    seen = [(o.waits, dict(o.held_s), o.held_steps, dict(o.ended), o.core_calls, o.lost_state) for o in outcomes]
    assert seen[0] == seen[1] == seen[2]
    assert outcomes[0].grants > 0 and any(w > 0 for w in outcomes[0].all_waits())  # 4 GPUs for 20 users: some queue

def test_auto_pool_finds_the_smallest_pool_meeting_the_target() -> None:
    workload = alternating()
    assert smallest_pool(workload, parse_policy("dedicated", 0), 10.0, TIMING).outcome.pool == {"a100": 2}
    assert smallest_pool(workload, parse_policy("idle:60s", 0), 10.0, TIMING).outcome.pool == {"a100": 1}
    sized = smallest_pool(workload, parse_policy("per-cell", 5.0), 10.0, TIMING)
    assert sized.outcome.pool == {"a100": 1} and sized.floors == {}
    # A restore longer than the target: no pool meets it; sized for the lowest p99 instead.
    slow = smallest_pool(workload, parse_policy("per-cell", 20.0), 10.0, TIMING)
    assert slow.floors == {"a100": 20.0} and slow.outcome.pool == {"a100": 1}


def test_auto_pool_sizes_each_gpu_type_for_its_own_cells() -> None:
    h100 = (GpuChoice("h100"),)
    carol = Session("c", "carol", 0.0, 1000.0, (Cell(200.0, 100.0, h100),))
    workload = Workload("two types", (*alternating().sessions, carol), "by hand")
    sized = smallest_pool(workload, parse_policy("dedicated", 0), 10.0, TIMING)
    assert sized.outcome.pool == {"a100": 2, "h100": 1}
    assert sized.outcome.waits["h100"] == [0.0]


def test_summary_prices_held_hours_and_the_pool() -> None:
    prices = load_prices("modal")
    row = summarize(run("per-cell", pool=2), alternating(), prices)
    per_hour = prices["a100"].usd_per_gpu_hour
    assert row["cost_held_usd"] == pytest.approx(410 / 3600 * per_hour)
    assert row["gpus_per_user"] == 1.0
    assert row["wait_p99_s"] == 5.0 and row["wait_p50_s"] == 0.0


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([], 0.99) == 0.0


def test_policy_and_duration_parsing_name_the_bad_value() -> None:
    assert parse_duration("10m", "x") == 600.0 and parse_duration("90", "x") == 90.0
    assert parse_policy("idle:2h", 0).idle_s == 7200.0
    with pytest.raises(ValueError, match="idle timeout 'soon' is not a duration"):
        parse_policy("idle:soon", 0)
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        parse_policy("greedy", 0)


# --- trace readers -------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_user_csv_trace_groups_cells_into_sessions(tmp_path: Path) -> None:
    trace = write(tmp_path / "t.csv", "user,start,duration,gpus,gpu_type\n"
                  "alice,0,120,1,a100\n"
                  "bob,10,60,2,H100\n"
                  "alice,400,30,0,a100\n"      # CPU-only: skipped
                  "alice,500,30,1,a100\n"
                  "alice,40000,30,1,a100\n")  # after a night away: a new session
    workload = read_user_trace(trace)
    sessions = {s.name: s for s in workload.sessions}
    assert sorted(sessions) == ["alice/0", "alice/1", "bob/0"]
    assert [c.start for c in sessions["alice/0"].cells] == [0.0, 500.0]
    assert sessions["alice/0"].end == 530.0
    assert sessions["bob/0"].cells[0].choices == (GpuChoice("h100", 2),)
    assert workload.users == 2 and workload.cells == 4


def test_user_json_lines_trace_reads_the_same_fields(tmp_path: Path) -> None:
    records = [{"user": "u", "start": 5, "duration": 10, "gpus": 1, "gpu_type": "a100", "session": "nb1"},
               {"user": "u", "start": 50, "duration": 10, "gpus": 1, "gpu_type": "a100", "session": "nb2"}]
    trace = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    workload = read_user_trace(trace)
    assert [s.name for s in workload.sessions] == ["u/nb1/0", "u/nb2/0"]


@pytest.mark.parametrize("line, expected", [
    ("alice,soon,10,1,a100", "line 3: field 'start': 'soon' is not a number of seconds"),
    ("alice,5,-1,1,a100", "line 3: field 'duration': '-1' must be a finite number >= 0"),
    ("alice,5,10,two,a100", "line 3: field 'gpus': 'two' is not a whole number"),
    ("alice,5,10,1,A100:2", "line 3: field 'gpu_type': 'A100:2' must be one type name"),
    ("alice,5,10,1,", "line 3: field 'gpu_type' is missing"),
])
def test_bad_csv_records_are_named_by_line_and_field(tmp_path: Path, line: str, expected: str) -> None:
    trace = write(tmp_path / "t.csv", f"user,start,duration,gpus,gpu_type\nbob,0,1,1,a100\n{line}\n")
    with pytest.raises(TraceError, match=expected.replace("(", r"\(")):
        read_user_trace(trace)


def test_bad_header_and_bad_json_lines_are_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="line 1: header lacks duration"):
        read_user_trace(write(tmp_path / "h.csv", "user,start,gpus,gpu_type\na,0,1,a100\n"))
    bad = '{"user": "a", "start": 0, "duration": 1, "gpus": 1, "gpu_type": "a100"}\n{"user": "a", \n[1]\n'
    with pytest.raises(TraceError) as raised:
        read_user_trace(write(tmp_path / "b.jsonl", bad))
    assert "line 2: not valid JSON" in str(raised.value)
    assert "line 3: a JSON line must be an object" in str(raised.value)


def test_adobe_sessions_reader_converts_ticks_and_skips_cpu_cells(tmp_path: Path) -> None:
    document = {"sessions": [
        {"id": "s1", "start_tick": 2, "stop_tick": 30, "trainings": [
            {"start_tick": 10, "duration_in_ticks": 3, "gpus": 4},
            {"start_tick": 5, "duration_in_ticks": 1, "gpus": 0},
        ]},
        {"id": "s2", "start_tick": 3000, "stop_tick": 3100, "trainings": []},
    ]}
    path = write(tmp_path / "s.json", json.dumps(document))
    workload = read_adobe_sessions(path, "a100", days=1)
    assert [s.name for s in workload.sessions] == ["s1"]  # s2 opens after day 1
    session = workload.sessions[0]
    assert (session.start, session.end) == (120.0, 1800.0)
    assert session.cells == (Cell(600.0, 180.0, (GpuChoice("a100", 4),)),)
    with pytest.raises(TraceError, match="session 0: missing or bad field"):
        read_adobe_sessions(write(tmp_path / "bad.json", '{"sessions": [{"start_tick": 1}]}'), "a100")


def test_adobe_training_reader_uses_minutes_and_names_bad_rows(tmp_path: Path) -> None:
    header = "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n"
    workload = read_adobe_training(write(tmp_path / "t.csv", header + "0,8,3,0,vgg11,2,0\n"), "h100")
    assert workload.sessions[0].cells == (Cell(180.0, 120.0, (GpuChoice("h100", 8),)),)
    with pytest.raises(TraceError, match="line 3"):
        read_adobe_training(write(tmp_path / "b.csv", header + "0,8,3,0,vgg11,2,0\n1,x,3,0,vgg11,2,0\n"), "h100")


def test_synthetic_workload_is_reproducible_from_its_seed() -> None:
    first = synthetic_workload(20, 2, "a100", seed=7)
    assert first == synthetic_workload(20, 2, "a100", seed=7)
    assert first != synthetic_workload(20, 2, "a100", seed=8)
    assert first.users == 20 and len(first.sessions) == 40
    assert all(c.duration > 0 for s in first.sessions for c in s.cells)


def test_price_file_errors_name_the_line(tmp_path: Path) -> None:
    good = write(tmp_path / "p.csv", "gpu_type,usd_per_gpu_hour,source,date\na100,1.5,our contract,2026-01\n")
    assert load_prices(str(good))["a100"].usd_per_gpu_hour == 1.5
    bad = write(tmp_path / "q.csv", "gpu_type,usd_per_gpu_hour,source,date\na100,cheap,x,y\n")
    with pytest.raises(ValueError, match="line 2: field 'usd_per_gpu_hour': 'cheap'"):
        load_prices(str(bad))


# --- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "two.csv"
    path.write_text("user,start,duration,gpus,gpu_type\n"
                    "alice,100,100,1,a100\nbob,300,100,1,a100\nalice,500,100,1,a100\nbob,700,100,1,a100\n")
    return path


def test_cli_prints_the_policies_side_by_side_and_writes_the_plot(small_trace: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "out.png"
    code = cli.main(["simulate", "--trace", str(small_trace), "--policy", "dedicated,idle:60s",
                     "--policy", "per-cell", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    header = next(line for line in out.splitlines() if "dedicated" in line and "per-cell" in line)
    assert "idle:60s" in header
    assert "held / busy" in out and "releases losing state" in out and "price a100" in out


def test_cli_json_matches_the_hand_worked_answer(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["simulate", "--trace", str(small_trace), "--policy", "idle:60s", "--pool", "a100=1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    (row,) = report["policies"]
    # The user trace's sessions end with their last cell, so the 60 s idle tail is cut for the
    # last cells: 160 + 160 + 100 + 100 GPU-seconds held for 400 busy.
    assert row["gpu_hours_held"] * 3600 == pytest.approx(520.0)
    assert row["lost_state_releases"] == 2 and row["wait_max_s"] == 0.0


def test_cli_errors_name_the_value_and_the_fix(small_trace: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--trace", str(small_trace), "--pool", "h100=4"]) == 2
    assert "the trace asks for a100 but --pool has only h100: add a100=N or use --pool auto" in capsys.readouterr().err
    bad = write(tmp_path / "bad.csv", "user,start,duration,gpus,gpu_type\nalice,0,ten,1,a100\n")
    assert cli.main(["simulate", "--trace", str(bad)]) == 2
    assert "line 2: field 'duration': 'ten'" in capsys.readouterr().err
    assert cli.main(["simulate", "--trace", str(small_trace), "--users", "5"]) == 2
    assert "--users 5 applies to --trace synthetic only" in capsys.readouterr().err
    wide = write(tmp_path / "wide.csv", "user,start,duration,gpus,gpu_type\nalice,0,10,4,a100\n")
    assert cli.main(["simulate", "--trace", str(wide), "--gpus-per-node", "2"]) == 2
    assert "a cell asks for 4 a100 GPUs on one node but --gpus-per-node is 2" in capsys.readouterr().err
    assert cli.main(["simulate", "--trace", str(wide), "--pool", "a100=3"]) == 2
    assert "give at least a100=4" in capsys.readouterr().err


def test_cli_plot_without_matplotlib_says_what_to_install(small_trace: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    plot = tmp_path / "never.png"
    assert cli.main(["simulate", "--trace", str(small_trace), "--plot", str(plot)]) == 2
    assert 'pip install "jupyter-gpu[simulate]"' in capsys.readouterr().err
    assert not plot.exists()
