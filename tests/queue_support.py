"""Real Redis and real ``sdengine worker`` processes for the tests of the celery task backend.

``redis_server`` (session fixture): a ``redis-server`` (the Debian package; ``.ci/run`` installs it) on a free
loopback port with its files in a temp folder, AOF on (``appendfsync always``; ``everysec`` on request), so a
test can restart it.
``queue_workers`` (session fixture): worker processes on that Redis, by role:

- ``double``: the engine is :func:`queue_double_factory` (a TEST DOUBLE, see tests.api_support.EngineDouble) for
  the tests that need a task to fail, stall or be cancelled on demand (Redis DB 1);
- ``tiny``: two workers running the real engine (ONNX Runtime) on the session's tiny models (Redis DB 2).

Workers run ``python -m cli worker`` exactly as users start it, one process group each (so a test can
SIGKILL the pool process alone, or the whole worker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core.errors import Cancelled
from tests.api_support import EngineDouble

ROOT = Path(__file__).resolve().parents[1]
ENV_GATES = "SDENGINE_TEST_GATES"


# ------------------------------------------------------------------------------------------------ test doubles
class QueueDouble(EngineDouble):
    """TEST DOUBLE (see EngineDouble) that also understands, in the prompt:
    ``GATE:token`` -- after step 1, block until the file ``$SDENGINE_TEST_GATES/token`` exists (or cancel);
    ``PAUSE`` -- sleep 2 s before the first step (a model load);
    ``BIG`` -- make 1024x1024 noise images from the seed (a PNG write that takes a while)."""

    def generate(self, request, *, progress=None, cancel=None):
        words = request.prompt.split()
        if "PAUSE" in words:
            time.sleep(2.0)
        gate = next((w.split(":", 1)[1] for w in words if w.startswith("GATE:")), None)
        if gate:
            self.started.set()
            progress(1, request.steps)
            path = Path(os.environ[ENV_GATES]) / gate
            while not path.exists():
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled at step 1")
                time.sleep(0.01)
        result = super().generate(request, progress=progress, cancel=cancel)
        if "BIG" in words:
            import numpy as np

            images = []
            for seed in result.seeds:
                rng = np.random.default_rng(seed)
                images.append(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
            result = type(result)(images=images, infotexts=result.infotexts, info=result.info, seeds=result.seeds,
                                  subseeds=result.subseeds, timings=result.timings)
        return result


def queue_double_factory(config=None):
    return QueueDouble(config)


# ------------------------------------------------------------------------------------------------------ Redis
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1:port with AOF in ``root``; ``restart()`` keeps its data (AOF)."""

    def __init__(self, root: Path, appendfsync: str = "always"):
        self.root = root
        self.appendfsync = appendfsync  # docs/DEPLOYMENT.md asks for everysec; a process kill loses nothing either way
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--protected-mode", "yes",
             "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        end = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self, db: int = 0):
        import redis

        return redis.Redis(port=self.port, db=db)


@pytest.fixture(scope="session")
def redis_server():
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs the Debian package redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    pytest.importorskip("celery", reason="the 'queue' extra (celery, redis) is not installed")
    root = Path(tempfile.mkdtemp(prefix="sdengine-redis-"))
    server = RedisServer(root)
    server.start()
    yield server
    server.kill()
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- workers
class WorkerProcess:
    """``sdengine worker`` in its own process group."""

    def __init__(self, url: str, results_dir: Path, log: Path, *args: str, env: dict | None = None):
        self.url = url
        self.results_dir = results_dir
        self.log = log
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.name = f"t{free_port()}"

    def start(self) -> WorkerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--queue", self.url, "--results-dir",
             str(self.results_dir), "--threads", "1", "--name", self.name, "--loglevel", "INFO", *self.args],
            cwd=ROOT, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, client, timeout: float = 60.0) -> None:
        """Until the worker announces itself in Redis (it consumes from then on)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(k.decode().startswith(self.name + "@") for k in client.hkeys("sdengine:workers")):
                return
            assert self.proc.poll() is None, f"the worker exited: {self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"the worker did not come up: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main and pool processes)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc:
            client = None
            try:
                import redis

                client = redis.Redis.from_url(self.url)
                for key in client.hkeys("sdengine:workers"):
                    if key.decode().startswith(self.name + "@"):
                        client.hdel("sdengine:workers", key)
            finally:
                if client is not None:
                    client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def pool_pid(record: dict) -> int:
    """The pool process running a task, from its record's ``worker`` (host:pid:nonce)."""
    return int(record["worker"].split(":")[1])


def record(client, task_id: str) -> dict:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"sdengine:task:{task_id}").items()}


def wait_until(predicate, timeout: float = 30.0, every: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


class QueueWorkers:
    """The session's worker groups (see the module docstring)."""

    def __init__(self, redis_server: RedisServer, root: Path, tiny_store: Path, cache: Path):
        self.redis = redis_server
        self.root = root
        self.gates = root / "gates"
        self.gates.mkdir()
        self.tiny_store = tiny_store
        self.cache = cache
        self.groups: dict[str, list[WorkerProcess]] = {}
        self.dbs = {"double": 1, "tiny": 2}

    def url(self, role: str) -> str:
        return self.redis.url(self.dbs[role])

    def results(self, role: str) -> Path:
        return self.root / f"results-{role}"

    def ensure(self, role: str, count: int = 1) -> list[WorkerProcess]:
        group = self.groups.setdefault(role, [])
        group[:] = [w for w in group if w.proc.poll() is None]
        while len(group) < count:
            args: tuple[str, ...] = ("--visibility-timeout", "30", "--restore-interval", "1")
            if role == "double":
                args += ("--engine-factory", "tests.queue_support:queue_double_factory", "--models-dir",
                         str(self.root / "no-models"))
            else:
                args += ("--models-dir", str(self.tiny_store), "--cache-dir", str(self.cache))
            worker = WorkerProcess(self.url(role), self.results(role), self.root / f"{role}-{len(group)}.log",
                                   *args, env={ENV_GATES: str(self.gates)}).start()
            group.append(worker)
        client = self.redis.client(self.dbs[role])
        for worker in group:
            worker.wait_ready(client)
        client.close()
        return group

    def close(self) -> None:
        for group in self.groups.values():
            for worker in group:
                worker.stop()


@pytest.fixture(scope="session")
def queue_workers(redis_server, tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    cache = tmp_path_factory.getbasetemp() / "api-engine-cache"  # the tiny_engine fixture's export cache
    cache.mkdir(exist_ok=True)
    workers = QueueWorkers(redis_server, root, tiny_store, cache)
    yield workers
    workers.close()


def dump(value) -> str:
    return json.dumps(value, indent=1)[:3000]
