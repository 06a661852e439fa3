"""export.manifest.build_artefact when two processes share a cache (test workers, several workers on one host):
the second builder of the same artefact keeps the first one's directory instead of replacing it under a
process that may be loading it; a stale artefact (another key) is still replaced."""

from __future__ import annotations

from export.manifest import build_artefact, read_manifest, valid_artefact


def _build(directory, key, text):
    with build_artefact(directory, key, hashed=("model.onnx",)) as (tmp, manifest):
        (tmp / "model.onnx").write_text(text)
    return manifest


def test_a_concurrent_build_of_the_same_key_keeps_the_first(tmp_path):
    directory = tmp_path / "h" / "unet" / "onnx-fp32"
    key = {"component": "unet", "opset": 17}
    with build_artefact(directory, key, hashed=("model.onnx",)) as (tmp, ours):
        (tmp / "model.onnx").write_text("ours")
        theirs = _build(directory, key, "theirs")  # the other process finishes first
        inode = (directory / "model.onnx").stat().st_ino
    assert (directory / "model.onnx").read_text() == "theirs"
    assert (directory / "model.onnx").stat().st_ino == inode  # not replaced, not moved
    assert ours == theirs == read_manifest(directory)
    assert valid_artefact(directory, key) == theirs
    assert sorted(p.name for p in directory.parent.iterdir()) == ["onnx-fp32"]  # no temp or old directory


def test_a_build_for_another_key_replaces_the_stale_one(tmp_path):
    directory = tmp_path / "h" / "unet" / "onnx-fp32"
    _build(directory, {"opset": 16}, "old")
    manifest = _build(directory, {"opset": 17}, "new")
    assert (directory / "model.onnx").read_text() == "new"
    assert read_manifest(directory) == manifest and manifest["key"] == {"opset": 17}
    assert sorted(p.name for p in directory.parent.iterdir()) == ["onnx-fp32"]
