"""The HTTP contract through the real ASGI app (fastapi TestClient) and once through a real uvicorn on
127.0.0.1 (a free port, stops itself), plus `sdengine serve` and `sdengine txt2img` end to end. Generation is
the real engine on the tiny models, except where a test double (EngineDouble) holds or cancels a task."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from api_compat import TaskService
from api_compat.http import create_app
from tests.api_support import EngineDouble, png_b64, png_infotext, png_pixels, png_seed, tiny_engine, wait_healthy  # noqa: F401
from tests.queue_support import queue_workers, redis_server  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["embedded", "celery"])
def service(request, tmp_path, tiny_engine):
    """The same routes over both task backends: embedded, and celery with real Redis and `sdengine worker`s."""
    if request.param == "celery":
        workers = request.getfixturevalue("queue_workers")
        workers.ensure("tiny")
        svc = TaskService(results_dir=workers.results("tiny"), max_queue=8, configs={"other": {}},
                           queue=workers.url("tiny"), **tiny_engine)
    else:
        svc = TaskService(results_dir=tmp_path / "results", max_queue=8, configs={"other": {}}, **tiny_engine)
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service, max_body_bytes=64 * 1024), base_url="http://localhost") as c:
        yield c


def poll(client, task_id, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.post("/scc/sd_get_result", json={"taskId": task_id})
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("succeeded", "failed"):
            return r.json()
        time.sleep(0.02)
    raise AssertionError("task did not finish")


def test_submit_poll_and_fetch_images(client):
    r = client.post("/scc/sd_txt2img", json={"prompt": "a cat", "seed": 11, "batch_size": 2, "steps": 2,
                                             "width": 64, "height": 64})
    assert r.status_code == 200 and set(r.json()) == {"taskId", "status"} and r.json()["status"] == "waiting"
    result = poll(client, r.json()["taskId"])
    assert result["status"] == "succeeded" and result["parameters"]["prompt"] == "a cat"
    assert all(u.startswith("http://localhost/scc/images/") for u in result["images"])
    for i, url in enumerate(result["images"]):
        image = client.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        text = png_infotext(image.content)
        assert text.startswith("a cat\nSteps: 2, Sampler: Euler a, ") and f"Seed: {11 + i}, Size: 64x64" in text
        assert "Model: tiny-sd1" in text and png_pixels(image.content).shape == (64, 64, 3)
    assert result["info"]["all_seeds"] == [11, 12] and result["info"]["sd_model_name"] == "tiny-sd1"


def test_webui_client_payload_is_served_leniently(client):
    """What webui clients send (the extension's template, client libraries): unknown fields (ignored and named in
    info.warnings, here and where the worker translates the payload again), a scheduler by its /schedulers name,
    a sampler in another case, the hires fix at denoising strength 0 (the webui upscales and decodes), a
    disabled ADetailer."""
    r = client.post("/scc/sd_txt2img", json={
        "prompt": "a cat", "seed": 3, "steps": 2, "width": 64, "height": 64, "seed_enable_extras": True,
        "override_settings_texts": [], "scheduler": "automatic", "sampler_name": "euler A", "enable_hr": True,
        "denoising_strength": 0, "hr_scale": 2, "hr_scheduler": "karras",
        "alwayson_scripts": {"ADetailer": {"args": [False, False, {"ad_model": "face_yolov8n.pt"}]}}})
    assert r.status_code == 200, r.text
    result = poll(client, r.json()["taskId"])
    assert result["status"] == "succeeded", result
    warnings = result["info"]["warnings"]
    for name in ("seed_enable_extras", "override_settings_texts"):
        assert f"{name}: unknown field, ignored (sdengine serve --strict refuses it)" in warnings, warnings
    image = client.get(result["images"][0])
    assert png_pixels(image.content).shape == (128, 128, 3)  # the hires size, with no second pass run
    text = png_infotext(image.content)
    assert "Sampler: Euler a, Schedule type: Automatic" in text and "Denoising strength: 0," in text, text


def test_validation_errors_name_the_field(client, service):
    r = client.post("/scc/sd_txt2img", json={"alwayson_scripts": {"controlnet": {"units": [
        {"model": "c", "input_image": png_b64()}, {"model": "c", "input_image": png_b64(), "weight": 5}]}}})
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["field"] == "alwayson_scripts.controlnet.units[1].weight"
    assert body["error"]["allowed"] == "a number from 0 to 2" and body["error"]["code"] == "invalid_request"
    r = client.post("/scc/sd_txt2img", json={"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "hr_upscaler"
    assert "Latent (nearest-exact)" in r.json()["error"]["allowed"] and "Lanczos" in r.json()["error"]["allowed"]
    service.strict = True  # sdengine serve --strict
    r = client.post("/scc/sd_txt2img", json={"image_cfg_scale": 1.5})  # an img2img field
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_field"
    r = client.post("/scc/sd_txt2img", json={"stepz": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_field"
    service.strict = False
    r = client.post("/scc/sd_txt2img", json={}, headers={"X-SP-RESOURCE-CONFIG-ID": "nope"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "headers.X-SP-RESOURCE-CONFIG-ID"
    r = client.post("/scc/sd_txt2img", json={}, headers={"X-SP-RESOURCE-CONFIG-ID": "other"})
    assert r.status_code == 200


@pytest.mark.parametrize("body,status", [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b"\xff\xfe", 400),
                                         (b"null", 400), (b'"text"', 400)])
def test_malformed_bodies(client, body, status):
    r = client.post("/scc/sd_txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["code"] == "bad_request"


def test_body_size_limit(client):
    big = {"prompt": "x" * 70000}
    r = client.post("/scc/sd_txt2img", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the stream is counted
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/scc/sd_txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_queue_full_is_429(tmp_path):
    gate = threading.Event()

    class Blocked(EngineDouble):
        """TEST DOUBLE: holds the worker until the test releases it."""

        def generate(self, request, *, progress=None, cancel=None):
            gate.wait(120)  # released by the test (finally: always); a short wait let the queue drain under load
            return super().generate(request, progress=progress, cancel=cancel)

    svc = TaskService(tmp_path, results_dir=tmp_path / "r", engine_factory=Blocked, check_models=False,
                       max_queue=2)
    try:
        with TestClient(create_app(svc), base_url="http://localhost") as c:
            codes = [c.post("/scc/sd_txt2img", json={}).status_code for _ in range(5)]
            assert codes.count(200) in (2, 3) and codes[-1] == 429
            r = c.post("/scc/sd_txt2img", json={})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            gate.set()
    finally:
        gate.set()
        svc.close()


@pytest.mark.parametrize("path", [
    "/scc/images/0123456789abcdef0123456789abcdef/0.png",
    "/scc/images/../tasks.sqlite3",
    "/scc/images/..%2Ftasks.sqlite3/0.png",
    "/scc/images/x/..%2F..%2Ftasks.sqlite3",
    "/scc/images/%2E%2E/%2E%2E%2Ftasks.sqlite3",
    "/scc/images/0123456789abcdef0123456789abcdef/-1.png",
    "/scc/images/0123456789abcdef0123456789abcdef/0.png%00",
])
def test_image_route_takes_ids_only(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"CREATE TABLE" not in r.content and b"SQLite" not in r.content


def test_image_index_out_of_range(client):
    task = client.post("/scc/sd_txt2img", json={"steps": 1, "width": 64, "height": 64}).json()["taskId"]
    poll(client, task)
    assert client.get(f"/scc/images/{task}/0.png").status_code == 200
    assert client.get(f"/scc/images/{task}/1.png").status_code == 404
    for name in ("00.png", "0.PNG", "0.png.png", "0", "1e0.png", " 0.png"):
        assert client.get(f"/scc/images/{task}/{name}").status_code == 404


def test_wrong_methods_and_paths_answer_json(client):
    r = client.get("/scc/sd_txt2img")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/health")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_image_payloads_are_validated_off_the_event_loop(client):
    """A submit with a ControlNet image goes through the heavy-work pool (api_compat.guard); the answer is the
    same. The task runs the real tiny ControlNet (canny on a 256x256 input, fitted to 64x64)."""
    unit = {"model": "tiny-controlnet-sd1", "module": "canny", "input_image": png_b64(256, 256)}
    r = client.post("/scc/sd_txt2img", json={"steps": 1, "width": 64, "height": 64,
                                             "alwayson_scripts": {"controlnet": {"units": [unit]}}})
    assert r.status_code == 200, r.text
    result = poll(client, r.json()["taskId"])
    assert result["status"] == "succeeded", result.get("error")
    infotext = result["info"]["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: tiny-controlnet-sd1' in infotext, infotext
    assert result["parameters"]["alwayson_scripts"]["controlnet"]["units"][0]["input_image"].startswith("<image: ")
    bad = {**unit, "weight": 9}
    r = client.post("/scc/sd_txt2img", json={"alwayson_scripts": {"controlnet": {"units": [bad]}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "alwayson_scripts.controlnet.units[0].weight"


def test_unknown_task_is_404(client):
    r = client.post("/scc/sd_get_result", json={"taskId": "0" * 32})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/scc/sd_get_result", json={"taskId": "../../etc"})
    assert r.status_code == 404
    r = client.post("/scc/sd_get_result", json=[1])
    assert r.status_code == 400


def test_cancel_route(tmp_path):
    svc = TaskService(tmp_path, results_dir=tmp_path / "r", check_models=False,
                       engine_factory=lambda c: EngineDouble(c, step_delay=0.02))
    try:
        with TestClient(create_app(svc), base_url="http://localhost") as c:
            task = c.post("/scc/sd_txt2img", json={"prompt": "SLOW", "steps": 150}).json()["taskId"]
            c.post("/scc/sd_cancel", json={"taskId": task})
            result = poll(c, task, 10)
            assert result["status"] == "failed" and result["error"]["code"] == "cancelled"
    finally:
        svc.close()


def test_health_and_openapi(client):
    health = client.get("/health").json()
    devices = health["devices"]
    assert health["status"] == "ok" and devices and all(d["alive"] and d["device"] == "cpu" for d in devices.values())
    assert all("default" in d["configs"] and "other" in d["configs"] for d in devices.values())
    spec = client.get("/openapi.json").json()
    assert "/scc/sd_txt2img" in spec["paths"] and "/scc/sd_get_result" in spec["paths"]
    img2img = spec["paths"]["/scc/sd_img2img"]["post"]
    assert img2img["operationId"] == "sd_img2img"
    assert img2img["requestBody"]["content"]["application/json"]["schema"]["$ref"] == \
        "#/components/schemas/Img2ImgPayload"
    i2i = spec["components"]["schemas"]["Img2ImgPayload"]
    assert {"init_images", "denoising_strength", "resize_mode", "mask", "inpainting_fill"} <= set(i2i["properties"])
    assert "init_images" in i2i["required"] and "enable_hr" not in i2i["properties"]
    assert {"enable_hr", "hr_scale", "hr_upscaler", "hr_cfg"} <= set(spec["components"]["schemas"][
        "Txt2ImgPayload"]["properties"])
    body = spec["paths"]["/scc/sd_txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/Txt2ImgPayload"
    schemas = spec["components"]["schemas"]
    assert "negtive_prompt" in schemas["Txt2ImgPayload"]["properties"]
    assert "ControlNetUnitPayload" in schemas and "input_image" in schemas["ControlNetUnitPayload"]["properties"]
    assert not [r for r in json.dumps(spec).split('"$ref": "')[1:] if not r.startswith("#/components/schemas/")]


def test_img2img_route(client):
    """POST /scc/sd_img2img: the same task model (taskId, sd_get_result), an inpainting payload with a mask,
    over both task backends (the Celery worker translates the img2img payload by its kind)."""
    import base64
    import io

    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    payload = {"init_images": [b64(init)], "prompt": "a cat", "seed": 4, "steps": 4, "width": 64, "height": 64,
               "denoising_strength": 0.5, "mask": b64(mask), "mask_blur": 0, "inpaint_full_res": False,
               "inpainting_fill": 1, "override_settings": {"img2img_fix_steps": True, "samples_save": True}}
    r = client.post("/scc/sd_img2img", json=payload)
    assert r.status_code == 200 and set(r.json()) == {"taskId", "status"}, r.text
    result = poll(client, r.json()["taskId"])
    assert result["status"] == "succeeded", result
    assert result["parameters"]["denoising_strength"] == 0.5
    assert result["parameters"]["init_images"][0] == payload["init_images"][0] or \
        result["parameters"]["init_images"][0].startswith("<image:")
    text = result["info"]["infotexts"][0]
    assert "Denoising strength: 0.5" in text and "Seed: 4" in text
    png = client.get(result["images"][0].replace("http://localhost", ""))
    pixels = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert (pixels[:8] == (200, 40, 40)).all(), "the unmasked pixels are the init image's"
    bad = client.post("/scc/sd_img2img", json={**payload, "override_settings": {"upscaler_for_img2img": "ESRGAN"}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "override_settings.upscaler_for_img2img"
    bad = client.post("/scc/sd_img2img", json={"prompt": "no image"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "init_images"


def test_api_key(service):
    with TestClient(create_app(service, api_key="s3cret"), base_url="http://localhost") as c:
        assert c.post("/scc/sd_txt2img", json={}).status_code == 401
        assert c.post("/scc/sd_txt2img", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/scc/images/" + "0" * 32 + "/0.png").status_code == 401
        assert c.post("/scc/sd_txt2img", json={}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/scc/sd_txt2img", json={}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200
        r = c.post("/scc/sd_get_result", json={"taskId": "0" * 32})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def _free_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_real_uvicorn_on_loopback(service):
    import uvicorn

    sock = _free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 20
        while not server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start within 20 s"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            task = http.post("/scc/sd_txt2img", json={"seed": 3, "steps": 1, "width": 64, "height": 64}).json()
            deadline = time.monotonic() + 120
            while (result := http.post("/scc/sd_get_result", json=task).json())["status"] not in ("succeeded",
                                                                                                 "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert result["status"] == "succeeded"
            assert result["images"][0].startswith(f"http://127.0.0.1:{port}/scc/images/")
            png = http.get(result["images"][0])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert "Seed: 3, Size: 64x64" in png_infotext(png.content) and "Model: tiny-sd1" in png_infotext(png.content)
            assert http.post("/scc/sd_txt2img", json={"steps": 0}).status_code == 422
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def _own_store(tiny_store, root: Path) -> Path:
    """A model store of its own holding tiny-sd1 (the CLI writes its artefacts into ``<models-dir>/cache``; the
    session's shared store stays read-only)."""
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copyfile(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors",
                    root / "Stable-diffusion" / "tiny-sd1.safetensors")
    return root


def test_sdengine_serve_subprocess(tmp_path, tiny_store):
    """`sdengine serve` as users run it: binds 127.0.0.1, checks the API key, validates against its model store,
    stops on SIGTERM. (Generation over a real socket: test_real_uvicorn_on_loopback, same app and service; the
    CLI's default engine: test_cli_txt2img_payload_and_flags. No task is queued here: building the engine in a
    fresh process costs ~10 s and SIGTERM would wait for it.)"""
    models = _own_store(tiny_store, tmp_path / "m")
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDENGINE_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(models),
         "--results-dir", str(tmp_path / "r")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers={"X-API-Key": "k"}) as http:
            wait_healthy(f"http://127.0.0.1:{port}", proc, lambda: "sdengine serve did not come up", 30, 0.1)
            assert http.post("/scc/sd_txt2img", json={}, headers={"X-API-Key": "wrong"}).status_code == 401
            r = http.post("/scc/sd_txt2img", json={"stable_diffusion_model": "nope", "steps": 1})
            assert r.status_code == 422 and r.json()["error"]["code"] == "model_not_found"
            assert "tiny-sd1" in r.json()["error"]["message"], "the error lists the store's checkpoints"
            assert http.post("/scc/sd_txt2img", json={"steps": 0}).status_code == 422
            assert http.get("/health").json()["devices"]["cpu"]["waiting"] == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM)
    assert proc.returncode in (0, -15), out.decode(errors="replace")[-2000:]
    assert b"Application shutdown complete" in out and f"127.0.0.1:{port}".encode() in out
    # its server.json goes with it (uvicorn's re-raised SIGTERM used to end the process before the finally ran)
    assert not (tmp_path / "r" / "server.json").exists()


def test_cli_txt2img_payload_and_flags(tmp_path, tiny_store):
    """`sdengine txt2img` on the real engine (tiny-sd1, ONNX Runtime): payload file, stdin and flags."""
    from cli import main

    payload = tmp_path / "p.json"
    payload.write_text(json.dumps({"prompt": "from file", "negtive_prompt": "n", "seed": 5, "steps": 2, "width": 64,
                                   "height": 64}))
    runner = CliRunner()
    base = ["txt2img", "--models-dir", str(_own_store(tiny_store, tmp_path / "m")), "--results-dir",
            str(tmp_path / "r"), "--model", "tiny-sd1", "--steps", "2"]
    r = runner.invoke(main, base + ["--output", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    text = png_infotext(tmp_path / "out.png")
    assert "\nSteps: 2, Sampler: Euler a, " in text and "Size: 64x64" in text and "Model: tiny-sd1" in text
    assert png_pixels(tmp_path / "out.png").shape == (64, 64, 3)
    r = runner.invoke(main, base + [str(payload), "--seed", "9", "--batch-size", "2", "-o", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    outs = [tmp_path / "b-1.png", tmp_path / "b-2.png"]
    assert [png_seed(p) for p in outs] == [9, 10]
    assert str(outs[0]) in r.output and str(outs[1]) in r.output
    assert png_infotext(outs[0]).startswith("from file\nNegative prompt: n\n")
    r = runner.invoke(main, base + ["-", "--output", str(tmp_path / "one.png")], input=json.dumps({"seed": 4}))
    assert r.exit_code == 0, r.output
    assert png_seed(tmp_path / "one.png") == 4
    (path,) = [line for line in r.stdout.splitlines() if line.endswith(".png")]
    assert Path(path) == tmp_path / "one.png" and len(list((tmp_path / "r" / "images").glob("*.png"))) == 4
    r = runner.invoke(main, base + ["--model", "nope"])
    assert r.exit_code == 1 and "stable_diffusion_model" in r.output and "tiny-sd1" in r.output
    r = runner.invoke(main, base + ["--steps", "0"])
    assert r.exit_code == 1 and "steps" in r.output and "allowed" in r.output
    r = runner.invoke(main, base + ["--width", "72"])  # a multiple of 8 (the API) but not of 16 (this UNet)
    assert r.exit_code == 1 and "invalid_request" in r.output and "width" in r.output


def test_missing_server_extra_has_a_clear_message(service, monkeypatch):
    from core.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingDependency, match=r"sdengine\[server\]"):
        create_app(service)
