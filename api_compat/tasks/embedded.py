"""The ``embedded`` task backend (the default): one worker thread and one bounded FIFO queue per device in the
API's own process, records and PNGs in a :class:`TaskStore` (SQLite + files).

The engine configurations on one device share its worker, which builds each configuration's engine on its first
task. Tasks go waiting -> running -> succeeded | failed; one failing task never stops a worker.

Every accepted task runs, also across a crash of the process (SIGKILL, out of memory): its record keeps the
validated payload with the seeds drawn at submit, and a new backend on the same results directory queues the
tasks the dead one left waiting or running again, in their submit order, before it takes new ones
(:class:`~api_compat.tasks.store.TaskStore` has the rules: a start that died counts, ``max_attempts``).
"""

from __future__ import annotations

import collections
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.config import EngineConfig
from core.errors import Cancelled, SdEngineError

from api_compat.tasks.backend import (Progress, RunLimit, Submission, error_of, initial_progress, result_dict,
                                      run_generation)
from api_compat.detect import run_detect
from api_compat.extras import run_extras
from api_compat.engine_api import EngineFactory, EngineLike
from api_compat.errors import ApiError
from api_compat.tasks.store import PendingTask, Status, TaskRecord, TaskStore

log = logging.getLogger(__name__)


@dataclass
class _Task:
    sub: Submission
    status: Status = Status.WAITING
    started: float | None = None
    progress: dict[str, Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0  # starts that died with an earlier process

    @property
    def task_id(self) -> str:
        return self.sub.task_id

    @property
    def request(self):
        return self.sub.request


class HeapFreezer:
    """Keeps the garbage collector's full collections off the submit path (issue 25). The engine's model load
    leaves a few hundred thousand long-lived Python objects (torch, diffusers, ONNX Runtime) in this process; a
    full collection walks them all, holding the GIL for 0.5 s or more, and the objects every submit keeps alive
    trigger one every few hundred submits -- each a stall of every request in flight. After a task that grew the
    heap a lot (a model loaded), the heap is collected once and frozen (``gc.freeze``): later collections walk
    only younger objects. Frozen objects are unfrozen and collected again at the next freeze, so an evicted
    model's reference cycles are freed then."""

    def __init__(self, growth: float = 1.25, least: int = 100_000):
        self.growth = growth
        self.least = least
        self.blocks = 0  # sys.getallocatedblocks() after the last freeze
        self._lock = threading.Lock()

    def after_task(self) -> bool:
        blocks = sys.getallocatedblocks()
        if blocks < max(self.blocks * self.growth, self.blocks + self.least) or not self._lock.acquire(False):
            return False
        try:
            started = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.blocks = sys.getallocatedblocks()
        finally:
            self._lock.release()
        log.info("heap frozen after a model load: %d objects, %.0f ms", gc.get_freeze_count(),
                 (time.perf_counter() - started) * 1e3)
        return True


FREEZER = HeapFreezer()  # the process's garbage collector is one, so is its freezer (every embedded backend's)


def device_key(device: str) -> str:
    """"cuda" and "cuda:0" are the same device."""
    return "cuda:0" if device == "cuda" else device


class _Worker:
    """One FIFO queue and one thread per device; it keeps one engine per configuration that runs there."""

    def __init__(self, backend: EmbeddedBackend, device: str):
        self.backend = backend
        self.device = device
        self.queue: collections.deque[_Task] = collections.deque()
        self.queued_bytes = 0
        self.running: _Task | None = None
        self.engines: dict[str, EngineLike] = {}
        self.thread = threading.Thread(target=self._loop, name=f"sdengine-worker-{device}", daemon=True)

    def _loop(self) -> None:
        backend = self.backend
        while True:
            with backend._cond:
                while not self.queue and not backend._closing:
                    backend._cond.wait()
                if not self.queue:
                    return
                task = self.queue.popleft()
                self.queued_bytes -= task.sub.nbytes
                task.started = time.time()
                # the record says running before any reader can see it running (a crash then reads "running")
                backend.store.set_running(task.task_id, task.started)
                task.status = Status.RUNNING
                self.running = task
            try:
                backend._run(self, task)
            except BaseException:  # pragma: no cover - _run handles everything; keep the worker alive
                log.exception("worker %s: unexpected error around task %s", self.device, task.task_id)
            finally:
                with backend._cond:
                    self.running = None
                    backend._live.pop(task.task_id, None)
                    backend._cond.notify_all()
                task.done.set()


Restore = Callable[[PendingTask], Submission]


class EmbeddedBackend:
    """Worker threads + :class:`TaskStore` under ``results_dir``. ``configs`` maps config ids to EngineConfigs.

    ``restore(pending) -> Submission`` rebuilds a task a dead process left (its stored payload validated and
    translated again); it raises :class:`ApiError` (or an engine error) for a task that can no longer run,
    which is then failed with that error. None: such tasks are failed ``interrupted``.
    ``max_attempts``: starts of one task that may die with the process (then ``worker_lost``).
    ``max_task_seconds``: a running task is stopped after so long (``timed_out``); None: no limit."""

    name = "embedded"

    def __init__(self, configs: dict[str, EngineConfig], results_dir: Path, *, engine_factory: EngineFactory,
                 max_queue: int, max_queue_bytes: int, max_age_s: float | None, max_tasks: int | None,
                 restore: Restore | None = None, max_attempts: int = 3, max_task_seconds: float | None = None):
        self.configs = configs
        self.max_task_seconds = max_task_seconds
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_attempts = max_attempts
        self._factory = engine_factory
        self.store = TaskStore(results_dir, max_age_s=max_age_s, max_tasks=max_tasks, max_attempts=max_attempts)
        self._cond = threading.Condition()
        self._live: dict[str, _Task] = {}
        self._closing = False
        self._closed = False
        self._last_cleanup = time.monotonic()
        self._workers: dict[str, _Worker] = {}
        for config in configs.values():
            device = device_key(config.device)
            if device not in self._workers:
                self._workers[device] = _Worker(self, device)
        self._worker_of = {k: self._workers[device_key(c.device)] for k, c in configs.items()}
        self.restored = self._restore(restore)
        for worker in self._workers.values():
            worker.thread.start()

    def _restore(self, restore: Restore | None) -> int:
        """Queue the tasks a dead process left (before any new one, in their submit order); returns how many."""
        count = 0
        for pending in self.store.pending():
            try:
                if restore is None:
                    raise ApiError("interrupted", "the service stopped before this task finished; submit it again")
                if pending.config_id not in self._worker_of:
                    raise ApiError("unknown_config", f"the resource configuration {pending.config_id!r} of this "
                                   "task is no longer served; submit it again", field="headers")
                sub = restore(pending)
            except (ApiError, SdEngineError) as exc:
                log.warning("task %s left by a previous process cannot run again: %s", pending.task_id, exc)
                self.store.finish(pending.task_id, Status.FAILED, error_code=exc.code, error_message=str(exc)[:2000])
                continue
            except Exception as exc:  # a bug of ours: the task ends, with the reason
                log.exception("task %s left by a previous process: restore failed", pending.task_id)
                self.store.finish(pending.task_id, Status.FAILED, error_code="internal_error",
                                  error_message=f"{type(exc).__name__}: {exc}"[:2000])
                continue
            task = _Task(sub, attempts=pending.attempts)
            worker = self._worker_of[sub.config_id]
            self._live[sub.task_id] = task
            worker.queue.append(task)
            worker.queued_bytes += sub.nbytes
            count += 1
        if count:
            log.warning("%d task(s) left by a previous process are queued again", count)
        return count

    # ------------------------------------------------------------------------------------------ the seam
    def submit(self, sub: Submission) -> None:
        task = _Task(sub)
        worker = self._worker_of[sub.config_id]
        with self._cond:
            if self._closing:
                raise ApiError("closed", "the service is closed")
            if len(worker.queue) >= self.max_queue:
                raise ApiError("queue_full", f"the queue is full ({self.max_queue} waiting tasks); retry later",
                               field=None, allowed=f"at most {self.max_queue} waiting tasks")
            if worker.queue and worker.queued_bytes + sub.nbytes > self.max_queue_bytes:
                raise ApiError("queue_full", f"the waiting tasks' images fill the queue ({worker.queued_bytes} of "
                               f"{self.max_queue_bytes} bytes); retry later",
                               allowed=f"at most {self.max_queue_bytes} bytes of images in waiting tasks")
            self.store.insert(sub.task_id, sub.config_id, sub.parameters, sub.created, kind=sub.kind,
                              payload=sub.payload or None)
            self._live[sub.task_id] = task
            worker.queue.append(task)
            worker.queued_bytes += sub.nbytes
            self._cond.notify_all()

    def result(self, task_id: str) -> dict[str, Any]:
        with self._cond:
            task = self._live.get(task_id)
            if task is not None and task.status in (Status.WAITING, Status.RUNNING):
                out = {"taskId": task_id, "status": task.status.value, "images": [],
                       "parameters": task.sub.parameters, "info": {}}
                if task.status is Status.RUNNING:
                    out["progress"] = dict(task.progress or initial_progress(
                        task.sub.request.steps * task.sub.request.n_iter))
                else:
                    out["queue_position"] = self._worker_of[task.sub.config_id].queue.index(task)
                    if task.attempts:  # as the celery backend shows a task whose worker died
                        out["retry"] = {"attempts": task.attempts, "max_attempts": self.max_attempts,
                                        "reason": "the service stopped while this task ran; it runs again"}
                return out
        record = self.store.get(task_id)
        if record is None:
            expired = self.store.expired_at(task_id)
            if expired is not None:
                raise _expired(task_id, self.store.max_age_s)
            raise ApiError("not_found", f"no task {task_id!r}", field="taskId")
        return self._record_dict(record)

    def cancel(self, task_id: str) -> None:
        with self._cond:
            task = self._live.get(task_id)
            if task is not None:
                task.cancel.set()
                if task.status is Status.RUNNING:  # a crash before it stops must not run it again
                    self.store.request_cancel(task_id)
                queue = self._worker_of[task.sub.config_id].queue
                if task.status is Status.WAITING and task in queue:
                    queue.remove(task)
                    self._worker_of[task.sub.config_id].queued_bytes -= task.sub.nbytes
                    self._live.pop(task_id, None)
                    self.store.finish(task_id, Status.FAILED, error_code="cancelled",
                                      error_message="cancelled while waiting")
                    task.status = Status.FAILED
                    task.done.set()

    def wait(self, task_id: str, timeout: float | None) -> None:
        with self._cond:
            task = self._live.get(task_id)
        if task is not None and not task.done.wait(timeout):
            raise TimeoutError(f"task {task_id} did not finish within {timeout} s")

    def image_path(self, task_id: str, index: int) -> Path | None:
        return self.store.image_path(task_id, index)

    def health(self) -> dict[str, Any]:
        with self._cond:
            devices = {k: {"device": k, "waiting": len(w.queue), "waiting_bytes": w.queued_bytes, "running": w.running is not None, "capacity": self.max_queue,
                           "alive": w.thread.is_alive(), "configs": sorted(c for c, x in self._worker_of.items()
                                                                           if x is w)}
                       for k, w in self._workers.items()}
        return {"status": "closed" if self._closing else "ok", "queue": self.name, "devices": devices}

    def close(self, timeout: float | None = 60.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._closing = True
            for worker in self._workers.values():
                while worker.queue:
                    task = worker.queue.popleft()
                    worker.queued_bytes -= task.sub.nbytes
                    self._live.pop(task.task_id, None)
                    self.store.finish(task.task_id, Status.FAILED, error_code="cancelled",
                                      error_message="the service was closed before the task ran")
                    task.status = Status.FAILED
                    task.done.set()
                if worker.running is not None:
                    worker.running.cancel.set()
            self._cond.notify_all()
        for worker in self._workers.values():
            worker.thread.join(timeout)
        self._closed = True
        self.store.close()

    @property
    def closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------------------------------- helpers
    def _record_dict(self, record: TaskRecord) -> dict[str, Any]:
        return result_dict(record.task_id, record.status.value,
                           [str(self.store.images_dir / name) for name in record.images], record.parameters,
                           record.info, (record.error_code, record.error_message))

    def _engine(self, worker: _Worker, task: _Task) -> EngineLike:
        engine = worker.engines.get(task.sub.config_id)
        if engine is None:
            engine = worker.engines[task.sub.config_id] = self._factory(self.configs[task.sub.config_id])
        return engine

    def _run(self, worker: _Worker, task: _Task) -> None:
        """Run one task to a final state; every exception ends as a failed task, never in the worker."""
        tracker = Progress(task.sub.request.steps)
        limit = RunLimit(task.cancel, self.max_task_seconds)

        def progress(event, steps: int | None = None) -> None:
            limit.observe(event)
            task.progress = tracker(event, steps)

        def preview(step: int, image) -> None:  # live previews, from the engine's preview thread
            task.progress = tracker.preview(step, image)

        try:
            if task.cancel.is_set():
                raise Cancelled("cancelled before the task started")
            with limit:
                if task.sub.kind in ("extras", "extras-batch"):  # the webui's extras: upscalers, no SD engine
                    config = self.configs[task.sub.config_id]
                    info, names = run_extras(task.sub.request, images_dir=self.store.images_dir,
                                             task_id=task.task_id, progress=progress, cancel=task.cancel,
                                             models_dir=config.models_dir, device=config.device)
                elif task.sub.kind == "detect":  # /controlnet/detect: the preprocessors, no engine
                    info, names = run_detect(task.sub.request, images_dir=self.store.images_dir,
                                             task_id=task.task_id, progress=progress, cancel=task.cancel,
                                             models_dir=self.configs[task.sub.config_id].models_dir)
                else:
                    engine = self._engine(worker, task)
                    info, names = run_generation(engine, task.sub.request, images_dir=self.store.images_dir,
                                                 task_id=task.task_id, config_id=task.sub.config_id,
                                                 progress=progress, cancel=task.cancel, warnings=task.sub.warnings,
                                                 preview=preview)
            self.store.finish(task.task_id, Status.SUCCEEDED, info=info, images=names)
            task.status = Status.SUCCEEDED
        except Exception as exc:
            code, message = error_of(exc, task.task_id, task.sub.origins, limit)
            self._fail(task, code, message)
        try:
            self.store.checkpoint()
        except Exception:  # pragma: no cover - the records are safe in the WAL
            log.warning("WAL checkpoint failed", exc_info=True)
        self._maybe_cleanup()
        FREEZER.after_task()

    def _fail(self, task: _Task, code: str, message: str) -> None:
        try:
            self.store.finish(task.task_id, Status.FAILED, error_code=code, error_message=message)
        except Exception:  # pragma: no cover - the store itself failed; the record stays 'running' until restart
            log.exception("could not record the failure of task %s", task.task_id)
        task.status = Status.FAILED

    def _maybe_cleanup(self) -> None:
        if time.monotonic() - self._last_cleanup > 60.0:
            self._last_cleanup = time.monotonic()
            try:
                self.store.cleanup()
            except Exception:  # pragma: no cover
                log.exception("retention cleanup failed")


def _expired(task_id: str, ttl: float | None) -> ApiError:
    after = f" (results are kept {ttl:g} s)" if ttl else ""
    return ApiError("expired", f"task {task_id!r} finished and its result has expired{after}; submit it again",
                    field="taskId", allowed="a task id from sd_txt2img, within the results TTL")
