#!/usr/bin/env python
"""On a machine with CUDA: torch CUDA tensors and a model on the GPU go through a snapshot
file to host memory and back onto the GPU, and what came back is checked and printed. Then
GPU idleness's NVML reading (pool_manager/gpu_use.py): a second of matrix products on the GPU
must read as use, a quiet second should not.

    PYTHONPATH=. python scripts/gpu-check-snapshot.py [--mb 256]

Not part of the test suite (CI has no GPU). Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

from jupyter_gpu import snapshot
from pool_manager.gpu_use import GpuUseSampler


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="size of the large CUDA tensor")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check")
        return 2
    device = torch.device("cuda:0")
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
    big = torch.randn(args.mb * 2**20 // 4, device=device)
    half = torch.randn(1000, device=device, dtype=torch.bfloat16)  # no numpy dtype: travels in-band
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512)).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 512, device=device)).sum().backward()
    optimizer.step()  # optimizer state (CUDA tensors) to save too
    grad_leaf = torch.ones(10, device=device, requires_grad=True)
    stream = torch.cuda.Stream()
    ns: dict[str, Any] = {"big": big, "half": half, "model": model, "optimizer": optimizer,
                          "grad_leaf": grad_leaf, "cpu_tensor": torch.arange(5), "stream": stream}
    expected = {"big": big.cpu(), "half": half.cpu(), "weight": model[0].weight.detach().cpu(),
                "running_mean": model[1].running_mean.cpu()}
    torch.cuda.synchronize()
    folder = tempfile.mkdtemp(prefix="gpu-check-snapshot-")
    path = os.path.join(folder, "snap")
    failures: list[str] = []
    try:
        began = time.perf_counter()
        kept = snapshot.save(path, ns)
        saved = time.perf_counter() - began
        print(f"saved {kept['names']} ({kept['nbytes'] / 1e6:.1f} MB) in {saved:.2f} s; not saved: {kept['unsaved']}")
        if "stream" not in kept["unsaved"]:
            failures.append("a CUDA stream was saved")
        fresh: dict[str, Any] = {}
        report = snapshot.load(path, fresh)
        torch.cuda.synchronize()
        print(f"restored {report.names} in {report.seconds:.2f} s; failed: {report.failed}; devices: {report.devices}")
        print(snapshot.describe(report))
        checks = {
            "big": fresh["big"], "half": fresh["half"],
            "weight": fresh["model"][0].weight, "running_mean": fresh["model"][1].running_mean,
        }
        for name, value in checks.items():
            where = value.device
            same = torch.equal(value.detach().cpu(), expected[name])
            print(f"  {name}: {tuple(value.shape)} {value.dtype} on {where}, equal: {same}")
            if where.type != "cuda":
                failures.append(f"{name} came back on {where}, not on the GPU")
            if not same:
                failures.append(f"{name} changed on the way")
        if not isinstance(fresh["model"][0].weight, torch.nn.Parameter):
            failures.append("a parameter came back as a plain tensor")
        if fresh["optimizer"].param_groups[0]["params"][0] is not fresh["model"][0].weight:
            failures.append("the optimizer no longer drives the restored model's parameters")
        state = fresh["optimizer"].state[fresh["model"][0].weight]
        if state["exp_avg"].device.type != "cuda":
            failures.append(f"optimizer state came back on {state['exp_avg'].device}")
        if not fresh["grad_leaf"].requires_grad:
            failures.append("requires_grad was lost")
        if fresh["cpu_tensor"].device.type != "cpu":
            failures.append("a CPU tensor moved to the GPU")
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)
    failures += check_gpu_use(device)
    for failure in failures:
        print("FAIL:", failure)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


def check_gpu_use(device: torch.device) -> list[str]:
    """The sampler GPU idleness uses, through the real nvidia-ml-py calls (nvmlDeviceGetSamples)."""
    index = device.index or 0  # CUDA_VISIBLE_DEVICES unset on the check machine: CUDA and NVML agree
    sampler = GpuUseSampler()
    try:
        sampler.used([index])  # the first look takes what NVML buffered before the check
        time.sleep(1.5)
        quiet = sampler.used([index])
        a = torch.randn(4096, 4096, device=device)
        until = time.perf_counter() + 1.0
        while time.perf_counter() < until:
            a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
        busy = sampler.used([index])
    finally:
        sampler.close()
    print(f"GPU use (NVML samples): quiet second -> {sorted(quiet)}, second of matmuls -> {sorted(busy)}")
    if quiet:
        print("  note: the quiet second read as use (another process on this GPU?)")
    return [] if busy == {index} else [f"a second of matrix products on GPU {index} did not read as use"]


if __name__ == "__main__":
    sys.exit(main())
