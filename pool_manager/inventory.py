"""What this machine can offer: real GPUs found through NVML, declared (emulated) GPUs, CPU slots.

A machine without an NVIDIA GPU or driver must still serve, so discovery never raises: it says
why it found nothing and the pool goes on with declared or CPU devices. ``pynvml`` (package
nvidia-ml-py) is imported lazily so this module loads where it is not installed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from typing import Any, TypedDict

from jupyter_gpu.protocol import ANY_TYPE, CPU_TYPE

from .model import Device

_MB = 1024 * 1024

# --- names -----------------------------------------------------------------------------

#: Brand words that say nothing about which GPU it is.
_VENDOR_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "gpu", "generation"})
#: Form factor, interconnect and memory technology: the same chip in another package.
_FORM_FACTOR_RE = re.compile(r"^(sxm\d*|pcie|nvl|nvlink|hbm\d*e?|dgxs?)$")
_MEMORY_RE = re.compile(r"^(\d+)gb$")
_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
#: Used when nothing of a name is left, so a real GPU is still listed under some type.
UNKNOWN_TYPE = "gpu"


def normalize_gpu_name(name: str) -> str:
    """Turn an NVML product name into the short type users ask for (``NVIDIA A100-SXM4-80GB`` -> ``a100-80gb``).

    Rule: lower-case, split on spaces, ``-``, ``_`` and ``/``; drop brand words (NVIDIA, Tesla,
    GeForce, Quadro, GPU, Generation) and form-factor words (SXM*, PCIe, NVL, NVLink, HBM*,
    DGX*); stop at ``MIG`` (what follows is a MIG profile); join the remaining model tokens
    without separators (``RTX 4090`` -> ``rtx4090``) and append ``-<N>gb`` from the first
    ``<N>GB`` token. The model comes first so that a request for ``a100`` matches ``a100-80gb``
    (:func:`jupyter_gpu.protocol.type_matches`).

    Only the name is used, never the reported memory: NVML reports less than the nominal size
    (81559 MiB on an 80 GB card), so a suffix derived from it would be a guess, and a type
    without a suffix is still matched by a request for the bare model.
    """
    model: list[str] = []
    memory: str | None = None
    for token in re.split(r"[\s\-_/]+", name.lower()):
        if token == "mig":
            break
        if not token or token in _VENDOR_WORDS or _FORM_FACTOR_RE.match(token):
            continue
        size = _MEMORY_RE.match(token)
        if size:
            memory = memory or f"{int(size.group(1))}gb"
            continue
        model.append(re.sub(r"[^a-z0-9.]", "", token))
    base = "".join(model).lstrip(".") or UNKNOWN_TYPE
    return f"{base}-{memory}" if memory else base


# --- declared (emulated) inventory -------------------------------------------------------

#: Nominal memory of emulated devices, so listings look like the real thing.
KNOWN_MEMORY_MB = {
    "a100": 40960,
    "a100-80gb": 81920,
    "h100": 81920,
    "h200": 143360,
    "a10g": 24576,
    "l4": 23034,
    "t4": 15360,
    "v100": 16384,
}

_DECLARED_FORM = "TYPE=COUNT[,TYPE=COUNT...], e.g. 'a100=2,h100=1'"


def parse_declared_inventory(text: str) -> list[tuple[str, int]]:
    """Parse ``a100=2,h100=1`` into ``[("a100", 2), ("h100", 1)]``, in the order given.

    Strict, because a typo here silently changes what a whole pool offers: every error names
    the bad part and the expected form. ``cpu`` and ``any`` are reserved (CPU slots are
    configured on their own; ``any`` is the request wildcard).
    """
    spec: list[tuple[str, int]] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue  # tolerate a trailing comma
        name, sep, count_text = (piece.strip() for piece in part.partition("="))
        name = name.lower()
        if not sep or not name:
            raise ValueError(f"bad declared inventory part {part!r} in {text!r}: expected {_DECLARED_FORM}")
        if not _TYPE_RE.match(name):
            raise ValueError(
                f"bad GPU type {name!r} in declared inventory {text!r}: use lower-case letters, digits and '-' "
                f"(expected {_DECLARED_FORM})"
            )
        if name in (CPU_TYPE, ANY_TYPE):
            raise ValueError(
                f"GPU type {name!r} in declared inventory {text!r} is reserved: "
                f"declare GPU types only (expected {_DECLARED_FORM})"
            )
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(
                f"bad count {count_text!r} for {name!r} in declared inventory {text!r}: "
                f"use a whole number of 1 or more (expected {_DECLARED_FORM})"
            )
        if any(name == seen for seen, _ in spec):
            raise ValueError(f"GPU type {name!r} is declared twice in {text!r}: give each type once")
        spec.append((name, int(count_text)))
    if not spec:
        raise ValueError(f"empty declared inventory {text!r}: expected {_DECLARED_FORM}")
    return spec


def _nominal_memory_mb(gpu_type: str) -> int:
    """Memory for an emulated type: its ``-<N>gb`` suffix, else the known table, else 0 (unknown)."""
    size = re.search(r"-(\d+)gb$", gpu_type)
    if size:
        return int(size.group(1)) * 1024
    return KNOWN_MEMORY_MB.get(gpu_type, 0)


def declared_devices(spec: list[tuple[str, int]], memory_mb: dict[str, int] | None = None) -> list[Device]:
    """Emulated GPUs for a declared inventory, indexed 0.. in order like a real machine's.

    ``memory_mb`` overrides the nominal memory per type.
    """
    overrides = memory_mb or {}
    devices: list[Device] = []
    for gpu_type, count in spec:
        memory = overrides.get(gpu_type, _nominal_memory_mb(gpu_type))
        for _ in range(count):
            index = len(devices)
            devices.append(
                Device(
                    key=f"local/gpu{index}",
                    gpu_type=gpu_type,
                    index=index,
                    name=f"emulated {gpu_type}",
                    memory_mb=memory,
                    emulated=True,
                )
            )
    return devices


def cpu_devices(n: int) -> list[Device]:
    """``n`` CPU slots, so kernels without a GPU are pooled like any other type."""
    if n < 0:
        raise ValueError(f"number of CPU slots must be 0 or more, got {n}")
    return [Device(key=f"local/cpu{i}", gpu_type=CPU_TYPE, index=None, name="CPU kernel") for i in range(n)]


# --- NVML ------------------------------------------------------------------------------

#: Plain words for the NVML failures a machine without a GPU typically has.
_NVML_REASONS = {
    "NVMLError_LibraryNotFound": "NVML: library not found",
    "NVMLError_DriverNotLoaded": "NVML: NVIDIA driver not loaded",
    "NVMLError_NoPermission": "NVML: no permission",
}


def _open_nvml() -> tuple[Any, str | None]:
    """Import and initialise pynvml; on failure return ``(None, reason)`` instead of raising.

    A missing package, library or driver is the normal state of a laptop or CI machine, not
    an error, and must not stop the gateway.
    """
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, _NVML_REASONS.get(type(exc).__name__, f"NVML init failed: {type(exc).__name__}: {exc}")
    return pynvml, None


def _close_nvml(nvml: Any) -> None:
    """Shut NVML down; a failure here is harmless (the next init starts afresh)."""
    with contextlib.suppress(nvml.NVMLError):
        nvml.nvmlShutdown()


def _probe(nvml: Any, index: int) -> Device:
    """One GPU; a GPU whose name or memory cannot be read is listed unhealthy, not dropped."""
    key = f"local/gpu{index}"
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        raw_name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError as exc:
        return Device(key=key, gpu_type=UNKNOWN_TYPE, index=index, name=f"GPU {index} (NVML: {exc})", healthy=False)
    name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
    gpu_type = normalize_gpu_name(name)
    try:
        memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // _MB
    except nvml.NVMLError as exc:
        return Device(key=key, gpu_type=gpu_type, index=index, name=f"{name} (NVML: {exc})", healthy=False)
    return Device(key=key, gpu_type=gpu_type, index=index, name=name, memory_mb=memory_mb)


def discover_nvml() -> tuple[list[Device], str | None]:
    """The GPUs NVML sees, or ``([], reason)`` when there are none; NVML failures never raise.

    ``Device.index`` is the NVML index, which is PCI bus order: kernels pinned with
    ``CUDA_VISIBLE_DEVICES`` need ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` for CUDA to agree.
    """
    nvml, reason = _open_nvml()
    if nvml is None:
        return [], reason
    try:
        count = int(nvml.nvmlDeviceGetCount())
        devices = [_probe(nvml, index) for index in range(count)]
    except nvml.NVMLError as exc:
        return [], f"NVML device count failed: {exc}"
    finally:
        _close_nvml(nvml)
    if not devices:
        return [], "NVML: no devices"
    return devices, None


class GpuStatus(TypedDict):
    """Live figures of one GPU, as the sidebar shows them."""

    utilization: int
    memory_used_mb: int
    memory_total_mb: int


def _read_status(nvml: Any, index: int) -> GpuStatus | None:
    """One GPU's figures, or None when NVML cannot read it (a lost GPU must not blank the rest)."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
    except nvml.NVMLError:
        return None
    return GpuStatus(
        utilization=int(utilization.gpu),
        memory_used_mb=int(memory.used) // _MB,
        memory_total_mb=int(memory.total) // _MB,
    )


def gpu_status(indices: list[int]) -> dict[int, GpuStatus]:
    """Live utilization (%) and memory (MB) of real GPUs by NVML index; ``{}`` without NVML.

    A GPU that cannot be read is left out rather than failing the whole answer.
    """
    nvml, _ = _open_nvml()
    if nvml is None:
        return {}
    try:
        readings = {index: _read_status(nvml, index) for index in indices}
    finally:
        _close_nvml(nvml)
    return {index: reading for index, reading in readings.items() if reading is not None}


# --- the whole inventory ------------------------------------------------------------------


def _summary(devices: list[Device]) -> str:
    counts = Counter(device.gpu_type for device in devices)
    return ", ".join(f"{gpu_type} x{count}" for gpu_type, count in counts.items())


def build_inventory(declared: str | None, cpu_slots: int, log: logging.Logger) -> list[Device]:
    """Everything this machine offers: declared GPUs if configured, else NVML's, then CPU slots.

    A declared inventory wins over discovery, so a GPU machine can also run an emulated
    layout. A blank ``declared`` counts as not given (traitlets' empty default). Finding no
    GPU is normal on a laptop or CI: one line says why and the pool serves what it has.
    """
    if declared is not None and declared.strip():
        devices = declared_devices(parse_declared_inventory(declared))
        log.info("declared inventory (emulated GPUs): %s", _summary(devices))
    else:
        devices, reason = discover_nvml()
        if devices:
            log.info("found GPUs with NVML: %s", _summary(devices))
            for device in devices:
                if not device.healthy:
                    log.warning("GPU %s is unhealthy and will not be used: %s", device.index, device.name)
        elif cpu_slots:
            log.info(
                "no NVIDIA GPU found (%s); serving cpu kernels only (declare an inventory such as 'a100=2' "
                "to emulate GPUs)",
                reason,
            )
        else:
            log.warning(
                "no NVIDIA GPU found (%s) and no CPU slots configured: nothing to serve; "
                "declare an inventory such as 'a100=2' or add CPU slots",
                reason,
            )
    return devices + cpu_devices(cpu_slots)
