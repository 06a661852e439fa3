"""core.mapped: resident pages of file mappings dropped, never a written copy's (reference: the bytes written and
the file's bytes, read back after the drop; tolerance: none)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from core.mapped import drop_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps, madvise")


def test_a_written_private_mapping_is_left_alone(tmp_path):
    """A private writable mapping (safetensors' torch tensors are mapped so) is dropped while none of its pages
    was written -- reading it again gives the file's bytes -- and never once one was: the written bytes stay."""
    # a suffix of this test's own: the worker process may hold other tests' .safetensors mappings
    suffix = f".{tmp_path.name}.safetensors"
    path = tmp_path / f"weights{suffix}"
    data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    data.tofile(path)
    clean = np.memmap(path, dtype=np.float32, mode="c")
    assert float(clean.sum()) == float(data.sum())
    assert drop_mapped_pages(path) == 4 << 20
    np.testing.assert_array_equal(np.asarray(clean), data)
    written = np.memmap(path, dtype=np.float32, mode="c")
    written[:2048] = -1.0  # copy-on-write: these pages are the only copy of what was written
    assert drop_mapped_pages(suffixes=(suffix,)) == 4 << 20  # the clean mapping only
    assert (np.asarray(written[:2048]) == -1.0).all()
    np.testing.assert_array_equal(np.asarray(written[2048:]), data[2048:])
    np.testing.assert_array_equal(np.asarray(clean), data)
    assert drop_mapped_pages(tmp_path / "other.bin") == 0  # a path not mapped: nothing
