"""sha256 of a file's bytes, streamed: the one file hash of the project (model hashes, artefact manifests)."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 22  # bytes read at a time


def sha256_file(path: str | os.PathLike, h=None) -> str:
    """sha256 hex digest of ``path``'s bytes. ``h``: a running ``hashlib.sha256`` object to continue (the digest
    is then that of everything fed to it so far, this file included)."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
