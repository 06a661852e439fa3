"""Model hashes (engine.models.hashing): the diffusers-folder hash by its documented formula, stable under a move,
changed by any hashed file, through symlinks; the cache reused only while size and mtime match."""

from __future__ import annotations

import hashlib
import os

from engine.models.hashing import HashCache, sha256_file


def _folder(root):
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text('{"a": 1}')
    (root / "unet" / "model.safetensors").write_bytes(b"weights" * 100)
    (root / "model_index.json").write_text("{}")
    (root / "README.md").write_text("not hashed")
    return root


def test_folder_hash_is_the_documented_formula(tmp_path):
    folder = _folder(tmp_path / "m")
    rels = sorted(["model_index.json", "unet/config.json", "unet/model.safetensors"])
    text = "".join(f"{r}\t{sha256_file(folder / r)}\n" for r in rels)
    assert HashCache(None).folder_sha256(folder) == hashlib.sha256(text.encode()).hexdigest()


def test_folder_hash_follows_content_not_place(tmp_path):
    cache = HashCache(tmp_path / "hashes.json")
    folder = _folder(tmp_path / "m")
    first = cache.folder_sha256(folder)
    moved = tmp_path / "elsewhere"
    os.rename(folder, moved)
    assert cache.folder_sha256(moved) == first
    (moved / "README.md").write_text("still not hashed")
    assert cache.folder_sha256(moved) == first
    (moved / "unet" / "config.json").write_text('{"a": 2}')  # a new size: the cached entry is not reused
    assert cache.folder_sha256(moved) != first


def test_symlinked_files_hash_as_their_target(tmp_path):
    folder = _folder(tmp_path / "m")
    linked = tmp_path / "linked"
    (linked / "unet").mkdir(parents=True)
    for rel in ("model_index.json", "unet/config.json", "unet/model.safetensors"):
        (linked / rel).symlink_to(folder / rel)
    cache = HashCache(None)
    assert cache.folder_sha256(linked) == cache.folder_sha256(folder)


def test_file_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import engine.models.hashing as hashing

    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    cache = HashCache(tmp_path / "hashes.json")
    assert cache.file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    reads = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or "recomputed")
    assert HashCache(tmp_path / "hashes.json").file_sha256(path) == hashlib.sha256(b"abc").hexdigest()  # from the file
    assert reads == []
    os.utime(path, ns=(1, 1))
    assert cache.file_sha256(path) == "recomputed" and len(reads) == 1
