"""What keeps one client's costly requests from starving the others (issue 31, item 5).

- :data:`MAX_JSON_KEYS`: a body may hold at most so many object keys in all (a full payload with every ControlNet
  unit has a few hundred; the webui's whole options dict under a thousand), checked right after decoding, so that
  validating, "did you mean" suggestions and error answers stay bounded (:func:`too_many_keys`).
- :class:`HeavyWork`: CPU-heavy request work (decoding a large JSON body, validating a payload that decodes
  images or fetches URLs) runs on a small executor of its own, at most ``per_client`` at a time per client
  address, never on the event loop's shared default pool, which the light calls (results, listings, the
  synchronous routes' polls) use.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from api_compat.errors import ApiError

MAX_JSON_KEYS = 10_000  # object keys in one body, all levels together
HEAVY_WORKERS = max(2, min(4, os.cpu_count() or 2))  # threads for heavy request work, all clients together
PER_CLIENT = 2  # heavy requests of one client address worked on at once; more wait their turn


def too_many_keys(value: Any, limit: int = MAX_JSON_KEYS) -> ApiError | None:
    """The error for a decoded JSON value with more than ``limit`` object keys (all levels), else None. Stops
    counting at the limit."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if count > limit:
            return ApiError("payload_too_large", f"the body has more than {limit} object keys",
                            allowed=f"at most {limit} keys in all (a payload needs a few hundred)")
        stack.extend(c for c in children if isinstance(c, (dict, list)))
    return None


class HeavyWork:
    """A small thread pool for CPU-heavy request work, with at most ``per_client`` jobs at a time per client
    address (the rest wait, in order). ``await heavy.run(client, fn, *args)``; :meth:`close` at shutdown."""

    def __init__(self, workers: int = HEAVY_WORKERS, per_client: int = PER_CLIENT):
        self.workers = workers
        self.per_client = per_client
        self._executor: ThreadPoolExecutor | None = None
        self._slots: dict[str | None, list] = {}  # client -> [semaphore, users]

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sdengine-heavy")
        return self._executor

    async def run(self, client: str | None, fn: Callable[..., Any], *args: Any) -> Any:
        slot = self._slots.setdefault(client, [asyncio.Semaphore(self.per_client), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                return await asyncio.get_running_loop().run_in_executor(self._pool(), functools.partial(fn, *args))
        finally:
            slot[1] -= 1
            if not slot[1]:
                self._slots.pop(client, None)

    def bound(self, scope_or_request: Any) -> Callable[..., Any]:
        """``run`` for the client of an ASGI scope (or a Starlette request): ``await bound(fn, *args)``."""
        scope = getattr(scope_or_request, "scope", scope_or_request)
        client = (scope.get("client") or (None,))[0]
        return functools.partial(self.run, client)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
