"""The celery task backend under failure, on a real ``redis-server`` and real ``sdengine worker`` / ``sdengine
serve --queue`` processes: SIGKILL of a worker's pool process at three moments and of a whole worker, a task
whose workers keep dying, the API server killed and restarted, Redis killed and restarted with AOF, model
routing, and many tasks over HTTP through two workers, pixel-equal to the embedded backend. Redis restarts
mid-task and the answers during an outage: tests/test_queue_recovery.py.

Stalls use tests.queue_support.QueueDouble, a TEST DOUBLE of the engine (deterministic images from the seed);
the HTTP run uses the real engine on the tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from api_compat import ApiError, TaskService
from engine.request import GenerationRequest
from tests.api_support import png_pixels, png_seed, tiny_engine, wait_healthy  # noqa: F401 (fixture)
from tests.queue_support import (ROOT, QueueDouble, RedisServer, WorkerProcess, free_port, pool_pid,  # noqa: F401
                                 queue_workers, record, redis_server, wait_until)

DOUBLE = ("--engine-factory", "tests.queue_support:queue_double_factory")


@pytest.fixture
def cluster(redis_server, tmp_path):
    """A Redis DB of its own (flushed), a results folder, and a way to start double-engine workers on it."""
    db = 3
    client = redis_server.client(db)
    client.flushdb()
    workers: list[WorkerProcess] = []

    def start(*args, count=1, visibility=30):
        made = []
        for _ in range(count):
            w = WorkerProcess(redis_server.url(db), tmp_path / "results", tmp_path / f"w{len(workers)}.log",
                              *DOUBLE, "--models-dir", str(tmp_path / "no-models"), "--visibility-timeout",
                              str(visibility), "--restore-interval", "1", *args).start()
            workers.append(w)
            made.append(w)
        for w in made:
            w.wait_ready(client)
        return made

    def service(**kw):
        return TaskService(tmp_path / "no-models", results_dir=tmp_path / "results", check_models=False,
                            queue=redis_server.url(db), **kw)

    yield start, service, client, tmp_path / "results" / "images"
    for w in workers:
        w.kill()
    client.flushdb()
    client.close()


def expected_pixels(prompt, seed, steps=20):
    """What the double makes for this request (the images every delivery must reproduce)."""
    result = QueueDouble().generate(GenerationRequest(prompt=prompt, seed=seed, steps=steps, width=64, height=64))
    return result.images[0]


def files_of(images: Path, task_id: str) -> list[str]:
    return sorted(p.name for p in images.iterdir() if task_id in p.name)


@pytest.mark.parametrize("moment", ["before the first step", "mid-sampling", "during the PNG write"])
def test_sigkill_pool_process_then_redelivered_once(cluster, moment):
    """The pool process dies (SIGKILL, as the OOM killer does): the message goes back to the queue at once
    (reject_on_worker_lost), the new pool process runs the task again, and it succeeds exactly once with the
    same images; no partial or duplicate PNG."""
    start, service, client, images = cluster
    (worker,) = start()
    prompt = {"before the first step": "PAUSE", "mid-sampling": "SLOW", "during the PNG write": "BIG"}[moment]
    with service() as svc:
        task = svc.sd_txt2img({"prompt": prompt, "seed": 42, "steps": 60, "width": 64, "height": 64})["taskId"]
        if moment == "before the first step":
            rec = wait_until(lambda: (r := record(client, task)).get("status") == "running" and r)
            assert "progress" not in rec or '"step": 0' in rec["progress"]
        elif moment == "mid-sampling":
            rec = wait_until(lambda: '"step": 5,' in (r := record(client, task)).get("progress", "") and r)
        else:
            wait_until(lambda: list(images.glob(f".{task}-0.png.*.tmp")), every=0.002)
            rec = record(client, task)
        os.kill(pool_pid(rec), signal.SIGKILL)
        result = svc.wait(task, 60)
        assert result["status"] == "succeeded", result
        final = record(client, task)
        assert final["attempts"] == "2" and pool_pid(final) != pool_pid(rec), final
        assert files_of(images, task) == [f"{task}-0.png"], "one PNG, no temp file left"
        expected = expected_pixels(prompt, 42, 60)
        assert np.array_equal(png_pixels(result["images"][0]), expected)
        assert png_seed(result["images"][0]) == 42
        assert worker.proc.poll() is None, "the worker itself lives on"


@pytest.mark.slow
def test_sigkill_whole_worker_recovered_by_the_lease_rule_with_default_settings(cluster):
    """The whole worker dies (main and pool process: a lost host) with the DEFAULT settings (visibility timeout
    3600 s): its lease lapses, the other worker's reaper sees its heartbeat stand still and publishes the task
    again; meanwhile the API reads it as waiting (retry); the other worker finishes it within 60 s of the kill,
    once (attempts 2, one PNG, the same pixels)."""
    start, service, client, images = cluster
    workers = start(count=2, visibility=3600)
    with service() as svc:
        task = svc.sd_txt2img({"prompt": "SLOW", "seed": 9, "steps": 40, "width": 64, "height": 64})["taskId"]
        rec = wait_until(lambda: '"step": 3,' in (r := record(client, task)).get("progress", "") and r)
        victim = next(w for w in workers if os.getpgid(pool_pid(rec)) == w.proc.pid)
        killed = time.monotonic()
        victim.kill()
        waiting = wait_until(lambda: (r := svc.sd_get_result({"taskId": task}))["status"] == "waiting" and r, 40)
        assert waiting["retry"]["attempts"] == 1 and "delivered" in waiting["retry"]["reason"]
        result = svc.wait(task, 60)
        took = time.monotonic() - killed
        assert result["status"] == "succeeded", result
        assert took <= 60, f"recovered {took:.1f} s after the kill"
        final = record(client, task)
        assert final["attempts"] == "2" and os.getpgid(pool_pid(final)) != victim.proc.pid, final
        assert np.array_equal(png_pixels(result["images"][0]), expected_pixels("SLOW", 9, 40))
        assert files_of(images, task) == [f"{task}-0.png"]
        assert client.zcard("sdengine:running") == 0 and "message" not in final


def test_task_whose_workers_keep_dying_fails_with_a_reason(cluster):
    start, service, client, images = cluster
    start("--max-attempts", "2")
    with service() as svc:
        task = svc.sd_txt2img({"prompt": "SLOW", "seed": 1, "steps": 150})["taskId"]
        for attempt in ("1", "2"):
            rec = wait_until(lambda: (r := record(client, task)).get("attempts") == attempt
                             and '"step": 2,' in r.get("progress", "") and r)
            os.kill(pool_pid(rec), signal.SIGKILL)
        result = svc.wait(task, 60)
    assert result["status"] == "failed" and result["error"]["code"] == "worker_lost", result
    assert "stopped 2 times" in result["error"]["message"] and result["images"] == []
    assert files_of(images, task) == []


def test_results_ttl_removes_records_and_pngs(cluster):
    """Past the results TTL: Redis drops the record (the id then answers ``expired``), a worker removes the PNG."""
    start, service, client, images = cluster
    start()
    with service(max_age_s=1) as svc:
        first = svc.wait(svc.sd_txt2img({"prompt": "old", "seed": 1})["taskId"], 30)
        assert first["status"] == "succeeded" and Path(first["images"][0]).is_file()
        assert 0 < client.ttl(f"sdengine:task:{first['taskId']}") <= 1
        time.sleep(1.5)
        with pytest.raises(ApiError) as exc:
            svc.sd_get_result({"taskId": first["taskId"]})
        assert exc.value.code == "expired" and exc.value.http_status == 410
        second = svc.wait(svc.sd_txt2img({"prompt": "new", "seed": 2})["taskId"], 30)
        assert second["status"] == "succeeded"
        wait_until(lambda: not Path(first["images"][0]).exists(), timeout=10)
        assert files_of(images, second["taskId"]) == [f"{second['taskId']}-0.png"]


def _serve(url, port, results, models, log, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--queue", url,
                             "--results-dir", str(results), "--models-dir", str(models), *extra],
                            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_http(http, proc, log):
    wait_healthy(str(http.base_url).rstrip("/"), proc,
                 lambda: f"sdengine serve did not come up: {Path(log).read_text()[-3000:]}", 60, 0.1)


def poll_all(http, ids, timeout):
    """Each task's final result over HTTP, polled in submit order (the order they finish in, roughly)."""
    end = time.monotonic() + timeout
    done = {}
    for t in ids:
        while time.monotonic() < end:
            r = http.post("/scc/sd_get_result", json={"taskId": t}).json()
            if r["status"] in ("succeeded", "failed"):
                done[t] = r
                break
            time.sleep(0.05)
    return done


def test_api_server_sigkill_and_restart_loses_nothing(cluster, tmp_path):
    """`sdengine serve --queue` killed (SIGKILL) with tasks queued and running, started again: every task the
    first server accepted is served by the second, succeeded."""
    start, service, client, images = cluster
    port = free_port()
    results = tmp_path / "results"
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    server = _serve(f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/3", port, results,
                    tmp_path / "no-models", log)
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            _wait_http(http, server, log)
            ids = [http.post("/scc/sd_txt2img", json={"prompt": "SLOW", "seed": i, "steps": 4}).json()["taskId"]
                   for i in range(12)]
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
            start()  # the workers come (or go on) meanwhile
            server = _serve(f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/3", port,
                            results, tmp_path / "no-models", log)
            _wait_http(http, server, log)
            done = poll_all(http, ids, 90)
            assert [done.get(t, {}).get("status") for t in ids] == ["succeeded"] * len(ids)
            png = http.get(done[ids[3]]["images"][0])
            assert png.status_code == 200 and png_seed(png.content) == 3
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def test_redis_restart_with_aof_keeps_queued_tasks(tmp_path):
    """Redis killed (SIGKILL) and restarted with appendonly yes: the queued tasks and their records survive, a
    worker started afterwards runs them all, and the API's connections recover by themselves."""
    server = RedisServer(tmp_path)
    server.start()
    worker = None
    try:
        with TaskService(tmp_path / "no-models", results_dir=tmp_path / "results", check_models=False,
                          queue=server.url(0)) as svc:
            ids = [svc.sd_txt2img({"prompt": "queued", "seed": i, "steps": 2})["taskId"] for i in range(10)]
            server.restart()
            after = svc.sd_get_result({"taskId": ids[0]})
            assert after["status"] == "waiting" and after["queue_position"] == 0
            ids.append(svc.sd_txt2img({"prompt": "after the restart", "seed": 10, "steps": 2})["taskId"])
            worker = WorkerProcess(server.url(0), tmp_path / "results", tmp_path / "w.log", *DOUBLE,
                                   "--models-dir", str(tmp_path / "no-models")).start()
            results = [svc.wait(t, 60) for t in ids]
            assert [r["status"] for r in results] == ["succeeded"] * 11
            assert [png_seed(r["images"][0]) for r in results] == list(range(11))
            # a second restart under a running worker: it reconnects and takes the new tasks
            server.restart()
            more = [svc.sd_txt2img({"prompt": "later", "seed": 20 + i, "steps": 2})["taskId"] for i in range(3)]
            assert [png_seed(svc.wait(t, 90)["images"][0]) for t in more] == [20, 21, 22]
    finally:
        if worker is not None:
            worker.kill()
        server.kill()


def test_routing_by_model(redis_server, tiny_store, tmp_path):
    """Workers restricted with --models take only their checkpoints' tasks; a task names its checkpoint, or
    the API's default; a checkpoint no worker serves waits (it is never run by the wrong worker)."""
    db = 4
    client = redis_server.client(db)
    client.flushdb()
    args = ("--models-dir", str(tiny_store), *DOUBLE)
    sd1 = WorkerProcess(redis_server.url(db), tmp_path / "r", tmp_path / "a.log", *args, "--models", "tiny-sd1").start()
    sd2 = WorkerProcess(redis_server.url(db), tmp_path / "r", tmp_path / "b.log", *args,
                        "--models", "tiny-sd2v,tiny-sdxl").start()
    try:
        for w in (sd1, sd2):
            w.wait_ready(client)
        with TaskService(tiny_store, results_dir=tmp_path / "r", queue=redis_server.url(db),
                          default_model="tiny-sd2v") as svc:
            named = {m: svc.sd_txt2img({"stable_diffusion_model": m, "seed": 1})["taskId"]
                     for m in ("tiny-sd1", "tiny-sdxl", "tiny-sd2v.safetensors")}
            default = svc.sd_txt2img({"seed": 2})["taskId"]
            alone = svc.sd_txt2img({"stable_diffusion_model": "tiny-sd1-diffusers", "seed": 3})["taskId"]
            for t in [*named.values(), default]:
                assert svc.wait(t, 60)["status"] == "succeeded"
            ran_on = {m: pool_pid(record(client, t)) for m, t in named.items()}
            ran_on["default"] = pool_pid(record(client, default))
            group = {m: os.getpgid(pid) for m, pid in ran_on.items()}
            assert group["tiny-sd1"] == sd1.proc.pid, group
            assert group["tiny-sdxl"] == group["tiny-sd2v.safetensors"] == group["default"] == sd2.proc.pid
            assert record(client, default)["queue"] == "sdengine.model.tiny-sd2v.safetensors"
            time.sleep(0.5)
            waiting = svc.sd_get_result({"taskId": alone})
            assert waiting["status"] == "waiting" and waiting["queue_position"] == 0
            health = svc.health()["devices"]
            assert sorted(sorted(d["models"]) for d in health.values()) == [
                ["tiny-sd1.safetensors"], ["tiny-sd2v.safetensors", "tiny-sdxl.safetensors"]]
            assert svc.cancel(alone)["error"]["code"] == "cancelled"
    finally:
        sd1.kill()
        sd2.kill()
        client.flushdb()
        client.close()


N_HTTP = 200


@pytest.mark.slow
def test_many_tasks_over_http_through_two_workers_pixel_equal_to_embedded(queue_workers, tiny_engine, tmp_path):
    """N_HTTP tasks submitted over HTTP (`sdengine serve --queue`, 8 client threads) run on two real workers
    (tiny-sd1, ONNX Runtime, 1 Euler step, 64x64): every one succeeds once, both workers take a share, and
    each PNG equals, pixel for pixel, the embedded backend's for the same payload."""
    workers = queue_workers.ensure("tiny", 2)
    port = free_port()
    log = tmp_path / "serve.log"
    server = _serve(queue_workers.url("tiny"), port, queue_workers.results("tiny"), tiny_engine["models_dir"], log,
                    "--backend", "onnxruntime", "--max-queue", "1000")
    payloads = [{"prompt": f"task {i}", "seed": 1000 * i, "steps": 1, "width": 64, "height": 64,
                 "sampler_name": "Euler", "cfg_scale": 1, "stable_diffusion_model": "tiny-sd1"}
                for i in range(N_HTTP)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          limits=httpx.Limits(max_connections=8)) as http:
            _wait_http(http, server, log)
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda p: http.post("/scc/sd_txt2img", json=p).json()["taskId"], payloads))
            assert len(set(ids)) == N_HTTP
            done = poll_all(http, ids, 600)
            assert [i for i, t in enumerate(ids) if done.get(t, {}).get("status") != "succeeded"] == []
            pngs = {t: http.get(done[t]["images"][0]).content for t in ids}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    client = queue_workers.redis.client(queue_workers.dbs["tiny"])
    records = [record(client, t) for t in ids]
    client.close()
    assert {r["attempts"] for r in records} == {"1"}, "each task ran once"
    groups = {os.getpgid(pool_pid(r)) for r in records}
    assert groups == {w.proc.pid for w in workers}, "both workers took tasks"
    with TaskService(results_dir=tmp_path / "embedded", max_queue=N_HTTP, **tiny_engine) as svc:
        local = [svc.sd_txt2img(p)["taskId"] for p in payloads]
        embedded = [svc.wait(t, 600) for t in local]
    for i, (t, e) in enumerate(zip(ids, embedded)):
        assert e["status"] == "succeeded"
        assert np.array_equal(png_pixels(pngs[t]), png_pixels(e["images"][0])), f"task {i}: other pixels"
        assert done[t]["info"]["all_seeds"] == e["info"]["all_seeds"] == [1000 * i]
    assert not np.array_equal(png_pixels(pngs[ids[0]]), png_pixels(pngs[ids[1]]))


def test_worker_refuses_unknown_model(redis_server, tiny_store, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cli", "worker", "--queue", redis_server.url(5),
                           "--results-dir", str(tmp_path), "--models-dir", str(tiny_store), "--models", "nope"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--models" in proc.stderr and "nope" in proc.stderr, proc.stderr[-2000:]


def test_unreachable_redis_is_503(tmp_path):
    with TaskService(tmp_path / "m", results_dir=tmp_path / "r", check_models=False,
                      queue=f"redis://127.0.0.1:{free_port()}/0") as svc:
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({"prompt": "x"})
        assert exc.value.code == "backend_unavailable" and exc.value.http_status == 503
        assert svc.health()["status"] == "queue_unavailable"


# ------------------------------------------------------------------------------ run-time limit and extras
def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB picture (a small noise image enlarged: PNGs stay small)."""
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def _png_data(image: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_max_task_seconds_on_the_queue(cluster, tmp_path):
    """``sdengine worker --max-task-seconds`` stops a task that runs longer -- a generation (the double's SLOW
    steps) and an extras batch (a model upscaler over many small tiles) -- within a step or tile: it fails
    ``timed_out`` with the documented message (docs/API.md "Run-time limit"), soon after the limit (5 s of
    slack for a loaded machine), and leaves no image (the batch's first one was written before the limit); the
    server's own limit travels in the message and the smaller one applies; a short task under the limit
    succeeds."""
    from tests import upscaler_support as us

    us.write_esrgan_old(tmp_path / "no-models" / "ESRGAN" / "4x-Tiny.pth")
    start, service, client, images = cluster
    start("--max-task-seconds", "2.5")
    slow = {"prompt": "SLOW", "seed": 3, "steps": 150, "width": 64, "height": 64}  # 0.05 s a step: 7.5 s
    # a small first image (done and written well within the limit: it must not stay behind), then big ones
    sizes = [32] + [256] * 15
    batch = {"imageList": [{"data": _png_data(_picture(n, n, i)), "name": f"{i}.png"} for i, n in enumerate(sizes)],
             "upscaling_resize": 4, "upscaler_1": "4x-Tiny", "ESRGAN_tile": 8, "ESRGAN_tile_overlap": 2}
    for server_limit, applies in ((None, 2.5), (1.5, 1.5)):
        with service(max_task_seconds=server_limit) as svc:
            assert svc.wait(svc.sd_txt2img({"prompt": "quick", "steps": 3})["taskId"], 30)["status"] == "succeeded"
            for submit in (lambda: svc.sd_txt2img(slow), lambda: svc.extras(batch, batch=True)):
                task = submit()["taskId"]
                wait_until(lambda: record(client, task).get("status") == "running", 30)
                started = time.monotonic()
                result = svc.wait(task, 120)
                took = time.monotonic() - started
                assert result["status"] == "failed" and result["error"]["code"] == "timed_out", result
                message = result["error"]["message"]
                assert f"limit of {applies:g} s per task" in message and "--max-task-seconds" in message, message
                assert took < applies + 5.0, f"stopped {took - applies:.1f} s after the limit"
                assert result["images"] == [] and files_of(images, task) == []


def test_extras_on_the_queue_as_embedded(cluster, tmp_path):
    """``/sdapi/v1/extra-single-image`` and ``extra-batch-images`` bodies as tasks on the Celery backend: a worker
    runs them; the PNGs are pixel-equal to the embedded backend's and to engine.extras.postprocess run directly
    with the same tiling (``ESRGAN_tile`` travels in the payload), the input's text chunks kept."""
    from engine.extras import Extras, postprocess
    from engine.upscalers import Upscaling
    from tests import upscaler_support as us

    models = tmp_path / "no-models"
    us.write_esrgan_old(models / "ESRGAN" / "4x-Tiny.pth")
    start, service, client, images = cluster
    start()
    picture = _picture(40, 24, 1)
    single = {"image": _png_data(picture), "upscaling_resize": 2, "upscaler_1": "4x-Tiny", "upscaler_2": "Lanczos",
              "extras_upscaler_2_visibility": 0.3, "ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4}
    batch = {"imageList": [{"data": _png_data(picture), "name": "a.png"},
                           {"data": _png_data(picture[:, ::-1].copy()), "name": "b.png"}],
             "upscaling_resize": 2, "upscaler_1": "Nearest"}
    with service() as svc:
        queued = [svc.wait(svc.extras(single)["taskId"], 60), svc.wait(svc.extras(batch, batch=True)["taskId"], 60)]
    with TaskService(models, results_dir=tmp_path / "embedded", check_models=False) as svc:
        embedded = [svc.wait(svc.extras(single)["taskId"], 60), svc.wait(svc.extras(batch, batch=True)["taskId"], 60)]
    for q, e in zip(queued, embedded):
        assert q["status"] == "succeeded" and e["status"] == "succeeded", (q, e)
        assert len(q["images"]) == len(e["images"])
        for a, b in zip(q["images"], e["images"]):
            assert np.array_equal(png_pixels(a), png_pixels(b))
        assert q["info"]["infotexts"] == e["info"]["infotexts"]
    want, _ = postprocess(picture, Extras(upscaling_resize=2, upscaler_1="4x-Tiny", upscaler_2="Lanczos",
                                          extras_upscaler_2_visibility=0.3),
                          Upscaling(models_dir=models, tile=16, overlap=4))
    got = png_pixels(queued[0]["images"][0])
    assert got.shape == (48, 80, 3) and np.array_equal(got, want)
    assert np.array_equal(png_pixels(queued[1]["images"][1]), np.repeat(np.repeat(picture[:, ::-1], 2, 0), 2, 1))
