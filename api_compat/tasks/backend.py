"""The task-backend seam: what :class:`api_compat.service.TaskService` hands a validated task to.

Two implementations, chosen by ``TaskService(queue=...)``:

- ``embedded`` (:mod:`api_compat.tasks.embedded`, the default): SQLite records and one worker thread per device,
  in the API's own process;
- ``celery`` (:mod:`api_compat.tasks.celery_producer`, :mod:`api_compat.tasks.worker`): a Redis broker and Redis
  task records, served by any number of ``sdengine worker`` processes.

The service validates (schema, engine limits, model names) and shapes nothing itself: a backend answers the
result dict of API.md ("Poll") and raises :class:`ApiError` with the same codes in both implementations.
Running one task (engine call, PNGs written atomically, the ``info`` dict, the error codes) is
:func:`run_generation`, shared by both, so their results cannot drift.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.errors import Cancelled, SdEngineError
from engine.progress import Progress as PhaseEvent
from engine.progress import ProgressReporter
from engine.rules import default

from api_compat.errors import in_payload_terms
from api_compat.images import png_base64, write_png
from api_compat.storage import storage_code

log = logging.getLogger(__name__)

DEFAULT_STEPS = default("steps")  # what progress shows before the engine reports
PREVIEW_KEY = "current_image"  # the live preview in a running task's stored progress (service: opt-in to show)


@dataclass(frozen=True)
class Submission:
    """A task the service accepted: the engine request (embedded), the validated payload with its seeds drawn
    (the wire form for a queue: a worker translates it again), the ``parameters`` echo and the model it routes
    to (the checkpoint entry name, or None for the configuration's default)."""

    task_id: str
    config_id: str
    request: Any
    parameters: dict[str, Any]
    payload: dict[str, Any]
    model: str | None
    created: float
    nbytes: int = 0  # what the queued task holds: its unit, init and mask images, compressed
    kind: str = "txt2img"  # or "img2img", "detect" (/controlnet/detect): which payload ``payload`` is
    origins: Mapping[str, str] = field(default_factory=dict)  # request path -> payload path (errors)
    warnings: tuple[str, ...] = ()  # the payload's own (ignored unknown fields: api_compat.leniency)


class TaskBackend(Protocol):
    """submit, result (state, progress, images, error), cancel, wait, image files, health, close."""

    name: str

    def submit(self, task: Submission) -> None:
        """Queue the task; raises ApiError ``queue_full`` / ``closed`` / ``backend_unavailable``."""

    def result(self, task_id: str) -> dict[str, Any]:
        """The result dict; raises ApiError ``not_found`` (unknown id) or ``expired`` (past the results TTL)."""

    def cancel(self, task_id: str) -> None:
        """Waiting: failed ``cancelled`` at once. Running: the worker stops between steps."""

    def wait(self, task_id: str, timeout: float | None) -> None:
        """Block until the task is final; TimeoutError after ``timeout`` s."""

    def image_path(self, task_id: str, index: int) -> Path | None: ...

    def health(self) -> dict[str, Any]: ...

    def close(self, timeout: float | None = 60.0) -> None: ...


def image_file(images_dir: Path, task_id: str, index: int) -> Path:
    """Where image ``index`` of a task is written (ids only: the name never comes from a client)."""
    return Path(images_dir) / f"{task_id}-{index}.png"


def initial_progress(steps: int | None) -> dict[str, Any]:
    """The ``progress`` of a running task before the engine reported anything: it is loading."""
    return PhaseEvent("loading", steps=max(int(steps or DEFAULT_STEPS), 1)).as_dict()


class Progress:
    """The progress callback of ``engine.generate`` -> the ``progress`` object of ``sd_get_result``
    (docs/API.md): the engine's phase events (engine.progress) as they come; an engine that calls the old
    ``progress(done, total)`` gets its sampling steps with the same ETA rule (median step time)."""

    def __init__(self, steps: int | None):
        self.value = initial_progress(steps)
        self.last: PhaseEvent | None = None
        self.image: dict[str, Any] | None = None  # the newest live preview: {"step", "image": base64 PNG}
        self._legacy = ProgressReporter(self._record, None, max(int(steps or DEFAULT_STEPS), 1))

    def _record(self, event: PhaseEvent) -> None:
        self.last = event
        value = event.as_dict()
        if self.image is not None:
            value[PREVIEW_KEY] = self.image
        self.value = value

    def preview(self, step: int, image) -> dict[str, Any]:
        """A live preview (engine.preview, called on its decoding thread): kept in the progress value under
        :data:`PREVIEW_KEY` (the service shows it only to a query that asks, docs/API.md) as a base64 PNG."""
        self.image = {"step": int(step), "image": png_base64(image)}
        self.value = {**self.value, PREVIEW_KEY: self.image}
        return self.value

    def __call__(self, event: PhaseEvent | int, steps: int | None = None) -> dict[str, Any]:
        if steps is not None:
            self._legacy.sampled(int(event), int(steps))
        else:
            self._record(event)
        return self.value


def run_generation(engine, request, *, images_dir: Path, task_id: str, config_id: str, progress,
                   cancel: threading.Event, warnings: tuple[str, ...] = (), preview=None
                   ) -> tuple[dict[str, Any], list[str]]:
    """Generate and write the PNGs (each atomically: temp file + rename, so a reader or a killed worker never
    leaves a partial image under its final name). An engine that takes ``on_images`` (engine.pipeline.Engine)
    hands each iteration's images over as they are decoded and they are written at once, so the images of an
    ``n_iter`` request are never all held (engine.memory counts one batch); a task that fails after some were
    written removes them. Returns ``(info, image file names)``; ``info["warnings"]`` has the payload's
    ``warnings`` before the engine's. ``preview(step, image)`` gets the live previews of a request that asks for
    them (``request.live_preview``)."""
    names: list[str] = []
    total = request.batch_size * request.n_iter
    last = PhaseEvent("sampling", steps=request.steps * request.n_iter)

    def relay(event, steps: int | None = None) -> None:
        nonlocal last
        if steps is None and isinstance(event, PhaseEvent):
            last = event
        progress(event, steps)

    def save(first: int, images, infotexts) -> None:
        for k, image in enumerate(images):
            relay(PhaseEvent("saving", first + k, total, last.step, last.steps, last.eta_seconds))
            path = image_file(images_dir, task_id, first + k)
            write_png(path, image, infotexts[k] if k < len(infotexts) else None)
            names.append(path.name)

    extra = {}
    if preview is not None and getattr(request, "live_preview", None) and _takes(engine, "preview"):
        extra["preview"] = preview
    try:
        if _takes(engine, "on_images"):
            result = engine.generate(request, progress=relay, cancel=cancel, on_images=save, **extra)
        else:
            result = engine.generate(request, progress=relay, cancel=cancel, **extra)
        infotexts = list(result.infotexts)
        if result.images:  # an engine that returns them all at the end
            save(len(names), result.images, infotexts[len(names):])
        # ControlNet detected maps (units with save_detected_map) follow the images, as the extension appends them
        maps = list(getattr(result, "detected_maps", None) or [])
        for detected in maps:
            path = image_file(images_dir, task_id, len(names))
            write_png(path, detected, None)
            names.append(path.name)
    except BaseException:
        for name in names:  # no image of a task that did not succeed stays behind
            try:
                (Path(images_dir) / name).unlink()
            except FileNotFoundError:
                pass
        raise
    info = dict(result.info)
    if warnings:
        info["warnings"] = [*warnings, *(info.get("warnings") or [])]
    info["detected_maps"] = len(maps)
    info.setdefault("infotexts", infotexts)
    info.setdefault("all_seeds", list(result.seeds))
    info.setdefault("all_subseeds", list(result.subseeds))
    info.setdefault("timings", dict(result.timings))
    info.setdefault("resource_config_id", config_id)
    return info, names


def _takes(engine, name: str) -> bool:
    """Whether ``engine.generate`` takes the keyword ``name`` (engine.pipeline.Engine takes ``on_images`` and
    ``preview``; simpler engines may not)."""
    try:
        params = inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class RunLimit:
    """The server's limit on one task's run time (``--max-task-seconds``): ``with RunLimit(cancel, seconds)``
    around a run sets the task's ``cancel`` event once ``seconds`` of its run have passed, which stops the engine
    at its next check (after the current sampling step, VAE tile or upscaled image); ``fired`` tells a cancel by
    the limit from a client's. The time the engine spends loading a model or exporting a component (phases
    ``loading`` and ``exporting``, reported to :meth:`observe`) is not counted: it is the server's, once per model,
    not the request's. ``seconds`` None or 0: no limit."""

    PAUSED = ("loading", "exporting")

    def __init__(self, cancel: threading.Event, seconds: float | None):
        self.cancel = cancel
        self.seconds = seconds or None
        self.fired = False
        self.used = 0.0  # seconds counted before the running stretch
        self._since: float | None = None  # start of the running stretch (None: paused)
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def _fire(self) -> None:
        with self._lock:
            if self._timer is None or self.cancel.is_set():
                return
            self.fired = True
        log.warning("a task ran past the limit of %g s (--max-task-seconds); stopping it", self.seconds)
        self.cancel.set()

    def _run(self) -> None:
        if self.seconds is None or self._timer is not None:
            return
        self._since = time.monotonic()
        self._timer = threading.Timer(max(self.seconds - self.used, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _pause(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.used += time.monotonic() - self._since

    def observe(self, event) -> None:
        """A progress event of the run: the clock stops in ``loading``/``exporting`` and runs in other phases."""
        phase = getattr(event, "phase", None)
        if phase is None or self.seconds is None:
            return
        with self._lock:
            self._pause() if phase in self.PAUSED else self._run()

    def __enter__(self) -> RunLimit:
        with self._lock:
            self._run()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._pause()

    def error(self) -> tuple[str, str]:
        return "timed_out", (f"the task ran longer than this server's limit of {self.seconds:g} s per task "
                             "(--max-task-seconds; loading and exporting models not counted) and was stopped; ask "
                             "for fewer steps, images or pixels")


def error_of(exc: BaseException, task_id: str, origins: Mapping[str, str] | None = None,
             limit: RunLimit | None = None) -> tuple[str, str]:
    """The (code, message) a failed task reports for ``exc``, the same in every backend; an error about a
    request field names the payload's (``origins``: api_compat.translate.field_origins); a task stopped by
    the server's run-time ``limit`` fails ``timed_out``."""
    if isinstance(exc, Cancelled) and limit is not None and limit.fired:
        return limit.error()
    if isinstance(exc, Cancelled):
        return "cancelled", (str(exc) or "cancelled")[:2000]
    if isinstance(exc, SdEngineError):
        return exc.code, str(in_payload_terms(exc, origins))[:2000]
    storage = storage_code(exc)
    if storage is not None:  # the cause, without the server's paths
        log.error("task %s failed: results storage: %s", task_id, exc)
        return storage, ("the server's results disk is full" if storage == "storage_full" else
                         "the server's results storage cannot be written") + ": the images could not be stored"
    log.error("task %s failed", task_id, exc_info=exc)
    return "internal_error", f"{type(exc).__name__}: {exc}"[:2000]


def result_dict(task_id: str, status: str, images: list[str], parameters: dict[str, Any], info: dict[str, Any],
                error: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    """The result shape of API.md ("Poll") for a final task (``images``: PNG paths)."""
    out: dict[str, Any] = {"taskId": task_id, "status": status, "images": images, "parameters": parameters,
                           "info": info}
    if status == "failed":
        code, message = error or (None, None)
        out["error"] = {"code": code or "internal_error", "message": message or ""}
    elif status == "succeeded":
        gone = [i for i, path in enumerate(images) if not Path(path).is_file()]
        if gone:  # deleted by hand or by another tool: no URL may point at a missing file
            out.update(status="failed", images=[], error={
                "code": "expired", "message": f"the result image(s) {gone} are no longer on the server "
                                              "(deleted after the task succeeded); submit the task again"})
    return out
