"""Values travel as cloudpickle protocol 5 with array data out-of-band."""

from __future__ import annotations

import numpy as np

from jupyter_gpu import serialize


def test_numpy_data_goes_out_of_band_without_a_copy() -> None:
    array = np.arange(1_000_000, dtype=np.float64)
    stream, buffers = serialize.dump(array)
    assert len(stream) < 1_000  # the 8 MB of data are not in the pickle stream
    assert len(buffers) == 1 and np.shares_memory(np.frombuffer(buffers[0], dtype=np.float64), array)
    restored = serialize.load(stream, buffers)
    assert np.array_equal(restored, array)


def test_notebook_defined_functions_and_classes_travel_by_value() -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    scale = 3
    stream, buffers = serialize.dump((Point(2), lambda v: v * scale))
    point, fn = serialize.load(stream, buffers)
    assert point.x == 2 and fn(2) == 6


def test_fingerprint_tracks_content_not_identity() -> None:
    a = np.ones(1000)
    first = serialize.fingerprint(*serialize.dump(a))
    assert serialize.fingerprint(*serialize.dump(a.copy())) == first
    a[500] = 2
    assert serialize.fingerprint(*serialize.dump(a)) != first


def test_describe_names_type_shape_and_size() -> None:
    info = serialize.describe(np.zeros((3, 4), dtype=np.float32))
    assert info["type"] == "numpy.ndarray" and info["shape"] == [3, 4]
    assert info["dtype"] == "float32" and info["nbytes"] == 48


def test_torch_tensors_travel_as_out_of_band_numpy_buffers() -> None:
    import torch

    tensor = torch.arange(250_000, dtype=torch.float32).reshape(500, 500).requires_grad_(True)
    stream, buffers = serialize.dump({"weights": tensor})
    assert len(stream) < 2_000 and sum(len(b) for b in buffers) == 1_000_000
    restored = serialize.load(stream, buffers)["weights"]
    assert isinstance(restored, torch.Tensor) and restored.requires_grad
    assert torch.equal(restored.detach(), tensor.detach())


def test_torch_dtypes_without_numpy_twin_still_travel() -> None:
    import torch

    tensor = torch.ones(4, dtype=torch.bfloat16)
    restored = serialize.load(*serialize.dump(tensor))
    assert restored.dtype == torch.bfloat16 and torch.equal(restored, tensor)
