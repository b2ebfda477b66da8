"""Memory and CPU limits per kernel with Linux control groups (v2, else v1).

Each kernel gets a group of its own below one group per gateway, itself below the group the
gateway runs in (so a container's or a systemd unit's own limits still apply on top). The
kernel's process joins its group before it execs anything (see :mod:`pool_manager.sandbox`),
so nothing it starts can escape the limit. The group's ``oom_kill`` count then tells a kernel
killed for exceeding its memory from one that died of something else.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

#: CFS period for CPU quotas: 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class KernelLimits:
    """Per-kernel limits; 0 means none."""

    memory_bytes: int = 0
    cpus: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.memory_bytes or self.cpus)


class CgroupError(RuntimeError):
    """Control groups cannot enforce the limits here (not mounted, not writable, no controller)."""


@dataclass
class KernelCgroup:
    """The group(s) of one kernel: one directory on v2, one per controller on v1."""

    version: int
    dirs: tuple[Path, ...]

    @property
    def procs_files(self) -> list[str]:
        """Files the kernel's first process writes its pid into to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_kills(self) -> int:
        """How many processes of this kernel the OOM killer ended (0 where unknown)."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for directory in self.dirs:
            try:
                text = (directory / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> None:
        """Remove the group once its processes are gone (a killed process may linger a moment)."""
        for directory in self.dirs:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a process is still exiting
                    time.sleep(0.01)


class CgroupLimiter:
    """Creates kernel groups with limits under this gateway's own group."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        self._parents = parents  # controller ("" on v2) -> this gateway's group

    @property
    def description(self) -> str:
        return f"cgroup v{self.version}"

    @classmethod
    def probe(cls, limits: KernelLimits) -> CgroupLimiter:
        """A limiter that can enforce ``limits`` here, or CgroupError saying why not."""
        failures = []
        for version in (2, 1):
            try:
                return cls._setup(version, limits)
            except (CgroupError, OSError) as exc:
                failures.append(f"v{version}: {exc}")
        raise CgroupError("; ".join(failures))

    @classmethod
    def _setup(cls, version: int, limits: KernelLimits) -> CgroupLimiter:
        needed = [c for c, wanted in (("memory", limits.memory_bytes), ("cpu", limits.cpus)) if wanted]
        mounts = _cgroup_mounts()
        own = _own_groups()
        name = f"jupyter-gpu-{os.getpid()}"
        parents: dict[str, Path] = {}
        if version == 2:
            if "" not in mounts or "" not in own:
                raise CgroupError("no cgroup2 mount")
            base = mounts[""] / own[""].lstrip("/")
            available = (base / "cgroup.controllers").read_text().split()
            missing = [c for c in needed if c not in available]
            if missing:
                raise CgroupError(f"controllers {missing} not delegated to {base}")
            # The parent must hand the controllers down; it refuses (EBUSY) while it holds
            # processes itself, which is why a unit runs the gateway in a leaf of its own.
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in needed))
            group = base / name
            group.mkdir(exist_ok=True)
            (group / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in needed))
            parents[""] = group
        else:
            for controller in needed:
                if controller not in mounts or controller not in own:
                    raise CgroupError(f"no v1 {controller} hierarchy")
                group = mounts[controller] / own[controller].lstrip("/") / name
                group.mkdir(exist_ok=True)
                parents[controller] = group
        return cls(version, parents)

    def create(self, kernel_id: str, limits: KernelLimits) -> KernelCgroup:
        """A group for one kernel with ``limits`` applied, ready for its process to join."""
        dirs = []
        try:
            for controller, parent in self._parents.items():
                directory = parent / kernel_id
                directory.mkdir()
                dirs.append(directory)
                for file, value in self._settings(controller, limits):
                    if (directory / file).exists():
                        (directory / file).write_text(value)
        except OSError:
            KernelCgroup(self.version, tuple(dirs)).remove()
            raise
        return KernelCgroup(self.version, tuple(dirs))

    def _settings(self, controller: str, limits: KernelLimits) -> list[tuple[str, str]]:
        quota = str(int(limits.cpus * CPU_PERIOD_US)) if limits.cpus else ""
        memory = str(limits.memory_bytes) if limits.memory_bytes else ""
        if self.version == 2:
            # no swap either: a kernel past its memory should end, not crawl
            return [(f, v) for f, v in (("memory.max", memory), ("memory.swap.max", "0" if memory else ""),
                                        ("cpu.max", f"{quota} {CPU_PERIOD_US}" if quota else "")) if v]
        if controller == "memory":  # memsw (memory + swap) may only be set at or above the memory limit
            return [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)]
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", quota)]

    def close(self) -> None:
        for parent in self._parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()


def _cgroup_mounts() -> dict[str, Path]:
    """Mount point per v1 controller, and of the v2 hierarchy under key ''."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mounts") as file:
        for line in file:
            _, point, fstype, options, *_ = line.split()
            if fstype == "cgroup2":
                mounts.setdefault("", Path(point))
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, Path(point))
    return mounts


def _own_groups() -> dict[str, str]:
    """This process's group per v1 controller, and its v2 group under key ''."""
    groups: dict[str, str] = {}
    with open("/proc/self/cgroup") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                groups[controller] = path
    return groups
