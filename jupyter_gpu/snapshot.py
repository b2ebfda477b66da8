"""A kernel's user variables saved to one file when its GPU is released, and loaded into
the notebook's next GPU kernel (any type).

Variables are pickled one by one (so one that cannot be saved is named, and the rest are
kept) but with one shared memo, so objects they share stay shared: an optimizer still
holds the very parameters of its model after a restore. Array data leaves the pickle as
out-of-band buffers written straight from memory into the file, and comes back as views
of the mapped file: no copy on either side beyond the one to or from the page cache.
CUDA tensors are copied to host memory as they are pickled; their device is recorded and
they go back to this kernel's GPU when it has one (else they stay on the CPU).
"""

from __future__ import annotations

import importlib
import io
import json
import mmap
import os
import pickle
import sys
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import serialize
from .snapshot_format import FORMAT, SnapshotFormatError, padding, prefix, read_header

#: Names a shell binds for itself, never the user's state.
_SHELL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit"})


def user_variables(ns: dict[str, Any], hidden: Iterable[str] = ()) -> dict[str, Any]:
    """The user's own names: not ``_``-prefixed (IPython's ``_i3``, ``_``, the helper's
    ``__jupyter_gpu_...``), not the shell's hidden start-up names."""
    skip = _SHELL_NAMES | set(hidden)
    return {name: value for name, value in ns.items() if not name.startswith("_") and name not in skip}


# --- tensors keep their device ----------------------------------------------------------

#: Where the tensors of the restore in progress went (device string -> count).
_placed: dict[str, int] = {}


def _device_here(device: str) -> str:
    """The device on this kernel for a tensor that was on ``device``: the same CUDA index
    where this kernel has it, else its first GPU, else the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    return f"cuda:{index if index < torch.cuda.device_count() else 0}"


def _tensor_on_device(data: Any, requires_grad: bool, device: str, parameter: bool) -> Any:
    """Rebuild a tensor saved from ``device``: from a numpy array (out-of-band) or a CPU tensor."""
    import torch

    tensor = torch.from_numpy(data) if not isinstance(data, torch.Tensor) else data
    target = _device_here(device)
    _placed[target] = _placed.get(target, 0) + 1
    if target != "cpu":
        tensor = tensor.to(target)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


class _SnapshotPickler(serialize._Pickler):
    """The transfer pickler, except that a CUDA tensor remembers its device."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, io.IOBase) and not isinstance(obj, io.BytesIO | io.StringIO):
            # cloudpickle would save a file open for reading as its contents, which a restore
            # turns into an in-memory copy at position 0: not the file the notebook had open.
            raise TypeError(f"an open file ({type(obj).__name__}) cannot outlive its kernel; open it again")
        torch = sys.modules.get("torch")
        if (torch is not None and isinstance(obj, torch.Tensor) and obj.layout == torch.strided and obj.is_cuda
                and type(obj) in (torch.Tensor, torch.nn.Parameter)):
            cpu = obj.detach().to("cpu")
            try:
                data: Any = cpu.numpy()
            except (TypeError, RuntimeError):  # bfloat16 and friends: the CPU tensor, in-band
                data = cpu
            return _tensor_on_device, (data, bool(obj.requires_grad), str(obj.device),
                                       isinstance(obj, torch.nn.Parameter))
        return super().reducer_override(obj)


# --- saving -----------------------------------------------------------------------------


@dataclass
class Captured:
    """Variables pickled for a snapshot: what the file will hold, still in memory."""

    variables: list[dict[str, Any]]
    unsaved: dict[str, str]
    stream: io.BytesIO
    buffers: list[memoryview]

    @property
    def nbytes(self) -> int:
        return len(self.stream.getbuffer()) + sum(len(b) for b in self.buffers)


def _why_not(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def capture(variables: dict[str, Any]) -> Captured:
    """Pickle each variable (modules by name); those that raise are named in ``unsaved``."""
    stream = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    # The memo goes from each pickler to the next as the memo proxy of the last one that
    # succeeded (a failed dump's additions are dropped with it); each variable records the
    # memo indices its own pickle adds, so a restore can tell which later ones need it.
    memo: Any = {}
    memo_size = 0
    globals_ref: dict[int, Any] = {}  # cloudpickle's: functions sharing globals keep sharing them
    entries: list[dict[str, Any]] = []
    unsaved: dict[str, str] = {}
    for name, value in variables.items():
        if isinstance(value, types.ModuleType):
            entries.append({"name": name, "kind": "module", "module": value.__name__})
            continue
        start, first = stream.tell(), len(buffers)
        pickler = _SnapshotPickler(stream, protocol=serialize.PROTOCOL, buffer_callback=buffers.append)
        pickler.memo = memo
        pickler.globals_ref = globals_ref
        try:
            pickler.dump(value)
        except Exception as exc:  # open files, sockets, generators, locks, CUDA streams, ...
            stream.seek(start)
            stream.truncate()
            del buffers[first:]
            unsaved[name] = _why_not(exc)
            continue
        memo = pickler.memo
        grown = len(memo.copy())
        kind = type(value)
        entries.append({"name": name, "kind": "pickle", "start": start, "end": stream.tell(),
                        "buffers": [first, len(buffers)], "memo": [memo_size, grown],
                        "type": f"{kind.__module__}.{kind.__qualname__}"})
        memo_size = grown
    return Captured(entries, unsaved, stream, [b.raw() for b in buffers])


def write(path: str, captured: Captured) -> int:
    """Write the snapshot file (a new file: never overwrites); returns its data size."""
    with captured.stream.getbuffer() as stream:
        return _write(path, captured, stream)


def _write(path: str, captured: Captured, stream: memoryview) -> int:
    layout: list[list[int]] = []
    position = len(stream)
    for buffer in captured.buffers:
        position += padding(position)
        layout.append([position, len(buffer)])
        position += len(buffer)
    header = {"format": FORMAT, "created": time.time(), "variables": captured.variables,
              "unsaved": captured.unsaved, "pickle_bytes": len(stream), "buffers": layout, "data_bytes": position}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb", buffering=0) as file:
        head = prefix(json.dumps(header).encode())
        file.write(head)
        file.write(stream)
        written = len(stream)
        for (offset, _), buffer in zip(layout, captured.buffers, strict=True):
            if offset > written:
                file.write(b"\0" * (offset - written))
            view = memoryview(buffer).cast("B")
            while view:  # an unbuffered write may be short
                done = file.write(view)
                view = view[done or 0 :]
            written = offset + len(buffer)
    return position


class SnapshotTooLarge(ValueError):
    """More to keep than the place the snapshot goes to has room for."""


def save(path: str, ns: dict[str, Any], hidden: Iterable[str] = (), max_bytes: int | None = None) -> dict[str, Any]:
    """Snapshot the user's variables in ``ns`` to ``path``; returns what was kept and not.

    ``max_bytes``: refuse, before writing anything, a snapshot larger than this.
    """
    captured = capture(user_variables(ns, hidden))
    if max_bytes is not None and captured.nbytes > max_bytes:
        raise SnapshotTooLarge(f"{captured.nbytes / 1e9:.2f} GB of variables to keep, but only "
                               f"{max_bytes / 1e9:.2f} GB free where the snapshot is written")
    nbytes = write(path, captured)
    return {"names": [v["name"] for v in captured.variables], "unsaved": captured.unsaved, "nbytes": nbytes}


# --- restoring --------------------------------------------------------------------------


@dataclass
class Restored:
    """What a restore put back, and what it could not."""

    names: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unsaved: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0
    created: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)


_GAP = object()


class _Memo(dict[int, Any]):
    """An unpickler memo where the entries of a variable that failed to load are gaps."""

    def __getitem__(self, index: int) -> Any:
        value = super().__getitem__(index)
        if value is _GAP:
            raise KeyError(index)
        return value


def _map(path: str) -> mmap.mmap:
    """The file, mapped privately: arrays rebuilt on it are writable, and their writes stay
    in this process (copied on write), never reaching the file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def load(path: str, ns: dict[str, Any]) -> Restored:
    """Bind the snapshot's variables into ``ns``; one that fails is named, the others load."""
    began = time.perf_counter()
    header, offset = read_header(path)
    mapping = _map(path)
    data = memoryview(mapping)[offset:]
    pickle_bytes = int(header["pickle_bytes"])
    layout = header.get("buffers", [])
    if pickle_bytes > len(data) or any(o < pickle_bytes or o + n > len(data) for o, n in layout):
        raise SnapshotFormatError(f"{path}: its header points outside the file")
    stream = data[:pickle_bytes]
    report = Restored(unsaved=dict(header.get("unsaved", {})), nbytes=int(header.get("data_bytes", 0)),
                      created=float(header.get("created", 0.0)))
    # Python's own unpickler, not the C one: its memo is a plain dict that carries over from
    # one variable to the next (the C Unpickler's memo setter loses the count MEMOIZE needs).
    # The pickle streams are small: array data is out-of-band.
    memo = _Memo()
    _placed.clear()
    for entry in header.get("variables", []):
        name = str(entry["name"])
        try:
            if entry["kind"] == "module":
                ns[name] = importlib.import_module(entry["module"])
            else:
                first, last = entry["buffers"]
                views = [data[o : o + n] for o, n in layout[first:last]]
                unpickler = pickle._Unpickler(io.BytesIO(stream[entry["start"] : entry["end"]]), buffers=views)
                unpickler.memo = memo  # type: ignore[attr-defined]
                ns[name] = unpickler.load()
        except Exception as exc:  # a package this kernel lacks, a class that changed, ...
            report.failed[name] = _why_not(exc)
            if entry["kind"] != "module":
                # Its memo entries are gaps: a later variable that shares an object with
                # it fails too (a KeyError) instead of getting something else.
                for index in range(*entry["memo"]):
                    memo[index] = _GAP
            continue
        report.names.append(name)
    report.devices = dict(_placed)
    report.seconds = time.perf_counter() - began
    return report


def describe(report: Restored, now: float | None = None) -> str:
    """The one line a notebook shows about a restore."""
    now = time.time() if now is None else now
    age = max(0.0, now - report.created)
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    names = ", ".join(report.names[:12]) + (f" and {len(report.names) - 12} more" if len(report.names) > 12 else "")
    line = (f"jupyter-gpu: restored {len(report.names)} variable{'' if len(report.names) == 1 else 's'} kept at "
            f"the last release ({ago} ago): {names or 'none'}; {_size(report.nbytes)} in {report.seconds:.2f} s")
    gpu = sum(n for device, n in report.devices.items() if device != "cpu")
    if report.devices.get("cpu"):
        line += f"; {report.devices['cpu']} GPU tensor(s) are on the CPU (this kernel has no GPU)"
    elif gpu:
        line += f"; {gpu} tensor(s) back on the GPU"
    lost = {**report.unsaved, **report.failed}
    if lost:
        line += "; not restored: " + ", ".join(f"{name} ({why})" for name, why in sorted(lost.items()))
    return line


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
