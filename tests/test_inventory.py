"""Inventory: GPU name normalisation, declared inventories, NVML discovery and its absence."""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import pytest

from jupyter_gpu.protocol import type_matches
from pool_manager.inventory import (
    build_inventory,
    cpu_devices,
    declared_devices,
    discover_nvml,
    gpu_status,
    normalize_gpu_name,
    parse_declared_inventory,
)
from pool_manager.model import Device

# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H100 NVL", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A10G", "a10g"),
        ("Tesla V100-SXM2-16GB", "v100-16gb"),
        ("Tesla T4", "t4"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA RTX A6000", "rtxa6000"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx6000ada"),
        ("Quadro RTX 8000", "rtx8000"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GH200 480GB", "gh200-480gb"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "a100-40gb"),
        ("NVIDIA", "gpu"),
    ],
)
def test_normalize_gpu_name(name: str, expected: str) -> None:
    assert normalize_gpu_name(name) == expected


def test_normalized_type_is_matched_by_bare_model() -> None:
    assert type_matches("a100", normalize_gpu_name("NVIDIA A100-SXM4-80GB"))
    assert type_matches("h100", normalize_gpu_name("NVIDIA H100 80GB HBM3"))


# --- declared inventory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a100=2,h100=1", [("a100", 2), ("h100", 1)]),
        (" a100 = 2 , h100=1 ", [("a100", 2), ("h100", 1)]),
        ("a100-80gb=4", [("a100-80gb", 4)]),
        ("A100=1,", [("a100", 1)]),
    ],
)
def test_parse_declared_inventory(text: str, expected: list[tuple[str, int]]) -> None:
    assert parse_declared_inventory(text) == expected


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("a100", "'a100'"),
        ("a100=2,h100", "'h100'"),
        ("a100=x", "'x'"),
        ("=2", "'=2'"),
        ("a100=-1", "'-1'"),
        ("a100=0", "'0'"),
        ("cpu=2", "'cpu'"),
        ("any=1", "'any'"),
        ("a 100=1", "'a 100'"),
        ("a100=1,a100=2", "'a100'"),
        ("", "''"),
    ],
)
def test_parse_declared_inventory_errors_name_the_part(text: str, bad_part: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_declared_inventory(text)
    message = str(info.value)
    assert bad_part in message
    if "twice" not in message:
        assert "TYPE=COUNT" in message


def test_reserved_cpu_type_says_why() -> None:
    with pytest.raises(ValueError, match="reserved"):
        parse_declared_inventory("cpu=2")


def test_declared_devices_are_emulated_and_indexed_in_order() -> None:
    devices = declared_devices([("a100", 2), ("h100", 1), ("mystery", 1)])
    assert [(d.key, d.gpu_type, d.index) for d in devices] == [
        ("local/gpu0", "a100", 0),
        ("local/gpu1", "a100", 1),
        ("local/gpu2", "h100", 2),
        ("local/gpu3", "mystery", 3),
    ]
    assert all(d.emulated and d.healthy and d.node == "local" for d in devices)
    assert devices[0].name == "emulated a100"
    assert [d.memory_mb for d in devices] == [40960, 40960, 81920, 0]


def test_declared_memory_from_size_suffix_and_overrides() -> None:
    devices = declared_devices([("a100-80gb", 1), ("v100-32gb", 1), ("l4", 1)], memory_mb={"l4": 24000})
    assert [d.memory_mb for d in devices] == [81920, 32768, 24000]


def test_cpu_devices() -> None:
    assert cpu_devices(2) == [
        Device(key="local/cpu0", gpu_type="cpu", index=None, name="CPU kernel"),
        Device(key="local/cpu1", gpu_type="cpu", index=None, name="CPU kernel"),
    ]
    assert cpu_devices(0) == []
    with pytest.raises(ValueError, match="-1"):
        cpu_devices(-1)


# --- this machine: no GPU, no NVIDIA driver ---------------------------------------------


def test_discover_nvml_without_gpu_returns_reason() -> None:
    devices, reason = discover_nvml()
    assert devices == []
    assert reason and "\n" not in reason


def test_gpu_status_without_nvml_is_empty() -> None:
    assert gpu_status([0, 1]) == {}


def test_build_inventory_without_gpu_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.inventory")
    with caplog.at_level(logging.DEBUG, logger="test.inventory"):
        devices = build_inventory(None, 2, log)
    assert [d.gpu_type for d in devices] == ["cpu", "cpu"]
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("no NVIDIA GPU found (")
    assert "NVML" in record.getMessage() or "pynvml" in record.getMessage()


def test_build_inventory_without_gpu_or_cpu_warns(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.inventory")
    with caplog.at_level(logging.DEBUG, logger="test.inventory"):
        assert build_inventory("", 0, log) == []
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_build_inventory_declared_then_cpu(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.inventory")
    with caplog.at_level(logging.DEBUG, logger="test.inventory"):
        devices = build_inventory("a100=2,h100=1", 1, log)
    assert [(d.gpu_type, d.emulated) for d in devices] == [
        ("a100", True),
        ("a100", True),
        ("h100", True),
        ("cpu", False),
    ]
    assert "a100 x2, h100 x1" in caplog.text


def test_build_inventory_bad_declared_raises() -> None:
    with pytest.raises(ValueError, match="a100=x"):
        build_inventory("a100=x", 1, logging.getLogger("test.inventory"))


# --- successful discovery, with a fake pynvml ----------------------------------------------
# This machine has no GPU and no NVIDIA driver, so the real NVML can only fail here; the path
# where it finds GPUs is outside our control and is exercised with a stand-in module.


class _FakeNVMLError(Exception):
    pass


class NVMLError_GpuIsLost(_FakeNVMLError):  # named like pynvml's generated classes
    def __str__(self) -> str:
        return "GPU is lost"


def _fake_pynvml(gpus: list[tuple[Any, int]], lost: tuple[int, ...] = ()) -> types.ModuleType:
    """A pynvml stand-in with ``gpus`` as (name, total bytes); indices in ``lost`` fail every query."""
    calls: list[str] = []
    fake = types.ModuleType("pynvml")

    def check(index: int) -> None:
        if index in lost:
            raise NVMLError_GpuIsLost()

    def get_name(handle: int) -> Any:
        check(handle)
        return gpus[handle][0]

    def get_memory(handle: int) -> types.SimpleNamespace:
        check(handle)
        total = gpus[handle][1]
        return types.SimpleNamespace(total=total, used=total // 4, free=total - total // 4)

    fake.NVMLError = _FakeNVMLError  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = get_name  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = get_memory  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=37, memory=5)  # type: ignore[attr-defined]
    fake.calls = calls  # type: ignore[attr-defined]
    return fake


GIB = 1024**3


def test_discover_nvml_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([(b"NVIDIA A100-SXM4-80GB", 80 * GIB), ("NVIDIA H100 PCIe", 80 * GIB), ("Tesla T4", 15 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    devices, reason = discover_nvml()
    assert reason is None
    assert devices == [
        Device(key="local/gpu0", gpu_type="a100-80gb", index=0, name="NVIDIA A100-SXM4-80GB", memory_mb=81920),
        Device(key="local/gpu1", gpu_type="h100", index=1, name="NVIDIA H100 PCIe", memory_mb=81920),
        Device(key="local/gpu2", gpu_type="t4", index=2, name="Tesla T4", memory_mb=15360),
    ]
    assert fake.calls == ["init", "shutdown"]


def test_discover_nvml_marks_unreadable_gpu_unhealthy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _fake_pynvml([("NVIDIA L4", 22 * GIB), ("NVIDIA L4", 22 * GIB)], lost=(1,))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    log = logging.getLogger("test.inventory")
    with caplog.at_level(logging.DEBUG, logger="test.inventory"):
        devices = build_inventory(None, 1, log)
    assert [(d.key, d.healthy) for d in devices] == [("local/gpu0", True), ("local/gpu1", False), ("local/cpu0", True)]
    assert devices[1].index == 1 and "GPU is lost" in devices[1].name
    assert fake.calls == ["init", "shutdown"]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


def test_discover_nvml_init_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([])

    def fail() -> None:
        raise NVMLError_GpuIsLost()

    fake.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert discover_nvml() == ([], "NVML init failed: NVMLError_GpuIsLost: GPU is lost")


def test_discover_nvml_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert discover_nvml() == ([], "NVML: no devices")
    assert fake.calls == ["init", "shutdown"]


def test_gpu_status_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([("NVIDIA A10G", 24 * GIB), ("NVIDIA A10G", 24 * GIB)], lost=(1,))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_status([0, 1]) == {0: {"utilization": 37, "memory_used_mb": 6144, "memory_total_mb": 24576}}
    assert fake.calls == ["init", "shutdown"]


def test_discover_nvml_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` raise ImportError
    assert discover_nvml() == ([], "nvidia-ml-py (pynvml) is not installed")
