"""Which GPUs a kernel on a Ray node is pinned to."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from pool_manager.model import StartKernel
from pool_manager.ray_slot import on_gpus_ray_reserved


def _request(indices: tuple[int, ...]) -> StartKernel:
    return StartKernel(slot_id="s1", gpu_type="a100", gpu_indices=indices, node="10.0.0.2", kernel_id="k1")


def test_real_gpus_follow_what_ray_reserved_not_the_cores_guess() -> None:
    # The core thought GPU 0; Ray reserved GPU 3 for this actor: the kernel must see GPU 3 only,
    # or it would share GPU 0 with whichever kernel Ray gave it to.
    pinned = on_gpus_ray_reserved(_request((0,)), [3], real_gpus=True)
    assert pinned.gpu_indices == (3,)
    assert pinned.kernel_id == "k1" and pinned.node == "10.0.0.2"


def test_emulated_gpus_keep_the_cores_indices() -> None:
    assert on_gpus_ray_reserved(_request((1,)), [0], real_gpus=False).gpu_indices == (1,)


def test_a_cpu_kernel_gets_no_gpus() -> None:
    assert on_gpus_ray_reserved(_request(()), [], real_gpus=True).gpu_indices == ()
