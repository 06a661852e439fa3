"""Recovery of the celery task backend (issues 25 and 31), on a real ``redis-server`` of each test's own and real
``sdengine worker`` processes: Redis killed and restarted mid-task (several rounds), a whole worker lost with a
Redis restart right after, a lost worker restarted under the same name, and the 503 answers while Redis is
down. The lease settings are short here (``SHORT``) to keep the tests quick; the recovery of a lost worker with
the DEFAULT settings is tested in tests/test_queue_celery.py, and the defaults' bound below.

Stalls use tests.queue_support.QueueDouble, a TEST DOUBLE of the engine (deterministic images from the seed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from api_compat import TaskService
from tests.api_support import png_pixels
from tests.queue_support import RedisServer, WorkerProcess, free_port, pool_pid, record, wait_until
from tests.test_queue_celery import DOUBLE, _serve, _wait_http, expected_pixels, files_of


# short lease settings, so that the Redis-restart tests stay quick (the defaults are tested above)
SHORT = ("--lease-ttl", "3", "--worker-timeout", "4", "--reap-interval", "0.5", "--heartbeat-interval", "0.5")


def _running_at(rec: dict) -> int:
    """The step a running task's record shows (-1: not running)."""
    if rec.get("status") != "running":
        return -1
    return int(json.loads(rec.get("progress") or "{}").get("step") or 0)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own (AOF on, fsync every second), which it may kill and restart, and
    double-engine workers on it."""
    pytest.importorskip("celery", reason="the 'queue' extra (celery, redis) is not installed")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendfsync="everysec")  # as docs/DEPLOYMENT.md asks
    server.start()
    workers: list[WorkerProcess] = []

    def start(count: int, *args: str) -> list[WorkerProcess]:
        made = [WorkerProcess(server.url(0), tmp_path / "results", tmp_path / f"w{len(workers) + i}.log", *DOUBLE,
                              "--models-dir", str(tmp_path / "no-models"), *SHORT, *args).start()
                for i in range(count)]
        workers.extend(made)
        client = server.client(0)
        for w in made:
            w.wait_ready(client)
        client.close()
        return made

    yield server, start, tmp_path / "results" / "images"
    for w in workers:
        w.kill()
    server.kill()


def test_redis_restart_mid_task_loses_nothing(own_redis, tmp_path):
    """Redis killed (SIGKILL) while two tasks run and one waits, restarted 3 s later, two rounds: the running
    tasks finish meanwhile, keep their results and write them when Redis is back; every task ends succeeded
    once (one run, one PNG, the pixels of its seed: no live worker is taken for lost after the restart), and no
    record is left running."""
    server, start, images = own_redis
    workers = start(2)
    client = server.client(0)
    with TaskService(tmp_path / "no-models", results_dir=tmp_path / "results", check_models=False,
                     queue=server.url(0)) as svc:
        for round_ in range(2):
            seeds = [100 * round_ + i for i in range(3)]
            ids = [svc.sd_txt2img({"prompt": "SLOW", "seed": s, "steps": 30, "width": 64, "height": 64})["taskId"]
                   for s in seeds]
            wait_until(lambda: sum(_running_at(record(client, t)) >= 3 for t in ids) == 2, every=0.005)
            server.kill()
            time.sleep(3.0)  # the two running tasks (1.5 s each) end meanwhile; their final writes wait
            server.start()
            client = server.client(0)
            results = [svc.wait(t, 90) for t in ids]
            assert [r["status"] for r in results] == ["succeeded"] * 3, results
            for t, s, r in zip(ids, seeds, results):
                assert record(client, t)["attempts"] == "1", "a live worker was taken for lost after the restart"
                assert files_of(images, t) == [f"{t}-0.png"]
                assert np.array_equal(png_pixels(r["images"][0]), expected_pixels("SLOW", s, 30))
        assert client.zcard("sdengine:running") == 0
    logs = "".join(w.log.read_text() for w in workers)
    assert "retrying the final write" in logs, "the scenario did not happen: no final write waited for Redis"
    assert "unexpected error" not in logs and "internal_error" not in logs
    client.close()


def test_sigkill_whole_worker_and_redis_restart_recovered_once(own_redis, tmp_path):
    """A whole worker killed mid-task and Redis killed and restarted right after: the surviving worker's reaper
    (which forgets what it saw while Redis was away) publishes the task again, the surviving worker finishes it
    within 60 s of the kill, once."""
    server, start, images = own_redis
    workers = start(2)
    client = server.client(0)
    with TaskService(tmp_path / "no-models", results_dir=tmp_path / "results", check_models=False,
                     queue=server.url(0)) as svc:
        task = svc.sd_txt2img({"prompt": "SLOW", "seed": 5, "steps": 40, "width": 64, "height": 64})["taskId"]
        rec = wait_until(lambda: '"step": 3,' in (r := record(client, task)).get("progress", "") and r)
        victim = next(w for w in workers if os.getpgid(pool_pid(rec)) == w.proc.pid)
        killed = time.monotonic()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        server.kill()
        time.sleep(1.0)
        server.start()
        client = server.client(0)
        result = svc.wait(task, 60)
        took = time.monotonic() - killed
        assert result["status"] == "succeeded" and took <= 60, (result, took)
        final = record(client, task)
        assert final["attempts"] == "2" and os.getpgid(pool_pid(final)) != victim.proc.pid, final
        assert files_of(images, task) == [f"{task}-0.png"]
        assert np.array_equal(png_pixels(result["images"][0]), expected_pixels("SLOW", 5, 40))
    client.close()


def test_lost_worker_restarted_under_the_same_name_takes_its_task_back(own_redis, tmp_path):
    """The only worker killed mid-task and started again under the same name (as a container restarts: same
    hostname, same pid): the new instance is not taken for the dead one, its reaper publishes the task again
    and it runs it, once."""
    server, start, images = own_redis
    client = server.client(0)

    def worker(log):
        w = WorkerProcess(server.url(0), tmp_path / "results", tmp_path / log, *DOUBLE, "--models-dir",
                          str(tmp_path / "no-models"), *SHORT)
        w.name = "fixed"
        w.start().wait_ready(client)
        return w

    first = worker("first.log")
    second = None
    try:
        with TaskService(tmp_path / "no-models", results_dir=tmp_path / "results", check_models=False,
                         queue=server.url(0)) as svc:
            task = svc.sd_txt2img({"prompt": "SLOW", "seed": 8, "steps": 40, "width": 64, "height": 64})["taskId"]
            wait_until(lambda: _running_at(record(client, task)) >= 3)
            os.killpg(first.proc.pid, signal.SIGKILL)  # its heartbeat entry stays, as after a crash
            first.proc.wait(10)
            second = worker("second.log")
            result = svc.wait(task, 60)
            assert result["status"] == "succeeded", result
            final = record(client, task)
            assert final["attempts"] == "2" and os.getpgid(pool_pid(final)) == second.proc.pid, final
            assert files_of(images, task) == [f"{task}-0.png"]
    finally:
        if second is not None:
            second.kill()
        client.close()


def test_redis_outage_answers_503_and_a_webui_call_waits_it_out(own_redis, tmp_path):
    """While Redis is down: sd_get_result, sd_cancel, a result image and the webui's progress and interrupt
    answer 503 backend_unavailable (not 500); /health says queue_unavailable. A synchronous webui txt2img
    waiting meanwhile waits the outage out and answers 200 once Redis and a worker are back."""
    server, start, images = own_redis
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(server.url(0), port, tmp_path / "results", tmp_path / "no-models", log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            _wait_http(http, proc, log)
            task = http.post("/scc/sd_txt2img", json={"prompt": "x", "seed": 3}).json()["taskId"]
            with ThreadPoolExecutor(1) as pool:
                webui = pool.submit(http.post, "/sdapi/v1/txt2img", json={"prompt": "y", "seed": 4, "steps": 2,
                                                                          "width": 64, "height": 64})
                wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 1)
                server.kill()
                answers = [http.post("/scc/sd_get_result", json={"taskId": task}),
                           http.post("/scc/sd_cancel", json={"taskId": task}),
                           http.get(f"/scc/images/{task}/0.png"),
                           http.get("/sdapi/v1/progress"),
                           http.post("/sdapi/v1/interrupt")]
                for answer in answers:
                    assert answer.status_code == 503, (answer.request.url, answer.text)
                    error = answer.json()["error"]
                    assert error["code"] == "backend_unavailable" and "Redis" in error["message"], error
                assert http.get("/health").json()["status"] == "queue_unavailable"
                server.start()
                start(1)
                answer = webui.result(60)
            assert answer.status_code == 200 and len(answer.json()["images"]) == 1, answer.text[:500]
            assert http.post("/scc/sd_get_result", json={"taskId": task}).json()["status"] in ("waiting", "running",
                                                                                               "succeeded")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_queue_options_defaults_meet_the_recovery_bound():
    """The default lease settings publish a lost worker's task again within 24 s (the bound the whole-worker
    test above checks end to end, with a 60 s budget for the rerun); settings that would take a live worker
    for lost are refused, naming the field."""
    from api_compat.tasks.celery_app import QueueOptions

    options = QueueOptions()
    assert (options.lease_ttl, options.worker_timeout, options.reap_interval, options.visibility_timeout) == (
        15.0, 20.0, 2.0, 3600.0)
    assert options.recovery_bound == 24.0
    with pytest.raises(ValueError, match="worker_timeout"):
        QueueOptions(worker_timeout=3, heartbeat_interval=2)
    with pytest.raises(ValueError, match="lease_ttl"):
        QueueOptions(lease_ttl=float("nan"))
