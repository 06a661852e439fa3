"""The ``celery`` task backend: the same sd_txt2img / sd_get_result contract over many GPU workers, with Celery
on a Redis broker and the task records in the same Redis (the ``queue`` extra: ``pip install sdengine[queue]``).

    API server(s)  --submit-->  Redis  <--take--  sdengine worker (one per GPU) --PNG--> shared results dir
         `------------------ read records, serve PNGs from the results dir -----------------'

Who does what:

- The API (:class:`~api_compat.tasks.celery_producer.CeleryBackend`, inside
  ``TaskService(queue="redis://...")``) validates the payload exactly as the embedded backend does, draws the
  random seeds, writes the task record (``waiting``) and publishes a JSON message (the payload, the resource
  configuration's engine options) to the queue of the task's checkpoint (``sdengine.model.<name>``;
  ``sdengine.default`` when the API has no model store to resolve names).
- A worker (:func:`~api_compat.tasks.worker.run_worker`, ``sdengine worker``) consumes the queues of the
  checkpoints it serves, one task at a time per device (Celery prefork pool, concurrency 1, prefetch 1), keeps
  its engines in the pool process, translates the payload again, runs
  :func:`api_compat.tasks.backend.run_generation` (PNGs written atomically into the shared results directory),
  and writes progress (per step) and the final state. A ``/controlnet/detect`` task runs the preprocessors
  (:func:`api_compat.detect.run_detect`) on the default checkpoint's queue, without an engine.

Nothing is lost when a worker dies: messages are acknowledged late (after the record is final) and rejected
back to the queue when the pool process dies (``task_reject_on_worker_lost``: at once); when a whole worker
host dies, Redis hands its unacknowledged message to another worker after ``visibility_timeout`` seconds. A
task runs under a lease (a Redis key refreshed by a heartbeat thread), so a message delivered twice never runs
twice at the same time, and the final state is written by a compare-and-set script: a task ends succeeded
exactly once, or failed (``worker_lost``) after ``max_attempts`` deliveries whose workers died.

Record keys (``{prefix}`` = ``sdengine``): ``{prefix}:task:{id}`` (hash), ``{prefix}:lease:{id}``,
``{prefix}:expired:{id}`` (tombstone: the id answers ``expired`` after the results TTL),
``{prefix}:waiting:{queue}`` (sorted set: queue positions and the queue bound), ``{prefix}:workers`` (hash).

The modules: this one (the Celery app, the queue names, the task name and the settings the API and the workers
share), :mod:`~api_compat.tasks.redis_records` (the records and their atomic transitions),
:mod:`~api_compat.tasks.celery_producer` (the API side: the seam's ``celery`` backend) and
:mod:`~api_compat.tasks.worker` (``sdengine worker``). ``celery`` and ``redis`` are imported when a queue is
used, never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from core.lazy import require

TASK_NAME = "sdengine.txt2img"
# engine options that belong to the worker's machine, never forwarded from the API
WORKER_LOCAL = ("models_dir", "cache_dir", "device", "providers", "num_threads")


@dataclass(frozen=True)
class QueueOptions:
    """Settings shared by the API and the workers.

    ``visibility_timeout``: seconds before Redis hands the unacknowledged task of a vanished worker host to
    another worker; it must be longer than the longest task (a killed pool process is redelivered at once).
    ``restore_interval``: seconds between the workers' sweeps for such tasks. ``max_attempts``: deliveries
    whose worker died before the task is failed (``worker_lost``). ``prefix``: of the Redis keys and queues.
    ``max_task_seconds``: a running task is stopped after so long (``timed_out``); the server's value travels
    in each task's message and the worker applies the smaller of it and its own. None: no limit.
    """

    visibility_timeout: float = 3600.0
    restore_interval: float = 10.0
    max_attempts: int = 3
    prefix: str = "sdengine"
    poll_interval: float = 0.02
    max_task_seconds: float | None = None

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

