"""How values travel between the notebook and the GPU kernel: cloudpickle, protocol 5.

Large array data leaves the pickle as out-of-band buffers (sent as raw frames, never
copied into the pickle stream). Used on both sides: by the magic and by the kernel helper.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudpickle
import xxhash

from . import write_tracking

PROTOCOL = 5


def _tensor_from_numpy(array: Any, requires_grad: bool) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _parameter_from_numpy(array: Any, requires_grad: bool) -> Any:
    import torch

    return torch.nn.Parameter(torch.from_numpy(array), requires_grad=requires_grad)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus: torch tensors travel as numpy buffers, and CUDA ones as CPU tensors.

    A CUDA tensor unpickled where there is no GPU fails (model weights included: they are
    ``nn.Parameter``s); torch's own pickling also copies the data into the stream, where a
    numpy view goes out-of-band for free.
    """

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
            rebuild = {torch.Tensor: _tensor_from_numpy, torch.nn.Parameter: _parameter_from_numpy}.get(type(obj))
            cpu = obj.detach().to("cpu")
            if rebuild is None:  # another subclass: torch's own pickling, but never of CUDA memory
                return cpu.__reduce_ex__(PROTOCOL) if obj.is_cuda else super().reducer_override(obj)
            try:
                array = cpu.numpy()
            except (TypeError, RuntimeError):  # e.g. bfloat16 has no numpy dtype: torch's pickling
                if not obj.is_cuda:
                    return super().reducer_override(obj)
                if isinstance(obj, torch.nn.Parameter):
                    return torch.nn.Parameter(cpu, requires_grad=obj.requires_grad).__reduce_ex__(PROTOCOL)
                return cpu.requires_grad_(obj.requires_grad).__reduce_ex__(PROTOCOL)
            return rebuild, (array, bool(obj.requires_grad))
        return super().reducer_override(obj)


def estimated_nbytes(value: Any) -> int | None:
    """Size of an array, tensor or torch module without pickling it; None when unknown."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return int(value.numel() * value.element_size())
        if isinstance(value, torch.nn.Module):
            tensors = [*value.parameters(), *value.buffers()]
            return sum(int(t.numel() * t.element_size()) for t in tensors)
    return None


def dump(value: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value``; returns the stream and its out-of-band buffers (views, no copies)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=PROTOCOL, buffer_callback=buffers.append).dump(value)
    return stream.getvalue(), [buffer.raw() for buffer in buffers]


def load(data: bytes | memoryview, buffers: list[Any]) -> Any:
    return pickle.loads(data, buffers=buffers)


#: Buffers hash in pieces of this size, on all cores (xxhash releases the GIL): the hash of
#: a large array runs at memory speed, so a second core nearly halves it.
HASH_PIECE = 64 * 2**20
_hash_pool: ThreadPoolExecutor | None = None


def _digest(piece: memoryview) -> bytes:
    return xxhash.xxh3_128(piece).digest()


def _piece_digests(views: list[memoryview]) -> list[bytes]:
    """Per view, the digests of its HASH_PIECE-sized pieces, concatenated; pieces on all cores."""
    global _hash_pool
    pieces = [(n, view[i : i + HASH_PIECE]) for n, view in enumerate(views)
              for i in range(0, max(1, len(view)), HASH_PIECE)]
    if len(pieces) > 1:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="jupyter-gpu-hash")
        digests = list(_hash_pool.map(_digest, [piece for _, piece in pieces]))
    else:
        digests = [_digest(piece) for _, piece in pieces]
    joined: list[list[bytes]] = [[] for _ in views]
    for (n, _), digest in zip(pieces, digests, strict=True):
        joined[n].append(digest)
    return [b"".join(parts) for parts in joined]


def fingerprint(data: bytes | memoryview, buffers: list[memoryview], digests: list[bytes] | None = None) -> str:
    """Content hash of a pickled value, to avoid sending what the other side already has.

    The same value gives the same fingerprint on both sides: the stream, then each buffer
    as the digests of its HASH_PIECE-sized pieces. A large buffer nothing wrote to since
    its last hash is not read again (write_tracking), which makes re-running a cell over
    an unchanged gigabyte cost microseconds instead of a pass over memory. ``digests``, if
    given, receives each buffer's digest (what ``write_tracking.tracker.remember`` takes).
    """
    hasher = xxhash.xxh3_128()
    hasher.update(data)
    views = [memoryview(b).cast("B") for b in buffers]
    tracked = {n: view for n, view in enumerate(views) if len(view) >= write_tracking.TRACK_MIN_BYTES}
    untracked = iter(_piece_digests([view for n, view in enumerate(views) if n not in tracked]))
    for n, view in enumerate(views):
        if n in tracked:
            digest = write_tracking.tracker.digest(view, lambda v: _piece_digests([v])[0])
        else:
            digest = next(untracked)
        hasher.update(digest)
        if digests is not None:
            digests.append(digest)
    return hasher.hexdigest()


def describe(value: Any, nbytes: int | None = None) -> dict[str, Any]:
    """What a value is, for a RemoteRef's repr: type, shape, dtype, size, device."""
    kind = type(value)
    info: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}"}
    for attr in ("shape", "dtype", "device"):
        try:
            attr_value = getattr(value, attr, None)
        except Exception:  # a property that raises is no reason to fail the cell
            attr_value = None
        if attr_value is not None and not callable(attr_value):
            info[attr] = list(attr_value) if attr == "shape" else str(attr_value)
    size = nbytes if nbytes is not None else getattr(value, "nbytes", None)
    if isinstance(size, int):
        info["nbytes"] = size
    # No repr(): it can cost milliseconds (a large DataFrame) on every pulled value.
    return info
