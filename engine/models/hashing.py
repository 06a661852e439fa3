"""Model hashes as the webui computes them, cached so that a file is read once.

- A single file's hash is the sha256 of the whole file (streamed); its *short hash* is the first 10 hex
  digits (the webui's ``sd_models.model_hash`` shown as ``name [abcdef0123]``).
- A diffusers folder's hash is the sha256 of the text ``"{relative posix path}\\t{sha256 of the file}\\n"``
  over every ``*.safetensors``, ``*.bin`` and ``*.json`` file below the folder, sorted by relative path. It
  changes when any weight or config changes and does not depend on where the folder lives.

:class:`HashCache` keeps ``{absolute path: (size, mtime_ns, sha256)}`` in one JSON file (the store puts it in
``{models_dir}/cache/hashes.json``); an entry is reused only while size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from core.atomic import atomic_file
from core.hashing import sha256_file

log = logging.getLogger(__name__)

SHORT_HASH_LEN = 10
FOLDER_HASH_SUFFIXES = (".safetensors", ".bin", ".json")


def short_hash(sha256: str) -> str:
    return sha256[:SHORT_HASH_LEN]


def legacy_model_hash(path: str | os.PathLike) -> str | None:
    """The webui's old 8-hex ``model_hash``: sha256 of 64 KiB at offset 1 MiB (sd-webui-controlnet still
    shows it in ControlNet names such as ``control_v11p_sd15_canny [d14c016b]``). ``None`` for folders and for
    files that end before that window (the webui would show the hash of no bytes, ``e3b0c442``, for all of them)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= 0x100000:
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class HashCache:
    """sha256 of files and diffusers folders, cached in a JSON file keyed by (path, size, mtime)."""

    def __init__(self, cache_file: str | os.PathLike | None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._entries: dict[str, list] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = {}
            if self.cache_file and self.cache_file.is_file():
                try:
                    data = json.loads(self.cache_file.read_text(encoding="utf-8"))
                    if isinstance(data, dict):
                        self._entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3}
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable hash cache %s: %s", self.cache_file, exc)
        return self._entries

    def _save(self) -> None:
        if not self.cache_file:
            return
        try:
            with atomic_file(self.cache_file, "w", encoding="utf-8") as f:
                json.dump(self._entries, f, indent=0, sort_keys=True)
        except OSError as exc:  # a read-only store still works, it just hashes again next time
            log.warning("cannot write hash cache %s: %s", self.cache_file, exc)

    def file_sha256(self, path: str | os.PathLike) -> str:
        """sha256 of ``path``, from the cache when size and mtime match, else computed and stored."""
        path = Path(path).resolve()
        return self._digest(path, path.stat())

    def _digest(self, path: Path, st: os.stat_result) -> str:
        """sha256 of the resolved ``path`` whose stat is ``st``: the cached one while size and mtime match."""
        key = str(path)
        with self._lock:
            entry = self._load().get(key)
            if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                return entry[2]
        log.info("hashing %s (%.1f MB)", path, st.st_size / 1e6)
        digest = sha256_file(path)
        with self._lock:
            self._load()[key] = [st.st_size, st.st_mtime_ns, digest]
            self._save()
        return digest

    def folder_sha256(self, folder: str | os.PathLike) -> str:
        """The stable hash of a diffusers folder (see the module docstring). Checked on every request that uses
        the folder: one directory walk and one stat per file (symlinked files resolved), no path objects."""
        folder = Path(folder).resolve()
        files = []  # (relative posix path, resolved path, stat)
        todo = [(str(folder), "")]
        while todo:
            directory, prefix = todo.pop()
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((entry.path, f"{prefix}{entry.name}/"))
                    elif entry.name.endswith(FOLDER_HASH_SUFFIXES) and entry.is_file():
                        real = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
                        files.append((prefix + entry.name, real, os.stat(real)))
        h = hashlib.sha256()
        for rel, real, st in sorted(files):
            h.update(f"{rel}\t{self._digest(Path(real), st)}\n".encode())
        return h.hexdigest()

    def data_sha256(self, path: str | os.PathLike) -> str:
        """sha256 of a safetensors file's tensor data (the bytes after its header: the webui's "addnet" LoRA
        hash), cached as the file hash is (key ``{path}#data``)."""
        from core.safetensors_header import data_sha256

        path = Path(path).resolve()
        st = path.stat()
        key = f"{path}#data"
        with self._lock:
            entry = self._load().get(key)
            if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                return entry[2]
        digest = data_sha256(path)
        with self._lock:
            self._load()[key] = [st.st_size, st.st_mtime_ns, digest]
            self._save()
        return digest

    def sha256(self, path: str | os.PathLike) -> str:
        """Hash of a file or a diffusers folder."""
        return self.folder_sha256(path) if Path(path).is_dir() else self.file_sha256(path)
