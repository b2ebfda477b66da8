"""Whether real GPUs did any work since the last look, through NVML (nvidia-ml-py).

NVML keeps a buffer of utilization samples per GPU (several a second). Reading the samples
taken since the previous look (``nvmlDeviceGetSamples``) sees a burst of work between two
looks that one reading of the utilization at the moment of the look would miss; where a
driver keeps no samples, that instant reading stands in. NVML stays open between looks (a
look is then a few calls per GPU), and a machine without NVML simply reports nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .inventory import _close_nvml, _open_nvml

log = logging.getLogger(__name__)


class GpuUseSampler:
    def __init__(self) -> None:
        self._nvml: Any = None
        self._unavailable: str | None = None
        #: NVML index -> timestamp (microseconds) of the newest sample seen
        self._seen: dict[int, int] = {}

    def used(self, indices: Iterable[int]) -> set[int]:
        """The GPUs among ``indices`` that showed any utilization since the last look (on the
        first look: in NVML's buffer). Blocking: the service calls it in a worker thread."""
        nvml = self._open()
        if nvml is None:
            return set()
        busy = set()
        for index in indices:
            try:
                if self._worked(nvml, index):
                    busy.add(index)
            except nvml.NVMLError as exc:  # a lost GPU must not blind the look at the others
                log.debug("no utilization for GPU %s: %s", index, exc)
        return busy

    def close(self) -> None:
        if self._nvml is not None:
            _close_nvml(self._nvml)
            self._nvml = None

    def _open(self) -> Any:
        if self._nvml is None and self._unavailable is None:
            self._nvml, self._unavailable = _open_nvml()
            if self._unavailable:
                log.warning("GPU idleness cannot read GPU utilization (%s): a running cell alone keeps a lease "
                            "from ending for GPU idleness", self._unavailable)
        return self._nvml

    def _worked(self, nvml: Any, index: int) -> bool:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            _, samples = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, self._seen.get(index, 0))
        except (nvml.NVMLError_NotFound, nvml.NVMLError_NoData):
            return False  # no sample since the last look: nothing ran long enough to be sampled
        except nvml.NVMLError_NotSupported:
            return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) > 0
        if samples:
            self._seen[index] = max(int(sample.timeStamp) for sample in samples)
        return any(int(sample.sampleValue.uiVal) > 0 for sample in samples)
