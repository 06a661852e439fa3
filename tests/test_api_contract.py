"""The service contract, run against both task backends (``embedded`` and ``celery`` on a real Redis with real
``sdengine worker`` processes), so that they cannot drift: the same payloads give the same states, results,
errors and pixels.

The end-to-end tests run the real engine (tiny-sd1, ONNX Runtime). Stalls, failures and cancels use
tests.queue_support.QueueDouble, a TEST DOUBLE of the engine (addressable by name, so the worker processes run
it too)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from api_compat import ApiError, TaskService
from tests.api_support import png_pixels, png_seed, tiny_engine  # noqa: F401 (fixture)
from tests.queue_support import ENV_GATES, queue_double_factory, queue_workers, redis_server  # noqa: F401

HEX32 = "0123456789abcdef" * 2
BACKENDS = ["embedded", "celery"]


@pytest.fixture(params=BACKENDS)
def api(request, tmp_path, monkeypatch, tiny_engine):
    """``api(engine, **kw)`` -> a TaskService on ``engine`` ("double" or "tiny") and the chosen backend."""
    kind = request.param
    made = []
    gates = tmp_path / "gates"
    gates.mkdir()

    def make(engine: str = "double", **kw):
        if kind == "celery":
            workers = request.getfixturevalue("queue_workers")
            workers.ensure(engine)
            kw["queue"] = workers.url(engine)
            kw["results_dir"] = workers.results(engine)
            gate_dir = workers.gates
        else:
            kw["results_dir"] = tmp_path / "results"
            gate_dir = gates
            monkeypatch.setenv(ENV_GATES, str(gates))
        if engine == "double":
            kw.setdefault("check_models", False)
            svc = TaskService(tmp_path / "models", engine_factory=queue_double_factory, **kw)
        else:
            svc = TaskService(**{**tiny_engine, **kw})
        svc.gate_dir, svc.gate_tokens = gate_dir, []
        made.append(svc)
        return svc

    make.kind = kind
    yield make
    for svc in made:
        for token in svc.gate_tokens:  # release whatever a failed test left blocked
            open_gate(svc, token)
        svc.close()


def open_gate(svc, token):
    (svc.gate_dir / token).touch()


def gate_token(svc) -> str:
    import uuid

    token = uuid.uuid4().hex
    svc.gate_tokens.append(token)
    return token


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_succeeded_result_and_png_infotext(api):
    """Real engine (tiny-sd1): 2 x 2 images, each PNG with its own seed in the webui infotext."""
    svc = api("tiny")
    task = svc.sd_txt2img({"prompt": "a red cube", "negtive_prompt": "blurry", "seed": 77, "batch_size": 2,
                           "n_iter": 2, "steps": 3, "width": 64, "height": 64})
    assert task["status"] == "waiting"
    result = svc.wait(task["taskId"], timeout=120)
    assert result["status"] == "succeeded", result.get("error")
    assert set(result) == {"taskId", "status", "images", "parameters", "info"}
    assert result["parameters"]["prompt"] == "a red cube" and result["parameters"]["negative_prompt"] == "blurry"
    assert [png_seed(p) for p in result["images"]] == [77, 78, 79, 80]
    assert result["info"]["all_seeds"] == [77, 78, 79, 80]
    with Image.open(result["images"][0]) as img:
        text = img.text["parameters"]
    assert text.startswith("a red cube\nNegative prompt: blurry\nSteps: 3, ")
    assert "Seed: 77, Size: 64x64, Model hash: " in text and "Model: tiny-sd1" in text
    assert result["info"]["sd_model_name"] == "tiny-sd1" and result["info"]["backend"] == "onnxruntime"
    # the pixels of both backends are the engine's: equal to a direct Engine.generate of the same request
    engine = tiny_engine_of(svc)
    from engine.request import GenerationRequest

    direct = engine.generate(GenerationRequest(prompt="a red cube", negative_prompt="blurry", seed=77, batch_size=2,
                                               n_iter=2, steps=3, width=64, height=64))
    for path, pixels in zip(result["images"], direct.images):
        assert np.array_equal(png_pixels(path), pixels)
    assert svc.image_path(task["taskId"], 3) is not None and svc.image_path(task["taskId"], 4) is None


def tiny_engine_of(svc):
    from tests.api_support import shared_engine

    return shared_engine(svc.configs["default"])


def test_states_progress_and_queue_position(api, request):
    svc = api()
    token = gate_token(svc)
    first = svc.sd_txt2img({"prompt": f"GATE:{token}", "steps": 10})["taskId"]
    second = svc.sd_txt2img({"prompt": "b"})["taskId"]
    assert wait_for(lambda: svc.sd_get_result({"taskId": first})["status"] == "running")
    assert wait_for(lambda: svc.sd_get_result({"taskId": first})["progress"]["step"] == 1)
    running = svc.sd_get_result({"taskId": first})
    assert running["progress"]["steps"] == 10 and running["progress"]["fraction"] == pytest.approx(0.1)
    assert running["images"] == [] and "error" not in running and running["info"] == {}
    waiting = svc.sd_get_result({"taskId": second})
    assert waiting["status"] == "waiting" and waiting["queue_position"] == 0 and "progress" not in waiting
    assert waiting["parameters"]["prompt"] == "b"
    open_gate(svc, token)
    assert svc.wait(first, 20)["status"] == "succeeded"
    done = svc.wait(second, 20)
    assert done["status"] == "succeeded" and len(done["images"]) == 1 and done["parameters"]["seed"] == -1
    assert [png_seed(p) for p in done["images"]] == done["info"]["all_seeds"]


def test_cancel_waiting_and_running(api, request):
    svc = api()
    token = gate_token(svc)
    running = svc.sd_txt2img({"prompt": f"GATE:{token}", "steps": 10})["taskId"]
    assert wait_for(lambda: (svc.sd_get_result({"taskId": running}).get("progress") or {}).get("step") == 1)
    waiting = svc.sd_txt2img({"prompt": "never runs"})["taskId"]
    result = svc.cancel(waiting)
    assert result["status"] == "failed" and result["error"] == {"code": "cancelled",
                                                                "message": "cancelled while waiting"}
    assert svc.cancel(running)["status"] in ("running", "failed")
    result = svc.wait(running, 20)
    assert result["status"] == "failed" and result["error"]["code"] == "cancelled"
    assert "step" in result["error"]["message"] and result["images"] == []
    assert svc.wait(waiting, 1)["error"]["code"] == "cancelled"
    # the worker goes on
    assert svc.wait(svc.sd_txt2img({"prompt": "next"})["taskId"], 20)["status"] == "succeeded"


def test_failure_isolation(api):
    svc = api()
    ids = [svc.sd_txt2img({"prompt": p, "seed": i})["taskId"]
           for i, p in enumerate(["ok", "FAIL", "INVALID", "ok", "FAIL", "ok"])]
    results = [svc.wait(t, 20) for t in ids]
    assert [r["status"] for r in results] == ["succeeded", "failed", "failed", "succeeded", "failed", "succeeded"]
    assert results[1]["error"] == {"code": "internal_error", "message": "RuntimeError: injected failure"}
    assert results[2]["error"]["code"] == "invalid_request" and "prompt" in results[2]["error"]["message"]
    assert results[1]["images"] == []
    assert [png_seed(r["images"][0]) for r in results if r["status"] == "succeeded"] == [0, 3, 5]


def test_queue_full(api, request):
    svc = api(max_queue=3)
    token = gate_token(svc)
    first = svc.sd_txt2img({"prompt": f"GATE:{token}"})["taskId"]
    assert wait_for(lambda: svc.sd_get_result({"taskId": first})["status"] == "running")
    queued = [svc.sd_txt2img({})["taskId"] for _ in range(3)]
    with pytest.raises(ApiError) as exc:
        svc.sd_txt2img({})
    assert exc.value.code == "queue_full" and exc.value.http_status == 429 and "full" in str(exc.value)
    svc.cancel(queued[0])
    queued.append(svc.sd_txt2img({})["taskId"])  # room again
    open_gate(svc, token)
    assert [svc.wait(t, 20)["status"] for t in queued[1:]] == ["succeeded"] * 3


def test_unknown_task_and_bad_ids(api):
    svc = api()
    for query in ({"taskId": HEX32}, {"taskId": "../../etc/passwd"}):
        with pytest.raises(ApiError) as exc:
            svc.sd_get_result(query)
        assert exc.value.code == "not_found" and exc.value.http_status == 404
    for query in ({"taskId": 5}, {"taskId": None}):
        with pytest.raises(ApiError) as exc:
            svc.sd_get_result(query)
        assert exc.value.code == "invalid_request" and exc.value.http_status == 422
    with pytest.raises(ApiError) as exc:
        svc.sd_get_result({})
    assert exc.value.field == "taskId" and exc.value.code == "invalid_request"
    with pytest.raises(ApiError) as exc:
        svc.cancel(HEX32)
    assert exc.value.code == "not_found"
    assert svc.image_path(HEX32, 0) is None


def test_validation_is_the_same(api):
    """Refused at submit, with the field and the allowed values, before anything is queued."""
    svc = api("tiny")
    cases = [({"steps": 0}, "steps"), ({"sampler_name": "Nope"}, "sampler_name"),
             ({"stable_diffusion_model": "missing-model"}, "stable_diffusion_model"),
             ({"width": 4096}, "width"), ({"bogus": 1}, "bogus")]
    svc.strict = True  # unknown fields too (sdengine serve --strict; by default they are ignored and named)
    for payload, field in cases:
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img(payload)
        assert exc.value.field == field and exc.value.allowed, (payload, exc.value.to_dict())
    svc.strict = False
    with pytest.raises(ApiError) as exc:
        svc.sd_txt2img({}, {"X-SP-RESOURCE-CONFIG-ID": "nope"})
    assert exc.value.code == "unknown_config"


def test_wait_timeout(api, request):
    svc = api()
    token = gate_token(svc)
    task = svc.sd_txt2img({"prompt": f"GATE:{token}"})["taskId"]
    with pytest.raises(TimeoutError):
        svc.wait(task, timeout=0.05)
    open_gate(svc, token)
    assert svc.wait(task, 20)["status"] == "succeeded"


def test_expired_result(api):
    """Past the results TTL a task id answers ``expired`` (410), not ``not_found``, and its PNG is gone."""
    svc = api(max_age_s=1)
    task = svc.sd_txt2img({"prompt": "short-lived", "seed": 3})["taskId"]
    result = svc.wait(task, 20)
    assert result["status"] == "succeeded"
    time.sleep(1.2)
    if api.kind == "embedded":
        svc.store.cleanup()
    else:  # Redis expires the record; the workers remove the PNG later (tested in test_queue_celery)
        assert wait_for(lambda: not svc.backend.tasks.get(task), 5)
    with pytest.raises(ApiError) as exc:
        svc.sd_get_result({"taskId": task})
    assert exc.value.code == "expired" and exc.value.http_status == 410 and "expired" in str(exc.value)
    assert svc.image_path(task, 0) is None


def test_queue_bound_in_bytes_of_images(api):
    """Waiting tasks are bounded by the bytes of their (compressed) ControlNet images too, in both backends."""
    import base64

    from tests.api_support import png_b64

    image = png_b64(32, 32, (200, 10, 10))
    size = len(base64.b64decode(image))
    payload = {"steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"units": [
        {"model": "c", "module": "none", "input_image": image, "resize_mode": 0}]}}}
    svc = api(max_queue_bytes=2 * size)
    token = gate_token(svc)
    first = svc.sd_txt2img({"prompt": f"GATE:{token}"})["taskId"]
    assert wait_for(lambda: svc.sd_get_result({"taskId": first})["status"] == "running")
    queued = [svc.sd_txt2img(payload)["taskId"] for _ in range(2)]
    assert sum(d["waiting_bytes"] for d in svc.health()["devices"].values()) == 2 * size
    with pytest.raises(ApiError) as exc:
        svc.sd_txt2img(payload)
    assert exc.value.code == "queue_full" and "bytes" in str(exc.value)
    svc.cancel(queued[0])
    assert sum(d["waiting_bytes"] for d in svc.health()["devices"].values()) == size
    queued.append(svc.sd_txt2img(payload)["taskId"])
    open_gate(svc, token)
    assert [svc.wait(t, 20)["status"] for t in queued[1:]] == ["succeeded"] * 2
    assert sum(d["waiting_bytes"] for d in svc.health()["devices"].values()) == 0


def test_webui_synchronous_call_and_interrupt(api):
    """The webui route (/sdapi/v1/txt2img) is a task of either backend: it answers the webui shapes, shows in
    /sdapi/v1/progress while it runs, and /sdapi/v1/interrupt cancels it (the call answers 409)."""
    import json
    import threading

    from fastapi.testclient import TestClient

    from api_compat.http import create_app

    svc = api("double")
    with TestClient(create_app(svc), base_url="http://localhost") as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 5, "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert len(r.json()["images"]) == 1 and info["all_seeds"] == [5]
        assert svc.sd_get_result({"taskId": info["sdengine_task_id"]})["status"] == "succeeded"
        token = gate_token(svc)
        answer = {}
        caller = threading.Thread(target=lambda: answer.update(r=client.post(
            "/sdapi/v1/txt2img", json={"prompt": f"GATE:{token}", "steps": 5, "width": 64, "height": 64})))
        caller.start()
        assert wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0, 60)
        assert client.post("/sdapi/v1/interrupt").json() == {}
        caller.join(60)
        assert answer["r"].status_code == 409 and answer["r"].json()["error"]["code"] == "cancelled"
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def _png_b64(pixels: np.ndarray) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_detect_is_a_task_on_both_backends(api):
    """/controlnet/detect's body is validated at submit and its preprocessor runs on the backend's worker: the
    result's images are the detected maps, pixel-equal to the engine's preprocessor called directly."""
    from engine.controlnet.preprocessors import get_preprocessor

    svc = api("double")
    pixels = np.zeros((64, 48, 3), np.uint8)
    pixels[16:40, 8:30] = 255
    body = {"controlnet_module": "canny", "controlnet_input_images": [_png_b64(pixels)] * 2,
            "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}
    task = svc.controlnet_detect(body)
    result = svc.wait(task["taskId"], timeout=60)
    assert result["status"] == "succeeded", result
    assert result["info"]["detected_maps"] == 2 and len(result["images"]) == 2
    expected = get_preprocessor("canny")(pixels, 64, 100, 200)
    for path in result["images"]:
        assert np.array_equal(png_pixels(path), expected)
    with pytest.raises(ApiError) as err:
        svc.controlnet_detect({**body, "controlnet_input_images": ["not base64"]})
    assert err.value.field == "controlnet_input_images[0]" and err.value.code == "invalid_request"
