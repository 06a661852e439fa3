"""The CLI's way to a running ``sdengine serve`` on the same home: its results folder is locked by the server's
task store, so ``txt2img``/``img2img`` send their task to that server (found by the ``server.json`` it writes
there) over its ``/scc`` API instead, with the standard library's HTTP client (no extra needed)."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from core.atomic import atomic_file
from core.process import pid_alive, process_started

from api_compat.errors import ApiError
from api_compat.tasks.store import SERVER_RECORD, read_server_record

log = logging.getLogger(__name__)

API_KEY_ENV = "SDENGINE_API_KEY"  # what `sdengine serve --api-key` reads too


class RemoteService:
    """The part of :class:`api_compat.service.TaskService` the CLI uses, over HTTP to the server at ``url``;
    result images are downloaded into ``results_dir/cli``."""

    def __init__(self, url: str, pid: int, results_dir: Path, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.pid = pid
        self.results_dir = Path(results_dir)
        self.api_key = api_key

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                raw = answer.read()
                return raw if path.endswith(".png") else json.loads(raw)
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "bad_request", "message": f"HTTP {exc.code}"}
            if exc.code == 401:
                raise ApiError("unauthorized", f"the running server at {self.url} needs its API key: set "
                               f"${API_KEY_ENV} (or stop it and run here)") from None
            message = str(error.get("message", ""))
            field = error.get("field")
            if field and message.startswith(f"{field}: "):
                message = message[len(field) + 2:]
            if error.get("allowed") and message.endswith(f" (allowed: {error['allowed']})"):
                message = message[: -len(f" (allowed: {error['allowed']})")]
            raise ApiError(error.get("code") or "bad_request", message, field=field,
                           allowed=error.get("allowed")) from None

    def sd_txt2img(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/scc/sd_txt2img", payload)

    def sd_img2img(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/scc/sd_img2img", payload)

    def sd_get_result(self, query: dict[str, Any]) -> dict[str, Any]:
        result = self._call("POST", "/scc/sd_get_result", query)
        if result.get("status") == "succeeded":
            result["images"] = [str(self._download(url, result["taskId"], i))
                                for i, url in enumerate(result.get("images") or [])]
        return result

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", "/scc/sd_cancel", {"taskId": task_id})

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.sd_get_result({"taskId": task_id})
            if result["status"] in ("succeeded", "failed"):
                return result
            if end is not None and time.monotonic() > end:
                raise TimeoutError(task_id)
            time.sleep(0.1)

    def _download(self, url: str, task_id: str, index: int) -> Path:
        path = self.results_dir / "cli" / f"{task_id}-{index}.png"
        if not path.exists():
            data = self._call("GET", url[len(self.url):] if url.startswith(self.url) else
                              f"/scc/images/{task_id}/{index}.png")
            with atomic_file(path) as f:
                f.write(data)
        return path


def running_server(results_dir: Path) -> RemoteService | None:
    """The ``sdengine serve`` that holds ``results_dir`` (its ``server.json``, its PID alive and the process that
    wrote it, ``/health`` answering), or None. A stale record -- its process is gone (killed, the machine
    restarted) or its PID is now another process's -- is removed, with a log line; a record whose server does
    not answer (still starting) is ignored, with a log line."""
    path = Path(results_dir) / SERVER_RECORD
    record = read_server_record(results_dir)
    if record is None:
        if path.is_file():
            _discard(path, None, "not a server record")
        return None
    pid, url = record.get("pid"), record.get("url")
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(url, str):
        _discard(path, record, "not a server record")
        return None
    if not pid_alive(pid):
        _discard(path, record, f"its server, process {pid}, is not running")
        return None
    started = process_started(pid)
    try:
        written = path.stat().st_mtime
    except OSError:
        return None
    if started is not None and started > written + 1.0:  # 1 s: /proc's clock-tick and boot-time rounding
        _discard(path, record, f"process {pid} started after the record was written: another process has that PID")
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as answer:
            if answer.status != 200:
                raise OSError(f"HTTP {answer.status}")
    except (OSError, ValueError) as exc:
        log.info("%s: ignored: the server at %s (process %d) does not answer /health (%s)", path, url, pid, exc)
        return None
    return RemoteService(url, pid, results_dir, os.environ.get(API_KEY_ENV) or None)


def _discard(path: Path, record: dict | None, why: str) -> None:
    """Remove the stale server record ``path`` (read as ``record``) unless a new server replaced it meanwhile."""
    if read_server_record(path.parent) != record:
        return
    try:
        path.unlink()
    except OSError as exc:
        log.warning("%s: stale server record (%s), ignored; it could not be removed: %s", path, why, exc)
        return
    log.warning("%s: stale server record removed (%s)", path, why)
