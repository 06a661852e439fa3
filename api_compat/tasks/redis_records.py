"""The task records of the ``celery`` backend in Redis, used by the API and the workers alike: one hash per task,
its lease, the expiry tombstone, the waiting sets (queue positions and bounds); every transition is one Lua
script (atomic), so a task ends succeeded exactly once (:mod:`api_compat.tasks.celery_app` has the overview)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from api_compat.errors import ApiError
from api_compat.tasks.backend import Submission, initial_progress, result_dict
from api_compat.tasks.celery_app import QueueOptions
from api_compat.tasks.store import dumps

EXPIRED_KEEP_S = 7 * 86400  # an expired id answers "expired" (not "not_found") this long after its TTL
PENDING_TTL_S = 30 * 86400  # a record that never finishes (its message lost with an unpersisted Redis) goes

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
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[3], 'worker', ARGV[1], 'node', ARGV[7])
redis.call('HDEL', KEYS[1], 'progress')
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[4])
return {'run', tostring(n), redis.call('HGET', KEYS[1], 'cancel') or '', redis.call('HGET', KEYS[1], 'message') or ''}
"""

# the final state: only once, and (owner given) only by the run that took the task last (the record's worker)
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'succeeded' or st == 'failed' then return 0 end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[9] then return 0 end
local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
if st == 'waiting' and nb > 0 then redis.call('HINCRBY', KEYS[5], ARGV[11], -nb) end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2], 'info', ARGV[3], 'images', ARGV[4],
           'error_code', ARGV[5], 'error_message', ARGV[6])
redis.call('HDEL', KEYS[1], 'progress', 'message')
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[8])
else
  redis.call('PERSIST', KEYS[1])
end
if ARGV[9] ~= '' and redis.call('GET', KEYS[2]) == ARGV[9] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[10])
redis.call('ZREM', KEYS[6], ARGV[10])
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
  redis.call('HDEL', KEYS[1], 'message')
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

# the running worker's heartbeat: refresh its lease; take it back when it lapsed (Redis was away) and the task is
# still this run's (running, or put back to waiting by a reaper that took this worker for lost); 0: superseded,
# -1: final already (this run's final write came first)
_HOLD = """
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'succeeded' or st == 'failed' then return -1 end
if holder then return 0 end
if (st ~= 'running' and st ~= 'waiting') or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if st == 'waiting' then
  local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
  if nb > 0 then redis.call('HINCRBY', KEYS[4], ARGV[4], -nb) end
  redis.call('HSET', KEYS[1], 'status', 'running')
  redis.call('ZREM', KEYS[3], ARGV[3])
end
redis.call('ZADD', KEYS[5], 'NX', ARGV[5], ARGV[3])
return 2
"""

# a reaper: the task's lease lapsed and its worker is lost -> waiting again, at its old queue position (the
# caller has published it again); nothing when its worker took it back or another run took it meanwhile
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'waiting')
redis.call('HDEL', KEYS[1], 'progress')
local nb = tonumber(redis.call('HGET', KEYS[1], 'nbytes') or '0') or 0
if nb > 0 then redis.call('HINCRBY', KEYS[4], ARGV[3], nb) end
redis.call('ZADD', KEYS[3], tonumber(redis.call('HGET', KEYS[1], 'created') or '0') or 0, ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[2])
return 1
"""


class RedisTasks:
    """The task records in Redis, used by the API and the workers alike (atomic transitions in Lua)."""

    def __init__(self, url: str, options: QueueOptions):
        import redis

        self.options = options
        self.prefix = options.prefix
        self.client = redis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5,
                                             socket_timeout=15)
        self._start = self.client.register_script(_START)
        self._finish = self.client.register_script(_FINISH)
        self._cancel = self.client.register_script(_CANCEL)
        self._hold = self.client.register_script(_HOLD)
        self._requeue = self.client.register_script(_REQUEUE)

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def waiting_key(self, queue: str) -> str:
        return f"{self.prefix}:waiting:{queue}"

    @property
    def running_key(self) -> str:
        """Sorted set of the running tasks (score: when they started), what a reaper scans."""
        return f"{self.prefix}:running"

    @property
    def workers_key(self) -> str:
        """Hash worker name -> its heartbeat (JSON with ``seen``)."""
        return f"{self.prefix}:workers"

    @property
    def bytes_key(self) -> str:
        """Hash queue -> bytes of the ControlNet images its waiting tasks hold."""
        return f"{self.prefix}:waiting-bytes"

    # -------------------------------------------------------------------------------------------- API side
    def create(self, sub: Submission, queue: str, max_queue: int, max_queue_bytes: int | None = None, *,
               message: dict[str, Any] | None = None) -> None:
        """A waiting record; ``message`` (what a worker runs: the payload with its seeds, the engine options) is
        kept in it until the task is final, so that a reaper can publish the task again."""
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
            "parameters": json.dumps(sub.parameters, ensure_ascii=False), "attempts": 0, "nbytes": sub.nbytes,
            **({"message": json.dumps(message, ensure_ascii=False)} if message is not None else {})})
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
    def start(self, task_id: str, owner: str, steal: str = "", node: str = "") -> list[str]:
        """Take the task: ``['run', attempts, cancel flag, message JSON]``, ``['leased', holder]``,
        ``['final']`` or ``['missing']``."""
        record = self.get(task_id) or {}
        queue = record.get("queue", "")
        answer = self._start(
            keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(queue), self.bytes_key,
                  self.running_key],
            args=[owner, int(self.options.lease_ttl * 1000), repr(time.time()), task_id, steal or "\x00", queue,
                  node])
        return [a.decode() if isinstance(a, bytes) else str(a) for a in answer]

    def hold(self, task_id: str, owner: str) -> int:
        """Refresh the lease (or take it back after it lapsed): > 0; 0 when another run has the task now (or its
        record is gone); -1 when the task is final."""
        queue = (self.client.hget(self.key("task", task_id), "queue") or b"").decode()
        return int(self._hold(keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(queue),
                                     self.bytes_key, self.running_key],
                               args=[owner, int(self.options.lease_ttl * 1000), task_id, queue, repr(time.time())]))

    def workers(self) -> dict[str, float]:
        """``name#instance`` of each worker (as a running record's ``node``) -> the time of its last heartbeat
        (its own clock: compared only with itself)."""
        out = {}
        for name, raw in self.client.hgetall(self.workers_key).items():
            try:
                info = json.loads(raw)
                out[f"{name.decode()}#{info.get('instance', '')}"] = float(info.get("seen", 0))
            except (ValueError, TypeError, AttributeError):
                out[f"{name.decode()}#"] = 0.0
        return out

    def orphans(self) -> list[dict[str, str]]:
        """The running tasks without a lease (their run stopped refreshing it) that can be published again
        (``task_id``, ``worker``, ``node``, ``queue``); final records are dropped from the running set."""
        ids = [i.decode() for i in self.client.zrange(self.running_key, 0, -1)]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.key("task", task_id), "status", "worker", "node", "queue", "message")
            pipe.exists(self.key("lease", task_id))
        answers = pipe.execute()
        out, done = [], []
        for i, task_id in enumerate(ids):
            status, worker, node, queue, message = (v.decode() if v is not None else None for v in answers[2 * i])
            if status in (None, "succeeded", "failed"):
                done.append(task_id)
            elif status == "running" and not answers[2 * i + 1] and message:
                out.append({"task_id": task_id, "worker": worker or "", "node": node or "", "queue": queue or ""})
        if done:
            self.client.zrem(self.running_key, *done)
        return out

    def claim_reap(self, task_id: str, seconds: float) -> bool:
        """One reaper at a time publishes a lost task."""
        return bool(self.client.set(self.key("reap", task_id), "1", nx=True, px=int(seconds * 1000)))

    def requeue(self, task_id: str, owner: str, queue: str) -> bool:
        """A lost run's task back to waiting (after it was published again); False when it is not lost."""
        return bool(self._requeue(keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(queue),
                                        self.bytes_key, self.running_key], args=[owner, task_id, queue]))

    def progress(self, task_id: str, value: dict[str, Any]) -> bool:
        """Write progress; True when a cancel was asked for."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key("task", task_id), "progress", json.dumps(value))
        pipe.hget(self.key("task", task_id), "cancel")
        return bool(pipe.execute()[1])

    def finish(self, task_id: str, status: str, *, owner: str, ttl: float | None, info: dict | None = None,
               images: list[str] | None = None, error: tuple[str, str] | None = None) -> bool:
        """Write the final state unless one is there already or (``owner`` given) another run took the task;
        False then."""
        record = self.get(task_id) or {}
        code, message = error or ("", "")
        done = self._finish(
            keys=[self.key("task", task_id), self.key("lease", task_id), self.waiting_key(record.get("queue", "")),
                  self.key("expired", task_id), self.bytes_key, self.running_key],
            args=[status, repr(time.time()), dumps(info or {}), json.dumps(images or []), code, message[:2000],
                  int(ttl or 0), int(ttl or 0) + EXPIRED_KEEP_S, owner, task_id, record.get("queue", "")])
        return bool(done)



def record_result(record: dict[str, str], task_id: str, images_dir: Path, steps: int | None) -> dict[str, Any]:
    """A record as the result dict of API.md ("Poll"); ``images`` as paths under ``images_dir``."""
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

