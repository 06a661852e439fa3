"""The ``celery`` task backend: the same sd_txt2img / sd_get_result contract over many GPU workers, with Celery
on a Redis broker and the task records in the same Redis (the ``queue`` extra: ``pip install sdengine[queue]``).

    API server(s)  --submit-->  Redis  <--take--  sdengine worker (one per GPU) --PNG--> shared results dir
         `------------------ read records, serve PNGs from the results dir -----------------'

Who does what:

- The API (:class:`~api_compat.tasks.celery_producer.CeleryBackend`, inside
  ``TaskService(queue="redis://...")``) validates the payload exactly as the embedded backend does, draws the
  random seeds, writes the task record (``waiting``, with what the worker runs: the payload and the resource
  configuration's engine options) and publishes a JSON message (the task id) to the queue of the task's
  checkpoint (``sdengine.model.<name>``; ``sdengine.default`` when the API has no model store to resolve
  names).
- A worker (:func:`~api_compat.tasks.worker.run_worker`, ``sdengine worker``) consumes the queues of the
  checkpoints it serves, one task at a time per device (Celery prefork pool, concurrency 1, prefetch 1), keeps
  its engines in the pool process, translates the payload again, runs
  :func:`api_compat.tasks.backend.run_generation` (PNGs written atomically into the shared results directory),
  and writes progress (per step) and the final state. A ``/controlnet/detect`` task runs the preprocessors
  (:func:`api_compat.detect.run_detect`) on the default checkpoint's queue, without an engine.

Nothing is lost when a worker dies: messages are acknowledged late (after the record is final) and rejected
back to the queue when the pool process dies (``task_reject_on_worker_lost``: at once). A task runs under a
lease (a Redis key its pool process's heartbeat thread refreshes every ``lease_ttl / 3`` s), and every worker's
main process writes its own heartbeat (``{prefix}:workers``) and runs a reaper
(:class:`~api_compat.tasks.worker.Reaper`): a running task whose lease lapsed while its worker's heartbeat stood
still for ``worker_timeout`` s (a lost host: the whole worker killed, a power-off) is put back to ``waiting``
and published again at once, without waiting for the broker's ``visibility_timeout`` (which stays long: it
only restores a message whose worker vanished before it took the task's lease). The payload lives in the
record (the message carries the task id), so a task can always be published again. The final state is
written by a compare-and-set script that only the run that took the task last can pass, so a task ends
succeeded exactly once, or failed (``worker_lost``) after ``max_attempts`` deliveries whose workers died.
When Redis is away (a restart), a worker keeps its task running, keeps the result and retries the final
write until Redis is back; its heartbeat takes the lease back if it lapsed meanwhile.

Record keys (``{prefix}`` = ``sdengine``): ``{prefix}:task:{id}`` (hash), ``{prefix}:lease:{id}``,
``{prefix}:expired:{id}`` (tombstone: the id answers ``expired`` after the results TTL),
``{prefix}:waiting:{queue}`` (sorted set: queue positions and the queue bound), ``{prefix}:running`` (sorted
set: the tasks a reaper watches), ``{prefix}:workers`` (hash: worker heartbeats), ``{prefix}:reap:{id}`` (one
reaper at a time publishes a lost task).

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

    ``visibility_timeout``: seconds before Redis hands an unacknowledged message of a vanished worker to
    another worker (only a message whose worker died before it took the task's lease needs it: running tasks
    are recovered by the lease rule); keep it longer than the longest task. ``restore_interval``: seconds
    between the workers' sweeps for such messages. ``max_attempts``: deliveries whose worker died before the
    task is failed (``worker_lost``). ``prefix``: of the Redis keys and queues.

    The lease rule (with the defaults, the task of a lost worker host is published again within
    :attr:`recovery_bound`, 24 s): ``lease_ttl``: seconds a task's lease lives without a refresh (refreshed
    every ``lease_ttl / 3``); ``heartbeat_interval``: seconds between a worker's heartbeats;
    ``worker_timeout``: seconds a reaper must see a worker's heartbeat stand still before that worker counts as
    lost; ``reap_interval``: seconds between a reaper's scans of the running tasks.
    ``max_task_seconds``: a running task is stopped after so long (``timed_out``); the server's value travels
    in each task's message and the worker applies the smaller of it and its own. None: no limit.
    """

    visibility_timeout: float = 3600.0
    restore_interval: float = 10.0
    max_attempts: int = 3
    prefix: str = "sdengine"
    poll_interval: float = 0.02
    lease_ttl: float = 15.0
    heartbeat_interval: float = 2.0
    worker_timeout: float = 20.0
    reap_interval: float = 2.0
    max_task_seconds: float | None = None

    def __post_init__(self):
        for name in ("visibility_timeout", "restore_interval", "lease_ttl", "heartbeat_interval", "worker_timeout",
                     "reap_interval", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.worker_timeout < 2 * self.heartbeat_interval:
            raise ValueError(f"worker_timeout ({self.worker_timeout:g} s) must be at least twice heartbeat_interval "
                             f"({self.heartbeat_interval:g} s): a live worker would count as lost")

    @property
    def recovery_bound(self) -> float:
        """Seconds from the loss of a worker host to its task being published again, at most: the lease has
        lapsed and a reaper has seen the heartbeat stand still long enough (its scan comes at most one
        interval after each)."""
        return max(self.lease_ttl, self.worker_timeout + self.reap_interval) + self.reap_interval


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
        # a worker outlives a Redis outage however long (it reconnects; its running task keeps its result), and
        # its running task goes on when the broker connection drops (Celery 6 would cancel it by default)
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
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

