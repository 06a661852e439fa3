"""core.atomic: a file is replaced whole or not at all, and no temp file is left behind either way."""

from __future__ import annotations

import os
import stat

import pytest

from core.atomic import atomic_file, atomic_path


def test_atomic_file_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "x.json"
    with atomic_file(target, "w", encoding="utf-8") as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w", encoding="utf-8") as f:
            f.write("half-writ")
            raise RuntimeError("writer failed")
    assert target.read_text() == "first"  # the old content stays
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]  # no temp file left


def test_atomic_path_keeps_the_mode_of_the_file_it_rewrites(tmp_path):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_path(target, mode_of=target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not replaced before the block ends
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
