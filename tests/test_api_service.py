"""TaskService task mechanics: states, progress, cancellation, failure isolation, queue bounds, PNG output,
retention, and 200 concurrent submits with none lost.

The end-to-end tests run the real engine on the tiny models (``tiny_engine``). Failure, slowness and
cancellation are injected with tests.api_support.EngineDouble, a TEST DOUBLE of the engine (a real engine
cannot be made to fail or stall on demand)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from api_compat import ApiError, TaskService
from api_compat.tasks.store import Status
from engine.request import GenerationRequest
from engine.config import EngineConfig
from tests.api_support import EngineDouble, png_infotext, png_pixels, png_seed, tiny_engine  # noqa: F401 (fixture)

HEX32 = "0123456789abcdef" * 2


class Gate(EngineDouble):
    """TEST DOUBLE: blocks in generate until released, to hold a task in 'running'."""

    def __init__(self, config=None):
        super().__init__(config)
        self.release = threading.Event()
        self.prompts = []

    def generate(self, request, *, progress=None, cancel=None):
        self.prompts.append(request.prompt)
        self.started.set()
        progress(1, request.steps)
        while not self.release.wait(0.01):
            if cancel.is_set():
                from core.errors import Cancelled

                raise Cancelled("cancelled at step 1")
        return super().generate(request, progress=progress, cancel=cancel)


def make(tmp_path, factory, **kw):
    kw.setdefault("check_models", False)
    return TaskService(tmp_path / "models", results_dir=tmp_path / "results", engine_factory=factory, **kw)


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_succeeded_result_and_png_infotext(tmp_path, tiny_engine):
    """Real engine (tiny-sd1, ONNX Runtime): 2 x 2 images, each PNG with its own seed in the webui infotext."""
    with TaskService(results_dir=tmp_path / "results", **tiny_engine) as svc:
        task = svc.sd_txt2img({"prompt": "a red cube", "negtive_prompt": "blurry", "seed": 77, "batch_size": 2,
                               "n_iter": 2, "steps": 3, "width": 64, "height": 64})
        result = svc.wait(task["taskId"], timeout=120)
    assert result["status"] == "succeeded", result.get("error")
    assert set(result) >= {"taskId", "status", "images", "parameters", "info"} and "error" not in result
    assert result["parameters"]["prompt"] == "a red cube" and result["parameters"]["negative_prompt"] == "blurry"
    assert len(result["images"]) == 4
    assert [png_seed(p) for p in result["images"]] == [77, 78, 79, 80]
    assert result["info"]["all_seeds"] == [77, 78, 79, 80]
    assert len(result["info"]["infotexts"]) == 4
    with Image.open(result["images"][0]) as img:
        text = img.text["parameters"]
        assert img.format == "PNG" and img.mode == "RGB"
    assert text.startswith("a red cube\nNegative prompt: blurry\nSteps: 3, ")
    assert "Seed: 77, Size: 64x64, Model hash: " in text and "Model: tiny-sd1" in text
    assert result["info"]["sd_model_name"] == "tiny-sd1" and result["info"]["backend"] == "onnxruntime"
    first, second = png_pixels(result["images"][0]).astype(int), png_pixels(result["images"][1]).astype(int)
    assert first.shape == (64, 64, 3) and np.abs(first - second).mean() > 1, "seeds 77 and 78 give other images"
    assert not list((tmp_path / "results" / "images").glob("*.tmp")), "no temp files left behind"


def test_states_and_progress(tmp_path):
    gate = Gate()
    with make(tmp_path, lambda c: gate) as svc:
        first = svc.sd_txt2img({"prompt": "a", "steps": 10})["taskId"]
        second = svc.sd_txt2img({"prompt": "b"})["taskId"]
        assert gate.started.wait(5)
        assert wait_for(lambda: svc.sd_get_result({"taskId": first})["status"] == "running")
        running = svc.sd_get_result({"taskId": first})
        assert running["progress"]["step"] == 1 and running["progress"]["steps"] == 10
        assert running["progress"]["fraction"] == pytest.approx(0.1)
        assert running["images"] == [] and "error" not in running
        waiting = svc.sd_get_result({"taskId": second})
        assert waiting["status"] == "waiting" and waiting["queue_position"] == 0 and "progress" not in waiting
        assert svc.store.get(first).status is Status.RUNNING and svc.store.get(second).status is Status.WAITING
        gate.release.set()
        assert svc.wait(first, 10)["status"] == "succeeded"
        assert svc.wait(second, 10)["status"] == "succeeded"


def test_progress_reports_eta(tmp_path):
    seen = []

    class Recorder(EngineDouble):
        def generate(self, request, *, progress=None, cancel=None):
            def spy(step, steps):
                progress(step, steps)
                seen.append(dict(svc.sd_get_result({"taskId": holder[0]})["progress"]))
            time.sleep(0.05)
            return super().generate(request, progress=spy, cancel=cancel)

    holder = []
    with make(tmp_path, Recorder) as svc:
        holder.append(svc.sd_txt2img({"prompt": "SLOW", "steps": 4})["taskId"])
        assert svc.wait(holder[0], 10)["status"] == "succeeded"
    assert [p["step"] for p in seen] == [1, 2, 3, 4]
    assert seen[-1]["fraction"] == 1.0 and seen[-1]["eta_seconds"] == 0
    assert seen[0]["eta_seconds"] > 0


def test_cancel_waiting_is_immediate(tmp_path):
    gate = Gate()
    with make(tmp_path, lambda c: gate) as svc:
        svc.sd_txt2img({"prompt": "holds the worker"})
        assert gate.started.wait(5)
        waiting = svc.sd_txt2img({"prompt": "never runs"})["taskId"]
        result = svc.cancel(waiting)
        assert result["status"] == "failed" and result["error"]["code"] == "cancelled"
        assert svc.wait(waiting, 0.1)["error"]["code"] == "cancelled"
        gate.release.set()
    assert "never runs" not in gate.prompts


def test_cancel_running(tmp_path):
    double = EngineDouble(step_delay=0.02)
    with make(tmp_path, lambda c: double) as svc:
        task = svc.sd_txt2img({"prompt": "SLOW", "steps": 150})["taskId"]
        assert double.started.wait(5)
        assert svc.cancel(task)["status"] in ("running", "failed")
        result = svc.wait(task, 10)
        assert result["status"] == "failed" and result["error"]["code"] == "cancelled"
        assert "step" in result["error"]["message"]
        # the worker goes on
        assert svc.wait(svc.sd_txt2img({"prompt": "next"})["taskId"], 10)["status"] == "succeeded"


def test_max_task_seconds_stops_a_task_within_a_step(tmp_path, tiny_engine):
    """``TaskService(max_task_seconds=...)`` (``serve``/``worker --max-task-seconds``) on the real engine: a task
    that would run for minutes (tiny-sd1 64x64, 150 steps x n_iter 100) fails ``timed_out`` soon after the limit
    (a step takes milliseconds; 5 s of slack for a loaded machine), with the images of the iterations it had
    finished removed; a short task under the same limit succeeds."""
    from api_compat.tasks.backend import image_file
    from tests.api_support import shared_engine

    # the session's engine of this configuration, warmed up outside the limit (a runtime's first session build
    # of each component counts in a task's time; loading and exporting do not)
    options = {k: v for k, v in tiny_engine.items() if k != "engine_factory"}
    shared_engine(EngineConfig(**options)).generate(GenerationRequest(steps=1, width=64, height=64))
    limit = 4.0
    with TaskService(results_dir=tmp_path / "r", max_task_seconds=limit, memory_budget=None, **tiny_engine) as svc:
        short = svc.wait(svc.sd_txt2img({"steps": 2, "width": 64, "height": 64})["taskId"], 120)
        assert short["status"] == "succeeded", short.get("error")
        task = svc.sd_txt2img({"steps": 150, "n_iter": 100, "width": 64, "height": 64, "sampler_name": "Euler"})
        assert wait_for(lambda: svc.sd_get_result(task)["status"] == "running", 30)
        started = time.monotonic()
        result = svc.wait(task["taskId"], 120)
        took = time.monotonic() - started
    assert result["status"] == "failed" and result["error"]["code"] == "timed_out", result
    assert f"{limit:g} s" in result["error"]["message"] and "--max-task-seconds" in result["error"]["message"]
    assert took < limit + 5.0, f"stopped {took - limit:.1f} s after the limit"
    assert result["images"] == [] and not image_file(tmp_path / "r" / "images", task["taskId"], 0).exists()
    with pytest.raises(ValueError, match="max_task_seconds"):
        TaskService(results_dir=tmp_path / "r2", max_task_seconds=0, **tiny_engine)


def test_failure_isolation(tmp_path):
    with make(tmp_path, EngineDouble) as svc:
        ids = [svc.sd_txt2img({"prompt": p, "seed": i})["taskId"]
               for i, p in enumerate(["ok", "FAIL", "INVALID", "ok", "FAIL", "ok"])]
        results = [svc.wait(t, 10) for t in ids]
        assert svc.health()["devices"]["cpu"]["alive"]
    assert [r["status"] for r in results] == ["succeeded", "failed", "failed", "succeeded", "failed", "succeeded"]
    assert results[1]["error"] == {"code": "internal_error", "message": "RuntimeError: injected failure"}
    assert results[2]["error"]["code"] == "invalid_request" and "prompt" in results[2]["error"]["message"]
    assert results[1]["images"] == []


def test_engine_construction_failure_fails_the_task_not_the_worker(tmp_path):
    calls = []

    def factory(config):
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("no backend")
        return EngineDouble(config)

    with make(tmp_path, factory) as svc:
        first = svc.wait(svc.sd_txt2img({})["taskId"], 10)
        second = svc.wait(svc.sd_txt2img({})["taskId"], 10)
    assert first["status"] == "failed" and "no backend" in first["error"]["message"]
    assert second["status"] == "succeeded" and len(calls) == 2


def test_queue_full(tmp_path):
    gate = Gate()
    with make(tmp_path, lambda c: gate, max_queue=3) as svc:
        svc.sd_txt2img({})
        assert gate.started.wait(5)
        queued = [svc.sd_txt2img({})["taskId"] for _ in range(3)]
        before = svc.store.count()
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({})
        assert exc.value.code == "queue_full" and exc.value.http_status == 429 and "full" in str(exc.value)
        assert svc.store.count() == before
        svc.cancel(queued[0])
        svc.sd_txt2img({})  # room again
        gate.release.set()


def test_unknown_task(tmp_path):
    with make(tmp_path, EngineDouble) as svc:
        for query in ({"taskId": HEX32}, {"taskId": "../../etc/passwd"}):
            with pytest.raises(ApiError) as exc:
                svc.sd_get_result(query)
            assert exc.value.code == "not_found" and exc.value.http_status == 404
        # a task id of the wrong type is a payload error (422) in every call, as a missing one
        for call in (svc.sd_get_result, svc.cancel, svc.wait):
            for query in ({"taskId": 5}, {"taskId": None}, {"taskId": ["a"]}, {"taskId": {}}, {}):
                with pytest.raises(ApiError) as exc:
                    call(query)
                assert (exc.value.code, exc.value.http_status, exc.value.field) == ("invalid_request", 422, "taskId")
        with pytest.raises(ApiError):
            svc.cancel(HEX32)


def test_wait_timeout(tmp_path):
    gate = Gate()
    with make(tmp_path, lambda c: gate) as svc:
        task = svc.sd_txt2img({})["taskId"]
        with pytest.raises(TimeoutError):
            svc.wait(task, timeout=0.05)
        gate.release.set()
        assert svc.wait(task, 10)["status"] == "succeeded"


def test_close_fails_waiting_and_cancels_running(tmp_path):
    gate = Gate()
    svc = make(tmp_path, lambda c: gate)
    running = svc.sd_txt2img({})["taskId"]
    assert gate.started.wait(5)
    waiting = svc.sd_txt2img({})["taskId"]
    svc.close()
    with pytest.raises(ApiError) as exc:
        svc.sd_txt2img({})
    assert exc.value.code == "closed"
    with make(tmp_path, EngineDouble) as again:
        assert again.sd_get_result({"taskId": running})["error"]["code"] == "cancelled"
        assert again.sd_get_result({"taskId": waiting})["error"]["code"] == "cancelled"


def test_one_worker_per_device_one_engine_per_config(tmp_path):
    built = []

    def factory(config):
        built.append((config.device, config.precision.value))
        return EngineDouble(config)

    configs = {"gpu0": {"device": "cuda:0"}, "gpu0-fp16": {"device": "cuda", "precision": "fp16"},
               "cpu-bf16": {"precision": "bf16"}}
    with make(tmp_path, factory, configs=configs) as svc:
        health = svc.health()["devices"]
        assert sorted(health) == ["cpu", "cuda:0"]
        assert health["cuda:0"]["configs"] == ["gpu0", "gpu0-fp16"]
        assert health["cpu"]["configs"] == ["cpu-bf16", "default"]
        ids = {name: svc.sd_txt2img({}, {"X-SP-RESOURCE-CONFIG-ID": name})["taskId"]
               for name in ("default", "gpu0", "gpu0-fp16", "cpu-bf16", "gpu0")}
        for name, task in ids.items():
            assert svc.wait(task, 10)["info"]["resource_config_id"] == name
    # the default config's precision is the machine's default (bf16 for openvino on a CPU with native bf16)
    default = ("cpu", EngineConfig().precision.value)
    assert sorted(built) == sorted([("cpu", "bf16"), default, ("cuda", "fp16"), ("cuda:0", "fp32")])


def test_retention_removes_rows_and_files(tmp_path):
    with make(tmp_path, EngineDouble, max_tasks=3, max_age_s=3600) as svc:
        ids = [svc.sd_txt2img({"seed": i})["taskId"] for i in range(5)]
        results = [svc.wait(t, 10) for t in ids]
        files = [r["images"][0] for r in results]
        time.sleep(0.01)
        assert svc.store.cleanup() == 2
        for t in ids[:2]:
            with pytest.raises(ApiError):
                svc.sd_get_result({"taskId": t})
        assert [svc.sd_get_result({"taskId": t})["status"] for t in ids[2:]] == ["succeeded"] * 3
        import os

        assert [os.path.exists(f) for f in files] == [False, False, True, True, True]
        assert svc.store.cleanup(now=time.time() + 7200) == 3
        assert not os.listdir(tmp_path / "results" / "images")


def test_a_second_process_cannot_open_the_same_results(tmp_path):
    from api_compat.tasks.store import StoreLocked

    with make(tmp_path, EngineDouble):
        with pytest.raises(StoreLocked):
            make(tmp_path, EngineDouble)


def test_200_concurrent_submits_none_lost(tmp_path, tiny_engine):
    """200 tasks from 16 threads at once on the real engine (tiny-sd1, 1 Euler step, CFG 1, 64x64): every one
    finishes with its own seed (PNG infotext and parameters), none lost; a few images equal, pixel for pixel, a
    direct Engine.generate of the same request."""
    with TaskService(results_dir=tmp_path / "results", max_queue=256, **tiny_engine) as svc:
        def one(i):
            return i, svc.sd_txt2img({"prompt": f"task {i}", "seed": 1000 * i, "steps": 1, "width": 64,
                                      "height": 64, "sampler_name": "Euler", "cfg_scale": 1})["taskId"]

        with ThreadPoolExecutor(16) as pool:
            submitted = list(pool.map(one, range(200)))
        assert len({t for _, t in submitted}) == 200
        results = {i: svc.wait(t, timeout=600) for i, t in submitted}
        engine = tiny_engine["engine_factory"](svc.configs["default"])
    assert [i for i, r in results.items() if r["status"] != "succeeded"] == []
    for i, r in results.items():
        assert r["parameters"]["prompt"] == f"task {i}" and r["parameters"]["seed"] == 1000 * i
        assert [png_seed(p) for p in r["images"]] == [1000 * i]
        assert f"task {i}\nSteps: 1, Sampler: Euler," in png_infotext(r["images"][0])
        assert r["info"]["all_seeds"] == [1000 * i]
    for i in (0, 7, 199):
        direct = engine.generate(GenerationRequest(prompt=f"task {i}", seed=1000 * i, steps=1, width=64, height=64,
                                                   sampler_name="Euler", cfg_scale=1.0))
        assert np.array_equal(png_pixels(results[i]["images"][0]), direct.images[0]), f"task {i}: other pixels"
    assert not np.array_equal(png_pixels(results[0]["images"][0]), png_pixels(results[7]["images"][0]))


def test_heap_freezer_freezes_after_growth_only():
    """The embedded worker's guard against full garbage collections on the submit path (issue 25): after a task
    that grew the heap a lot (a model load) the heap is collected and frozen once; an ordinary task leaves it."""
    import gc
    import sys

    from api_compat.tasks.embedded import HeapFreezer

    freezer = HeapFreezer(least=50_000)
    try:
        freezer.after_task()  # the first call freezes what the test session holds
        assert not freezer.after_task() and gc.get_freeze_count() > 0
        # a "model load": many long-lived objects, enough to pass the growth rule whatever the session holds
        grown = [[i] for i in range(max(200_000, sys.getallocatedblocks() // 2))]
        assert freezer.after_task() and gc.get_freeze_count() >= len(grown)
        assert not freezer.after_task()
    finally:
        gc.unfreeze()
