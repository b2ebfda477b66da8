"""GPU idleness's NVML reading, against a stand-in for the driver (no GPU here; the real
calls are checked on a GPU machine by scripts/gpu-check-snapshot.py): samples since the last
look count, a look with no new sample is no use, and a driver without samples falls back to
the utilization of the moment."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pool_manager import gpu_use
from pool_manager.gpu_use import GpuUseSampler


class FakeNvml:
    NVML_GPU_UTILIZATION_SAMPLES = 1

    class NVMLError(Exception): ...

    class NVMLError_NotFound(NVMLError): ...

    class NVMLError_NoData(NVMLError): ...

    class NVMLError_NotSupported(NVMLError): ...

    def __init__(self) -> None:
        self.samples: dict[int, list[tuple[int, int]]] = {}  # index -> (timestamp, utilization %)
        self.no_samples: set[int] = set()
        self.instant: dict[int, int] = {}
        self.asked_since: list[int] = []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index not in self.samples and index not in self.no_samples:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetSamples(self, handle: int, kind: int, since: int) -> tuple[int, list[Any]]:
        if handle in self.no_samples:
            raise self.NVMLError_NotSupported()
        self.asked_since.append(since)
        new = [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=u)) for t, u in self.samples[handle]
               if t > since]
        if not new:
            raise self.NVMLError_NotFound()
        return 1, new

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self.instant.get(handle, 0))

    def nvmlShutdown(self) -> None: ...


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setattr(gpu_use, "_open_nvml", lambda: (fake, None))
    return fake


def test_only_samples_since_the_last_look_count(nvml: FakeNvml) -> None:
    nvml.samples = {0: [(10, 0), (20, 35), (30, 0)], 1: [(10, 0), (20, 0)]}
    sampler = GpuUseSampler()
    assert sampler.used([0, 1]) == {0}
    assert sampler.used([0, 1]) == set()  # nothing new since: no use, not an error
    nvml.samples[1].append((40, 5))  # a short burst between two looks is seen
    assert sampler.used([0, 1]) == {1}
    assert nvml.asked_since[-2:] == [30, 20]


def test_a_lost_gpu_does_not_blind_the_others_and_no_samples_falls_back(nvml: FakeNvml) -> None:
    nvml.samples = {0: [(10, 80)]}
    nvml.no_samples = {2}
    nvml.instant = {2: 40}
    assert GpuUseSampler().used([0, 1, 2]) == {0, 2}


def test_no_nvml_reads_as_no_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_use, "_open_nvml", lambda: (None, "nvidia-ml-py (pynvml) is not installed"))
    assert GpuUseSampler().used([0]) == set()
