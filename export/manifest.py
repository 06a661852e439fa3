"""Artefact directories with a JSON manifest, written atomically.

An artefact is a directory ``{cache}/{model hash}/{component}/{name}/`` holding its files and a
``manifest.json``: ``{"key": {...what made it...}, "files": {...}, "info": {...}}``. An artefact is
reused only when its manifest's ``key`` equals the key asked for and its files are intact (every file's size,
and the graph file's sha256, recomputed only when the file's mtime differs from the one recorded at build
time: a load from cache hashes nothing); anything else rebuilds it.

Building happens in a temporary sibling directory (``.tmp-{name}-{pid}-{random}``) that is renamed into
place only when complete, manifest included, so an interrupted build leaves nothing that later loads
(:func:`build_artefact`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from core.hashing import sha256_file
from core.process import pid_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the concatenated bytes of ``paths`` (a graph file and its external data)."""
    h = hashlib.sha256()
    for p in paths:
        sha256_file(p, h)
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A path component from a hash / component / key string: no separators, no dots at the start."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(text))
    cleaned = cleaned.lstrip(".")
    if not cleaned:
        raise ValueError(f"empty artefact name from {text!r}")
    return cleaned[:200]


def artefact_dir(cache: Path, model_hash: str, component: str, name: str) -> Path:
    return Path(cache) / safe_name(model_hash) / safe_name(component) / safe_name(name)


def read_manifest(directory: Path) -> dict | None:
    try:
        with open(Path(directory) / MANIFEST, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _normalise(key: Mapping) -> dict:
    # JSON round trip: tuples become lists, so a key compares equal to the one read back
    return json.loads(json.dumps(key, sort_keys=True))


def valid_artefact(directory: Path, key: Mapping) -> dict | None:
    """The manifest of ``directory`` if it was built for ``key`` and its files are intact, else None."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    if manifest.get("key") != _normalise(key):
        log.info("%s: manifest key differs, rebuilding", directory)
        return None
    return valid_files(directory, manifest)


def valid_files(directory: Path, manifest: dict | None = None) -> dict | None:
    """The manifest of ``directory`` if every file it lists is intact (size, and sha256 where recorded)."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    if manifest is None:
        return None
    for name, meta in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            log.warning("%s: %s missing or truncated, rebuilding", directory, name)
            return None
        unchanged = meta.get("mtime_ns") is not None and path.stat().st_mtime_ns == meta["mtime_ns"]
        if meta.get("sha256") and not unchanged and sha256_file(path) != meta["sha256"]:
            log.warning("%s: %s sha256 mismatch, rebuilding", directory, name)
            return None
    return manifest


def _clean_stale(parent: Path, name: str) -> None:
    for tmp in parent.glob(f".tmp-{name}-*"):
        pid = tmp.name.split("-")[-2] if tmp.name.count("-") >= 3 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def build_artefact(directory: Path, key: Mapping, info: Mapping | None = None,
                   hashed: tuple[str, ...] = ()) -> Iterator[tuple[Path, dict]]:
    """Build an artefact: yields ``(tmp_dir, manifest)``; the caller writes its files into ``tmp_dir``
    and may add to ``manifest["info"]``. On success the manifest is written (with each file's size and,
    for the names in ``hashed``, its sha256) and the directory renamed to ``directory``, replacing an
    old one -- unless another process sharing the cache built a valid one for the same key meanwhile: that
    one is kept (and ``manifest`` becomes its manifest), so a directory is never replaced under a process
    loading it. On an exception the temporary directory is removed and nothing is renamed.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent, directory.name)
    tmp = parent / f".tmp-{directory.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    manifest = {"key": _normalise(key), "files": {}, "info": dict(info or {})}
    try:
        yield tmp, manifest
        for path in sorted(tmp.iterdir()):
            if path.is_file():
                st = path.stat()
                meta = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
                if path.name in hashed:
                    meta["sha256"] = sha256_file(path)
                manifest["files"][path.name] = meta
        manifest["info"] = _normalise(manifest["info"])
        tmp_manifest = tmp / (MANIFEST + ".tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, tmp / MANIFEST)
        theirs = valid_artefact(directory, manifest["key"]) if directory.exists() else None
        if theirs is not None:
            # another process sharing the cache finished the same artefact meanwhile: keep its directory (a
            # reader may be loading it) and drop ours, identical by key
            shutil.rmtree(tmp, ignore_errors=True)
            manifest.clear()
            manifest.update(theirs)
            return
        old = None
        if directory.exists():
            old = parent / f".old-{directory.name}-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
