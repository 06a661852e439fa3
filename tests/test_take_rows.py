"""engine.arrays.take_rows: the denoiser's row gather without host-built index tensors for the CFG layouts.

Reference: numpy / torch fancy indexing ``x[index]`` (exact equality, it is a copy of rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.arrays import as_like, take_rows

INDEXES = [[0, 1, 2], [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 2], [2, 0], [1],
           [0, 1, 2, 2]]


@pytest.mark.parametrize("index", INDEXES, ids=str)
def test_take_rows_equals_fancy_indexing(index):
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(take_rows(x, index), x[index])
    t = torch.from_numpy(x)
    got = take_rows(t, index)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert torch.equal(got, t[index])


def test_all_rows_once_is_the_array_itself():
    x = torch.zeros(2, 4, 2, 2)
    assert take_rows(x, [0, 1]) is x


def test_as_like_keeps_kind_dtype_and_device():
    like = torch.zeros(2, dtype=torch.float16)
    got = as_like(np.array([1.5, 2.5]), like)
    assert got.dtype == torch.float16 and got.device == like.device and got.tolist() == [1.5, 2.5]
    assert as_like([1, 2], like, dtype=torch.int64).dtype == torch.int64
    assert as_like(np.array([1.0]), np.zeros(1, np.float32)).dtype == np.float32
