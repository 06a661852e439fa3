"""The results disk as clients and operators see it: a full (or failing) disk is a clear error naming the cause
(``storage_full`` 507, ``storage_unavailable`` 503) instead of a 500 ``OperationalError``, and ``/health`` says
``degraded`` while the disk is nearly full or a write failed on it recently (issue 31)."""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from api_compat.errors import ApiError

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 * 1024 * 1024  # below this (or 5% of a smaller disk) the results disk reads degraded
RECENT_S = 300.0  # a storage failure this recent still reads degraded

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_code(exc: BaseException) -> str | None:
    """``storage_full``, ``storage_unavailable``, or None when ``exc`` is not about storage."""
    if isinstance(exc, sqlite3.DatabaseError):
        text = str(exc).lower()
        if "full" in text:
            return "storage_full"
        if any(w in text for w in ("disk i/o", "readonly", "read-only", "unable to open", "malformed")):
            return "storage_unavailable"
    elif isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in _FULL_ERRNOS:
            return "storage_full"
        if exc.errno in (errno.EROFS, errno.EIO):
            return "storage_unavailable"
    return None


class StorageWatch:
    """The results disk of one server: :meth:`error` maps a storage exception to its API error (and remembers
    it), :meth:`health` adds the disk's state to a ``/health`` answer."""

    def __init__(self, results_dir: Path, min_free: int = MIN_FREE_BYTES):
        self.results_dir = Path(results_dir)
        self.min_free = min_free
        self._last: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def error(self, exc: BaseException) -> ApiError | None:
        """The API error of an exception raised by a write to the results storage (the task database, a PNG),
        or None when ``exc`` is not about storage."""
        code = storage_code(exc)
        if code is None:
            return None
        with self._lock:
            self._last = (code, time.time())
        log.error("results storage: %s: %s", type(exc).__name__, exc)
        if code == "storage_full":
            return ApiError(code, "the server's results disk is full: the task could not be stored",
                            allowed="retry once the operator has freed space on the results disk")
        return ApiError(code, "the server's results storage cannot be written (read-only or failing disk)",
                        allowed="retry once the operator has repaired the results disk")

    def health(self, health: dict[str, Any]) -> dict[str, Any]:
        """``health`` (the backend's answer) with ``storage.free_bytes`` and, when the results disk has under
        ``min_free`` bytes free (5% of a smaller disk) or a storage write failed in the last RECENT_S seconds,
        status ``degraded`` and ``problems`` naming why."""
        problems = []
        free = least = None
        try:
            usage = shutil.disk_usage(self.results_dir)
            free, least = usage.free, min(self.min_free, usage.total // 20)
        except OSError as exc:
            problems.append(f"the results directory cannot be read ({exc.strerror or type(exc).__name__})")
        if free is not None and free < least:
            problems.append(f"the results disk has {free} bytes free (under {least})")
        with self._lock:
            last = self._last
        if last is not None and time.time() - last[1] < RECENT_S:
            problems.append(f"a write to the results storage failed {time.time() - last[1]:.0f} s ago ({last[0]})")
        out = {**health, "storage": {"free_bytes": free}}
        if problems and health.get("status") == "ok":
            out.update(status="degraded", problems=problems)
        return out
