"""The webui routes in-process: the payload rule (inert webui defaults accepted, anything asking for more refused
naming the field), auth (API key and --api-auth on every route), the queue limit, the OpenAPI document, the
options kept across a restart. The demo-model client against the real server: tests/test_webui_client.py."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from api_compat import ApiError, TaskService
from api_compat.http import create_app, parse_api_auth
from api_compat.schema import parse_payload
from api_compat.webui import WEBUI_TXT2IMG_ECHO, webui_to_scc, webui_parameters
from tests.api_support import EngineDouble, png_b64


def test_every_webui_default_is_accepted():
    """The webui's full txt2img payload at its defaults (nulls included) is a valid request."""
    scc = webui_to_scc(dict(WEBUI_TXT2IMG_ECHO))
    parsed = parse_payload(scc)
    assert parsed.steps == 50 and parsed.width == 512 and parsed.sampler_index == "Euler"
    assert parsed.enable_hr is False and parsed.script_args == []


@pytest.mark.parametrize("field,value", [
    ("seed_resize_from_h", 512),
    ("firstpass_image", "abc"),
])
def test_a_field_asking_for_more_is_refused(field, value):
    with pytest.raises(ApiError) as exc:
        parse_payload(webui_to_scc({**WEBUI_TXT2IMG_ECHO, field: value}))
    assert exc.value.field == field and exc.value.code == "not_supported"


def test_webui_defaults_and_nulls():
    scc = webui_to_scc({"prompt": "x", "scheduler": None, "s_churn": None, "sampler_name": None})
    assert scc == {"prompt": "x", "steps": 50, "width": 512, "height": 512, "cfg_scale": 7.0, "sampler_index": "Euler"}
    assert webui_to_scc({"sampler_name": "DDIM"})["sampler_name"] == "DDIM"
    assert "sampler_index" not in webui_to_scc({"sampler_name": "DDIM"})
    assert webui_to_scc({"steps": 3, "width": 64})["steps"] == 3
    # options apply as override_settings the request did not set
    scc = webui_to_scc({"override_settings": {"CLIP_stop_at_last_layers": 1}},
                       {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "m"})
    assert scc["override_settings"] == {"CLIP_stop_at_last_layers": 1, "sd_model_checkpoint": "m"}


def test_controlnet_units_as_the_extension_sends_them():
    image = png_b64(8, 8)
    unit = {"enabled": True, "module": "canny", "model": "m", "image": {"image": image, "mask": None},
            "mask": None, "low_vram": False, "hr_option": "Both", "output_dir": "", "use_preview_as_input": False,
            "generated_image": None, "input_mode": "simple", "batch_images": "", "save_detected_map": False}
    scc = webui_to_scc({"alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}}})
    (out, off) = scc["alwayson_scripts"]["ControlNet"]["args"]
    assert out["image"] == image and "output_dir" not in out and out["save_detected_map"] is False
    assert off["save_detected_map"] is True  # the extension's default
    parsed = parse_payload(scc)
    assert parsed.alwayson_scripts.controlnet.args[0].image == image
    with pytest.raises(ApiError) as exc:
        webui_to_scc({"alwayson_scripts": {"controlnet": {"args": [{**unit, "output_dir": "/tmp/x"}]}}})
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].output_dir"
    with pytest.raises(ApiError) as exc:
        webui_to_scc({"alwayson_scripts": {"controlnet": {"args": [{**unit, "image": {"image": image,
                                                                                      "mask": image}}]}}})
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].image.mask"
    with pytest.raises(ApiError) as exc:
        parse_payload(webui_to_scc({"alwayson_scripts": {"controlnet": {"args": [{**unit, "mask": image}]}}}))
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].mask"


def test_png_info_parameters_split_the_size():
    text = 'a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 512x768, Model: "m, x"'
    params = webui_parameters(text)
    assert params["Prompt"] == "a cat" and params["Negative prompt"] == "dog" and params["Seed"] == "5"
    assert (params["Size-1"], params["Size-2"]) == ("512", "768") and params["Model"] == "m, x"
    assert webui_parameters("just words")["Prompt"] == "just words"


def test_api_auth_parsing():
    assert parse_api_auth("a:b,c:d:e") == (("a", "b"), ("c", "d:e"))
    with pytest.raises(ValueError, match="'a'"):
        parse_api_auth("a:b,a")
    with pytest.raises(ValueError) as exc:
        parse_api_auth("user:")
    assert "user" in str(exc.value)


@pytest.fixture
def service(tmp_path):
    svc = TaskService(tmp_path / "m", results_dir=tmp_path / "r", engine_factory=EngineDouble,
                       check_models=False, max_queue=1)
    yield svc
    svc.close()


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_api_key_and_basic_auth_on_every_route(service):
    app = create_app(service, api_key="k", api_auth="u:p")
    with TestClient(app, base_url="http://localhost") as c:
        for headers, ok in [({}, False), (basic("u", "p"), True), (basic("u", "x"), False),
                            ({"X-API-Key": "k"}, True), ({"Authorization": "Bearer k"}, True),
                            ({"Authorization": "Basic !!!"}, False), (basic("k", ""), False)]:
            for method, path in [("get", "/sdapi/v1/samplers"), ("get", "/controlnet/version"),
                                 ("post", "/scc/sd_get_result"), ("get", "/sdapi/v1/progress")]:
                r = getattr(c, method)(path, headers=headers, **({"json": {"taskId": "0" * 32}}
                                                                  if method == "post" else {}))
                assert (r.status_code != 401) == ok, (headers, path, r.status_code)
                if not ok:
                    assert r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/health").status_code == 200


def test_synchronous_call_respects_the_queue_limit(service):
    """max_queue=1: one webui call running, one /scc task waiting, the next webui call is 429; the webui task is
    in sd_get_result meanwhile."""
    with TestClient(create_app(service), base_url="http://localhost") as c:
        answers = {}
        first = threading.Thread(target=lambda: answers.update(
            first=c.post("/sdapi/v1/txt2img", json={"prompt": "SLOW", "steps": 60, "width": 64, "height": 64})))
        first.start()
        end = time.monotonic() + 20
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
        progress = c.get("/sdapi/v1/progress").json()
        task = progress["current_task"][5:-1]
        assert c.post("/scc/sd_get_result", json={"taskId": task}).json()["status"] == "running"
        assert c.post("/scc/sd_txt2img", json={"prompt": "waits"}).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        first.join(30)
        body = answers["first"].json()
        assert answers["first"].status_code == 200 and len(body["images"]) == 1
        assert json.loads(body["info"])["sdengine_task_id"] == task


def test_openapi_describes_every_route(service):
    app = create_app(service)
    with TestClient(app, base_url="http://localhost") as c:
        paths = c.get("/openapi.json").json()["paths"]
    from api_compat.webui import webui_router

    routes = {r.path for r in webui_router(service, None).routes}
    assert routes <= set(paths), routes - set(paths)
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/progress",
                 "/sdapi/v1/interrupt", "/sdapi/v1/png-info", "/controlnet/detect", "/scc/sd_txt2img"):
        assert path in paths
    assert paths["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Txt2ImgPayload"}
    # docs/WEBUI_API.md lists every route this server has
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "WEBUI_API.md").read_text()
    for path in routes:
        assert f"`{path}`" in doc, path


def test_options_survive_a_restart(tmp_path):
    kwargs = dict(results_dir=tmp_path / "r", engine_factory=EngineDouble, check_models=False)
    svc = TaskService(tmp_path / "m", **kwargs)
    with TestClient(create_app(svc, close_service=True), base_url="http://localhost") as c:
        r = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "eta_noise_seed_delta": 31337})
        assert r.status_code == 200, r.text
    svc = TaskService(tmp_path / "m", **kwargs)
    with TestClient(create_app(svc, close_service=True), base_url="http://localhost") as c:
        options = c.get("/sdapi/v1/options").json()
        assert options["CLIP_stop_at_last_layers"] == 3 and options["eta_noise_seed_delta"] == 31337
        r = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 13})
        assert r.status_code == 422 and r.json()["error"]["field"] == "CLIP_stop_at_last_layers"
        r = c.post("/sdapi/v1/options", content=b"x=1", headers={"content-type": "text/plain"})
        assert r.status_code == 415


def test_controlnet_detect_runs_on_the_worker_not_in_the_router(service, monkeypatch):
    """The preprocessor of /controlnet/detect runs on the task backend's worker thread (a task in sd_get_result),
    never on the server's event loop or its request threads."""
    import api_compat.detect as detect

    seen = []
    real = detect.get_preprocessor

    class Spy:
        """The preprocessor, noting the thread each call runs on (its other attributes are the preprocessor's)."""

        def __init__(self, pre):
            self.pre = pre

        def __getattr__(self, name):
            return getattr(self.pre, name)

        def __call__(self, *args, **kwargs):
            seen.append(threading.current_thread().name)
            return self.pre(*args, **kwargs)

    def spy(name, **kw):
        return Spy(real(name, **kw))

    monkeypatch.setattr(detect, "get_preprocessor", spy)
    image = base64.b64encode(_png_bytes()).decode()
    with TestClient(create_app(service), base_url="http://localhost") as c:
        r = c.post("/controlnet/detect", json={"controlnet_module": "invert", "controlnet_input_images": [image]})
    assert r.status_code == 200 and r.json()["info"] == "Success" and len(r.json()["images"]) == 1
    assert seen and all(name.startswith("sdengine-worker-") for name in seen), seen


@pytest.mark.parametrize("module", ["ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl"])
def test_controlnet_detect_refuses_ip_adapter_modules(service, module):
    """The ControlNet extension's own suite (tests/web_api/detect_test.py, test_unsupported_modules) expects a 422:
    an IP-Adapter module makes CLIP image tokens, not a map."""
    image = base64.b64encode(_png_bytes()).decode()
    with TestClient(create_app(service), base_url="http://localhost") as c:
        r = c.post("/controlnet/detect", json={"controlnet_module": module, "controlnet_input_images": [image]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "controlnet_module", r.text


def _png_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 40, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
