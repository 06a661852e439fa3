"""LocalService: the sd_txt2img / sd_img2img / sd_get_result contract in-process, over a bounded task queue.

    with LocalService(models_dir="models") as api:
        task = api.sd_txt2img({"prompt": "a cat", "steps": 20})
        result = api.wait(task["taskId"])          # {"taskId", "status", "images": [png paths], ...}

Validation happens at submit (an :class:`ApiError` is raised and nothing is queued). There is one worker
thread and one bounded FIFO queue per device; the engine configurations (the default one, and each named one
selected with the ``X-SP-RESOURCE-CONFIG-ID`` header) on that device share them, and the worker builds each
configuration's engine on its first task. Tasks go waiting -> running -> succeeded | failed; one failing
task never stops a worker. Records and PNGs live in a :class:`TaskStore`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.errors import Cancelled, InvalidRequest, SdEngineError
from engine.models.store import ModelStore

from api_compat.engine_api import EngineFactory, EngineLike, check_models, default_engine_factory
from api_compat.errors import ApiError, api_error_from
from api_compat.images import ImageLimits, write_png
from api_compat.schema import parse_img2img, parse_payload
from api_compat.store import TASK_ID, Status, TaskRecord, TaskStore
from api_compat.translate import translate, translate_img2img

log = logging.getLogger(__name__)

CONFIG_HEADER = "X-SP-RESOURCE-CONFIG-ID"
DEFAULT_CONFIG = "default"
ENV_RESULTS_DIR = "SDENGINE_RESULTS_DIR"


@dataclass
class _Task:
    task_id: str
    config_id: str
    request: Any
    parameters: dict[str, Any]
    nbytes: int = 0  # what the queued task holds: its unit images, compressed
    status: Status = Status.WAITING
    created: float = field(default_factory=time.time)
    started: float | None = None
    progress: dict[str, Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def _image_bytes(request: Any) -> int:
    """The compressed bytes of a request's images (ControlNet units, init image, mask) a waiting task holds."""
    images = [u.image for u in request.controlnet_units]
    if request.init is not None:
        images += [request.init.image, request.init.mask]
    return sum(getattr(image, "nbytes", 0) for image in images if image is not None)


def _device_key(device: str) -> str:
    """"cuda" and "cuda:0" are the same device."""
    return "cuda:0" if device == "cuda" else device


class _Worker:
    """One FIFO queue and one thread per device; it keeps one engine per configuration that runs there (built
    on the first task of that configuration, in this thread)."""

    def __init__(self, service: LocalService, device: str):
        self.service = service
        self.device = device
        self.queue: collections.deque[_Task] = collections.deque()
        self.queued_bytes = 0
        self.running: _Task | None = None
        self.engines: dict[str, EngineLike] = {}
        self.thread = threading.Thread(target=self._loop, name=f"sdengine-worker-{device}", daemon=True)

    def _loop(self) -> None:
        service = self.service
        while True:
            with service._cond:
                while not self.queue and not service._closing:
                    service._cond.wait()
                if not self.queue:
                    return
                task = self.queue.popleft()
                self.queued_bytes -= task.nbytes
                task.started = time.time()
                # the record says running before any reader can see it running (a crash then reads "running")
                service.store.set_running(task.task_id, task.started)
                task.status = Status.RUNNING
                self.running = task
            try:
                service._run(self, task)
            except BaseException:  # pragma: no cover - _run handles everything; keep the worker alive
                log.exception("worker %s: unexpected error around task %s", self.device, task.task_id)
            finally:
                with service._cond:
                    self.running = None
                    service._live.pop(task.task_id, None)
                    service._cond.notify_all()
                task.done.set()


class LocalService:
    """The embedded API. ``engine_options`` are :class:`EngineConfig` fields (backend, device, precision ...).

    ``configs`` maps a resource-configuration id to engine options applied over ``engine_options``; the
    ``X-SP-RESOURCE-CONFIG-ID`` header picks one (absent: the default configuration).
    ``engine_factory(config) -> engine`` builds an engine (default: ``engine.pipeline.Engine``).
    ``check_models``: model names are resolved in each configuration's model store at submit (an unknown
    name is refused before anything is queued); False leaves the lookup to the engine, when the task runs.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike | None = None,
        *,
        results_dir: str | os.PathLike | None = None,
        configs: dict[str, dict[str, Any]] | None = None,
        engine_factory: EngineFactory | None = None,
        check_models: bool = True,
        max_queue: int = 256,
        max_queue_bytes: int = 512 * 1024 * 1024,
        allow_url_fetch: bool = False,
        max_image_bytes: int = 20 * 1024 * 1024,
        max_image_pixels: int = 4096 * 4096,
        max_age_s: float | None = 7 * 86400,
        max_tasks: int | None = 10000,
        **engine_options: Any,
    ):
        if models_dir is not None:
            engine_options["models_dir"] = models_dir
        base = EngineConfig(**engine_options)
        self.configs: dict[str, EngineConfig] = {DEFAULT_CONFIG: base}
        for config_id, options in (configs or {}).items():
            self.configs[str(config_id)] = EngineConfig(**{**engine_options, **options})
        self.results_dir = Path(results_dir or os.environ.get(ENV_RESULTS_DIR) or "outputs/sdengine")
        self.limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels,
                                  allow_url_fetch=allow_url_fetch)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._factory = engine_factory or default_engine_factory
        self._stores: dict[str, ModelStore | None] = {
            k: ModelStore.from_config(c) if check_models else None for k, c in self.configs.items()}
        self.store = TaskStore(self.results_dir, max_age_s=max_age_s, max_tasks=max_tasks)
        self._cond = threading.Condition()
        self._live: dict[str, _Task] = {}
        self._closing = False
        self._closed = False
        self._last_cleanup = time.monotonic()
        self._workers: dict[str, _Worker] = {}
        for config in self.configs.values():
            device = _device_key(config.device)
            if device not in self._workers:
                self._workers[device] = _Worker(self, device)
        self._worker_of = {k: self._workers[_device_key(c.device)] for k, c in self.configs.items()}
        for worker in self._workers.values():
            worker.thread.start()

    # ----------------------------------------------------------------------------------------- the API
    def sd_txt2img(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, str]:
        """Validate and queue a task; returns ``{"taskId", "status"}``. Raises :class:`ApiError`."""
        return self._submit(payload, headers, img2img=False)

    def sd_img2img(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, str]:
        """The img2img sibling of :meth:`sd_txt2img` (webui img2img payload: init_images, denoising_strength,
        resize_mode, mask ...): validate and queue a task; returns ``{"taskId", "status"}``; the result is read
        with :meth:`sd_get_result`. Raises :class:`ApiError`."""
        return self._submit(payload, headers, img2img=True)

    def _submit(self, payload: dict[str, Any], headers: dict[str, str] | None, *, img2img: bool) -> dict[str, str]:
        config_id = self._config_id(headers)
        config = self.configs[config_id]
        parsed = parse_img2img(payload) if img2img else parse_payload(payload)
        try:
            translation = (translate_img2img if img2img else translate)(parsed, config, self.limits)
        except InvalidRequest as exc:
            raise api_error_from(exc) from None
        except SdEngineError as exc:  # e.g. a missing optional dependency of the engine
            raise ApiError(exc.code, str(exc)) from None
        store = self._stores[config_id]
        if store is not None:
            check_models(store, translation.models)
        task = _Task(task_id=uuid.uuid4().hex, config_id=config_id, request=translation.request,
                     parameters=translation.parameters,
                     nbytes=_image_bytes(translation.request))
        worker = self._worker_of[config_id]
        with self._cond:
            if self._closing:
                raise ApiError("closed", "the service is closed")
            if len(worker.queue) >= self.max_queue:
                raise ApiError("queue_full", f"the queue is full ({self.max_queue} waiting tasks); retry later",
                               field=None, allowed=f"at most {self.max_queue} waiting tasks")
            if worker.queue and worker.queued_bytes + task.nbytes > self.max_queue_bytes:
                raise ApiError("queue_full", f"the waiting tasks' images fill the queue ({worker.queued_bytes} of "
                               f"{self.max_queue_bytes} bytes); retry later",
                               allowed=f"at most {self.max_queue_bytes} bytes of images in waiting tasks")
            self.store.insert(task.task_id, config_id, task.parameters, task.created)
            self._live[task.task_id] = task
            worker.queue.append(task)
            worker.queued_bytes += task.nbytes
            self._cond.notify_all()
        return {"taskId": task.task_id, "status": Status.WAITING.value}

    def sd_get_result(self, query: dict[str, Any] | str) -> dict[str, Any]:
        """``{"taskId": ...}`` -> the task's result dict (API.md "Poll"). Raises :class:`ApiError` (not_found)."""
        task_id = self._task_id(query)
        with self._cond:
            task = self._live.get(task_id)
            if task is not None and task.status in (Status.WAITING, Status.RUNNING):
                out = {"taskId": task_id, "status": task.status.value, "images": [], "parameters": task.parameters,
                       "info": {}}
                if task.status is Status.RUNNING:
                    out["progress"] = dict(task.progress or {"step": 0, "steps": task.request.steps,
                                                             "fraction": 0.0, "eta_seconds": None})
                else:
                    out["queue_position"] = self._worker_of[task.config_id].queue.index(task)
                return out
        record = self.store.get(task_id)
        if record is None:
            raise ApiError("not_found", f"no task {task_id!r}", field="taskId")
        return self._record_dict(record)

    def cancel(self, query: dict[str, Any] | str) -> dict[str, Any]:
        """``{"taskId": ...}`` or the id. Waiting: failed ``cancelled`` at once. Running: the engine is asked to
        stop between steps."""
        task_id = self._task_id(query)
        with self._cond:
            task = self._live.get(task_id)
            if task is not None:
                task.cancel.set()
                queue = self._worker_of[task.config_id].queue
                if task.status is Status.WAITING and task in queue:
                    queue.remove(task)
                    self._worker_of[task.config_id].queued_bytes -= task.nbytes
                    self._live.pop(task_id, None)
                    self.store.finish(task_id, Status.FAILED, error_code="cancelled",
                                      error_message="cancelled while waiting")
                    task.status = Status.FAILED
                    task.done.set()
        return self.sd_get_result({"taskId": task_id})

    def wait(self, query: dict[str, Any] | str, timeout: float | None = None) -> dict[str, Any]:
        """``{"taskId": ...}`` or the id: block until the task is finished; ``TimeoutError`` after ``timeout`` s."""
        task_id = self._task_id(query)
        with self._cond:
            task = self._live.get(task_id)
        if task is not None and not task.done.wait(timeout):
            raise TimeoutError(f"task {task_id} did not finish within {timeout} s")
        return self.sd_get_result({"taskId": task_id})

    def image_path(self, task_id: str, index: int) -> Path | None:
        """The PNG file of image ``index`` of a finished task, or None."""
        return self.store.image_path(task_id, index)

    def health(self) -> dict[str, Any]:
        with self._cond:
            devices = {k: {"waiting": len(w.queue), "waiting_bytes": w.queued_bytes, "running": w.running is not None, "capacity": self.max_queue,
                           "alive": w.thread.is_alive(), "configs": sorted(c for c, x in self._worker_of.items()
                                                                           if x is w)}
                       for k, w in self._workers.items()}
        return {"status": "closed" if self._closing else "ok", "devices": devices}

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting tasks, fail the waiting ones (``cancelled``), cancel the running ones, join workers."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            for worker in self._workers.values():
                while worker.queue:
                    task = worker.queue.popleft()
                    worker.queued_bytes -= task.nbytes
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

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- helpers
    def _config_id(self, headers: dict[str, str] | None) -> str:
        value = None
        for key, val in (headers or {}).items():
            if isinstance(key, str) and key.lower() == CONFIG_HEADER.lower():
                value = val
        if value is None or value == "":
            return DEFAULT_CONFIG
        if not isinstance(value, str) or value not in self.configs:
            raise ApiError("unknown_config", f"unknown resource configuration {str(value)[:100]!r}",
                           field=f"headers.{CONFIG_HEADER}", allowed=", ".join(sorted(self.configs)))
        return value

    @staticmethod
    def _task_id(query: dict[str, Any] | str) -> str:
        """The task id of a query: missing or not a string is 422 (as any payload field), a string that is no
        task id of this service 404."""
        task_id = query.get("taskId") if isinstance(query, dict) else query
        if isinstance(query, dict) and "taskId" not in query:
            raise ApiError("invalid_request", "is required", field="taskId", allowed="a task id from sd_txt2img")
        if not isinstance(task_id, str):
            raise ApiError("invalid_request", f"must be a string, got {type(task_id).__name__}", field="taskId",
                           allowed="a task id from sd_txt2img (32 hex digits)")
        if not TASK_ID.match(task_id):
            raise ApiError("not_found", f"no task {task_id[:100]!r}", field="taskId",
                           allowed="a task id from sd_txt2img (32 hex digits)")
        return task_id

    def _record_dict(self, record: TaskRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "taskId": record.task_id,
            "status": record.status.value,
            "images": [str(self.store.images_dir / name) for name in record.images],
            "parameters": record.parameters,
            "info": record.info,
        }
        if record.status is Status.FAILED:
            out["error"] = {"code": record.error_code or "internal_error", "message": record.error_message or ""}
        elif record.status is Status.SUCCEEDED:
            gone = [i for i, name in enumerate(record.images) if not (self.store.images_dir / name).is_file()]
            if gone:  # deleted by hand or by another tool: no URL may point at a missing file
                out.update(status=Status.FAILED.value, images=[], error={
                    "code": "expired", "message": f"the result image(s) {gone} are no longer on the server "
                                                  "(deleted after the task succeeded); submit the task again"})
        return out

    def _engine(self, worker: _Worker, task: _Task) -> EngineLike:
        engine = worker.engines.get(task.config_id)
        if engine is None:
            engine = worker.engines[task.config_id] = self._factory(self.configs[task.config_id])
        return engine

    def _run(self, worker: _Worker, task: _Task) -> None:
        """Run one task to a final state; every exception ends as a failed task, never in the worker."""
        first = time.monotonic()

        def progress(step: int, steps: int) -> None:
            step, steps = int(step), max(int(steps), 1)
            elapsed = time.monotonic() - first
            eta = elapsed / step * (steps - step) if step > 0 else None
            task.progress = {"step": step, "steps": steps, "fraction": min(step / steps, 1.0),
                             "eta_seconds": None if eta is None else round(eta, 3)}

        try:
            if task.cancel.is_set():
                raise Cancelled("cancelled before the task started")
            engine = self._engine(worker, task)
            result = engine.generate(task.request, progress=progress, cancel=task.cancel)
            names = []
            infotexts = list(result.infotexts)
            for i, image in enumerate(result.images):
                path = self.store.image_file(task.task_id, i)
                write_png(path, image, infotexts[i] if i < len(infotexts) else None)
                names.append(path.name)
            info = dict(result.info)
            info.setdefault("infotexts", infotexts)
            info.setdefault("all_seeds", list(result.seeds))
            info.setdefault("all_subseeds", list(result.subseeds))
            info.setdefault("timings", dict(result.timings))
            info.setdefault("resource_config_id", task.config_id)
            self.store.finish(task.task_id, Status.SUCCEEDED, info=info, images=names)
            task.status = Status.SUCCEEDED
        except Cancelled as exc:
            self._fail(task, "cancelled", str(exc) or "cancelled")
        except SdEngineError as exc:
            self._fail(task, exc.code, str(exc))
        except Exception as exc:
            log.exception("task %s failed", task.task_id)
            self._fail(task, "internal_error", f"{type(exc).__name__}: {exc}")
        try:
            self.store.checkpoint()
        except Exception:  # pragma: no cover - the records are safe in the WAL
            log.warning("WAL checkpoint failed", exc_info=True)
        self._maybe_cleanup()

    def _fail(self, task: _Task, code: str, message: str) -> None:
        try:
            self.store.finish(task.task_id, Status.FAILED, error_code=code, error_message=message[:2000])
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
