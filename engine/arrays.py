"""The few array operations the engine needs, for numpy arrays and torch tensors alike (samplers, denoiser,
conditioning, noise, pipeline). The one home of numpy/torch dispatch: other modules do not test array kinds."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def is_torch(x: Array) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def floats(values: Array | Sequence[float]) -> list[float]:
    """Python floats of a 1-d array, tensor or sequence (one device sync for a CUDA tensor)."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v) for v in values]


def stack(items: Sequence[Array]) -> Array:
    if is_numpy(items[0]):
        return np.stack(items)
    import torch

    return torch.stack(list(items))


def concat(items: Sequence[Array], axis: int = 0) -> Array:
    if is_torch(items[0]):
        import torch

        return torch.cat(list(items), dim=axis)
    return np.concatenate(items, axis=axis)


def zeros_like(x: Array) -> Array:
    if is_torch(x):
        import torch

        return torch.zeros_like(x)
    return np.zeros_like(x)


def contiguous(x: Array) -> Array:
    """``x`` in contiguous memory (a slice handed to a runtime)."""
    if is_torch(x):
        return x.contiguous()
    return np.ascontiguousarray(x)


def to_like(t: Any, like: Array) -> Array:
    """A CPU torch tensor as an array of ``like``'s kind, dtype and device.

    To a CUDA device the copy goes through pinned memory, non-blocking: a copy from pageable memory would
    synchronise the stream, i.e. stop the host from queueing the next step while the GPU runs this one.
    """
    if is_numpy(like):
        return t.numpy().astype(like.dtype, copy=False)
    if like.device.type == "cuda":
        return t.to(dtype=like.dtype).pin_memory().to(like.device, non_blocking=True)
    return t.to(device=like.device, dtype=like.dtype)


def to_host(arr: Array) -> np.ndarray:
    """A float32-or-wider numpy array of any array (a device tensor is copied to the host)."""
    if isinstance(arr, np.ndarray):
        return arr
    return arr.detach().float().cpu().numpy()


def to_device(arr: np.ndarray, device: str) -> Array:
    """Sampling runs on numpy arrays on the CPU and on torch tensors on a CUDA device."""
    if device == "cpu":
        return arr
    import torch

    return torch.from_numpy(arr).to(device)


def as_like(values: Any, like: Array, dtype: Any = None) -> Array:
    """``values`` as an array of the same kind (and device) as ``like``; float dtype of ``like`` by default."""
    if is_numpy(like):
        return np.asarray(values, dtype=dtype or like.dtype)
    import torch

    if isinstance(values, torch.Tensor):
        return values.to(device=like.device, dtype=dtype or like.dtype)
    host = torch.as_tensor(np.asarray(values), dtype=dtype or like.dtype)
    if like.device.type == "cuda":  # pinned and non-blocking: a pageable copy would synchronise the stream
        return host.pin_memory().to(like.device, non_blocking=True)
    return host.to(like.device)


def take_rows(x: Array, index: Sequence[int]) -> Array:
    """``x[index]`` along the first axis. The usual CFG layouts (all rows, or all rows k times over) are
    concatenations on the device; any other index goes to a CUDA device non-blocking (no stream sync)."""
    index = list(index)
    n = int(x.shape[0])
    if index and len(index) % n == 0 and index == list(range(n)) * (len(index) // n):
        k = len(index) // n
        return x if k == 1 else concat([x] * k)
    if is_numpy(x):
        return x[index]
    return x.index_select(0, as_like(np.asarray(index, dtype=np.int64), x, dtype=_int64()))


def _int64():
    import torch

    return torch.int64


def maximum(a: Array, b: Array) -> Array:
    if is_numpy(a):
        return np.maximum(a, b)
    import torch

    return torch.maximum(a, b)


def rms(x: Array) -> float:
    """Root mean square of all elements, as a float."""
    return float((x * x).sum()) ** 0.5 / float(np.prod(x.shape)) ** 0.5
