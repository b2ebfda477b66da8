"""Readers for the traces the simulator replays: the two Adobe traces and the user's own.

The user's own format (CSV with a header line, or JSON lines), one GPU cell per record:

    user,start,duration,gpus,gpu_type[,session]
    alice,0,120,1,a100
    alice,400,30,1,a100

``start`` is seconds from the beginning of the trace, ``duration`` seconds the cell ran,
``gpus`` how many it used (0 = a CPU-only cell, skipped), ``gpu_type`` a type name such as
``a100``. A user's cells form one notebook session, ended by a pause over 8 hours (someone
away overnight is taken to have closed the notebook) or by a change of the optional
``session`` field.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_gpu.protocol import MAX_GPU_COUNT, GpuChoice, SpecError, parse_gpu_spec

from .workload import Cell, Session, Workload

MINUTE = 60.0
DAY = 86400.0
#: a pause longer than this ends a session in the user's own traces
SESSION_BREAK_S = 8 * 3600.0
#: at most this many bad records are listed in one error
MAX_LISTED_ERRORS = 10
USER_FIELDS = ("user", "start", "duration", "gpus", "gpu_type")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class TrainingEvent:
    """One row of ``adobe-training-events-2021-06.csv`` in seconds."""

    job_id: int
    gpus: int
    submit: float
    duration: float
    model_name: str


def _limit_days(days: float | None) -> float:
    if days is None:
        return math.inf
    if not days > 0:
        raise TraceError(f"--days must be positive, got {days}")
    return days * DAY


def read_adobe_sessions(path: Path, gpu_type: str, days: float | None = None) -> Workload:
    """The NotebookOS sessions file: 1-minute ticks; each session is one person's notebook.

    Cells with ``gpus == 0`` ran on CPU only and are skipped. The trace names no GPU type
    (``ANY_GPU``), so every cell asks for ``gpu_type``.
    """
    try:
        document = json.loads(Path(path).read_text())
        raw_sessions = document["sessions"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: not a NotebookOS sessions file ({exc}); "
                         "expected a JSON object with 'sessions'") from exc
    until = _limit_days(days)
    sessions = []
    for number, raw in enumerate(raw_sessions):
        where = f"{path}: session {number}"
        try:
            start, end = float(raw["start_tick"]) * MINUTE, float(raw["stop_tick"]) * MINUTE
            if start >= until:
                continue
            cells = tuple(
                Cell(float(t["start_tick"]) * MINUTE, float(t["duration_in_ticks"]) * MINUTE,
                     (GpuChoice(gpu_type, int(t["gpus"])),))
                for t in sorted(raw["trainings"], key=lambda t: float(t["start_tick"]))
                if int(t["gpus"]) > 0
            )
            name = str(raw.get("id", number))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{where}: missing or bad field {exc}") from exc
        sessions.append(Session(name, name, start, max(end, start), cells))
    return Workload(
        "adobe-sessions", tuple(sessions),
        f"{Path(path).name}: NotebookOS Adobe sessions, 1-minute ticks, one user per session, "
        f"CPU-only cells skipped, every GPU cell on {gpu_type}",
    )


def read_training_events(path: Path, days: float | None = None) -> list[TrainingEvent]:
    """The Tiresias-format training CSV. Its units, from the generator that wrote it
    (``scripts/tiresias_generator/generate_workload.py``): ``submit_time`` whole minutes
    from the first training, ``duration`` whole minutes (at least 1), ``num_gpu`` GPUs."""
    until = _limit_days(days)
    events = []
    with _open(path) as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or ()
        missing = [f for f in ("job_id", "num_gpu", "submit_time", "model_name", "duration") if f not in columns]
        if missing:
            raise TraceError(f"{path} line 1: missing column(s) {', '.join(missing)}")
        errors = []
        for line, row in enumerate(reader, start=2):
            try:
                event = TrainingEvent(int(row["job_id"]), int(row["num_gpu"]), int(row["submit_time"]) * MINUTE,
                                      int(row["duration"]) * MINUTE, row["model_name"])
            except (TypeError, ValueError) as exc:
                errors.append(f"line {line}: {exc}")
                continue
            if event.submit < until:
                events.append(event)
        _raise_if(path, errors)
    return events


def read_adobe_training(path: Path, gpu_type: str, days: float | None = None) -> Workload:
    """Each training is its own session (the trace has no user or notebook column): it is
    opened when the training is submitted and closed when it ends."""
    sessions = tuple(
        Session(f"job{e.job_id}", f"job{e.job_id}", e.submit, e.submit + e.duration,
                (Cell(e.submit, e.duration, (GpuChoice(gpu_type, e.gpus),)),))
        for e in read_training_events(path, days)
        if e.gpus > 0
    )
    return Workload(
        "adobe-training", sessions,
        f"{Path(path).name}: Adobe training events, whole minutes, each training its own session "
        f"(no user column), every cell on {gpu_type}",
    )


def read_user_trace(path: Path, days: float | None = None) -> Workload:
    """A CSV (header line first) or JSON-lines file in the format of this module's docstring."""
    until = _limit_days(days)
    text_path = Path(path)
    with _open(text_path) as handle:
        first = handle.readline()
        handle.seek(0)
        records = _json_lines(handle) if first.lstrip().startswith("{") else _csv_records(text_path, handle)
        cells: dict[tuple[str, str], list[Cell]] = {}
        errors = []
        for line, record in records:
            try:
                user, session, cell = _user_cell(record)
            except TraceError as exc:
                errors.append(f"line {line}: {exc}")
                continue
            if cell is not None and cell.start < until:
                cells.setdefault((user, session), []).append(cell)
            if len(errors) > MAX_LISTED_ERRORS:
                break
        _raise_if(path, errors)
    sessions = []
    for (user, session), recorded in cells.items():
        recorded.sort(key=lambda cell: cell.start)
        for part, run in enumerate(_split_at_breaks(recorded)):
            name = f"{user}/{session}/{part}" if session else f"{user}/{part}"
            sessions.append(Session(name, user, run[0].start, max(c.start + c.duration for c in run), tuple(run)))
    if not sessions:
        raise TraceError(f"{path}: no GPU cells (every record had gpus = 0, or the file is empty)")
    sessions.sort(key=lambda s: (s.start, s.name))
    return Workload(text_path.stem, tuple(sessions),
                    f"{text_path.name}: user trace, sessions split at pauses over {SESSION_BREAK_S / 3600:g} h")


def _open(path: Path) -> Any:
    try:
        return open(path, newline="")
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from exc


def _json_lines(handle: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            record = {"__error__": f"not valid JSON ({exc.args[0]})"}
        if not isinstance(record, dict):
            record = {"__error__": "a JSON line must be an object with the fields " + ", ".join(USER_FIELDS)}
        yield line, record


def _csv_records(path: Path, handle: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(handle)
    missing = [f for f in USER_FIELDS if f not in (reader.fieldnames or ())]
    if missing:
        raise TraceError(f"{path} line 1: header lacks {', '.join(missing)}; "
                         f"the first line must name the columns {','.join(USER_FIELDS)}[,session]")
    for row in reader:
        yield reader.line_num, row


def _user_cell(record: dict[str, Any]) -> tuple[str, str, Cell | None]:
    if "__error__" in record:
        raise TraceError(record["__error__"])
    missing = [f for f in USER_FIELDS if record.get(f) in (None, "")]
    if missing:
        raise TraceError(f"field {missing[0]!r} is missing")
    user = str(record["user"]).strip()
    start = _number(record, "start", "seconds from the start of the trace", minimum=0.0)
    duration = _number(record, "duration", "seconds", minimum=0.0)
    if duration == 0:
        raise TraceError("field 'duration': 0 seconds; a cell must run for some time")
    gpus_value = record["gpus"]
    try:
        gpus = int(str(gpus_value).strip())
    except ValueError:
        raise TraceError(f"field 'gpus': {gpus_value!r} is not a whole number of GPUs") from None
    if not 0 <= gpus <= MAX_GPU_COUNT:
        raise TraceError(f"field 'gpus': {gpus} is outside 0..{MAX_GPU_COUNT}")
    type_text = str(record["gpu_type"]).strip()
    try:
        choices = parse_gpu_spec(type_text)
    except SpecError as exc:
        raise TraceError(f"field 'gpu_type': {exc}") from None
    if len(choices) != 1 or choices[0].count != 1 or ":" in type_text:
        raise TraceError(f"field 'gpu_type': {type_text!r} must be one type name such as 'a100' "
                         "(the count goes in 'gpus')")
    session = str(record.get("session") or "").strip()
    if gpus == 0:
        return user, session, None
    return user, session, Cell(start, duration, (GpuChoice(choices[0].gpu_type, gpus),))


def _number(record: dict[str, Any], field: str, unit: str, minimum: float) -> float:
    value = record[field]
    try:
        number = float(str(value).strip())
    except ValueError:
        raise TraceError(f"field {field!r}: {value!r} is not a number of {unit}") from None
    if not math.isfinite(number) or number < minimum:
        raise TraceError(f"field {field!r}: {value!r} must be a finite number >= {minimum:g} ({unit})")
    return number


def _split_at_breaks(cells: list[Cell]) -> Iterator[list[Cell]]:
    run = [cells[0]]
    end = cells[0].start + cells[0].duration
    for cell in cells[1:]:
        if cell.start - end > SESSION_BREAK_S:
            yield run
            run = []
        run.append(cell)
        end = max(end, cell.start + cell.duration)
    yield run


def _raise_if(path: Path, errors: list[str]) -> None:
    if errors:
        more = " (and more; fix these first)" if len(errors) > MAX_LISTED_ERRORS else ""
        listed = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        raise TraceError(f"{path}: {len(errors[:MAX_LISTED_ERRORS])} bad record(s){more}:\n  {listed}")
