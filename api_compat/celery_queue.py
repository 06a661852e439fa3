"""The ``celery`` task backend: the same sd_txt2img / sd_get_result contract over many GPU workers, with Celery
on a Redis broker and the task records in the same Redis (the ``queue`` extra: ``pip install sdengine[queue]``).

    API server(s)  --submit-->  Redis  <--take--  sdengine worker (one per GPU) --PNG--> shared results dir
         `------------------ read records, serve PNGs from the results dir -----------------'

Who does what:

- The API (:class:`CeleryBackend`, inside ``LocalService(queue="redis://...")``) validates the payload exactly
  as the embedded backend does, draws the random seeds, writes the task record (``waiting``) and publishes a
  JSON message (the payload, the resource configuration's engine options) to the queue of the task's checkpoint
  (``sdengine.model.<name>``; ``sdengine.default`` when the API has no model store to resolve names).
- A worker (:func:`run_worker`, ``sdengine worker``) consumes the queues of the checkpoints it serves, one task
  at a time per device (Celery prefork pool, concurrency 1, prefetch 1), keeps its engines in the pool
  process, translates the payload again, runs :func:`api_compat.backend.run_generation` (PNGs written
  atomically into the shared results directory), and writes progress (per step) and the final state.

Nothing is lost when a worker dies: messages are acknowledged late (after the record is final) and rejected
back to the queue when the pool process dies (``task_reject_on_worker_lost``: at once); when a whole worker
host dies, Redis hands its unacknowledged message to another worker after ``visibility_timeout`` seconds. A
task runs under a lease (a Redis key refreshed by a heartbeat thread), so a message delivered twice never runs
twice at the same time, and the final state is written by a compare-and-set script: a task ends succeeded
exactly once, or failed (``worker_lost``) after ``max_attempts`` deliveries whose workers died.

Record keys (``{prefix}`` = ``sdengine``): ``{prefix}:task:{id}`` (hash), ``{prefix}:lease:{id}``,
``{prefix}:expired:{id}`` (tombstone: the id answers ``expired`` after the results TTL),
``{prefix}:waiting:{queue}`` (sorted set: queue positions and the queue bound), ``{prefix}:workers`` (hash).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine.lazy import require

from api_compat.backend import Submission, initial_progress, result_dict
from api_compat.errors import ApiError
from api_compat.store import TASK_ID, dumps
from export.manifest import pid_alive

log = logging.getLogger(__name__)

TASK_NAME = "sdengine.txt2img"
EXPIRED_KEEP_S = 7 * 86400  # an expired id answers "expired" (not "not_found") this long after its TTL
PENDING_TTL_S = 30 * 86400  # a record that never finishes (its message lost with an unpersisted Redis) goes
WORKER_SEEN_S = 15.0  # a worker whose heartbeat is older than this is not listed by health()
# engine options that belong to the worker's machine, never forwarded from the API
WORKER_LOCAL = ("models_dir", "cache_dir", "device", "providers", "num_threads")


@dataclass(frozen=True)
class QueueOptions:
    """Settings shared by the API and the workers.

    ``visibility_timeout``: seconds before Redis hands the unacknowledged task of a vanished worker host to
    another worker; it must be longer than the longest task (a killed pool process is redelivered at once).
    ``restore_interval``: seconds between the workers' sweeps for such tasks. ``max_attempts``: deliveries
    whose worker died before the task is failed (``worker_lost``). ``prefix``: of the Redis keys and queues.
    """

    visibility_timeout: float = 3600.0
    restore_interval: float = 10.0
    max_attempts: int = 3
    prefix: str = "sdengine"
    poll_interval: float = 0.02

    @property
    def lease_ttl(self) -> float:
        return min(max(self.visibility_timeout / 2, 1.0), 30.0)


def redact(url: str) -> str:
    """The URL without its password (for logs and /health)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def queue_name(prefix: str, model: str | None) -> str:
    return f"{prefix}.model.{model}" if model else f"{prefix}.default"


def make_app(url: str, options: QueueOptions):
    """A Celery app on the Redis broker at ``url`` (no module state: every caller makes its own)."""
    require("celery", "queue", "The Celery + Redis task queue")
    require("redis", "queue", "The Celery + Redis task queue")
    from celery import Celery

    app = Celery("sdengine", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=queue_name(options.prefix, None),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": options.visibility_timeout,
            "unacked_restore_interval": options.restore_interval,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=True,
        worker_deduplicate_successful_tasks=False,
    )
    return app


# ------------------------------------------------------------------------------------------ records in Redis
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'succeeded' or st == 'failed' then return {'final'} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] and holder ~= ARGV[5] then return {'leased', holder} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
if st == 'waiting' and nb > 0 then redis.call('HINCRBY', KEYS[4], ARGV[6], -nb) end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[3], 'worker', ARGV[1])
redis.call('HDEL', KEYS[1], 'progress')
redis.call('ZREM', KEYS[3], ARGV[4])
return {'run', tostring(n), redis.call('HGET', KEYS[1], 'cancel') or ''}
"""

_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'succeeded' or st == 'failed' then return 0 end
local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
if st == 'waiting' and nb > 0 then redis.call('HINCRBY', KEYS[5], ARGV[11], -nb) end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2], 'info', ARGV[3], 'images', ARGV[4],
           'error_code', ARGV[5], 'error_message', ARGV[6])
redis.call('HDEL', KEYS[1], 'progress')
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[8])
else
  redis.call('PERSIST', KEYS[1])
end
if ARGV[9] ~= '' and redis.call('GET', KEYS[2]) == ARGV[9] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[10])
return 1
"""

_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'waiting' then
  local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
  if nb > 0 then redis.call('HINCRBY', KEYS[4], ARGV[5], -nb) end
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished', ARGV[1], 'info', '{}', 'images', '[]',
             'error_code', 'cancelled', 'error_message', 'cancelled while waiting', 'cancel', '1')
  if tonumber(ARGV[2]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
  end
  redis.call('ZREM', KEYS[2], ARGV[4])
  return 'cancelled'
end
if st == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return st
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisTasks:
    """The task records in Redis, used by the API and the workers alike (atomic transitions in Lua)."""

    def __init__(self, url: str, options: QueueOptions):
        import redis

        self.options = options
        self.prefix = options.prefix
        self.client = redis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)
        self._start = self.client.register_script(_START)
        self._finish = self.client.register_script(_FINISH)
        self._cancel = self.client.register_script(_CANCEL)
        self._refresh = self.client.register_script(_REFRESH)

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def waiting_key(self, queue: str) -> str:
        return f"{self.prefix}:waiting:{queue}"

    @property
    def bytes_key(self) -> str:
        """Hash queue -> bytes of the ControlNet images its waiting tasks hold."""
        return f"{self.prefix}:waiting-bytes"

    # -------------------------------------------------------------------------------------------- API side
    def create(self, sub: Submission, queue: str, max_queue: int, max_queue_bytes: int | None = None) -> None:
        waiting = self.waiting_key(queue)
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(waiting)
        pipe.hget(self.bytes_key, queue)
        count, queued_bytes = pipe.execute()
        queued_bytes = int(queued_bytes or 0)
        if count >= max_queue and self._prune(waiting) >= max_queue:
            raise ApiError("queue_full", f"the queue is full ({max_queue} waiting tasks); retry later",
                           field=None, allowed=f"at most {max_queue} waiting tasks")
        if max_queue_bytes is not None and count and queued_bytes + sub.nbytes > max_queue_bytes:
            raise ApiError("queue_full", f"the waiting tasks' images fill the queue ({queued_bytes} of "
                           f"{max_queue_bytes} bytes); retry later",
                           allowed=f"at most {max_queue_bytes} bytes of images in waiting tasks")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key("task", sub.task_id), mapping={
            "status": "waiting", "config_id": sub.config_id, "queue": queue, "created": repr(sub.created),
            "parameters": json.dumps(sub.parameters, ensure_ascii=False), "attempts": 0, "nbytes": sub.nbytes})
        pipe.expire(self.key("task", sub.task_id), PENDING_TTL_S)
        pipe.zadd(waiting, {sub.task_id: sub.created})
        pipe.hincrby(self.bytes_key, queue, sub.nbytes)
        pipe.execute()

    def _prune(self, waiting: str) -> int:
        """Drop queue-position entries whose record is gone (an API that died between record and message)."""
        for task_id in self.client.zrange(waiting, 0, -1):
            task_id = task_id.decode()
            if not self.client.exists(self.key("task", task_id)):
                self.client.zrem(waiting, task_id)
        return self.client.zcard(waiting)

    def get(self, task_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(self.key("task", task_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    def position(self, task_id: str, queue: str) -> int:
        rank = self.client.zrank(self.waiting_key(queue), task_id)
        return int(rank) if rank is not None else int(self.client.zcard(self.waiting_key(queue)))

    def lease_holder(self, task_id: str) -> str | None:
        value = self.client.get(self.key("lease", task_id))
        return value.decode() if value else None

    def expired(self, task_id: str) -> bool:
        return bool(self.client.exists(self.key("expired", task_id)))

    def cancel(self, task_id: str, ttl: float | None) -> str:
        record = self.get(task_id)
        queue = record.get("queue", "") if record else ""
        answer = self._cancel(keys=[self.key("task", task_id), self.waiting_key(queue), self.key("expired", task_id),
                                    self.bytes_key],
                              args=[repr(time.time()), int(ttl or 0), int(ttl or 0) + EXPIRED_KEEP_S, task_id, queue])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    # ----------------------------------------------------------------------------------------- worker side
    def start(self, task_id: str, owner: str, steal: str = "") -> list[str]:
        record = self.get(task_id) or {}
        answer = self._start(
            keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(record.get("queue", "")),
                  self.bytes_key],
            args=[owner, int(self.options.lease_ttl * 1000), repr(time.time()), task_id, steal or "\x00",
                  record.get("queue", "")])
        return [a.decode() if isinstance(a, bytes) else str(a) for a in answer]

    def refresh(self, task_id: str, owner: str) -> bool:
        return bool(self._refresh(keys=[self.key("lease", task_id)], args=[owner, int(self.options.lease_ttl * 1000)]))

    def progress(self, task_id: str, value: dict[str, Any]) -> bool:
        """Write progress; True when a cancel was asked for."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key("task", task_id), "progress", json.dumps(value))
        pipe.hget(self.key("task", task_id), "cancel")
        return bool(pipe.execute()[1])

    def finish(self, task_id: str, status: str, *, owner: str, ttl: float | None, info: dict | None = None,
               images: list[str] | None = None, error: tuple[str, str] | None = None) -> bool:
        """Write the final state unless one is there already; False when it was (the task ended elsewhere)."""
        record = self.get(task_id) or {}
        code, message = error or ("", "")
        done = self._finish(
            keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(record.get("queue", "")),
                  self.key("expired", task_id), self.bytes_key],
            args=[status, repr(time.time()), dumps(info or {}), json.dumps(images or []), code, message[:2000],
                  int(ttl or 0), int(ttl or 0) + EXPIRED_KEEP_S, owner, task_id, record.get("queue", "")])
        return bool(done)


def _record_result(record: dict[str, str], task_id: str, images_dir: Path, steps: int | None) -> dict[str, Any]:
    status = record["status"]
    parameters = json.loads(record.get("parameters") or "{}")
    if status in ("succeeded", "failed"):
        images = [str(images_dir / name) for name in json.loads(record.get("images") or "[]")]
        return result_dict(task_id, status, images, parameters, json.loads(record.get("info") or "{}"),
                           (record.get("error_code") or None, record.get("error_message") or None))
    out: dict[str, Any] = {"taskId": task_id, "status": status, "images": [], "parameters": parameters, "info": {}}
    if status == "running":
        out["progress"] = json.loads(record.get("progress") or "null") or initial_progress(steps)
    return out


class CeleryBackend:
    """The API side: records and messages in Redis; PNGs read from the shared ``results_dir``/images."""

    name = "celery"

    def __init__(self, url: str, service, results_dir: Path, *, max_queue: int, results_ttl: float | None,
                 options: QueueOptions | None = None):
        self.url = url
        self.options = options or QueueOptions()
        self.service = service
        self.images_dir = Path(results_dir) / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self.ttl = results_ttl
        self.app = make_app(url, self.options)
        self.tasks = RedisTasks(url, self.options)
        self._closing = False

    def submit(self, sub: Submission) -> None:
        if self._closing:
            raise ApiError("closed", "the service is closed")
        queue = queue_name(self.options.prefix, sub.model)
        options = {k: _plain(v) for k, v in self.service.config_options[sub.config_id].items()
                   if k not in WORKER_LOCAL}
        limits = asdict(self.service.limits)
        message = {"task_id": sub.task_id, "config_id": sub.config_id, "kind": sub.kind, "payload": sub.payload,
                   "options": options,
                   "limits": limits, "ttl": self.ttl or 0, "steps": getattr(sub.request, "steps", None)}
        try:
            json.dumps(message)
        except (TypeError, ValueError) as exc:
            raise ApiError("bad_request", f"the payload cannot be sent to a worker as JSON ({exc})",
                           allowed="a JSON object") from None
        import redis

        try:
            self.tasks.create(sub, queue, self.max_queue, self.service.max_queue_bytes)
        except (redis.RedisError, OSError) as exc:
            log.error("queue %s unavailable: %s", redact(self.url), exc)
            raise ApiError("backend_unavailable", "the task queue is unavailable; retry later") from None
        try:
            self.app.send_task(TASK_NAME, kwargs=message, queue=queue, task_id=sub.task_id)
        except Exception as exc:  # kombu's OperationalError, redis errors: the record must not stay waiting
            log.error("queue %s unavailable: %s", redact(self.url), exc)
            try:
                self.tasks.finish(sub.task_id, "failed", owner="", ttl=self.ttl,
                                  error=("backend_unavailable", "the task queue could not take the task"))
            except (redis.RedisError, OSError):
                pass
            raise ApiError("backend_unavailable", "the task queue is unavailable; retry later") from None

    def result(self, task_id: str) -> dict[str, Any]:
        record = self.tasks.get(task_id)
        if record is None:
            if self.tasks.expired(task_id):
                ttl = f" (results are kept {self.ttl:g} s)" if self.ttl else ""
                raise ApiError("expired", f"task {task_id!r} finished and its result has expired{ttl}; submit it "
                               "again", field="taskId", allowed="a task id from sd_txt2img, within the results TTL")
            raise ApiError("not_found", f"no task {task_id!r}", field="taskId")
        steps = json.loads(record.get("parameters") or "{}").get("steps")
        out = _record_result(record, task_id, self.images_dir, steps)
        if out["status"] == "running" and self.tasks.lease_holder(task_id) is None:
            # its worker died: the message goes back to the queue (at once for a killed pool process, after
            # visibility_timeout for a lost host) and the next delivery runs it again
            out = {**out, "status": "waiting", "retry": {
                "attempts": int(record.get("attempts") or 0), "max_attempts": self.options.max_attempts,
                "reason": "the worker running this task stopped; it is delivered to a worker again"}}
            out.pop("progress", None)
        if out["status"] == "waiting":
            out["queue_position"] = self.tasks.position(task_id, record.get("queue", ""))
        return out

    def cancel(self, task_id: str) -> None:
        state = self.tasks.cancel(task_id, self.ttl)
        if state == "cancelled":
            try:  # the record is final already; revoking spares the worker the delivery
                self.app.control.revoke(task_id)
            except Exception:  # pragma: no cover - best effort
                log.warning("revoke of %s failed", task_id, exc_info=True)

    def wait(self, task_id: str, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.tasks.get(task_id)
            if record is None or record.get("status") in ("succeeded", "failed"):
                return
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id} did not finish within {timeout} s")
            time.sleep(self.options.poll_interval)

    def image_path(self, task_id: str, index: int) -> Path | None:
        if not TASK_ID.match(task_id):
            return None
        record = self.tasks.get(task_id)
        if record is None or record.get("status") != "succeeded":
            return None
        names = json.loads(record.get("images") or "[]")
        if not 0 <= index < len(names):
            return None
        path = self.images_dir / names[index]
        return path if path.is_file() else None

    def health(self) -> dict[str, Any]:
        devices = {}
        now = time.time()
        try:
            workers = self.tasks.client.hgetall(f"{self.options.prefix}:workers")
            for name, raw in workers.items():
                info = json.loads(raw)
                if now - info.get("seen", 0) > WORKER_SEEN_S:
                    continue
                waiting = sum(int(self.tasks.client.zcard(self.tasks.waiting_key(q))) for q in info.get("queues", []))
                queued = self.tasks.client.hmget(self.tasks.bytes_key, info.get("queues") or ["-"])
                devices[name.decode()] = {"waiting": waiting, "waiting_bytes": sum(int(b or 0) for b in queued),
                                          "capacity": self.max_queue, "alive": True,
                                          "device": info.get("device"), "models": info.get("models"),
                                          "configs": sorted(self.service.configs), "pid": info.get("pid")}
            status = "closed" if self._closing else "ok"
        except Exception as exc:  # the API itself is up; say what is down
            log.warning("health: %s", exc)
            status = "queue_unavailable"
        return {"status": status, "backend": self.name, "queue": redact(self.url), "devices": devices}

    def close(self, timeout: float | None = 60.0) -> None:
        self._closing = True
        try:
            self.tasks.client.close()
        except Exception:  # pragma: no cover
            pass


def _plain(value: Any) -> Any:
    if hasattr(value, "value"):  # enums
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------------------------------------ the worker
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
        from api_compat.engine_api import default_engine_factory

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
        from engine.config import EngineConfig

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
            self._execute(message, task_id, ttl, EngineConfig, cancel)
            return "done"
        finally:
            stop.set()
            beat.join(5)
            self._maybe_cleanup(ttl)

    def _execute(self, message, task_id, ttl, EngineConfig, cancel: threading.Event) -> None:
        from api_compat.backend import Progress, error_of, run_generation
        from api_compat.errors import api_error_from
        from api_compat.images import ImageLimits
        from api_compat.schema import parse_request
        from api_compat.translate import field_origins, translate_request
        from engine.errors import Cancelled, InvalidRequest

        tracker = Progress(message.get("steps"))
        names: list[str] = []
        origins: dict[str, str] = {}  # request path -> payload path, once the payload is parsed

        def progress(event, steps: int | None = None) -> None:
            if self.tasks.progress(task_id, tracker(event, steps)):
                cancel.set()

        try:
            options = {**self.settings.engine_options, **(message.get("options") or {})}
            for key in WORKER_LOCAL:
                if key in self.settings.engine_options:
                    options[key] = self.settings.engine_options[key]
                else:
                    options.pop(key, None)
            config = EngineConfig(**options)
            kind = message.get("kind", "txt2img")
            parsed = parse_request(kind, message["payload"])
            origins = field_origins(parsed)
            try:
                translation = translate_request(kind, parsed, config, ImageLimits(**(message.get("limits") or {})))
            except InvalidRequest as exc:  # in the payload's terms
                raise api_error_from(exc) from None
            key = json.dumps(options, sort_keys=True, default=str)
            engine = self.engines.get(key)
            if engine is None:
                engine = self.engines[key] = self.factory(config)
            if self.tasks.progress(task_id, tracker.value):
                raise Cancelled("cancelled before the task started")
            info, names = run_generation(engine, translation.request, images_dir=self.images_dir, task_id=task_id,
                                         config_id=message.get("config_id", "default"), progress=progress,
                                         cancel=cancel)
            if not self._finish(task_id, "succeeded", ttl, info=info, images=names):
                self._remove(names)  # cancelled (or ended) meanwhile: its record says so; no orphan files
        except ApiError as exc:
            self._finish(task_id, "failed", ttl, error=(exc.code, str(exc)))
        except Exception as exc:
            self._remove(names)
            self._finish(task_id, "failed", ttl, error=error_of(exc, task_id, origins))

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
    from engine.config import EngineConfig
    from engine.models.checkpoints import Kind
    from engine.models.store import ModelStore

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
