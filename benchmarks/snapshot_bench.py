"""Snapshot and restore of 1 GB of arrays on the local store, against raw disk bandwidth
measured in the same run: ``python benchmarks/snapshot_bench.py [--gb 1] [--store DIR]``.

The steps are those of a release and the next lease, in one process (no kernels, no
gateway): the kernel writes its snapshot into its staging area (/dev/shm by default), the
gateway moves it into the store (a copy: another file system) and, for the next lease,
copies it into the new kernel's staging area, which maps it and reads every byte (the
first cell that uses the arrays). The raw figures do the same copies with plain writes
and reads of one buffer of the same size. Each figure is the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from jupyter_gpu import snapshot
from kernel_gateway.snapshot_store import LocalSnapshotStore


def drop(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def raw_write(path: str, data: np.ndarray) -> None:
    with open(path, "wb", buffering=0) as file:
        view = memoryview(data).cast("B")
        while view:
            view = view[file.write(view) or 0 :]


def raw_read(path: str) -> float:
    """Map the file and read one value per page: what a restore's first use of its arrays does."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE) as mapping:
        data = np.frombuffer(mapping, dtype=np.float64)
        total = float(data[:: 4096 // 8].sum())
        del data
        return total


def touch(ns: dict[str, Any]) -> float:
    return float(sum(value[:: 4096 // 8].sum() for value in ns.values()))  # one read per page


STAGING = "/dev/shm" if os.path.isdir("/dev/shm") else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--store", default=None, help="store directory (default: a temp dir on /var/tmp's disk)")
    parser.add_argument("--staging", default=STAGING)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.gb, args.repeats, args.store, args.staging), indent=2))


def measure(gb: float, repeats: int, store_dir_given: str | None = None, staging_root: str | None = STAGING
            ) -> dict[str, Any]:
    """The medians and the ratios to the raw copies (what main prints; benchmarks/snapshot_rows.py's row)."""
    nbytes = int(gb * 1e9)
    # Four arrays, as a notebook holds several
    arrays = {f"a{i}": np.random.default_rng(i).random(nbytes // 8 // 4) for i in range(4)}
    total = sum(a.nbytes for a in arrays.values())
    store_dir = store_dir_given or tempfile.mkdtemp(prefix="snapbench-", dir="/var/tmp")
    staging = tempfile.mkdtemp(prefix="snapbench-", dir=staging_root)
    store = LocalSnapshotStore(os.path.join(store_dir, "store"), ttl=3600)
    figures: dict[str, list[float]] = {k: [] for k in (
        "raw_write_staging", "raw_copy_to_store", "raw_copy_to_staging", "raw_read",
        "snapshot_write_staging", "snapshot_to_store", "snapshot_total",
        "restore_to_staging", "restore_load_and_read", "restore_total")}
    try:
        for _ in range(repeats):
            blob = np.concatenate(list(arrays.values()))
            raw_staging, raw_store = os.path.join(staging, "raw"), os.path.join(store_dir, "raw")
            began = time.perf_counter()
            raw_write(raw_staging, blob)
            figures["raw_write_staging"].append(time.perf_counter() - began)
            began = time.perf_counter()
            shutil.copyfile(raw_staging, raw_store)
            figures["raw_copy_to_store"].append(time.perf_counter() - began)
            drop(raw_staging)
            began = time.perf_counter()
            shutil.copyfile(raw_store, raw_staging)
            figures["raw_copy_to_staging"].append(time.perf_counter() - began)
            began = time.perf_counter()
            raw_read(raw_staging)
            figures["raw_read"].append(time.perf_counter() - began)
            drop(raw_staging)
            drop(raw_store)
            del blob

            written = os.path.join(staging, "snap")
            began = time.perf_counter()
            snapshot.save(written, arrays)
            middle = time.perf_counter()
            record = store.put("bench", "bench.ipynb", written, {"names": list(arrays)})
            end = time.perf_counter()
            figures["snapshot_write_staging"].append(middle - began)
            figures["snapshot_to_store"].append(end - middle)
            figures["snapshot_total"].append(end - began)

            restored = os.path.join(staging, "restore")
            began = time.perf_counter()
            store.fetch("bench", record.id, restored)
            middle = time.perf_counter()
            ns: dict[str, Any] = {}
            snapshot.load(restored, ns)
            os.unlink(restored)
            touch(ns)
            end = time.perf_counter()
            figures["restore_to_staging"].append(middle - began)
            figures["restore_load_and_read"].append(end - middle)
            figures["restore_total"].append(end - began)
            del ns
            store.delete("bench", record.id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if store_dir_given is None:
            shutil.rmtree(store_dir, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    raw_snapshot = medians["raw_write_staging"] + medians["raw_copy_to_store"]
    raw_restore = medians["raw_copy_to_staging"] + medians["raw_read"]
    return {
        "bytes": total,
        "seconds": {k: round(v, 3) for k, v in medians.items()},
        "snapshot_GBps": round(total / medians["snapshot_total"] / 1e9, 2),
        "restore_GBps": round(total / medians["restore_total"] / 1e9, 2),
        "raw_snapshot_GBps": round(total / raw_snapshot / 1e9, 2),
        "raw_restore_GBps": round(total / raw_restore / 1e9, 2),
        "snapshot_vs_raw": round(raw_snapshot / medians["snapshot_total"], 2),
        "restore_vs_raw": round(raw_restore / medians["restore_total"], 2),
    }


if __name__ == "__main__":
    main()
