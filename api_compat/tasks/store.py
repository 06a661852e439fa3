"""Task records in SQLite (stdlib sqlite3, WAL) and result PNGs on disk, surviving restarts.

Layout of a results directory::

    tasks.sqlite3        one row per task (status, parameters, info, image file names, error)
    images/{taskId}-{i}.png
    .lock                the pid of the process that has the store open (information only)

The process that has a store open holds an exclusive ``flock`` on the results directory itself (an open file
descriptor of the directory): deleting or replacing ``.lock`` or any other file cannot release it, and the
kernel releases it when that process dies, however it dies.

A task's record keeps what it takes to run it again (``kind`` and ``payload``: the validated payload with its
random seeds drawn at submit) until it is final. Opening a store takes back every task a process that died
left ``waiting`` or ``running``: both are ``waiting`` again, in their submit order (:meth:`TaskStore.pending`),
and run with the same payload and seeds; a ``running`` one counts the start that died (``attempts``) and is
failed ``worker_lost`` once ``max_attempts`` starts died, as the Celery backend does. A task whose
cancel was asked, or whose record has no payload (written before records kept one), is failed
(``cancelled``, ``interrupted``). Files no final record names (a temp file or a PNG of the dead run) are
deleted, and retention is applied.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASK_ID = re.compile(r"^[0-9a-f]{32}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    config_id TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    parameters TEXT NOT NULL,
    info TEXT,
    images TEXT,
    error_code TEXT,
    error_message TEXT,
    kind TEXT,
    payload TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished);
CREATE TABLE IF NOT EXISTS expired (
    task_id TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""
# columns added since the first layout: a database written before gets them (NULL payload: not run again)
_ADDED = {"kind": "TEXT", "payload": "TEXT", "attempts": "INTEGER NOT NULL DEFAULT 0",
          "cancel": "INTEGER NOT NULL DEFAULT 0"}
EXPIRED_KEEP_S = 7 * 86400  # how long an expired task id still answers "expired" rather than "not_found"


class Status(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    status: Status
    config_id: str
    created: float
    started: float | None
    finished: float | None
    parameters: dict[str, Any]
    info: dict[str, Any]
    images: tuple[str, ...]
    error_code: str | None
    error_message: str | None
    attempts: int = 0


@dataclass(frozen=True)
class PendingTask:
    """A waiting task taken back at open: what :class:`~api_compat.tasks.embedded.EmbeddedBackend` queues again."""

    task_id: str
    config_id: str
    kind: str
    payload: Any
    parameters: dict[str, Any]
    created: float
    attempts: int


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN/Infinity, and HTTP answers must be strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_finite(json.loads(json.dumps(value, default=_json_default))), ensure_ascii=False,
                      allow_nan=False)


SERVER_RECORD = "server.json"  # written by `sdengine serve` in its results folder: {pid, url, auth}


def read_server_record(root: str | os.PathLike) -> dict[str, Any] | None:
    """The running server recorded in a results folder (``sdengine serve`` writes it), or None."""
    try:
        data = json.loads((Path(root) / SERVER_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def locked_message(root: str | os.PathLike) -> str:
    """Why a results folder cannot be opened: the process holding it (its PID, and the server's URL when it is
    ``sdengine serve``) and what to do."""
    try:
        pid = int((Path(root) / ".lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    server = read_server_record(root)
    who = f"process {pid}" if pid else "another process"
    if server and pid and server.get("pid") == pid and server.get("url"):
        who += f" (sdengine serve at {server['url']})"
    return (f"{root}: the results directory is in use by {who}; stop it, or give this one another "
            "--results-dir (or $SDENGINE_RESULTS_DIR)")


class StoreLocked(RuntimeError):
    """Another process has this results directory open."""


class TaskStore:
    """SQLite task records + PNG files under ``root``. Thread-safe (one connection behind a lock).

    ``max_age_s`` / ``max_tasks`` bound the finished tasks kept (rows and files); None keeps them all.
    ``max_attempts``: starts of a task that may die with the process before it is failed ``worker_lost``.
    """

    def __init__(self, root: str | os.PathLike, *, max_age_s: float | None = 7 * 86400,
                 max_tasks: int | None = 10000, max_attempts: int = 3):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s
        self.max_tasks = max_tasks
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._lock_file = self._acquire_dir_lock()
        self._db = sqlite3.connect(self.root / "tasks.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # no checkpoint (and its fsync) inside a submit: the workers call checkpoint() after each task
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name, decl in _ADDED.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {decl}")
        self._ckpt_lock = threading.Lock()
        self._ckpt: sqlite3.Connection | None = None
        self.recovered = self._recover()
        self.cleanup()

    # ---------------------------------------------------------------------------------------------- setup
    def _acquire_dir_lock(self) -> int | None:
        """An exclusive flock on the directory's own file descriptor (not on a file in it, which could be
        deleted and re-created by anyone, letting a second process in); returns the descriptor, held open."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLocked(locked_message(self.root)) from None
        try:
            (self.root / ".lock").write_text(f"{os.getpid()}\n")
        except OSError:  # information only
            pass
        return fd

    def _recover(self) -> int:
        """Take back the tasks a dead process left waiting/running (module docstring); returns how many wait
        to run again. Stray files removed."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cancelled = self._db.execute(
                "UPDATE tasks SET status='failed', finished=?, payload=NULL, error_code='cancelled', "
                "error_message='cancelled; the service stopped before the task finished' "
                "WHERE status IN ('waiting', 'running') AND cancel != 0", (now,)).rowcount
            interrupted = self._db.execute(
                "UPDATE tasks SET status='failed', finished=?, error_code='interrupted', "
                "error_message='the service stopped before this task finished (it was ' || status || "
                "'); submit it again' WHERE status IN ('waiting', 'running') AND payload IS NULL", (now,)).rowcount
            lost = self._db.execute(
                "UPDATE tasks SET status='failed', finished=?, payload=NULL, error_code='worker_lost', "
                "error_message='the service stopped ' || attempts || ' times while running this task (killed "
                "or out of memory); it is not run again' WHERE status='running' AND attempts >= ?",
                (now, self.max_attempts)).rowcount
            self._db.execute("UPDATE tasks SET status='waiting', started=NULL WHERE status='running'")
            count = self._db.execute("SELECT COUNT(*) FROM tasks WHERE status='waiting'").fetchone()[0]
            known = set()
            for (images,) in self._db.execute("SELECT images FROM tasks WHERE images IS NOT NULL"):
                known.update(json.loads(images))
        for entry in os.scandir(self.images_dir):
            if entry.name not in known:
                try:
                    os.unlink(entry.path)
                except OSError:
                    log.warning("could not remove stray file %s", entry.path)
        if count:
            log.warning("%d task(s) left by a previous process wait to run again", count)
        if cancelled or interrupted or lost:
            log.warning("tasks left by a previous process: %d cancelled, %d interrupted (no payload kept), "
                        "%d failed worker_lost after %d starts", cancelled, interrupted, lost, self.max_attempts)
        return count

    def pending(self) -> list[PendingTask]:
        """The waiting tasks, in submit order (at open: those a dead process left, to be queued again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, config_id, kind, payload, parameters, created, attempts FROM tasks "
                "WHERE status='waiting' ORDER BY rowid").fetchall()
        return [PendingTask(task_id=r[0], config_id=r[1], kind=r[2] or "txt2img", payload=json.loads(r[3]),
                            parameters=json.loads(r[4]), created=r[5], attempts=r[6]) for r in rows]

    # -------------------------------------------------------------------------------------------- writes
    def insert(self, task_id: str, config_id: str, parameters: dict[str, Any], created: float | None = None, *,
               kind: str = "txt2img", payload: Any = None) -> None:
        """A waiting task; ``payload`` (JSON) is what it runs again from after a crash (None: it is not)."""
        stored = None
        if payload is not None:
            try:
                stored = json.dumps(payload, ensure_ascii=False)
            except (TypeError, ValueError):  # not JSON (an in-process caller's objects): not run again
                log.warning("task %s: payload not JSON; it is not run again after a crash", task_id)
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (task_id, status, config_id, created, parameters, kind, payload) "
                "VALUES (?, 'waiting', ?, ?, ?, ?, ?)",
                (task_id, config_id, created or time.time(), json.dumps(parameters, ensure_ascii=False), kind,
                 stored),
            )

    def set_running(self, task_id: str, started: float | None = None) -> None:
        """The task started (one more attempt: a crash from here on counts against ``max_attempts``)."""
        with self._lock:
            self._db.execute("UPDATE tasks SET status='running', started=?, attempts=attempts+1 WHERE task_id=?",
                             (started or time.time(), task_id))

    def request_cancel(self, task_id: str) -> None:
        """Remember a cancel of a running task, so that a crash before it stops does not run it again."""
        with self._lock:
            self._db.execute("UPDATE tasks SET cancel=1 WHERE task_id=? AND status IN ('waiting', 'running')",
                             (task_id,))

    def finish(self, task_id: str, status: Status, *, info: dict[str, Any] | None = None,
               images: list[str] | tuple[str, ...] = (), error_code: str | None = None,
               error_message: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE tasks SET status=?, finished=?, info=?, images=?, error_code=?, error_message=?, "
                "payload=NULL WHERE task_id=?",
                (Status(status).value, time.time(), dumps(info or {}), json.dumps(list(images)), error_code,
                 error_message, task_id),
            )

    def image_file(self, task_id: str, index: int) -> Path:
        """Where image ``index`` of a task is written (ids only: the name never comes from a client)."""
        if not TASK_ID.match(task_id) or index < 0:
            raise ValueError(f"invalid task id or index: {task_id!r}, {index}")
        return self.images_dir / f"{task_id}-{index}.png"

    # --------------------------------------------------------------------------------------------- reads
    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT task_id, status, config_id, created, started, finished, parameters, info, images, "
                "error_code, error_message, attempts FROM tasks WHERE task_id=?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        return TaskRecord(
            task_id=row[0], status=Status(row[1]), config_id=row[2], created=row[3], started=row[4],
            finished=row[5], parameters=json.loads(row[6]), info=json.loads(row[7]) if row[7] else {},
            images=tuple(json.loads(row[8])) if row[8] else (), error_code=row[9], error_message=row[10],
            attempts=row[11] or 0,
        )

    def image_path(self, task_id: str, index: int) -> Path | None:
        """The PNG of a finished task, or None (unknown task, index out of range, file gone)."""
        if not TASK_ID.match(task_id):
            return None
        record = self.get(task_id)
        if record is None or not 0 <= index < len(record.images):
            return None
        path = self.images_dir / record.images[index]
        return path if path.is_file() else None

    def expired_at(self, task_id: str) -> float | None:
        """When retention removed this task (None: never known, or removed more than 7 days ago)."""
        with self._lock:
            row = self._db.execute("SELECT at FROM expired WHERE task_id=?", (task_id,)).fetchone()
        return row[0] if row else None

    def count(self, status: Status | None = None) -> int:
        with self._lock:
            if status is None:
                return self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM tasks WHERE status=?", (Status(status).value,)).fetchone()[0]

    # ----------------------------------------------------------------------------------------- retention
    def cleanup(self, now: float | None = None) -> int:
        """Delete finished tasks older than ``max_age_s`` or beyond the newest ``max_tasks``, files first."""
        now = time.time() if now is None else now
        with self._lock:
            doomed: list[tuple[str, str | None]] = []
            if self.max_age_s is not None:
                doomed += self._db.execute(
                    "SELECT task_id, images FROM tasks WHERE finished IS NOT NULL AND finished < ?",
                    (now - self.max_age_s,),
                ).fetchall()
            if self.max_tasks is not None:
                doomed += self._db.execute(
                    "SELECT task_id, images FROM tasks WHERE finished IS NOT NULL ORDER BY finished DESC "
                    "LIMIT -1 OFFSET ?",
                    (self.max_tasks,),
                ).fetchall()
            ids = {}
            for task_id, images in doomed:
                ids[task_id] = json.loads(images) if images else []
            for task_id, images in ids.items():
                for name in images:
                    try:
                        os.unlink(self.images_dir / name)
                    except FileNotFoundError:
                        pass
                self._db.execute("DELETE FROM tasks WHERE task_id=?", (task_id,))
                self._db.execute("INSERT OR REPLACE INTO expired (task_id, at) VALUES (?, ?)", (task_id, now))
            self._db.execute("DELETE FROM expired WHERE at < ?", (now - EXPIRED_KEEP_S,))
        if ids:
            log.info("retention removed %d finished task(s)", len(ids))
        return len(ids)

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        """Copy the WAL into the database file, on a connection of its own so that submits (inserts on the
        main connection) go on meanwhile. Called by the workers after each task and at close."""
        with self._ckpt_lock:
            if self._ckpt is None:
                self._ckpt = sqlite3.connect(self.root / "tasks.sqlite3", check_same_thread=False,
                                             isolation_level=None)
                self._ckpt.execute("PRAGMA busy_timeout=5000")
            self._ckpt.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if mode == 'TRUNCATE' else 'PASSIVE'})")

    def close(self) -> None:
        try:
            self.checkpoint("TRUNCATE")
        except sqlite3.Error:  # pragma: no cover - the data is safe in the WAL either way
            log.warning("final checkpoint of %s failed", self.root, exc_info=True)
        with self._ckpt_lock:
            if self._ckpt is not None:
                self._ckpt.close()
        with self._lock:
            try:
                self._db.close()
            finally:
                if self._lock_file is not None:
                    os.close(self._lock_file)
                    self._lock_file = None
