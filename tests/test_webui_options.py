"""The webui options (``/sdapi/v1/options``) and the webui's listings that answer empty lists.

In-process (the engine double, no model checks): the table (every webui key with its default), what POST takes
and refuses (unknown keys, wrong types, sizes: each error names the key), who may write, what a task record keeps.
Against the real server on the demo model (tests/test_webui_client.py's ``Server``): options checked on the current
model with a request's error, a stored option that no longer fits skipped with a warning, ``samples_format``.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient

from api_compat import TaskService
from api_compat.http import create_app
from api_compat.webui.option_table import DEFAULTS, EFFECTS, MAX_VALUE_BYTES, REQUEST_OPTIONS
from tests.api_support import EngineDouble


@pytest.fixture
def service(tmp_path):
    svc = TaskService(tmp_path / "m", results_dir=tmp_path / "r", engine_factory=EngineDouble, check_models=False)
    yield svc
    svc.close()


def client(service, **kwargs):
    return TestClient(create_app(service, **{k: v for k, v in kwargs.items() if k != "client"}),
                      base_url="http://localhost", **({"client": kwargs["client"]} if "client" in kwargs else {}))


def test_get_shows_every_webui_option_with_its_default(service):
    with client(service) as c:
        options = c.get("/sdapi/v1/options").json()
    for key, default in DEFAULTS.items():
        if key not in ("sd_model_checkpoint", "sd_checkpoint_hash"):
            assert options[key] == default, key
    assert options["send_seed"] is True and options["samples_format"] == "png"
    assert options["CLIP_stop_at_last_layers"] == 1 and options["sd_vae"] == "Automatic"
    assert set(EFFECTS) <= set(DEFAULTS) and set(REQUEST_OPTIONS) <= set(EFFECTS)


def test_a_ui_option_is_stored_and_read_back(service, tmp_path):
    """What the webui's own test does with send_seed: flip it, read it back, restore it."""
    with client(service) as c:
        before = c.get("/sdapi/v1/options").json()["send_seed"]
        assert c.post("/sdapi/v1/options", json={"send_seed": not before}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["send_seed"] is (not before)
        # only what differs from the defaults is written
        assert json.loads((tmp_path / "r" / "webui-options.json").read_text()) == {"send_seed": not before}
        assert c.post("/sdapi/v1/options", json={"send_seed": before}).status_code == 200
        assert json.loads((tmp_path / "r" / "webui-options.json").read_text()) == {}
        # the whole GET answer posted back (clients do) is accepted and changes nothing
        everything = c.get("/sdapi/v1/options").json()
        r = c.post("/sdapi/v1/options", json={**everything, "eta_noise_seed_delta": 31337})
        assert r.status_code == 200, r.text
        assert json.loads((tmp_path / "r" / "webui-options.json").read_text()) == {"eta_noise_seed_delta": 31337}


@pytest.mark.parametrize("body,code,status,field", [
    ({"send_seeds": True}, "unknown_field", 422, "send_seeds"),
    ({"send_seed": True, "no_such_option": 1}, "unknown_field", 422, "no_such_option"),
    ({"send_seed": "yes"}, "invalid_request", 422, "send_seed"),
    ({"jpeg_quality": 1.5}, "invalid_request", 422, "jpeg_quality"),
    ({"jpeg_quality": 101}, "invalid_request", 422, "jpeg_quality"),
    ({"samples_format": "bmp"}, "invalid_request", 422, "samples_format"),
    ({"hide_samplers": ["Euler", 3]}, "invalid_request", 422, "hide_samplers"),
    ({"CLIP_stop_at_last_layers": 13}, "invalid_request", 422, "CLIP_stop_at_last_layers"),
    ({"sd_vae": 3}, "invalid_request", 422, "sd_vae"),
    ({"font": "x" * (MAX_VALUE_BYTES + 1)}, "invalid_request", 422, "font"),
    ({"sd_checkpoint_hash": "abc"}, "not_supported", 422, "sd_checkpoint_hash"),
    # options that would change the images, which the engine does not do: their defaults only
    ({"sd_hypernetwork": "x"}, "not_supported", 422, "sd_hypernetwork"),
    # face restoration with no model installed: refused naming the folders (engine.faces)
    ({"face_restoration": True}, "invalid_request", 422, "face_restoration"),
    ({"code_former_weight": 1.5}, "invalid_request", 422, "code_former_weight"),
    ({"s_noise": 0.9}, "not_supported", 422, "s_noise"),
    ({"sd_vae_decode_method": "Tiny"}, "invalid_request", 422, "sd_vae_decode_method"),
    ({"show_progress_type": "Approx"}, "invalid_request", 422, "show_progress_type"),
    ({"show_progress_every_n_steps": -2}, "invalid_request", 422, "show_progress_every_n_steps"),
    # the model upscalers' tiles act on requests (hires fix, SD upscale): checked as their override_settings
    ({"ESRGAN_tile": 9000}, "invalid_request", 422, "ESRGAN_tile"),
])
def test_a_bad_option_is_refused_naming_it_and_nothing_is_stored(service, tmp_path, body, code, status, field):
    with client(service) as c:
        r = c.post("/sdapi/v1/options", json={"send_seed": False, **body})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["field"] == field
        assert c.get("/sdapi/v1/options").json()["send_seed"] is True  # all or nothing
    assert not (tmp_path / "r" / "webui-options.json").exists()


def test_the_options_body_is_bounded(service):
    with client(service) as c:
        big = {"font": "x" * 4000, "temp_dir": "y" * 4000}
        r = c.post("/sdapi/v1/options", json={k: big[k % 2 and "font" or "temp_dir"] for k in range(70)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post("/sdapi/v1/options", content=b"{" + b" " * 300_000 + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_unsupported_options_at_their_defaults_are_accepted(service):
    with client(service) as c:
        r = c.post("/sdapi/v1/options", json={"sd_hypernetwork": "None", "face_restoration": False, "s_noise": 1})
        assert r.status_code == 200, r.text


def test_api_restricted_options_are_accepted_and_left_alone(service):
    """As the webui: its restrict_api options posted over the API answer 200 and do not change."""
    with client(service) as c:
        assert c.post("/sdapi/v1/options", json={"api_forbid_local_requests": False}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["api_forbid_local_requests"] is True


def test_stored_file_keeps_only_valid_table_keys(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "webui-options.json").write_text(json.dumps(
        {"send_seed": False, "bogus": 1, "jpeg_quality": "high", "sd_checkpoint_hash": "x"}))
    svc = TaskService(tmp_path / "m", results_dir=tmp_path / "r", engine_factory=EngineDouble, check_models=False)
    with client(svc) as c:
        options = c.get("/sdapi/v1/options").json()
    svc.close()
    assert options["send_seed"] is False and options["jpeg_quality"] == 80 and "bogus" not in options


def test_who_may_write_options(service):
    # with credentials configured every route needs them, the options included
    with client(service, api_key="k") as c:
        assert c.post("/sdapi/v1/options", json={"send_seed": False}).status_code == 401
        assert c.post("/sdapi/v1/options", json={"send_seed": False}, headers={"X-API-Key": "k"}).status_code == 200
    # without: loopback clients only (a server bound elsewhere with --insecure-no-auth)
    with client(service, client=("203.0.113.7", 40000)) as c:
        r = c.post("/sdapi/v1/options", json={"send_seed": True})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.get("/sdapi/v1/options").json()["send_seed"] is False  # reading is fine
    with client(service, client=("127.0.0.1", 40000)) as c:
        assert c.post("/sdapi/v1/options", json={"send_seed": True}).status_code == 200
    # --freeze-settings: nobody
    with client(service, api_key="k", freeze_settings=True) as c:
        r = c.post("/sdapi/v1/options", json={"send_seed": False}, headers={"X-API-Key": "k"})
        assert r.status_code == 403 and "freeze-settings" in r.json()["error"]["message"]


def test_task_records_keep_only_the_options_that_act(service):
    """The options reach a request as override_settings only when they act on it (not the UI ones)."""
    with client(service) as c:
        r = c.post("/sdapi/v1/options", json={"send_seed": False, "font": "f" * 4000, "eta_noise_seed_delta": 7,
                                             "samples_format": "png", "CLIP_stop_at_last_layers": 1})
        assert r.status_code == 200, r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        task = json.loads(r.json()["info"])["sdengine_task_id"]
        record = c.post("/scc/sd_get_result", json={"taskId": task}).json()
    # and the live-preview options, always (previews are on by default, as in the webui)
    assert record["parameters"]["override_settings"] == {
        "eta_noise_seed_delta": 7, "live_previews_enable": True, "show_progress_every_n_steps": 10,
        "show_progress_type": "Approx NN", "live_preview_content": "Prompt"}
    assert "f" * 100 not in json.dumps(record)


def test_listings_the_engine_has_none_of(service):
    with client(service) as c:
        for path in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):  # none installed
            r = c.get(f"/sdapi/v1/{path}")
            assert r.status_code == 200 and r.json() == [], path
        assert c.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet", "adetailer"],
                                                     "img2img": ["sd upscale", "controlnet", "adetailer"]}
        info = c.get("/sdapi/v1/script-info").json()
    assert [(s["name"], s["is_alwayson"], s["is_img2img"]) for s in info] == [
        ("controlnet", True, False), ("adetailer", True, False), ("sd upscale", False, True),
        ("controlnet", True, True), ("adetailer", True, True)]
    assert [a["label"] for a in info[2]["args"]] == [None, "Tile overlap", "Upscaler", "Scale Factor"]
    assert set(info[0]["args"][0]) == {"label", "value", "minimum", "maximum", "step", "choices"}


# ------------------------------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    from tests.conftest import exclusive
    from tests.test_webui_client import WEBUI_DEFAULT_PAYLOAD, Server

    root = tmp_path_factory.mktemp("webui-options")
    # a stored option the demo model cannot take (its text encoder has 3 layers), as an older file or another
    # model would leave it
    (root / "results").mkdir()
    (root / "results" / "webui-options.json").write_text(json.dumps({"CLIP_stop_at_last_layers": 12}))
    srv = Server(root, cache_dir=demo_cache)
    try:
        with exclusive(demo_cache):
            r = srv.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 1})
        assert r.status_code == 200, r.text
        yield srv
    finally:  # a failed warm-up does not leave the server running
        srv.stop()


def test_a_stored_option_that_no_longer_fits_is_reported_not_fatal(server):
    from tests.test_webui_client import WEBUI_DEFAULT_PAYLOAD

    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["clip_skip"] == 1
    assert any("CLIP_stop_at_last_layers" in w and "3 layers" in w for w in info["warnings"]), info.get("warnings")
    assert "CLIP_stop_at_last_layers=12" in server.tail()
    # the request's own override_settings are not dropped: its error is the request's
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "override_settings": {"CLIP_stop_at_last_layers": 4}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "override_settings.CLIP_stop_at_last_layers"


def test_options_are_checked_on_the_current_model_with_the_request_error(server):
    r = server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 4})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "CLIP_stop_at_last_layers" and error["allowed"] == "an integer from 1 to 3"
    scc = server.post("/scc/sd_txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 4}})
    # the request's error, naming the option instead of override_settings.CLIP_stop_at_last_layers
    assert scc.status_code == 422 and scc.json()["error"]["message"] == "override_settings." + error["message"]
    r = server.post("/sdapi/v1/options", {"sd_vae": "no-such-vae.safetensors"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sd_vae"
    # a fitting value replaces the stale one: no more warnings
    assert server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}).status_code == 200
    from tests.test_webui_client import WEBUI_DEFAULT_PAYLOAD

    info = json.loads(server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 2}).json()["info"])
    assert info["clip_skip"] == 2 and not info.get("warnings")
    assert server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1}).status_code == 200


def test_samples_format_sets_the_answer_images_format(server):
    from PIL import Image

    from tests.test_webui_client import WEBUI_DEFAULT_PAYLOAD, b64_pixels

    payload = {**WEBUI_DEFAULT_PAYLOAD, "steps": 3, "seed": 11}
    png = server.post("/sdapi/v1/txt2img", payload).json()
    reference = b64_pixels(png["images"][0])
    try:
        for fmt, pil in (("jpg", "JPEG"), ("webp", "WEBP")):
            assert server.post("/sdapi/v1/options", {"samples_format": fmt, "jpeg_quality": 95}).status_code == 200
            body = server.post("/sdapi/v1/txt2img", payload).json()
            with Image.open(io.BytesIO(base64.b64decode(body["images"][0]))) as img:
                assert img.format == pil
                pixels = __import__("numpy").asarray(img.convert("RGB")).astype(int)
                comment = img.getexif().get_ifd(0x8769).get(0x9286)
            # same image, lossy: within a few levels on average
            assert abs(pixels - reference).mean() < 6
            infotext = json.loads(body["info"])["infotexts"][0]
            assert comment is not None and infotext in (comment.decode("utf-16-be", "ignore")
                                                        if isinstance(comment, bytes) else str(comment))
    finally:
        assert server.post("/sdapi/v1/options", {"samples_format": "png"}).status_code == 200
