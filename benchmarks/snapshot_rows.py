"""Row 9 of benchmarks/run.py: kept state (issue 12), measured in the same run as raw disk and
loopback bandwidth.

- ``snapshot_bench.measure``: the snapshot and the restore of the arrays in one process (the
  kernel's write into its staging area, the gateway's copy into the store; the copy into the
  next kernel's staging area, its map and a read of every page) next to the same copies done
  with plain writes and reads of one buffer: the raw disk figure.
- ``snapshot_e2e.measure``: the same through the real gateway and kernels: a release until the
  snapshot is kept, the next lease's first cell with the arrays restored, the a100 -> h100
  switch, and a release with nothing to keep next to a plain one.
- ``baselines.raw_tcp``: the arrays' size sent one way over loopback TCP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: GB of arrays and repeats per mode of benchmarks/run.py
SIZES = {"smoke": (0.01, 1), "quick": (1.0, 3), "full": (1.0, 5)}


def measure(mode: str) -> dict[str, Any]:
    import baselines
    import snapshot_bench
    import snapshot_e2e

    gb, repeats = SIZES[mode]
    return {"gb": gb, "bytes": int(gb * 1e9), "loopback": baselines.raw_tcp(int(gb * 1e9), repeats),
            "store": snapshot_bench.measure(gb, repeats), "e2e": snapshot_e2e.measure(gb, repeats)}


def add_rows(data: Any, add: Callable[..., None]) -> None:
    """The rows, through build_rows' ``add(row, what, system, median, p99, ratio, target, ok, **values)``."""
    if not isinstance(data, dict) or "e2e" not in data:
        return
    size, gb = data["bytes"], data["gb"]
    label = f"{gb:g} GB" if gb >= 1 else f"{gb * 1e3:g} MB"
    store, e2e = data["store"], data["e2e"]["seconds"]
    loop_gbps = size / data["loopback"]["median"] / 1e9
    raw = {"snapshot": store["raw_snapshot_GBps"], "restore": store["raw_restore_GBps"]}

    def bandwidth(step: str, seconds: float) -> tuple[str, bool]:
        gbps = size / seconds / 1e9
        share_disk, share_loop = gbps / raw[step], gbps / loop_gbps
        text = f"{gbps:.2f} GB/s: {share_disk:.2f}x raw disk, {share_loop:.2f}x loopback"
        return text, seconds <= 2.0 and max(share_disk, share_loop) >= 0.4

    system = "jupyter-gpu, local store"
    target = "<= 2 s, >= 0.4x raw disk or loopback"
    kept = e2e["release_snapshot_kept"]
    text, ok = bandwidth("snapshot", kept)
    add(9, f"snapshot of {label} of arrays at release (gateway: release until kept)", system, _s(kept), "", text,
        target, ok, seconds=kept)
    inner = store["seconds"]["snapshot_total"]
    add(9, "  the same in one process (kernel writes to staging, gateway files it)", system, _s(inner), "",
        bandwidth("snapshot", inner)[0], seconds=inner)
    restore = store["seconds"]["restore_total"]
    text, ok = bandwidth("restore", restore)
    add(9, f"restore of {label} into the next lease (to its staging, mapped, every page read)", system, _s(restore),
        "", text, target, ok, seconds=restore)
    add(9, f"  raw disk: the same copies of {label}, plain writes and reads", "raw disk",
        f"{raw['snapshot']:.2f} GB/s", f"restore path {raw['restore']:.2f} GB/s")
    add(9, f"  loopback TCP, {label} one way", "raw loopback TCP", f"{loop_gbps:.2f} GB/s",
        _s(data["loopback"]["median"]))
    first = e2e["reacquire_snapshot_first_cell"]
    add(9, f"re-acquire after release, {label} restored, first cell done", system, _s(first), "", "", "<= 2.5 s",
        first <= 2.5, seconds=first)
    switch = e2e["release_to_first_cell_switch"]
    add(9, f"a100 -> h100 with {label} of state (release, save, h100 lease, restore, first cell)", system,
        _s(switch), "", "", "<= 5 s", switch <= 5.0, seconds=switch)
    nothing, plain = e2e["release_nothing_until_gpu_free"], e2e["release_plain_until_gpu_free"]
    add(9, "release with nothing to keep, until a warm kernel is back", system, _s(nothing),
        f"until reported {_s(e2e['release_nothing_kept'])}", f"{nothing / plain:.2f}x plain", "<= 1.25x plain",
        nothing <= 1.25 * plain, seconds=nothing)
    add(9, "  plain release (no notebook: the kernel is not asked), until a warm kernel is back", system,
        _s(plain), f"until answered {_s(e2e['release_plain_kept'])}", seconds=plain)


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"
