"""The task backends behind :class:`api_compat.service.TaskService`, and the seam between them.

- :mod:`~api_compat.tasks.backend`: the seam (``TaskBackend``, ``Submission``) and what every backend shares
  (``run_generation``; ``api_compat.detect.run_detect`` for /controlnet/detect tasks; the result shape, the
  error codes);
- ``embedded`` (the default): :mod:`~api_compat.tasks.embedded` (one worker thread per device in the API's
  process) over :mod:`~api_compat.tasks.store` (SQLite records + PNGs);
- ``celery`` (the ``queue`` extra): :mod:`~api_compat.tasks.celery_app` (the Celery app, queue names, shared
  settings), :mod:`~api_compat.tasks.redis_records` (task records in Redis), :mod:`~api_compat.tasks.celery_producer`
  (the API side) and :mod:`~api_compat.tasks.worker` (``sdengine worker``).

Nothing is imported here: ``celery`` and ``redis`` load only when a queue is used.
"""
