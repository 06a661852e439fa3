"""Hypothesis fuzz of the sd_txt2img and sd_img2img payloads: validation alone (schema, translation, model names resolved in
the real model store of the tiny models), and the HTTP app (its engine is a test double that returns at once,
so the fuzz exercises validation, queueing and the HTTP layer, not generation). No input may raise anything
but ApiError/InvalidRequest, and no HTTP answer may be a 5xx. Derandomized; >= 1,000 cases each. The probe of
issue 12 added three families: deep nesting, thin images and cross-site requests (Origin, Host, body type).
Issue 15 added the webui's routes (/sdapi/v1/..., /controlnet/...) to them, and webui-shaped payloads."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_compat import ApiError, TaskService
from api_compat.engine_api import check_memory, check_models
from api_compat.http import create_app
from api_compat.schema import MAX_JSON_DEPTH, ControlNetUnitPayload, Img2ImgPayload, Txt2ImgPayload, parse_request
from api_compat.translate import translate_request
from api_compat.webui import webui_to_scc
from engine.config import EngineConfig
from core.errors import InvalidRequest
from engine.request import GenerationRequest, GenerationResult
from engine.models.store import ModelStore
from tests.api_support import png_b64, tiny_engine  # noqa: F401 (fixture)

SETTINGS = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 8, 20, 64, 512, 513, 2048, 4096, 2**63 - 1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.5, 30.0, -0.0]),
    st.text(max_size=20),
    st.sampled_from(["", "Euler a", "DPM++ 2M Karras", "Karras", "../x", "C:\\x", "canny", "None", "Automatic",
                     "tiny-sd1", "TINY-SD1.safetensors", "tiny-controlnet-sd1", "tiny-sd1 [0123abcd]",
                     "data:image/png;base64,", "http://127.0.0.1/x.png", png_b64(8, 8), "Crop and Resize"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=4)
unit_keys = st.sampled_from(sorted(ControlNetUnitPayload.model_fields) + ["wieght", "Model"])
units = st.lists(st.one_of(st.dictionaries(unit_keys, scalars, max_size=5), scalars), max_size=3)
scripts = st.one_of(
    json_values,
    st.fixed_dictionaries({"controlnet": st.one_of(json_values, st.fixed_dictionaries({"units": units}),
                                                   st.fixed_dictionaries({"args": units}))}),
)
top_keys = st.sampled_from(sorted(Txt2ImgPayload.model_fields) + ["stepz", "negativ_prompt", "model"])
GOOD = {  # plausible values per field, so that about half of the field-aware payloads are accepted
    "prompt": st.text(st.characters(exclude_characters="\x00"), max_size=30),
    "negtive_prompt": st.text(st.characters(exclude_characters="\x00"), max_size=10), "steps": st.integers(1, 150),
    "cfg_scale": st.floats(0, 30), "width": st.sampled_from([64, 128, 512, 2048, None]),
    "height": st.sampled_from([64, 256, 768]), "seed": st.integers(-1, 2**40), "batch_size": st.integers(1, 8),
    "n_iter": st.integers(1, 4), "clip_skip": st.integers(1, 12),
    "sampler_name": st.sampled_from(["Euler a", "DPM++ 2M Karras", "k_lms", "DDIM", "Heun"]),
    "scheduler": st.sampled_from(["Automatic", "Karras", "Exponential"]), "subseed_strength": st.floats(0, 1),
    "eta": st.one_of(st.none(), st.floats(0, 1)), "tiling": st.just(False), "enable_hr": st.booleans(),
    "hr_scale": st.floats(1, 4), "hr_upscaler": st.sampled_from(["Latent", "Lanczos", "Latent (nearest)", "ESRGAN"]),
    "hr_resize_x": st.sampled_from([0, 96, 1000]), "denoising_strength": st.floats(0, 1),
    "alwayson_scripts": st.fixed_dictionaries({"controlnet": st.fixed_dictionaries({"units": st.lists(
        st.fixed_dictionaries({"model": st.just("tiny-controlnet-sd1"), "input_image": st.just(png_b64(8, 8))},
                              optional={"weight": st.floats(0, 2), "module": st.sampled_from(["canny", "none"]),
                                        "guidance_end": st.floats(0.5, 1), "control_mode": st.integers(0, 2)}),
        max_size=2)})}),
}
_good = st.fixed_dictionaries({}, optional=GOOD)
field_aware = st.builds(lambda good, bad: {**good, **dict([bad] if bad else [])}, _good,
                        st.one_of(st.none(), st.tuples(top_keys, scalars)))

payloads = st.builds(
    lambda fields, s: {**fields, **({"alwayson_scripts": s} if s is not None else {})},
    st.dictionaries(top_keys, st.one_of(scalars, json_values), max_size=6),
    st.one_of(st.none(), scripts),
)


@pytest.fixture(scope="module")
def store(tiny_engine):
    return ModelStore(tiny_engine["models_dir"], cache_dir=tiny_engine["cache_dir"])


def _check(payload, store, kind: str = "txt2img") -> GenerationRequest | None:
    """What sd_txt2img (sd_img2img) checks before it queues: schema, translation, model names in the store."""
    try:
        config = EngineConfig(default_model="tiny-sd1")  # as the HTTP service's configuration
        translation = translate_request(kind, parse_request(kind, payload), config)
        check_models(store, translation.models)
        check_memory(store, config, translation.request, None)  # the model's limits (clip_skip), no budget
        return translation.request
    except ApiError as exc:
        assert exc.http_status in (400, 422) and str(exc)
        assert exc.field is None or isinstance(exc.field, str)
        return None
    except InvalidRequest as exc:
        assert exc.field
        return None


@settings(max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(value=json_values)
def test_fuzz_any_json_value(store, value):
    _check(value, store)


class NullEngine:
    """TEST DOUBLE: returns at once with no images, so the fuzz measures validation and HTTP, not PNG writing."""

    def __init__(self, config=None):
        pass

    def generate(self, request, *, progress=None, cancel=None):
        return GenerationResult(images=[], infotexts=[], info={}, seeds=[], subseeds=[], timings={})


class AsgiClient:
    """Requests straight into the ASGI app (httpx.ASGITransport) on one event loop: ~3x faster than
    TestClient's thread portal, which keeps 1,000 HTTP cases within a few seconds."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")

    def post(self, path, **kwargs):
        return self.loop.run_until_complete(self.client.post(path, **kwargs))

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def http_client(tmp_path_factory, tiny_engine):
    # no memory budget here: _check mirrors validation without it (the budget has its own tests, test_memory.py)
    svc = TaskService(results_dir=tmp_path_factory.mktemp("fuzz"), max_queue=100000, max_tasks=200,
                       memory_budget=None, **{**tiny_engine, "engine_factory": NullEngine})
    client = AsgiClient(create_app(svc, max_body_bytes=256 * 1024))
    yield client
    client.close()
    svc.close()


@SETTINGS
@given(payload=st.one_of(payloads, field_aware), header=st.one_of(st.none(), st.sampled_from(["", "default", "nope", "x" * 300])))
def test_fuzz_payload(http_client, store, payload, header):
    """Each case: validation in-process (only ApiError/InvalidRequest, accepted requests in range), then the
    same payload over HTTP (never a 5xx; accepted in-process <=> 200 over HTTP)."""
    request = _check(payload, store)
    if request is not None:
        assert 1 <= request.steps <= 150 and 1 <= request.batch_size <= 8 and 0 <= request.cfg_scale <= 30
        assert math.isfinite(request.cfg_scale) and request.seed >= -1
        assert request.width is None or (64 <= request.width <= 2048 and request.width % 8 == 0)
    headers = {"content-type": "application/json"}
    if header is not None:
        headers["X-SP-RESOURCE-CONFIG-ID"] = header
    r = http_client.post("/scc/sd_txt2img", content=json.dumps(payload).encode(), headers=headers)
    assert r.status_code in (200, 400, 413, 422), r.text
    if header in (None, "", "default") and r.status_code != 413:
        assert (r.status_code == 200) == (request is not None), r.text
    body = r.json()
    if r.status_code == 200:
        result = http_client.post("/scc/sd_get_result", json=body)
        assert result.status_code == 200 and result.json()["taskId"] == body["taskId"]
    else:
        assert body["error"]["code"] and body["error"]["message"]


IMG2IMG_GOOD = {
    **{k: v for k, v in GOOD.items() if k in Img2ImgPayload.model_fields},
    "init_images": st.one_of(st.just([png_b64(8, 8)]), st.just([png_b64(40, 16), png_b64(8, 8)])),
    "denoising_strength": st.floats(0, 1), "resize_mode": st.one_of(st.integers(0, 3), st.sampled_from(
        ["Crop and resize", "Just resize (latent upscale)", "Stretch"])),
    "mask": st.sampled_from([png_b64(8, 8), png_b64(16, 16), "", None]), "mask_blur": st.integers(0, 64),
    "inpainting_fill": st.one_of(st.integers(0, 3), st.sampled_from(["latent noise", "original"])),
    "inpaint_full_res": st.booleans(), "inpaint_full_res_padding": st.integers(0, 64),
    "inpainting_mask_invert": st.sampled_from([0, 1, True]), "initial_noise_multiplier": st.floats(0, 1.5),
    "override_settings": st.fixed_dictionaries({}, optional={
        "img2img_fix_steps": st.booleans(), "upscaler_for_img2img": st.sampled_from(["None", "Lanczos", "SwinIR"]),
        "initial_noise_multiplier": st.floats(0, 2), "samples_format": st.just("png")}),
}
img2img_keys = st.sampled_from(sorted(Img2ImgPayload.model_fields) + ["enable_hr", "image", "mask_blurr"])
img2img_payloads = st.one_of(
    st.builds(lambda good, bad: {**good, **dict([bad] if bad else [])},
              st.fixed_dictionaries({"init_images": IMG2IMG_GOOD["init_images"]},
                                    optional={k: v for k, v in IMG2IMG_GOOD.items() if k != "init_images"}),
              st.one_of(st.none(), st.tuples(img2img_keys, scalars))),
    st.dictionaries(img2img_keys, st.one_of(scalars, json_values), max_size=6),
)


@SETTINGS
@given(payload=img2img_payloads)
def test_fuzz_img2img_payload(http_client, store, payload):
    """sd_img2img: validation in-process (only ApiError/InvalidRequest; accepted requests carry an init image
    and a strength in range), then over HTTP (never a 5xx; accepted in-process <=> 200)."""
    request = _check(payload, store, "img2img")
    if request is not None:
        assert request.init is not None and 0 <= request.init.denoising_strength <= 1
        assert request.init.resize_mode in (0, 1, 2, 3) and request.init.inpainting_fill in (0, 1, 2, 3)
        assert request.init.upscaler in ("None", "Lanczos", "Nearest") and request.hires is None
    r = http_client.post("/scc/sd_img2img", content=json.dumps(payload).encode(),
                         headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 413, 422), r.text[:500]
    if r.status_code != 413:
        assert (r.status_code == 200) == (request is not None), r.text[:500]
    if r.status_code != 200:
        assert r.json()["error"]["code"] and r.json()["error"]["message"]


WEBUI_POSTS = ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/png-info",
               "/sdapi/v1/interrupt", "/controlnet/detect"]


@settings(max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200), st.sampled_from(["/scc/sd_txt2img", "/scc/sd_img2img", "/scc/sd_get_result",
                                                 "/scc/sd_cancel", *WEBUI_POSTS]))
def test_fuzz_http_raw_bytes(http_client, body, path):
    r = http_client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    assert "error" in r.json() or r.status_code == 200


# ------------------------------------------------------------------------- issue 12: the probe's families
FAST = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@FAST
@given(depth=st.integers(MAX_JSON_DEPTH + 1, 5000), opener=st.sampled_from(["[", '{"k":']),
       where=st.sampled_from(["", '{"prompt": "x", "comments": ', '{"hr_additional_modules": ', '{"taskId": ']),
       path=st.sampled_from(["/scc/sd_txt2img", "/scc/sd_get_result", "/scc/sd_cancel", "/sdapi/v1/txt2img",
                             "/sdapi/v1/options", "/sdapi/v1/png-info", "/controlnet/detect"]))
def test_fuzz_deep_nesting(http_client, depth, opener, where, path):
    closer = "]" if opener == "[" else "}"
    body = where + opener * depth + "1" + closer * depth + ("}" if where else "")
    r = http_client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text[:300]


@FAST
@given(long=st.integers(1, 20000), short=st.integers(1, 64), tall=st.booleans(),
       module=st.sampled_from(["canny", "none", "color", "blur_gaussian", "tile_resample"]),
       resize_mode=st.integers(0, 2), res=st.sampled_from([-1, 64, 512, 2048]), pp=st.booleans(),
       size=st.sampled_from([64, 512, 2048]))
def test_fuzz_thin_images(http_client, long, short, tall, module, resize_mode, res, pp, size):
    """Any accepted unit image has every working size within the limit (planned as the unit computes them);
    any refused one names the unit's input_image."""
    from PIL import Image as PILImage
    import base64
    import io

    w, h = (short, long) if tall else (long, short)
    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    unit = {"model": "tiny-controlnet-sd1", "module": module, "resize_mode": resize_mode, "processor_res": res,
            "pixel_perfect": pp, "input_image": base64.b64encode(buf.getvalue()).decode()}
    payload = {"width": size, "height": size, "alwayson_scripts": {"controlnet": {"units": [unit]}}}
    r = http_client.post("/scc/sd_txt2img", content=json.dumps(payload).encode(),
                         headers={"content-type": "application/json"})
    assert r.status_code in (200, 422), r.text[:300]
    if r.status_code == 422:
        assert r.json()["error"]["field"] == "alwayson_scripts.controlnet.units[0].input_image", r.text[:300]
        return
    from engine.controlnet import unit_sizes
    from engine.controlnet.images import MAX_ASPECT
    from engine.request import ControlNetUnit

    assert max(w, h) <= MAX_ASPECT * min(w, h)
    planned = ControlNetUnit(model="m", image=np.zeros((h, w, 3), np.uint8), module=module,
                             resize_mode=["Just Resize", "Crop and Resize", "Resize and Fill"][resize_mode],
                             processor_res=res, pixel_perfect=pp)
    assert all(1 <= sh * sw <= 4096 * 4096 and sh >= 1 and sw >= 1 for _, sh, sw in unit_sizes(planned, size, size))


@SETTINGS
@given(origin=st.one_of(st.none(), st.sampled_from(["http://localhost", "null", "http://evil.example",
                                                    "https://localhost", "http://localhost:1", "file://"]),
                        st.text(max_size=20)),
       host=st.one_of(st.sampled_from(["localhost", "127.0.0.1:7860", "[::1]", "evil.example", "localhost.evil",
                                       "", "127.0.0.1.nip.io"]), st.text(max_size=20)),
       content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain",
                                                          "application/x-www-form-urlencoded",
                                                          "multipart/form-data; boundary=x",
                                                          "application/json; charset=utf-8", "APPLICATION/JSON"]),
                              st.text(max_size=20)),
       path=st.sampled_from(["/scc/sd_txt2img", "/scc/sd_get_result", "/scc/sd_cancel", "/sdapi/v1/txt2img",
                             "/sdapi/v1/png-info", "/controlnet/detect"]))
def test_fuzz_cross_site_requests(http_client, origin, host, content_type, path):
    """A request from another site (Origin), to another name (Host, DNS rebinding) or with a body type an
    HTML form can send is never accepted; no answer is a 5xx."""
    from api_compat.http import LOOPBACK_NAMES, split_host

    headers = {"host": host}
    if origin is not None:
        headers["origin"] = origin
    if content_type is not None:
        headers["content-type"] = content_type
    try:
        r = http_client.post(path, content=b'{"steps": 1}', headers=headers)
    except (UnicodeEncodeError, httpx.LocalProtocolError):
        return  # not sendable as HTTP
    assert r.status_code < 500, r.text
    good_host = split_host(host) in LOOPBACK_NAMES
    same_site = origin is None or origin.strip().lower().rstrip("/") == "http://" + host.strip().lower().removesuffix(":80")
    json_body = content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"
    if not good_host:
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    elif not same_site:
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    elif not json_body:
        assert r.status_code == 415
    else:
        assert r.status_code in (200, 404, 422)


# --------------------------------------------------------------------- issue 15: the webui's txt2img route
webui_units = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(sorted(ControlNetUnitPayload.model_fields) + ["output_dir", "generated_image",
                                                                                   "use_preview_as_input"]),
                    scalars, max_size=5),
    st.fixed_dictionaries({"model": st.just("tiny-controlnet-sd1"), "enabled": st.booleans(),
                           "image": st.one_of(st.just(png_b64(8, 8)), st.fixed_dictionaries(
                               {"image": st.just(png_b64(8, 8)), "mask": st.one_of(st.none(), scalars)}),
                               json_values)},
                          optional={"mask": st.one_of(st.none(), scalars), "low_vram": st.booleans(),
                                    "hr_option": st.sampled_from(["Both", "Low res only"]),
                                    "output_dir": st.sampled_from(["", "/tmp"])}),
    scalars), max_size=2)
webui_payloads = st.builds(
    lambda fields, key, units: {**fields, **({"alwayson_scripts": {key: {"args": units}}} if units else {})},
    st.dictionaries(top_keys, st.one_of(scalars, json_values), max_size=5),
    st.sampled_from(["controlnet", "ControlNet", "CONTROLNET"]), st.one_of(st.none(), webui_units))


@FAST
@given(payload=st.one_of(webui_payloads, field_aware))
def test_fuzz_webui_txt2img(http_client, store, payload):
    """/sdapi/v1/txt2img: never a 5xx; accepted over HTTP <=> accepted in-process (webui_to_scc, then the /scc
    checks); an accepted call answers the webui's shapes (info a JSON string)."""
    try:
        request = _check(webui_to_scc(payload), store)
    except ApiError as exc:
        assert exc.http_status in (400, 422) and exc.field
        request = None
    r = http_client.post("/sdapi/v1/txt2img", content=json.dumps(payload).encode(),
                         headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 413, 422), r.text[:300]
    if r.status_code != 413:
        assert (r.status_code == 200) == (request is not None), r.text[:300]
    body = r.json()
    if r.status_code == 200:
        assert set(body) == {"images", "parameters", "info"} and isinstance(json.loads(body["info"]), dict)
    else:
        assert body["error"]["code"] and body["detail"]


@pytest.fixture(scope="module")
def options_client(tmp_path_factory, tiny_engine):
    svc = TaskService(results_dir=tmp_path_factory.mktemp("fuzz-options"), max_tasks=200,
                       **{**tiny_engine, "engine_factory": NullEngine})
    client = AsgiClient(create_app(svc, max_body_bytes=256 * 1024))
    yield client
    client.close()
    svc.close()


@FAST
@given(path=st.sampled_from(["/sdapi/v1/options", "/sdapi/v1/png-info", "/controlnet/detect"]),
       body=st.one_of(json_values, st.dictionaries(st.sampled_from(
           ["sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "samples_format",
            "image", "controlnet_module", "controlnet_input_images", "controlnet_processor_res",
            "controlnet_threshold_a", "controlnet_masks", "x"]), st.one_of(scalars, json_values), max_size=4)))
def test_fuzz_webui_json_routes(options_client, path, body):
    """The webui's other JSON routes: any JSON body answers 200 or a 4xx in our error shape, never a 5xx. (Its
    own server: the options it sets must not leak into the other tests' requests.)"""
    r = options_client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 413, 422), r.text[:300]
    if r.status_code != 200:
        assert r.json()["error"]["code"] and r.json()["detail"]
