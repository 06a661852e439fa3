"""``sdengine worker``: the worker side of the ``celery`` task backend. It consumes the queues of the checkpoints
it serves, one task at a time per device (Celery prefork pool, concurrency 1, prefetch 1), keeps its engines
in the pool process, translates the payload again, runs :func:`api_compat.tasks.backend.run_generation` (PNGs
written atomically into the shared results directory) under a lease, and writes progress and the final state
(:mod:`api_compat.tasks.celery_app` has the overview)."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from core.errors import Cancelled, InvalidRequest
from engine.models.checkpoints import Kind
from engine.models.store import ModelStore

from api_compat.detect import parse_detect, run_detect
from api_compat.engine_api import default_engine_factory
from api_compat.errors import ApiError, api_error_from
from api_compat.images import ImageLimits
from api_compat.schema import parse_request
from api_compat.tasks.backend import Progress, error_of, run_generation
from api_compat.tasks.celery_app import TASK_NAME, WORKER_LOCAL, QueueOptions, make_app, queue_name, redact
from api_compat.tasks.redis_records import RedisTasks
from api_compat.tasks.store import TASK_ID
from api_compat.translate import field_origins, translate_request
from core.process import pid_alive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What ``sdengine worker`` was started with."""

    url: str
    results_dir: Path
    engine_options: dict[str, Any]
    models: tuple[str, ...] = ()  # checkpoint names served; () = every checkpoint in the store + the default
    engine_factory: str | None = None  # module:attr
    options: QueueOptions = QueueOptions()
    name: str | None = None


class _Runtime:
    """Lives in a worker's pool process: engines (one per configuration, kept), the Redis records."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.tasks = RedisTasks(settings.url, settings.options)
        self.images_dir = Path(settings.results_dir) / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{random.getrandbits(32):08x}"
        if settings.engine_factory:
            import importlib

            module, _, attr = settings.engine_factory.partition(":")
            self.factory = getattr(importlib.import_module(module), attr)
        else:
            self.factory = default_engine_factory
        self.engines: dict[str, Any] = {}
        self._last_cleanup = 0.0

    def _dead_local_holder(self, holder: str) -> bool:
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        return host == self.host and pid.isdigit() and not pid_alive(int(pid))

    def run(self, message: dict[str, Any]) -> str:
        task_id = message["task_id"]
        if not TASK_ID.match(str(task_id)):
            log.error("message with a bad task id %r dropped", task_id)
            return "dropped"
        ttl = message.get("ttl") or None
        answer = self.tasks.start(task_id, self.owner)
        while answer[0] == "leased":
            holder = answer[1]
            if self._dead_local_holder(holder):  # its process on this host is gone: take over now
                answer = self.tasks.start(task_id, self.owner, steal=holder)
                continue
            # delivered twice while a live worker runs it: wait for that run (or its lease to lapse)
            time.sleep(self.settings.options.lease_ttl / 3)
            answer = self.tasks.start(task_id, self.owner)
        if answer[0] in ("missing", "final"):
            log.info("task %s: %s, nothing to do", task_id, answer[0])
            return answer[0]
        attempts, cancelled = int(answer[1]), answer[2] == "1"
        self._remove_partial(task_id)
        stop, cancel = threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task_id, stop, cancel), daemon=True)
        beat.start()
        try:
            if attempts > self.settings.options.max_attempts:
                self._finish(task_id, "failed", ttl, error=("worker_lost", (
                    f"the worker running this task stopped {attempts - 1} times (killed or lost); it is not "
                    "delivered again")))
                return "failed"
            if cancelled:
                self._finish(task_id, "failed", ttl, error=("cancelled", "cancelled before the task started"))
                return "failed"
            self._execute(message, task_id, ttl, cancel)
            return "done"
        finally:
            stop.set()
            beat.join(5)
            self._maybe_cleanup(ttl)

    def _execute(self, message, task_id, ttl, cancel: threading.Event) -> None:
        tracker = Progress(message.get("steps"))
        names: list[str] = []
        origins: dict[str, str] = {}  # request path -> payload path, once the payload is parsed

        def progress(event, steps: int | None = None) -> None:
            if self.tasks.progress(task_id, tracker(event, steps)):
                cancel.set()

        def preview(step: int, image) -> None:  # live previews: stored in the record's progress at the interval
            if self.tasks.progress(task_id, tracker.preview(step, image)):
                cancel.set()

        try:
            kind = message.get("kind", "txt2img")
            limits = ImageLimits(**(message.get("limits") or {}))
            if kind == "detect":  # /controlnet/detect: the preprocessors, no engine
                request = parse_detect(message["payload"], limits)
                if self.tasks.progress(task_id, tracker.value):
                    raise Cancelled("cancelled before the task started")
                info, names = run_detect(request, images_dir=self.images_dir, task_id=task_id, progress=progress,
                                         cancel=cancel)
            else:
                info, names = self._generate(kind, message, limits, task_id, tracker, progress, cancel, origins,
                                             preview)
            if not self._finish(task_id, "succeeded", ttl, info=info, images=names):
                self._remove(names)  # cancelled (or ended) meanwhile: its record says so; no orphan files
        except ApiError as exc:
            self._finish(task_id, "failed", ttl, error=(exc.code, str(exc)))
        except Exception as exc:
            self._remove(names)
            self._finish(task_id, "failed", ttl, error=error_of(exc, task_id, origins))

    def _generate(self, kind: str, message, limits: ImageLimits, task_id: str, tracker: Progress, progress,
                  cancel: threading.Event, origins: dict[str, str], preview=None) -> tuple[dict[str, Any], list[str]]:
        """Translate the payload again, on this worker's engine for the task's configuration, and run it
        (``origins`` is filled with the payload's field origins, for the errors of a failed task)."""
        options = {**self.settings.engine_options, **(message.get("options") or {})}
        for key in WORKER_LOCAL:
            if key in self.settings.engine_options:
                options[key] = self.settings.engine_options[key]
            else:
                options.pop(key, None)
        config = EngineConfig(**options)
        parsed = parse_request(kind, message["payload"])
        origins.update(field_origins(parsed))
        try:
            translation = translate_request(kind, parsed, config, limits)
        except InvalidRequest as exc:  # in the payload's terms
            raise api_error_from(exc) from None
        key = json.dumps(options, sort_keys=True, default=str)
        engine = self.engines.get(key)
        if engine is None:
            engine = self.engines[key] = self.factory(config)
        if self.tasks.progress(task_id, tracker.value):
            raise Cancelled("cancelled before the task started")
        return run_generation(engine, translation.request, images_dir=self.images_dir, task_id=task_id,
                              config_id=message.get("config_id", "default"), progress=progress, cancel=cancel,
                              warnings=parsed.warnings(), preview=preview)

    def _finish(self, task_id, status, ttl, **kw) -> bool:
        return self.tasks.finish(task_id, status, owner=self.owner, ttl=ttl, **kw)

    def _heartbeat(self, task_id: str, stop: threading.Event, cancel: threading.Event) -> None:
        """Refresh the lease (every lease_ttl / 3) and watch the cancel flag (4 times a second), also while the
        engine is between progress calls (model load, VAE decode)."""
        last = time.monotonic()
        while not stop.wait(0.25):
            try:
                if not cancel.is_set() and self.tasks.client.hget(self.tasks.key("task", task_id), "cancel"):
                    cancel.set()
                if time.monotonic() - last >= self.settings.options.lease_ttl / 3:
                    self.tasks.refresh(task_id, self.owner)
                    last = time.monotonic()
            except Exception:  # Redis away for a moment: the next beat tries again
                log.warning("lease refresh of %s failed", task_id, exc_info=True)

    def _remove(self, names) -> None:
        for name in names:
            try:
                os.unlink(self.images_dir / name)
            except FileNotFoundError:
                pass

    def _remove_partial(self, task_id: str) -> None:
        """Temp files of an earlier delivery of this task (its worker died while writing a PNG)."""
        for path in self.images_dir.glob(f".{task_id}-*.tmp"):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _maybe_cleanup(self, ttl: float | None) -> None:
        """PNGs whose record expired (results TTL), and temp files an hour old; at most once a minute (once per
        TTL when that is shorter). A PNG is written while its record exists (a waiting or running record lives
        30 days), so a PNG older than the TTL without a record is one whose result expired."""
        if time.monotonic() - self._last_cleanup < min(60.0, max(ttl or 60.0, 1.0)):
            return
        self._last_cleanup = time.monotonic()
        now = time.time()
        try:
            for entry in os.scandir(self.images_dir):
                age = now - entry.stat().st_mtime
                if entry.name.startswith("."):
                    if age > 3600:
                        os.unlink(entry.path)
                    continue
                task_id = entry.name.split("-", 1)[0]
                if ttl and age > ttl and TASK_ID.match(task_id) and not self.tasks.client.exists(
                        self.tasks.key("task", task_id)):
                    os.unlink(entry.path)
        except OSError:
            log.warning("results cleanup failed", exc_info=True)


def worker_queues(settings: WorkerSettings) -> tuple[list[str], list[str]]:
    """(checkpoint names, queue names) a worker serves: ``settings.models`` resolved in its model store, or
    every checkpoint there plus the default queue."""
    store = ModelStore.from_config(EngineConfig(**settings.engine_options))
    prefix = settings.options.prefix
    if settings.models:
        names = [store.resolve(name, Kind.CHECKPOINT, field="--models").name for name in settings.models]
        return names, [queue_name(prefix, n) for n in names]
    names = [e.name for e in store.entries(Kind.CHECKPOINT)]
    return names, [queue_name(prefix, None)] + [queue_name(prefix, n) for n in names]


def run_worker(settings: WorkerSettings, *, loglevel: str = "INFO") -> None:
    """Run a Celery worker (prefork pool, one process, one task at a time) until it is stopped."""
    from kombu import Exchange, Queue

    models, queues = worker_queues(settings)
    app = make_app(settings.url, settings.options)
    app.conf.task_queues = [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in queues]
    runtime: dict[str, _Runtime] = {}  # per pool process (made after the fork, on the first task)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def txt2img(self, **message):
        import redis

        rt = runtime.get("rt")
        if rt is None:
            rt = runtime["rt"] = _Runtime(settings)
        try:
            return rt.run(message)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # Redis away: try again (same lease owner)
            log.warning("task %s: Redis unavailable (%s); retrying", message.get("task_id"), exc)
            raise self.retry(exc=exc, countdown=2, max_retries=None) from None
        except Exception as exc:  # a bug of ours: the task must still end, with the reason
            log.exception("task %s: unexpected error", message.get("task_id"))
            rt.tasks.finish(str(message.get("task_id")), "failed", owner=rt.owner, ttl=message.get("ttl") or None,
                            error=("internal_error", f"{type(exc).__name__}: {exc}"))
            return "failed"

    name = settings.name or f"sdengine-{settings.engine_options.get('device', 'cpu')}-{os.getpid()}"
    nodename = f"{name}@{socket.gethostname()}"
    registry = RedisTasks(settings.url, settings.options)
    stop = threading.Event()

    def announce() -> None:
        info = {"device": settings.engine_options.get("device", "cpu"), "models": models, "queues": queues,
                "pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                registry.client.hset(f"{settings.options.prefix}:workers", nodename,
                                     json.dumps({**info, "seen": time.time()}))
            except Exception:
                log.warning("worker heartbeat failed", exc_info=True)
            if stop.wait(2.0):
                break
        try:
            registry.client.hdel(f"{settings.options.prefix}:workers", nodename)
        except Exception:
            pass

    log.info("worker %s: queue %s, checkpoints %s", nodename, redact(settings.url), ", ".join(models) or "none")
    from celery.signals import worker_ready

    def ready(sender=None, **kw):
        threading.Thread(target=announce, name="sdengine-announce", daemon=True).start()

    worker_ready.connect(ready, weak=False)
    try:
        app.worker_main(["worker", "--pool=prefork", "--concurrency=1", f"--loglevel={loglevel}", "-n", nodename,
                         "--without-gossip", "--without-mingle", "--without-heartbeat", "-O", "fair"])
    finally:
        stop.set()
