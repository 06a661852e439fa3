"""Files written whole or not at all: a temp file beside the target, flushed and fsynced, then ``os.replace``.

A leaf module (standard library only): export/ may use it as it uses core.errors. Nothing half-written is
left behind -- on any error the temp file is removed and the target keeps its old content.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode_of: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that takes a file name (``save_file(tmp)``); renamed onto
    ``path`` when the block ends without an error, removed otherwise. ``mode_of``: copy that file's permission
    bits onto the result (rewriting a file in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode_of is not None:
            os.chmod(tmp, os.stat(mode_of).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                mode_of: str | os.PathLike | None = None) -> Iterator[IO]:
    """An open temp file beside ``path`` (``mode`` "wb" or "w"); flushed, fsynced and renamed onto ``path``
    when the block ends without an error, removed otherwise."""
    with atomic_path(path, mode_of=mode_of) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
