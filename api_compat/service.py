"""TaskService: the sd_txt2img / sd_get_result contract in-process, in front of a task backend -- the embedded
queue in this process or the remote Celery + Redis queue.

    with TaskService() as api:                     # models and results under the home (engine.config)
        task = api.sd_txt2img({"prompt": "a cat", "steps": 20})
        result = api.wait(task["taskId"])          # {"taskId", "status", "images": [png paths], ...}

Validation happens at submit (an :class:`ApiError` is raised and nothing is queued); then the task goes to a
task backend (:mod:`api_compat.tasks`, the seam :mod:`api_compat.tasks.backend`): ``embedded`` by default (one
worker thread and one bounded FIFO queue per device in this process, records in SQLite,
:mod:`api_compat.tasks.embedded`), or ``celery`` with ``queue="redis://HOST:6379/0"`` (a Redis broker and Redis
records, served by ``sdengine worker`` processes, :mod:`api_compat.tasks.celery_producer`). The engine
configurations (the default one, and each named one selected with the ``X-SP-RESOURCE-CONFIG-ID`` header) are
the same in both. Tasks go waiting -> running -> succeeded | failed; one failing task never stops a worker.

``LocalService`` is the old name of :class:`TaskService` (it never was local only: it fronts the remote queue
too); it still works and warns (``DeprecationWarning``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, default_results_dir
from core.errors import InvalidRequest, ModelError, SdEngineError
from engine.models.store import ModelStore
from engine.rules import MAX_SEED

from api_compat import leniency
from api_compat.detect import parse_detect
from api_compat.extras import parse_extras
from api_compat.engine_api import EngineFactory, check_memory, check_models, default_engine_factory
from api_compat.errors import ApiError, api_error_from
from api_compat.paths import public_paths
from api_compat.images import ImageLimits
from api_compat.schema import parse_request
from api_compat.tasks.backend import PREVIEW_KEY, Submission, TaskBackend
from api_compat.tasks.celery_app import QueueOptions
from api_compat.tasks.celery_producer import CeleryBackend
from api_compat.tasks.embedded import EmbeddedBackend
from api_compat.tasks.store import TASK_ID, PendingTask, Status
from api_compat.translate import field_origins, image_bytes, translate_request

log = logging.getLogger(__name__)
EXTRAS_KINDS = ("extras", "extras-batch")  # /sdapi/v1/extra-single-image, /extra-batch-images

CONFIG_HEADER = "X-SP-RESOURCE-CONFIG-ID"
DEFAULT_CONFIG = "default"


class TaskService:
    """The API in front of a task backend: it validates and translates each payload, then hands the task to the
    embedded queue (worker threads in this process) or to the remote Celery + Redis queue (``sdengine worker``
    processes); results, cancels and health come from the same backend. ``engine_options`` are
    :class:`EngineConfig` fields (backend, device, precision ...).

    ``configs`` maps a resource-configuration id to engine options applied over ``engine_options``; the
    ``X-SP-RESOURCE-CONFIG-ID`` header picks one (absent: the default configuration).
    ``engine_factory(config) -> engine`` builds an engine (default: ``engine.pipeline.Engine``; embedded only).
    ``check_models``: model names are resolved in each configuration's model store at submit (an unknown
    name is refused before anything is queued); False leaves the lookup to the engine, when the task runs.
    ``queue``: None runs the tasks here (``embedded``); ``"redis://[:PASSWORD@]HOST:PORT/DB"`` sends them to
    ``sdengine worker`` processes over Celery + Redis (``celery``; ``queue_options`` are
    :class:`api_compat.tasks.celery_app.QueueOptions` fields). ``max_age_s`` is the results TTL in both.
    ``memory_budget``: bytes a request may need at its peak, estimated at submit by ``engine.memory`` from the
    model's configs ("auto": half the machine's memory; None: no check; needs ``check_models``).
    ``strict``: unknown payload fields are an ``unknown_field`` error instead of ignored and named in the
    result's ``info.warnings`` (the leniency policy: :mod:`api_compat.leniency`).
    ``max_attempts``: starts of a task that may die with their worker (embedded: with this process) before the
    task is failed ``worker_lost``; a killed process's other accepted tasks run when it is started again.
    ``max_task_seconds``: a running task is stopped after so long, within one sampling step (or VAE tile), and
    fails ``timed_out``; with a queue the workers apply it (the smaller of theirs and this). None: no limit.
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
        queue: str | None = None,
        queue_options: dict[str, Any] | None = None,
        memory_budget: int | str | None = "auto",
        strict: bool = False,
        max_attempts: int = 3,
        allow_private_urls: bool = False,
        url_fetch_seconds: float = 15.0,
        max_task_seconds: float | None = None,
        **engine_options: Any,
    ):
        if max_task_seconds is not None and not (isinstance(max_task_seconds, (int, float))
                                                 and not isinstance(max_task_seconds, bool) and max_task_seconds > 0):
            raise ValueError(f"max_task_seconds must be a number > 0 (or None), got {max_task_seconds!r}")
        self.max_task_seconds = max_task_seconds
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        self.strict = strict
        if models_dir is not None:
            engine_options["models_dir"] = models_dir
        base = EngineConfig(**engine_options)
        self.configs: dict[str, EngineConfig] = {DEFAULT_CONFIG: base}
        # the options as given, per configuration (a queue forwards them to the workers)
        self.config_options: dict[str, dict[str, Any]] = {DEFAULT_CONFIG: dict(engine_options)}
        for config_id, options in (configs or {}).items():
            self.configs[str(config_id)] = EngineConfig(**{**engine_options, **options})
            self.config_options[str(config_id)] = {**engine_options, **options}
        self.results_dir = Path(results_dir).absolute() if results_dir else default_results_dir()
        self.public_paths = public_paths(self.configs.values(), self.results_dir)
        self.limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels,
                                  allow_url_fetch=allow_url_fetch, allow_private_urls=allow_private_urls,
                                  url_fetch_seconds=url_fetch_seconds)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        if memory_budget == "auto" and queue:
            memory_budget = None  # this server's memory says nothing of the workers' (docs/DECISIONS.md)
        if memory_budget == "auto":
            from engine.memory import default_budget

            memory_budget = default_budget()
        self.memory_budget = memory_budget  # bytes a request may need at its peak (engine.memory), None: off
        self._stores: dict[str, ModelStore | None] = {
            k: ModelStore.from_config(c) if check_models else None for k, c in self.configs.items()}
        self.backend: TaskBackend
        if queue:
            self.backend = CeleryBackend(queue, self, self.results_dir, max_queue=max_queue, results_ttl=max_age_s,
                                         options=QueueOptions(**{"max_attempts": max_attempts,
                                                                 "max_task_seconds": max_task_seconds,
                                                                 **(queue_options or {})}))
        else:
            self.backend = EmbeddedBackend(self.configs, self.results_dir,
                                           engine_factory=engine_factory or default_engine_factory,
                                           max_queue=max_queue, max_queue_bytes=max_queue_bytes,
                                           max_age_s=max_age_s, max_tasks=max_tasks, restore=self._restore,
                                           max_attempts=max_attempts, max_task_seconds=max_task_seconds)

    @property
    def store(self):
        """The embedded backend's :class:`TaskStore` (records and PNGs)."""
        store = getattr(self.backend, "store", None)
        if store is None:
            raise AttributeError(f"the {self.backend.name} backend keeps no local TaskStore")
        return store

    # ----------------------------------------------------------------------------------------- the API
    def sd_txt2img(self, payload: dict[str, Any], headers: dict[str, str] | None = None, *,
                   inline_images: bool = False) -> dict[str, str]:
        """Validate and queue a task; returns ``{"taskId", "status"}``. Raises :class:`ApiError`.
        ``inline_images``: the caller will hold every result image as base64 (the webui route's answer), which
        the memory budget then counts."""
        return self._submit(payload, headers, "txt2img", inline_images)

    def sd_img2img(self, payload: dict[str, Any], headers: dict[str, str] | None = None, *,
                   inline_images: bool = False) -> dict[str, str]:
        """The img2img sibling of :meth:`sd_txt2img` (the webui img2img payload: init_images,
        denoising_strength, resize_mode, mask ...): validate and queue a task; returns ``{"taskId", "status"}``;
        the result is read with :meth:`sd_get_result`. Raises :class:`ApiError`."""
        return self._submit(payload, headers, "img2img", inline_images)

    def check(self, payload: dict[str, Any], headers: dict[str, str] | None = None, kind: str = "txt2img") -> None:
        """Every submit-time check of ``payload`` (schema, engine rules, the model store, the memory budget),
        nothing queued: raises the :class:`ApiError` submitting it would raise."""
        self._validate(payload, headers, kind)

    def _validate(self, payload: dict[str, Any], headers: dict[str, str] | None, kind: str,
                  inline_images: bool = False):
        config_id = self._config_id(headers)
        config = self.configs[config_id]
        parsed = parse_request(kind, payload, strict=self.strict)
        translation, origins = self._translate(kind, parsed, config)
        store = self._stores[config_id]
        if store is not None:
            check_models(store, translation.models, origins, config.allow_pickle)
            check_memory(store, config, translation.request, self.memory_budget, origins, answer=inline_images)
        return config_id, config, parsed, origins, translation, store

    def _submit(self, payload: dict[str, Any], headers: dict[str, str] | None, kind: str,
                inline_images: bool = False) -> dict[str, str]:
        config_id, config, parsed, origins, translation, store = self._validate(payload, headers, kind, inline_images)
        # seeds drawn here and kept in the task's payload, so that a task run again (its worker or this process
        # died) makes the same images
        wire, drawn = dict(payload), {}
        for name in ("seed", "subseed"):
            if getattr(parsed, name) == -1:
                wire[name] = drawn[name] = random.randrange(MAX_SEED)
        model = None
        if self.backend.name != "embedded":
            model = self._route(store, config, translation.request.model)
        request = dataclasses.replace(translation.request, **drawn) if drawn else translation.request
        sub = Submission(task_id=uuid.uuid4().hex, config_id=config_id, request=request,
                         parameters=translation.parameters, payload=wire, model=model, created=time.time(),
                         nbytes=image_bytes(request), kind=kind, origins=origins, warnings=parsed.warnings())
        self.backend.submit(sub)
        if parsed.ignored_fields:
            log.warning("task %s: ignored unknown field(s) %s (serve --strict refuses them)", sub.task_id,
                        ", ".join(parsed.ignored_fields[:leniency.MAX_WARNINGS]))
        return {"taskId": sub.task_id, "status": Status.WAITING.value}

    def _translate(self, kind: str, parsed, config: EngineConfig):
        """(the engine request's translation, the payload's field origins) of a parsed payload."""
        origins = field_origins(parsed)  # errors about the request name the payload's fields
        try:
            return translate_request(kind, parsed, config, self.limits), origins
        except InvalidRequest as exc:
            raise api_error_from(exc) from None  # already in the payload's terms
        except SdEngineError as exc:  # e.g. a missing optional dependency of the engine
            raise ApiError(exc.code, str(exc)) from None

    def _restore(self, pending: PendingTask) -> Submission:
        """The embedded backend's task left by a dead process, from its stored payload (seeds drawn at submit):
        parsed and translated again as at submit, so it makes the images the first run would have made."""
        if pending.kind in EXTRAS_KINDS:
            request = self._parse_extras(pending.payload, pending.config_id, pending.kind)
            return Submission(task_id=pending.task_id, config_id=pending.config_id, request=request,
                              parameters=pending.parameters, payload=pending.payload, model=None,
                              created=pending.created, nbytes=request.nbytes, kind=pending.kind)
        if pending.kind == "detect":
            request = parse_detect(pending.payload, self.limits, self.configs[pending.config_id].models_dir)
            return Submission(task_id=pending.task_id, config_id=pending.config_id, request=request,
                              parameters=pending.parameters, payload=pending.payload, model=None,
                              created=pending.created, nbytes=request.nbytes, kind="detect")
        parsed = parse_request(pending.kind, pending.payload, strict=self.strict)
        translation, origins = self._translate(pending.kind, parsed, self.configs[pending.config_id])
        return Submission(task_id=pending.task_id, config_id=pending.config_id, request=translation.request,
                          parameters=pending.parameters, payload=pending.payload, model=None,
                          created=pending.created, nbytes=image_bytes(translation.request), kind=pending.kind,
                          origins=origins, warnings=parsed.warnings())

    def controlnet_detect(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, str]:
        """sd-webui-controlnet's ``/controlnet/detect`` body (``controlnet_module``, ``controlnet_input_images``,
        the sliders) as a task: validated here (images decoded under the image limits, the working size
        checked), the preprocessor runs on the backend's worker, never in this process. Returns ``{"taskId",
        "status"}``; the succeeded result's images are the detected maps. Raises :class:`ApiError`."""
        config_id = self._config_id(headers)
        request = parse_detect(payload, self.limits, self.configs[config_id].models_dir, self.memory_budget)
        model, wire = None, payload  # a worker (or this process after a crash) parses the body again
        if self.backend.name != "embedded":
            try:  # the default checkpoint's queue: a worker serving only named checkpoints still takes it
                model = self._route(self._stores[config_id], self.configs[config_id], None)
            except ApiError:
                model = None
        sub = Submission(task_id=uuid.uuid4().hex, config_id=config_id, request=request,
                         parameters=request.parameters(), payload=wire, model=model, created=time.time(),
                         nbytes=request.nbytes, kind="detect")
        self.backend.submit(sub)
        return {"taskId": sub.task_id, "status": Status.WAITING.value}

    def _parse_extras(self, payload: Any, config_id: str, kind: str):
        return parse_extras(payload, self.limits, self.configs[config_id].models_dir, batch=kind == "extras-batch",
                            strict=self.strict, memory_budget=self.memory_budget)

    def extras(self, payload: Any, headers: dict[str, str] | None = None, batch: bool = False) -> dict[str, str]:
        """The webui's ``/extra-single-image`` (``batch``: ``/extra-batch-images``) body as a task: validated here
        (images decoded under the image limits, upscalers resolved, the output size and memory checked), the
        upscalers run on the backend's worker (api_compat.extras). Returns ``{"taskId", "status"}``."""
        config_id = self._config_id(headers)
        kind = "extras-batch" if batch else "extras"
        request = self._parse_extras(payload, config_id, kind)
        model = None
        if self.backend.name != "embedded":
            try:  # the default checkpoint's queue, as /controlnet/detect
                model = self._route(self._stores[config_id], self.configs[config_id], None)
            except ApiError:
                model = None
        sub = Submission(task_id=uuid.uuid4().hex, config_id=config_id, request=request,
                         parameters=request.parameters(), payload=payload, model=model, created=time.time(),
                         nbytes=request.nbytes, kind=kind)
        self.backend.submit(sub)
        return {"taskId": sub.task_id, "status": Status.WAITING.value}

    def sd_get_result(self, query: dict[str, Any] | str) -> dict[str, Any]:
        """``{"taskId": ...}`` -> the task's result dict (API.md "Poll"). Raises :class:`ApiError` (not_found,
        expired). The opt-in extension ``{"taskId": ..., "current_image": true}`` adds, while the task runs,
        ``current_image`` (the newest live preview, a base64 PNG, or null) and ``current_image_step``; without
        it the answer is the contract's, unchanged."""
        result = self.backend.result(self._task_id(query))
        progress = result.get("progress")
        image = None
        if isinstance(progress, dict) and PREVIEW_KEY in progress:
            progress = dict(progress)
            image = progress.pop(PREVIEW_KEY)
            result = {**result, "progress": progress}
        if isinstance(query, dict) and query.get("current_image") is True and result.get("status") == "running":
            result = {**result, "current_image": image["image"] if image else None,
                      "current_image_step": image["step"] if image else None}
        error = result.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):  # no server paths (api_compat.paths)
            result["error"] = {**error, "message": self.public_paths.text(error["message"])}
        return result

    def cancel(self, query: dict[str, Any] | str) -> dict[str, Any]:
        """``{"taskId": ...}`` or the id. Waiting: failed ``cancelled`` at once. Running: the engine is asked to
        stop between steps."""
        task_id = self._task_id(query)
        self.backend.cancel(task_id)
        return self.sd_get_result({"taskId": task_id})

    def wait(self, query: dict[str, Any] | str, timeout: float | None = None) -> dict[str, Any]:
        """``{"taskId": ...}`` or the id: block until the task is finished; ``TimeoutError`` after ``timeout`` s."""
        task_id = self._task_id(query)
        self.backend.wait(task_id, timeout)
        return self.sd_get_result({"taskId": task_id})

    def image_path(self, task_id: str, index: int) -> Path | None:
        """The PNG file of image ``index`` of a finished task, or None."""
        if not TASK_ID.match(task_id) or index < 0:
            return None
        return self.backend.image_path(task_id, index)

    def health(self) -> dict[str, Any]:
        return self.backend.health()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting tasks. Embedded: fail the waiting ones (``cancelled``), cancel the running ones, join
        the workers. Celery: the queued tasks stay queued for the workers."""
        self.backend.close(timeout)

    def __enter__(self) -> TaskService:
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
    def _route(store: ModelStore | None, config: EngineConfig, model: str | None) -> str | None:
        """The checkpoint a task runs on, as the model store names it (its routing key); None when unknown
        here (no store checked at submit: the configuration's default, decided by the worker)."""
        if store is None:
            return model
        try:
            entry = store.resolve(model) if model else store.default_checkpoint(config.default_model)
        except (InvalidRequest, ModelError) as exc:
            raise ApiError(getattr(exc, "code", "model_not_found"), str(exc), field="stable_diffusion_model",
                           allowed="a checkpoint name from the model store") from None
        return entry.name

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


def __getattr__(name: str):
    if name == "LocalService":  # the old name (deprecated)
        warnings.warn("api_compat.service.LocalService is now TaskService (it fronts the embedded and the remote "
                      "queue alike); LocalService will be removed", DeprecationWarning, stacklevel=2)
        return TaskService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
