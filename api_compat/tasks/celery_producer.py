"""The API side of the ``celery`` task backend (the seam's :class:`~api_compat.tasks.backend.TaskBackend`): it
writes the task record (``waiting``, with what a worker runs: the payload and the engine options) and publishes
a JSON message (the task id) to the queue of the task's checkpoint; it reads results from the records and the
PNGs from the shared results directory (:mod:`api_compat.tasks.celery_app` has the overview). While Redis cannot
be reached, every call answers ``backend_unavailable`` (HTTP 503)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from api_compat.errors import ApiError
from api_compat.tasks.backend import Submission
from api_compat.tasks.celery_app import TASK_NAME, WORKER_LOCAL, QueueOptions, make_app, queue_name, redact
from api_compat.tasks.redis_records import RedisTasks, record_result
from api_compat.tasks.store import TASK_ID

log = logging.getLogger(__name__)

WORKER_SEEN_S = 15.0  # a worker whose heartbeat is older than this is not listed by health()


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
                   "limits": limits, "ttl": self.ttl or 0, "steps": getattr(sub.request, "steps", None),
                   "max_seconds": self.options.max_task_seconds or 0}
        try:
            json.dumps(message)
        except (TypeError, ValueError) as exc:
            raise ApiError("bad_request", f"the payload cannot be sent to a worker as JSON ({exc})",
                           allowed="a JSON object") from None
        import redis

        try:
            self.tasks.create(sub, queue, self.max_queue, self.service.max_queue_bytes, message=message)
        except (redis.RedisError, OSError) as exc:
            log.error("queue %s unavailable: %s", redact(self.url), exc)
            raise ApiError("backend_unavailable", "the task queue is unavailable; retry later") from None
        try:
            self.app.send_task(TASK_NAME, kwargs={"task_id": sub.task_id}, queue=queue, task_id=sub.task_id)
        except Exception as exc:  # kombu's OperationalError, redis errors: the record must not stay waiting
            log.error("queue %s unavailable: %s", redact(self.url), exc)
            try:
                self.tasks.finish(sub.task_id, "failed", owner="", ttl=self.ttl,
                                  error=("backend_unavailable", "the task queue could not take the task"))
            except (redis.RedisError, OSError):
                pass
            raise ApiError("backend_unavailable", "the task queue is unavailable; retry later") from None

    def result(self, task_id: str) -> dict[str, Any]:
        with _queue_errors(self.url):
            return self._result(task_id)

    def _result(self, task_id: str) -> dict[str, Any]:
        record = self.tasks.get(task_id)
        if record is None:
            if self.tasks.expired(task_id):
                ttl = f" (results are kept {self.ttl:g} s)" if self.ttl else ""
                raise ApiError("expired", f"task {task_id!r} finished and its result has expired{ttl}; submit it "
                               "again", field="taskId", allowed="a task id from sd_txt2img, within the results TTL")
            raise ApiError("not_found", f"no task {task_id!r}", field="taskId")
        steps = json.loads(record.get("parameters") or "{}").get("steps")
        out = record_result(record, task_id, self.images_dir, steps)
        attempts = int(record.get("attempts") or 0)
        lost = out["status"] == "running" and self.tasks.lease_holder(task_id) is None
        if lost or (out["status"] == "waiting" and attempts):
            # its worker died: the task goes back to the queue (at once for a killed pool process, within
            # QueueOptions.recovery_bound for a lost host) and the next delivery runs it again
            out = {**out, "status": "waiting", "retry": {
                "attempts": attempts, "max_attempts": self.options.max_attempts,
                "reason": "the worker running this task stopped; it is delivered to a worker again"}}
            out.pop("progress", None)
        if out["status"] == "waiting":
            out["queue_position"] = self.tasks.position(task_id, record.get("queue", ""))
        return out

    def cancel(self, task_id: str) -> None:
        with _queue_errors(self.url):
            state = self.tasks.cancel(task_id, self.ttl)
        if state == "cancelled":
            try:  # the record is final already; revoking spares the worker the delivery
                self.app.control.revoke(task_id)
            except Exception:  # pragma: no cover - best effort
                log.warning("revoke of %s failed", task_id, exc_info=True)

    def wait(self, task_id: str, timeout: float | None) -> None:
        """Until the task is final; a Redis outage meanwhile is waited out (within ``timeout``)."""
        import redis

        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                record = self.tasks.get(task_id)
                if record is None or record.get("status") in ("succeeded", "failed"):
                    return
            except (redis.RedisError, OSError):
                pass
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"task {task_id} did not finish within {timeout} s")
            time.sleep(self.options.poll_interval)

    def image_path(self, task_id: str, index: int) -> Path | None:
        if not TASK_ID.match(task_id):
            return None
        with _queue_errors(self.url):
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
        # "queue": the task queue (embedded | celery); "backend" means the compute backend everywhere else
        return {"status": status, "queue": self.name, "broker": redact(self.url), "devices": devices}

    def close(self, timeout: float | None = 60.0) -> None:
        self._closing = True
        try:
            self.tasks.client.close()
        except Exception:  # pragma: no cover
            pass


@contextmanager
def _queue_errors(url: str):
    """Redis cannot be reached (a restart, a network fault): ApiError ``backend_unavailable`` (HTTP 503)."""
    import redis

    try:
        yield
    except (redis.RedisError, OSError) as exc:
        log.error("queue %s unavailable: %s", redact(url), exc)
        raise ApiError("backend_unavailable", "the task queue (Redis) cannot be reached; accepted tasks are kept, "
                       "retry later") from None


def _plain(value: Any) -> Any:
    if hasattr(value, "value"):  # enums
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
