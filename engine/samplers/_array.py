"""The few array operations samplers and the denoiser need, for numpy arrays and torch tensors alike."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


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


def as_like(values: Any, like: Array, dtype: Any = None) -> Array:
    """``values`` as an array of the same kind (and device) as ``like``; float dtype of ``like`` by default."""
    if is_numpy(like):
        return np.asarray(values, dtype=dtype or like.dtype)
    import torch

    if isinstance(values, torch.Tensor):
        return values.to(device=like.device, dtype=dtype or like.dtype)
    return torch.as_tensor(np.asarray(values), device=like.device, dtype=dtype or like.dtype)


def maximum(a: Array, b: Array) -> Array:
    if is_numpy(a):
        return np.maximum(a, b)
    import torch

    return torch.maximum(a, b)


def rms(x: Array) -> float:
    """Root mean square of all elements, as a float."""
    return float((x * x).sum()) ** 0.5 / float(np.prod(x.shape)) ** 0.5
