"""``sdengine worker``: the worker side of the ``celery`` task backend. It consumes the queues of the checkpoints
it serves, one task at a time per device (Celery prefork pool, concurrency 1, prefetch 1), keeps its engines
in the pool process, translates the payload again, runs :func:`api_compat.tasks.backend.run_generation` (PNGs
written atomically into the shared results directory) under a lease, and writes progress and the final state.
Its main process writes the worker's heartbeat and runs a :class:`Reaper`, which publishes again the tasks of
lost workers (:mod:`api_compat.tasks.celery_app` has the overview).

Redis away (a restart) never loses a task: the run goes on without progress writes, keeps its result and
retries the final write until Redis is back (the message is acknowledged after it); its heartbeat takes the
lease back if it lapsed meanwhile, and a run that another delivery took over stops."""

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
from api_compat.extras import parse_extras, run_extras
from api_compat.engine_api import default_engine_factory
from api_compat.errors import ApiError, api_error_from
from api_compat.images import ImageLimits
from api_compat.schema import parse_request
from api_compat.tasks.backend import Progress, RunLimit, error_of, run_generation
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

    def __init__(self, settings: WorkerSettings, node: str = ""):
        self.settings = settings
        self.node = node  # the worker's name and instance (name#instance: its heartbeat in {prefix}:workers)
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
        """Run the task of one delivery (``message``: its task id; an older API sent the whole message)."""
        task_id = message["task_id"]
        if not TASK_ID.match(str(task_id)):
            log.error("message with a bad task id %r dropped", task_id)
            return "dropped"
        answer = self._redis(lambda: self.tasks.start(task_id, self.owner, node=self.node), task_id, "take")
        if answer[0] == "leased" and self._dead_local_holder(answer[1]):
            # its pool process on this host died (the message came back at once): take over now
            answer = self._redis(lambda: self.tasks.start(task_id, self.owner, steal=answer[1], node=self.node),
                                 task_id, "take")
        if answer[0] == "leased":
            # delivered again while a live run holds the lease: that run ends it; if its worker is lost, a
            # reaper publishes the task again once the lease lapses
            log.info("task %s: running elsewhere (%s); this delivery is dropped", task_id, answer[1])
            return "duplicate"
        if answer[0] in ("missing", "final"):
            log.info("task %s: %s, nothing to do", task_id, answer[0])
            return answer[0]
        attempts, cancelled = int(answer[1]), answer[2] == "1"
        if len(answer) > 3 and answer[3]:
            message = json.loads(answer[3])
        ttl = message.get("ttl") or None
        self._remove_partial(task_id)
        stop, cancel, superseded = threading.Event(), threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task_id, stop, cancel, superseded), daemon=True)
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
            if "payload" not in message:
                self._finish(task_id, "failed", ttl, error=("interrupted", "the task's payload is not in its record "
                                                                          "(written by an older version); submit "
                                                                          "it again"))
                return "failed"
            self._execute(message, task_id, ttl, cancel)
            return "superseded" if superseded.is_set() else "done"
        finally:
            stop.set()
            beat.join(5)
            self._maybe_cleanup(ttl)

    def _redis(self, call, task_id: str, what: str):
        """``call()``, again and again while Redis cannot be reached (a restart): the task is kept meanwhile."""
        import redis

        delay, failures = 0.2, 0
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                    redis.exceptions.ReadOnlyError) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("task %s: Redis unavailable (%s); retrying the %s until it is back", task_id, exc,
                                what)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _execute(self, message, task_id, ttl, cancel: threading.Event) -> None:
        import redis

        tracker = Progress(message.get("steps"))
        names: list[str] = []
        # the smaller of this worker's limit and the server's (carried in the message)
        seconds = [float(x) for x in (self.settings.options.max_task_seconds, message.get("max_seconds")) if x]
        limit = RunLimit(cancel, min(seconds) if seconds else None)
        origins: dict[str, str] = {}  # request path -> payload path, once the payload is parsed
        down = [0.0]  # since when Redis is away (monotonic; 0: it is not)

        def write_progress(value) -> bool:
            """Progress to the record; True when a cancel was asked. Redis away: the run goes on (tried again
            once a second, so that connection attempts do not slow the steps down)."""
            if down[0] and time.monotonic() - down[0] < 1.0:
                return False
            try:
                asked = self.tasks.progress(task_id, value)
            except redis.RedisError as exc:
                if not down[0]:
                    log.warning("task %s: progress not written (%s); the task goes on", task_id, exc)
                down[0] = time.monotonic()
                return False
            down[0] = 0.0
            return asked

        def progress(event, steps: int | None = None) -> None:
            limit.observe(event)
            if write_progress(tracker(event, steps)):
                cancel.set()

        def preview(step: int, image) -> None:  # live previews: stored in the record's progress at the interval
            if self.tasks.progress(task_id, tracker.preview(step, image)):
                cancel.set()

        try:
            kind = message.get("kind", "txt2img")
            limits = ImageLimits(**(message.get("limits") or {}))
            if kind in ("extras", "extras-batch"):  # the webui's extras: upscalers, no SD engine
                config = EngineConfig(**{**self.settings.engine_options, **(message.get("options") or {})})
                request = parse_extras(message["payload"], limits, config.models_dir, batch=kind == "extras-batch")
                if write_progress(tracker.value):
                    raise Cancelled("cancelled before the task started")
                with limit:  # the run-time limit, as the embedded queue applies it to extras
                    info, names = run_extras(request, images_dir=self.images_dir, task_id=task_id,
                                             progress=progress, cancel=cancel, models_dir=config.models_dir,
                                             device=config.device)
            elif kind == "detect":  # /controlnet/detect: the preprocessors, no engine
                config = EngineConfig(**{**self.settings.engine_options, **(message.get("options") or {})})
                request = parse_detect(message["payload"], limits, config.models_dir)
                if write_progress(tracker.value):
                    raise Cancelled("cancelled before the task started")
                with limit:
                    info, names = run_detect(request, images_dir=self.images_dir, task_id=task_id,
                                             progress=progress, cancel=cancel, models_dir=config.models_dir)
            else:
                with limit:
                    info, names = self._generate(kind, message, limits, task_id, tracker, write_progress, progress,
                                                 cancel, origins, preview)
            if not self._finish(task_id, "succeeded", ttl, info=info, images=names):
                self._discard(task_id, names)  # cancelled or taken over meanwhile: its record says so
        except ApiError as exc:
            self._finish(task_id, "failed", ttl, error=(exc.code, str(exc)))
        except Exception as exc:
            self._discard(task_id, names)
            self._finish(task_id, "failed", ttl, error=error_of(exc, task_id, origins, limit))

    def _generate(self, kind: str, message, limits: ImageLimits, task_id: str, tracker: Progress, write_progress,
                  progress, cancel: threading.Event, origins: dict[str, str],
                  preview=None) -> tuple[dict[str, Any], list[str]]:
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
        if write_progress(tracker.value):
            raise Cancelled("cancelled before the task started")
        return run_generation(engine, translation.request, images_dir=self.images_dir, task_id=task_id,
                              config_id=message.get("config_id", "default"), progress=progress, cancel=cancel,
                              warnings=parsed.warnings(), preview=preview)

    def _finish(self, task_id, status, ttl, **kw) -> bool:
        """The final state, retried until Redis takes it (the result is kept meanwhile)."""
        return self._redis(lambda: self.tasks.finish(task_id, status, owner=self.owner, ttl=ttl, **kw), task_id,
                           "final write")

    def _heartbeat(self, task_id: str, stop: threading.Event, cancel: threading.Event,
                   superseded: threading.Event) -> None:
        """Hold the lease (refreshed every lease_ttl / 3; taken back at once when it lapsed while Redis was away)
        and watch the cancel flag (4 times a second), also while the engine is between progress calls (model
        load, VAE decode). Another run took the task over (this worker was taken for lost): this run stops."""
        last, failing = time.monotonic(), False
        while not stop.wait(0.25):
            try:
                if not cancel.is_set() and self.tasks.client.hget(self.tasks.key("task", task_id), "cancel"):
                    cancel.set()
                if failing or time.monotonic() - last >= self.settings.options.lease_ttl / 3:
                    held = self.tasks.hold(task_id, self.owner)
                    if held < 0:  # final (this run's own final write): nothing left to hold
                        return
                    if held == 0:
                        log.warning("task %s: another run has taken it over; this run stops", task_id)
                        superseded.set()
                        cancel.set()
                        return
                    last, failing = time.monotonic(), False
            except Exception as exc:  # Redis away for a moment: the next beat tries again
                if not failing:
                    log.warning("lease refresh of %s failed (%s); retrying", task_id, exc)
                failing = True

    def _remove(self, names) -> None:
        for name in names:
            try:
                os.unlink(self.images_dir / name)
            except FileNotFoundError:
                pass

    def _discard(self, task_id: str, names) -> None:
        """This run's PNGs, unless the task succeeded with them (the names are the task's: a run that took it
        over writes and names the same files)."""
        import redis

        if not names:
            return
        try:
            if self.tasks.client.hget(self.tasks.key("task", task_id), "status") == b"succeeded":
                return
        except redis.RedisError:
            return  # cannot tell: keep them (the results cleanup removes files no record names)
        self._remove(names)

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
        import redis

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
        except (OSError, redis.RedisError):
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

    name = settings.name or f"sdengine-{settings.engine_options.get('device', 'cpu')}-{os.getpid()}"
    nodename = f"{name}@{socket.gethostname()}"
    # this run of the worker: a worker restarted under the same name (a container keeps its hostname and pid)
    # is another instance, so a reaper still takes the tasks of the one that died for lost
    instance = f"{random.getrandbits(48):012x}"

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def txt2img(self, **message):
        rt = runtime.get("rt")
        if rt is None:
            rt = runtime["rt"] = _Runtime(settings, f"{nodename}#{instance}")
        try:
            return rt.run(message)
        except Exception as exc:  # a bug of ours: the task must still end, with the reason
            log.exception("task %s: unexpected error", message.get("task_id"))
            task_id = str(message.get("task_id"))
            rt._redis(lambda: rt.tasks.finish(task_id, "failed", owner=rt.owner, ttl=message.get("ttl") or None,
                                              error=("internal_error", f"{type(exc).__name__}: {exc}")),
                      task_id, "final write")
            return "failed"

    registry = RedisTasks(settings.url, settings.options)
    stop = threading.Event()

    def announce() -> None:
        info = {"device": settings.engine_options.get("device", "cpu"), "models": models, "queues": queues,
                "pid": os.getpid(), "host": socket.gethostname(), "instance": instance}
        failing = False
        while True:
            try:
                registry.client.hset(registry.workers_key, nodename, json.dumps({**info, "seen": time.time()}))
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("worker heartbeat failed (%s); retrying", exc)
                failing = True
            if stop.wait(settings.options.heartbeat_interval):
                break
        try:
            registry.client.hdel(registry.workers_key, nodename)
        except Exception:
            pass

    reaper = Reaper(settings.url, settings.options)

    def reap() -> None:
        while not stop.wait(settings.options.reap_interval):
            reaper.scan()

    log.info("worker %s: queue %s, checkpoints %s", nodename, redact(settings.url), ", ".join(models) or "none")
    from celery.signals import worker_ready

    def ready(sender=None, **kw):
        threading.Thread(target=announce, name="sdengine-announce", daemon=True).start()
        threading.Thread(target=reap, name="sdengine-reaper", daemon=True).start()

    worker_ready.connect(ready, weak=False)
    try:
        app.worker_main(["worker", "--pool=prefork", "--concurrency=1", f"--loglevel={loglevel}", "-n", nodename,
                         "--without-gossip", "--without-mingle", "--without-heartbeat", "-O", "fair"])
    finally:
        stop.set()


class Reaper:
    """Publishes again the tasks of lost workers, without waiting for the broker's visibility timeout: a running
    task whose lease lapsed while the heartbeat of the worker that took it stood still, as this reaper saw it,
    for ``worker_timeout`` seconds (the whole worker killed, its host lost). Every worker's main process runs
    one, :meth:`scan` every ``reap_interval`` seconds.

    Only what this reaper watched itself counts: it compares a worker's heartbeat with its earlier values, not
    with its own clock, and forgets everything when Redis cannot be reached (after a Redis restart, a live
    worker has ``worker_timeout`` seconds to beat again). The task goes back to ``waiting`` at its old queue
    position with a new message (the payload stays in the record); its attempts count, and the run of a worker
    taken for lost wrongly cannot write a second final state (the compare-and-set in
    :meth:`RedisTasks.finish`)."""

    def __init__(self, url: str, options: QueueOptions):
        self.options = options
        self.url = url
        self.tasks = RedisTasks(url, options)
        self.app = make_app(url, options)  # publishing: a Celery app of its own (not the consumer's)
        self.changed: dict[str, tuple[float | None, float]] = {}  # worker -> (heartbeat, monotonic when it changed)
        self.connected_since: float | None = None  # monotonic: since when this reaper's scans all reached Redis

    def scan(self) -> list[str]:
        """One look: the ids of the tasks published again."""
        import redis

        try:
            return self._scan(time.monotonic())
        except (redis.RedisError, OSError) as exc:
            if self.connected_since is not None:
                log.warning("reaper: Redis unavailable (%s); watching again from scratch when it is back", exc)
            self.changed.clear()
            self.connected_since = None
            return []
        except Exception:  # pragma: no cover - a bug of ours must not stop the reaper
            log.exception("reaper: scan failed")
            return []

    def _scan(self, now: float) -> list[str]:
        if self.connected_since is None:
            self.connected_since = now
        for node, seen in self.tasks.workers().items():
            old = self.changed.get(node)
            if old is None or old[0] != seen:
                self.changed[node] = (seen, now)
        published = []
        orphans = self.tasks.orphans()
        for orphan in orphans:
            # a worker with no heartbeat at all (stopped and deregistered, or never seen): this reaper's own watch
            since = self.changed[orphan["node"]][1] if orphan["node"] in self.changed else self.connected_since
            if now - since < self.options.worker_timeout:
                continue
            task_id = orphan["task_id"]
            if not self.tasks.claim_reap(task_id, max(10.0, 2 * self.options.reap_interval)):
                continue
            # published first, then waiting: a task is never waiting without a message (a delivery that comes
            # before the requeue takes the lapsed lease as usual, and the requeue then does nothing)
            self.app.send_task(TASK_NAME, kwargs={"task_id": task_id}, queue=orphan["queue"], task_id=task_id)
            requeued = self.tasks.requeue(task_id, orphan["worker"], orphan["queue"])
            log.warning("task %s: its worker %s is lost (no lease, no heartbeat for %.0f s); published again%s",
                        task_id, orphan["node"] or "?", now - since, "" if requeued else " (already taken)")
            published.append(task_id)
        for node, (seen, since) in list(self.changed.items()):  # workers gone long ago (restarted: new names)
            if now - since > 10 * self.options.worker_timeout and node not in {o["node"] for o in orphans}:
                del self.changed[node]
        return published
