"""Snapshot files of a kernel's variables: saved in one process, loaded in a fresh namespace."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from jupyter_gpu import snapshot
from jupyter_gpu.kernel_snapshot import KernelSnapshots
from jupyter_gpu.snapshot_format import SnapshotFormatError, read_header, summary


class Point:  # stands for a notebook-defined class; the subprocess test defines one in __main__
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y


def test_arrays_tensors_dicts_and_shared_objects_come_back(tmp_path: Path) -> None:
    big = np.arange(3_000_000, dtype=np.float32)
    model = torch.nn.Linear(64, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ns: dict[str, Any] = {
        "big": big, "alias": big, "t": torch.arange(10, dtype=torch.float64),
        "weights": {"a": np.ones((100, 100)), "b": np.zeros(7, dtype=np.int16)},
        "model": model, "optimizer": optimizer, "np": np, "n": 42,
        "_hidden": 1, "In": [], "startup": "warm-up value",
    }
    path = str(tmp_path / "snap")
    kept = snapshot.save(path, ns, hidden=["startup"])
    assert set(kept["names"]) == {"big", "alias", "t", "weights", "model", "optimizer", "np", "n"}
    assert kept["unsaved"] == {}
    header, _ = read_header(path)
    # the arrays went out-of-band: the pickle stream is small, the file holds the 12 MB raw
    assert header["pickle_bytes"] < 100_000 and os.path.getsize(path) >= big.nbytes

    fresh: dict[str, Any] = {}
    report = snapshot.load(path, fresh)
    assert report.failed == {} and set(report.names) == set(kept["names"])
    np.testing.assert_array_equal(fresh["big"], big)
    assert fresh["alias"] is fresh["big"]  # shared between variables: still one object
    assert fresh["big"].flags.writeable  # mapped privately: writable, and writes stay here
    fresh["big"][0] = -1
    assert snapshot.load(path, {}).names  # the file itself is unchanged by that write
    assert np.asarray(read_array(path, "big"))[0] == 0
    assert torch.equal(fresh["t"], torch.arange(10, dtype=torch.float64))
    np.testing.assert_array_equal(fresh["weights"]["a"], np.ones((100, 100)))
    assert fresh["weights"]["b"].dtype == np.int16
    assert fresh["np"] is np and fresh["n"] == 42
    assert torch.equal(fresh["model"].weight, model.weight)
    # the optimizer still drives the restored model's own parameters
    assert fresh["optimizer"].param_groups[0]["params"][0] is fresh["model"].weight


def read_array(path: str, name: str) -> Any:
    ns: dict[str, Any] = {}
    snapshot.load(path, ns)
    return ns[name]


def test_unsavable_variables_are_named_and_the_rest_kept(tmp_path: Path) -> None:
    handle = open(tmp_path / "log.txt", "w")
    sock = socket.socket()
    try:
        shared = np.arange(5)
        ns = {"f": handle, "s": sock, "gen": (i for i in range(3)), "first": shared,
              "pair": (shared, "x"), "p": Point(1.0, 2.0)}
        path = str(tmp_path / "snap")
        kept = snapshot.save(path, ns)
    finally:
        handle.close()
        sock.close()
    assert set(kept["unsaved"]) == {"f", "s", "gen"}
    assert "open file (TextIOWrapper)" in kept["unsaved"]["f"] and "generator" in kept["unsaved"]["gen"]
    fresh: dict[str, Any] = {}
    report = snapshot.load(path, fresh)
    # a failed dump in between left nothing behind: later variables share memo with earlier ones
    assert fresh["pair"][0] is fresh["first"] and fresh["p"].y == 2.0
    assert set(report.unsaved) == {"f", "s", "gen"}
    line = snapshot.describe(report)
    assert "restored 3 variables" in line and "not restored: f (TypeError" in line and "gen (" in line


def test_notebook_class_from_main_and_a_missing_module(tmp_path: Path) -> None:
    """A class defined in a notebook (``__main__``) is saved by value and loads in another
    process; a variable whose package is gone is named, the others still load."""
    path = tmp_path / "snap"
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "vanishing.py").write_text("class Thing:\n    value = 7\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(module_dir)!r})
        import numpy as np, vanishing
        from jupyter_gpu import snapshot
        class Particle:
            def __init__(self, mass): self.mass = mass
            def energy(self): return self.mass * 9
        p = Particle(np.float64(2.0))
        thing = vanishing.Thing()
        data = {{"w": np.full(1000, 3.0)}}
        both = (thing, data)
        print(snapshot.save({str(path)!r}, dict(p=p, thing=thing, data=data, both=both)))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, env=child_env())
    fresh: dict[str, Any] = {}
    report = snapshot.load(str(path), fresh)
    assert fresh["p"].energy() == 18.0 and type(fresh["p"]).__name__ == "Particle"
    assert fresh["data"]["w"].sum() == 3000.0
    assert "vanishing" in report.failed["thing"]
    # what shares an object with the variable that failed fails with it; the rest loads
    assert report.failed.keys() == {"thing", "both"} and report.names == ["p", "data"]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}


def test_cuda_device_is_recorded_and_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor saved from cuda:1 comes back on this kernel's GPU, or on the CPU without one
    (the GPU path itself runs in scripts/gpu-check-snapshot.py on a machine with CUDA)."""
    array = np.arange(6, dtype=np.float32)
    assert snapshot._device_here("cuda:1") == "cpu"  # no CUDA on this machine
    snapshot._placed.clear()
    tensor = snapshot._tensor_on_device(array, True, "cuda:1", False)
    assert tensor.requires_grad and tensor.device.type == "cpu"
    param = snapshot._tensor_on_device(torch.ones(2, dtype=torch.bfloat16), True, "cuda:0", True)
    assert isinstance(param, torch.nn.Parameter) and param.dtype == torch.bfloat16
    assert snapshot._placed == {"cpu": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert snapshot._device_here("cuda:1") == "cuda:0" and snapshot._device_here("cuda:0") == "cuda:0"
    assert snapshot._device_here("cpu") == "cpu"


def test_a_file_cut_short_or_foreign_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "snap")
    snapshot.save(path, {"x": np.ones(100_000)})
    header, _ = read_header(path)
    assert summary(header)["names"] == ["x"] and summary(header)["nbytes"] == header["data_bytes"]
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 10)
    with pytest.raises(SnapshotFormatError, match="header needs"):
        snapshot.load(path, {})
    (tmp_path / "other").write_bytes(b"not a snapshot at all")
    with pytest.raises(SnapshotFormatError, match="not a jupyter-gpu snapshot"):
        read_header(str(tmp_path / "other"))


def test_empty_namespace_makes_a_tiny_snapshot(tmp_path: Path) -> None:
    path = str(tmp_path / "snap")
    kept = snapshot.save(path, {"_": 1, "In": []})
    assert kept == {"names": [], "unsaved": {}, "nbytes": 0}
    assert snapshot.load(path, {}).names == []


def test_capture_writes_buffers_without_copying_them_into_the_stream() -> None:
    big = np.ones(1_000_000)
    captured = snapshot.capture({"big": big})
    assert len(captured.buffers) == 1 and np.shares_memory(np.frombuffer(captured.buffers[0]), big)
    assert isinstance(captured.stream, io.BytesIO) and len(captured.stream.getbuffer()) < 1000


def test_a_snapshot_larger_than_the_room_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    with pytest.raises(snapshot.SnapshotTooLarge, match=r"0\.01 GB of variables to keep, but only 0\.00 GB free"):
        snapshot.save(str(path), {"x": np.ones(1_000_000)}, max_bytes=1_000_000)
    assert not path.exists()


def test_a_kernel_on_another_machine_than_its_gateway_measures_its_own_room(tmp_path: Path) -> None:
    # The gateway cannot see a Ray node's staging area: it asks the kernel to leave room there.
    shell = SimpleNamespace(user_ns={"x": np.ones(1_000_000)}, user_ns_hidden={})
    kernel = KernelSnapshots(shell, str(tmp_path))
    room = os.statvfs(tmp_path)
    everything_but_a_kilobyte = room.f_bavail * room.f_frsize - 1000
    with pytest.raises(snapshot.SnapshotTooLarge, match="GB of variables to keep"):
        kernel.save("0" * 32, 10**15, leave_free=everything_but_a_kilobyte)
    assert os.listdir(tmp_path / "snapshot") == []
    kernel.save("1" * 32, 10**15, leave_free=0)
    assert read_header(str(tmp_path / "snapshot" / ("1" * 32)))[0]["variables"]
