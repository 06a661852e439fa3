"""A client written the way webui API clients are written -- plain ``requests`` calls, the webui's full default
txt2img payload, HTTP Basic auth (``--api-auth``), base64 images, ``info`` parsed as JSON -- against the real
server process (``python -m cli serve``) on the bundled demo model (ONNX Runtime backend).

Reference for the pixels: the same server's ``/scc/sd_txt2img`` for the same payload; tolerance: none (pixel-equal,
both run the same engine on the same queue).
"""

from __future__ import annotations

import base64
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

import numpy as np
import pytest
import requests

from tests.conftest import exclusive
from tests.api_support import wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("webui", "s3cret")
PROMPT = "a large red circle in the middle on a blue background"

# what webui clients send: the txt2img payload with every field at the webui's defaults (as the webui's own UI
# and client libraries such as webuiapi fill it), hires fix off with its hr_* defaults
WEBUI_DEFAULT_PAYLOAD = {
    "prompt": PROMPT, "negative_prompt": "", "styles": [], "seed": 1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a", "scheduler": "Automatic",
    "batch_size": 1, "n_iter": 1, "steps": 12, "cfg_scale": 1.5, "width": 64, "height": 64,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": 1.0, "denoising_strength": 0.7, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": {}, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m cli serve`` in a subprocess (127.0.0.1, a free port, --api-auth)."""

    def __init__(self, root: Path, *extra: str, cache_dir: Path | None = None):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # OMP_NUM_THREADS: the test run's (tests/conftest.py)
        if cache_dir is not None:  # serve takes its export cache from the environment
            env["SDENGINE_CACHE_DIR"] = str(cache_dir)
        env.pop("SDENGINE_API_KEY", None)
        self.log = open(root / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port), "--models-dir",
             str(root / "models"), "--results-dir", str(root / "results"), "--backend", "onnxruntime",
             "--api-auth", ":".join(AUTH), *extra],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.proc, self.tail)
        except BaseException:  # a server that never became healthy is not left running
            self.stop()
            raise

    def tail(self) -> str:
        self.log.flush()
        return (self.root / f"server-{self.port}.log").read_bytes().decode(errors="replace")[-3000:]

    def get(self, path, **kw):
        return requests.get(self.url + path, auth=AUTH, timeout=kw.pop("timeout", 300), **kw)

    def post(self, path, payload=None, **kw):
        return requests.post(self.url + path, json=payload, auth=AUTH, timeout=kw.pop("timeout", 600), **kw)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    root = tmp_path_factory.mktemp("webui-server")
    # a second checkpoint (the demo's weights under another name), for the options to switch to
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copyfile(ROOT / "engine" / "models" / "bundled" / "Stable-diffusion" / "sdengine-demo.safetensors",
                    root / "models" / "Stable-diffusion" / "demo-copy.safetensors")
    srv = Server(root, cache_dir=demo_cache)
    # the first generation exports the demo model (ONNX) unless another module did; every test after it runs warm
    try:
        with exclusive(demo_cache):
            r = srv.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 1})
        assert r.status_code == 200, r.text
        yield srv
    finally:  # a failed warm-up does not leave the server running
        srv.stop()


def b64_pixels(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def scc_images(srv: Server, payload: dict, route: str = "/scc/sd_txt2img") -> tuple[dict, list[np.ndarray]]:
    """The same payload through /scc/sd_txt2img (or ``route``) + sd_get_result, images fetched from their URLs."""
    r = srv.post(route, payload)
    assert r.status_code == 200, r.text
    task = r.json()["taskId"]
    end = time.monotonic() + 600
    while True:
        result = srv.post("/scc/sd_get_result", {"taskId": task}).json()
        if result["status"] in ("succeeded", "failed"):
            break
        assert time.monotonic() < end
        time.sleep(0.05)
    assert result["status"] == "succeeded", result
    return result, [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
        io.BytesIO(requests.get(u, auth=AUTH, timeout=30).content)).convert("RGB")) for u in result["images"]]


def test_txt2img_default_payload_is_pixel_equal_to_scc(server):
    r = server.post("/sdapi/v1/txt2img", WEBUI_DEFAULT_PAYLOAD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["seed"] == 1 and info["all_seeds"] == [1] and info["width"] == 64 and info["steps"] == 12
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "sdengine-demo"
    assert info["infotexts"][0].startswith(PROMPT + "\nSteps: 12, Sampler: Euler a, ")
    assert info["restore_faces"] is False and info["index_of_first_image"] == 0 and info["styles"] == []
    # parameters: the request as the webui echoes it (every field, as sent)
    assert body["parameters"]["prompt"] == PROMPT and body["parameters"]["enable_hr"] is False
    assert body["parameters"]["sampler_index"] == "Euler" and body["parameters"]["send_images"] is True
    (image,) = body["images"]
    webui = b64_pixels(image)
    assert webui.shape == (64, 64, 3)
    # the task is one of the store's: sd_get_result knows it
    task = info["sdengine_task_id"]
    assert server.post("/scc/sd_get_result", {"taskId": task}).json()["status"] == "succeeded"
    result, (scc,) = scc_images(server, WEBUI_DEFAULT_PAYLOAD)
    assert np.array_equal(webui, scc), "the webui route and /scc must make the same pixels"
    assert result["info"]["infotexts"] == info["infotexts"]
    # and the demo model drew what was asked (the evaluator of training/ reads the scene)
    from training.evaluate import analyse

    det = analyse(webui)
    assert (det.colour, det.shape, det.background) == ("red", "circle", "blue")


def test_batch_and_iterations(server):
    payload = {**WEBUI_DEFAULT_PAYLOAD, "seed": 40, "batch_size": 2, "n_iter": 2, "steps": 6}
    r = server.post("/sdapi/v1/txt2img", payload)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 4 and info["all_seeds"] == [40, 41, 42, 43]
    assert [t.split("Seed: ")[1].split(",")[0] for t in info["infotexts"]] == ["40", "41", "42", "43"]
    _, scc = scc_images(server, payload)
    for a, b in zip(body["images"], scc):
        assert np.array_equal(b64_pixels(a), b)
    # send_images false: no images, the rest as usual
    r = server.post("/sdapi/v1/txt2img", {**payload, "send_images": False, "n_iter": 1})
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["all_seeds"] == [40, 41]


def _edges_png() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse((6, 6, 30, 30), outline="white", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_as_the_extension_is_called(server):
    scripts = server.get("/sdapi/v1/scripts").json()
    assert "controlnet" in scripts["txt2img"]  # how clients detect the extension
    assert server.get("/controlnet/version").json()["version"] >= 2
    models = server.get("/controlnet/model_list").json()["model_list"]
    assert any(m.startswith("sdengine-demo-canny [") for m in models)
    assert "canny" in server.get("/controlnet/module_list").json()["module_list"]
    unit = {"enabled": True, "module": "none", "model": models[0], "weight": 1.0, "image": {"image": _edges_png(),
            "mask": None}, "resize_mode": "Crop and Resize", "low_vram": False, "processor_res": 64,
            "threshold_a": 64, "threshold_b": 64, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "pixel_perfect": False, "hr_option": "Both", "mask": None}
    payload = {**WEBUI_DEFAULT_PAYLOAD, "prompt": "a large red circle on a blue background", "seed": 5,
               "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    r = server.post("/sdapi/v1/txt2img", payload)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    # the image, then the detected map (the extension's default save_detected_map)
    assert len(body["images"]) == 2 and info["detected_maps"] == 1 and len(info["infotexts"]) == 1
    assert "ControlNet 0: " in info["infotexts"][0] and "ControlNet 0" in info["extra_generation_params"]
    detected = b64_pixels(body["images"][1])
    assert detected.shape == (64, 64, 3) and detected.max() == 255  # the white ring
    # same unit as /scc takes it (input_image string, detected map asked explicitly): same pixels
    scc_unit = {k: v for k, v in unit.items() if k != "image"}
    scc_unit.update(input_image=_edges_png(), save_detected_map=True)
    _, scc = scc_images(server, {**payload, "alwayson_scripts": {"controlnet": {"args": [scc_unit]}}})
    assert np.array_equal(b64_pixels(body["images"][0]), scc[0]) and np.array_equal(detected, scc[1])
    without = server.post("/sdapi/v1/txt2img", {**payload, "alwayson_scripts": {}}).json()
    assert not np.array_equal(b64_pixels(without["images"][0]), b64_pixels(body["images"][0]))
    # /controlnet/detect runs the same preprocessors
    r = server.post("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [_edges_png()],
                                           "controlnet_processor_res": 64, "controlnet_threshold_a": 100,
                                           "controlnet_threshold_b": 200})
    assert r.status_code == 200 and r.json()["info"] == "Success"
    assert b64_pixels(r.json()["images"][0]).max() == 255
    # a unit asking for a mask is refused, naming the field
    bad = dict(unit, image={"image": _edges_png(), "mask": _edges_png()})
    r = server.post("/sdapi/v1/txt2img", {**payload, "alwayson_scripts": {"controlnet": {"args": [bad]}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "alwayson_scripts.controlnet.args[0].image.mask"


def test_models_options_and_listings(server):
    models = server.get("/sdapi/v1/sd-models").json()
    (demo,) = [m for m in models if m["model_name"] == "sdengine-demo"]
    (copy,) = [m for m in models if m["model_name"] == "demo-copy"]
    assert copy["filename"] == "Stable-diffusion/demo-copy.safetensors" and copy["sha256"] == demo["sha256"]
    assert demo["title"] == f"sdengine-demo.safetensors [{demo['hash']}]" and demo["sha256"].startswith(demo["hash"])
    samplers = {s["name"]: s for s in server.get("/sdapi/v1/samplers").json()}
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    assert "Karras" in [s["label"] for s in server.get("/sdapi/v1/schedulers").json()]
    assert server.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    loras = server.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["path"]) for x in loras] == [
        ("sdengine-demo-red2blue", "bundled/Lora/sdengine-demo-red2blue.safetensors")]
    assert loras[0]["alias"] == "sdengine-demo-red2blue" and server.get("/sdapi/v1/sd-vae").json() == []
    assert [u["name"] for u in server.get("/sdapi/v1/upscalers").json()][0] == "None"
    assert server.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    assert server.get("/sdapi/v1/cmd-flags").json()["api"] is True
    assert server.post("/sdapi/v1/refresh-checkpoints").status_code == 200

    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == demo["title"] and options["CLIP_stop_at_last_layers"] == 1
    # setting the checkpoint loads it (a one-step task on the queue) and it stays the current one
    r = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "demo-copy.safetensors"})
    assert r.status_code == 200, r.text
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == f"demo-copy.safetensors [{demo['hash']}]"
    body = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 3}).json()
    assert json.loads(body["info"])["sd_model_name"] == "demo-copy"
    # posting back what GET gave (clients do) loads nothing; switching back loads the demo again
    assert server.post("/sdapi/v1/options", {**options, "CLIP_stop_at_last_layers": 2}).status_code == 200
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": demo["title"]}).status_code == 200
    options = server.get("/sdapi/v1/options").json()
    assert options["CLIP_stop_at_last_layers"] == 2 and options["sd_model_checkpoint"] == demo["title"]
    payload = {**WEBUI_DEFAULT_PAYLOAD, "seed": 8, "steps": 6}
    body = server.post("/sdapi/v1/txt2img", payload).json()
    info = json.loads(body["info"])
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    _, (scc,) = scc_images(server, {**payload, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert np.array_equal(b64_pixels(body["images"][0]), scc)
    # the request's own override_settings win over the options
    body = server.post("/sdapi/v1/txt2img", {**payload, "override_settings": {"CLIP_stop_at_last_layers": 1}})
    assert json.loads(body.json()["info"])["clip_skip"] == 1
    r = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope.safetensors"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sd_model_checkpoint"
    r = server.post("/sdapi/v1/options", {"sd_hypernetwork": "x"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sd_hypernetwork"
    # override_settings_restore_afterwards false keeps the request's settings (as the webui)
    body = server.post("/sdapi/v1/txt2img", {**payload, "override_settings": {"CLIP_stop_at_last_layers": 3},
                                             "override_settings_restore_afterwards": False})
    assert body.status_code == 200 and server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 3
    assert server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1}).status_code == 200


def test_embeddings_listing(server):
    """/sdapi/v1/embeddings in the webui's shape ({"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name,
    shape, vectors}}, "skipped": {...}}) for files written into the store while the server runs: loaded = those
    the current checkpoint (the demo model, one 64-wide text encoder) uses, skipped = SD1.5-width and SDXL
    (clip_l + clip_g) files; a pickle is not listed (pickles are refused by this server). The loaded one is
    the one a prompt triggers (TI hashes), the skipped one is not."""
    import torch
    from safetensors.torch import save_file

    from engine.infotext import parse_infotext

    folder = server.root / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))},
                  str(folder / "sdglow.safetensors"),
                  metadata={"step": "300", "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "sdengine-demo"})
        save_file({"clip_l": torch.zeros(3, 768), "clip_g": torch.zeros(3, 1280)}, str(folder / "sdglowxl.safetensors"))
        save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "sdglowbig.safetensors"))
        torch.save({"string_to_param": {"*": torch.zeros(2, 64)}, "step": 5}, folder / "sdold.pt")
        listing = server.get("/sdapi/v1/embeddings").json()
        none = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        assert listing == {
            "loaded": {"sdglow": {"step": 300, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "sdengine-demo",
                                  "shape": 64, "vectors": 2}},
            "skipped": {"sdglowxl": {**none, "shape": 2048, "vectors": 3},
                        "sdglowbig": {**none, "shape": 768, "vectors": 1}}}
        for prompt, used in ((PROMPT + ", sdglow", True), (PROMPT + ", sdglowbig", False)):
            r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "prompt": prompt, "steps": 2})
            assert r.status_code == 200, r.text
            params = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])[2]
            assert ("sdglow: " in params.get("TI hashes", "")) is used, params
    finally:
        shutil.rmtree(folder)
    assert server.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


def _long(seed: int) -> dict:
    return {**WEBUI_DEFAULT_PAYLOAD, "seed": seed, "steps": 150, "width": 256, "height": 256, "n_iter": 4}


def _wait_running(server: Server, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = server.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] > 0:
            return p
        time.sleep(0.05)
    raise AssertionError("no task started running")


def test_progress_polled_from_a_second_thread(server):
    seen: list[dict] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            seen.append(requests.get(server.url + "/sdapi/v1/progress", auth=AUTH, timeout=30).json())
            time.sleep(0.05)

    payload = {**WEBUI_DEFAULT_PAYLOAD, "seed": 3, "steps": 150}
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        r = server.post("/sdapi/v1/txt2img", payload)
    finally:
        stop.set()
        poller.join()
    assert r.status_code == 200, r.text
    running = [p for p in seen if p["state"]["sampling_step"] > 0]
    assert running, "the poller never saw the task running"
    steps = [p["state"]["sampling_step"] for p in running]
    assert steps == sorted(steps) and all(p["state"]["sampling_steps"] == 150 for p in running)
    assert all(0 < p["progress"] <= 1 and p["state"]["job_count"] == 1 for p in running)
    # live previews at the webui's default options (every 10 steps; "Approx NN" without its file: "Approx cheap",
    # the latent's own size), from the first interval on, while the task runs
    previews = [p["current_image"] for p in running if p["current_image"]]
    assert previews and all(p["current_image"] is None for p in running if p["state"]["sampling_step"] < 10)
    assert b64_pixels(previews[-1]).shape == (8, 8, 3)
    idle = server.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_live_previews_scc_opt_in_and_taesd_methods(server):
    """/scc: previews only for a payload that turns them on, shown only to a poll that asks (current_image: true);
    TAESD previews at full size; the TAESD decode method per request and as a webui option."""
    payload = {**WEBUI_DEFAULT_PAYLOAD, "seed": 5, "steps": 150, "override_settings": {
        "live_previews_enable": True, "show_progress_type": "TAESD", "show_progress_every_n_steps": 2,
        "live_preview_content": "Combined"}}
    task = server.post("/scc/sd_txt2img", payload).json()["taskId"]
    try:
        end = time.monotonic() + 300
        while True:
            asked = server.post("/scc/sd_get_result", {"taskId": task, "current_image": True}).json()
            plain = server.post("/scc/sd_get_result", {"taskId": task}).json()
            assert "current_image" not in plain and "current_image" not in (plain.get("progress") or {})
            if asked["status"] == "running" and asked.get("current_image"):
                break
            assert asked["status"] in ("waiting", "running") and time.monotonic() < end, asked
            time.sleep(0.1)
        assert b64_pixels(asked["current_image"]).shape == (64, 64, 3)
        assert asked["current_image_step"] % 2 == 0 and "current_image" not in asked["progress"]
    finally:
        server.post("/scc/sd_cancel", {"taskId": task})
    quiet = server.post("/scc/sd_txt2img", {**WEBUI_DEFAULT_PAYLOAD, "seed": 6, "steps": 150}).json()["taskId"]
    try:
        end = time.monotonic() + 300
        while True:  # no opt-in at submit: no preview is made
            result = server.post("/scc/sd_get_result", {"taskId": quiet, "current_image": True}).json()
            if result["status"] == "running" and result["progress"]["step"] >= 20:
                assert result["current_image"] is None
                break
            assert time.monotonic() < end, result
            time.sleep(0.1)
    finally:
        server.post("/scc/sd_cancel", {"taskId": quiet})
    # the decode method: TAESD is another decoder than the demo model's VAE (other pixels), per request and as
    # the webui option; an unknown method is refused naming the option
    base = {**WEBUI_DEFAULT_PAYLOAD, "seed": 9, "steps": 2}
    full = b64_pixels(server.post("/sdapi/v1/txt2img", base).json()["images"][0])
    taesd = b64_pixels(server.post("/sdapi/v1/txt2img", {**base, "override_settings": {
        "sd_vae_decode_method": "TAESD"}}).json()["images"][0])
    assert full.shape == taesd.shape and np.abs(full.astype(int) - taesd.astype(int)).mean() > 1.0
    assert server.post("/sdapi/v1/options", {"sd_vae_decode_method": "TAESD"}).status_code == 200
    try:
        again = b64_pixels(server.post("/sdapi/v1/txt2img", base).json()["images"][0])
        assert np.array_equal(again, taesd)
    finally:
        assert server.post("/sdapi/v1/options", {"sd_vae_decode_method": "Full"}).status_code == 200
    bad = server.post("/sdapi/v1/options", {"sd_vae_decode_method": "Tiny"})
    assert bad.status_code == 422 and "sd_vae_decode_method" in bad.text


def test_interrupt_cancels_the_synchronous_call(server):
    answer: dict = {}
    caller = threading.Thread(target=lambda: answer.update(r=server.post("/sdapi/v1/txt2img", _long(77))))
    caller.start()
    progress = _wait_running(server)
    task = progress["current_task"][len("task("):-1]
    t0 = time.monotonic()
    assert server.post("/sdapi/v1/interrupt").json() == {}
    caller.join(120)
    assert not caller.is_alive()
    r = answer["r"]
    assert r.status_code == 409 and r.json()["error"]["code"] == "cancelled", r.text
    assert time.monotonic() - t0 < 30
    result = server.post("/scc/sd_get_result", {"taskId": task}).json()
    assert result["status"] == "failed" and result["error"]["code"] == "cancelled"
    # the worker is free again
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 2})
    assert r.status_code == 200


def test_disconnected_client_does_not_block_the_worker(server):
    """A synchronous call whose client goes away: its task is cancelled, the next request runs at once."""
    body = json.dumps(_long(91)).encode()
    token = base64.b64encode(":".join(AUTH).encode()).decode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Basic " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    progress = _wait_running(server)
    task = progress["current_task"][len("task("):-1]
    sock.close()
    end = time.monotonic() + 60
    while server.post("/scc/sd_get_result", {"taskId": task}).json()["status"] != "failed":
        assert time.monotonic() < end, "the task of the disconnected client kept running"
        time.sleep(0.1)
    assert server.post("/scc/sd_get_result", {"taskId": task}).json()["error"]["code"] == "cancelled"
    t0 = time.monotonic()
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "steps": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < 60


def test_png_info_reads_the_infotext(server):
    body = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "seed": 12, "steps": 3}).json()
    info = json.loads(body["info"])
    r = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["info"] == info["infotexts"][0]
    assert got["parameters"]["Prompt"] == PROMPT and got["parameters"]["Seed"] == "12"
    assert got["parameters"]["Size-1"] == "64" and got["parameters"]["Steps"] == "3"
    r = server.post("/sdapi/v1/png-info", {"image": "not base64!"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "image"


def test_auth_and_refusals(server):
    assert requests.get(server.url + "/sdapi/v1/sd-models", timeout=30).status_code == 401
    r = requests.get(server.url + "/sdapi/v1/sd-models", auth=("webui", "wrong"), timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert requests.post(server.url + "/scc/sd_txt2img", json={}, timeout=30).status_code == 401
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "restore_faces": True})
    assert r.status_code == 422 and r.json()["error"]["field"] == "restore_faces" and "detail" in r.json()
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "styles": ["cinematic"]})  # no styles.csv
    assert r.status_code == 422 and r.json()["error"]["field"] == "styles[0]"
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "script_name": "x/y/z plot"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "script_name"
    r = requests.post(server.url + "/sdapi/v1/txt2img", data="prompt=x", auth=AUTH, timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=WEBUI_DEFAULT_PAYLOAD, auth=AUTH, timeout=30,
                      headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


HIRES = ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
         "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
         "hr_negative_prompt", "firstpass_image")


def test_img2img(server):
    """img2img as webui clients send it (init_images from a txt2img answer): pixel-equal to /scc/sd_img2img, or
    501 naming the feature while the engine has no img2img."""
    from api_compat import TaskService

    base = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "seed": 21, "steps": 6}).json()
    payload = {**{k: v for k, v in WEBUI_DEFAULT_PAYLOAD.items() if k not in HIRES}, "seed": 22, "steps": 8,
               "init_images": [base["images"][0]], "denoising_strength": 0.5, "resize_mode": 0, "mask": None,
               "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 32,
               "inpainting_mask_invert": 0, "include_init_images": False}
    r = server.post("/sdapi/v1/img2img", payload)
    if not hasattr(TaskService, "sd_img2img"):
        assert r.status_code == 501 and "img2img" in r.json()["error"]["message"], r.text
        return
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [22] and body["parameters"]["denoising_strength"] == 0.5
    _, (scc,) = scc_images(server, payload, "/scc/sd_img2img")
    assert np.array_equal(b64_pixels(body["images"][0]), scc)


# ------------------------------------------------------------------ what webui test suites and clients send
# the txt2img payload of the webui's own API tests (test/test_txt2img.py), and the variants they send
WEBUI_SUITE_TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
    "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
    "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
    "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
    "subseed_strength": 0, "tiling": False, "width": 64,
}
SUITE_VARIANTS = {
    "simple": {}, "negative_prompt": {"negative_prompt": "example negative prompt"},
    "complex_prompt": {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    "not_square": {"height": 128}, "hrfix": {"enable_hr": True}, "PLMS": {"sampler_index": "PLMS"},
    "DDIM": {"sampler_index": "DDIM"}, "UniPC": {"sampler_index": "UniPC"},
}


@pytest.mark.parametrize("variant", SUITE_VARIANTS)
def test_webui_suite_txt2img_payloads(server, variant):
    """The webui's own API tests' txt2img payloads answer 200; the hires fix at their denoising_strength 0 runs
    as the webui runs it: the first pass upscaled (hr_scale 2) and decoded, no second pass sampled."""
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_SUITE_TXT2IMG, **SUITE_VARIANTS[variant]})
    assert r.status_code == 200, r.text
    if variant == "hrfix":
        assert b64_pixels(r.json()["images"][0]).shape == (128, 128, 3)
        assert "Denoising strength: 0, " in json.loads(r.json()["info"])["infotexts"][0]


def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("variant", ["simple", "masked", "inverted_mask"])
def test_webui_suite_img2img_payloads(server, variant):
    """The webui's own API tests' img2img payloads (data: URIs, inpainting with and without inverted masks)."""
    init = np.zeros((64, 64, 3), np.uint8)
    init[16:48, 16:48] = (200, 30, 30)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    payload = {
        "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
        "include_init_images": False, "init_images": [_png_uri(init)], "inpaint_full_res": False,
        "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
        "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
        "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
        "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
        "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
    }
    if variant != "simple":
        payload.update(mask=_png_uri(mask), inpainting_mask_invert=variant == "inverted_mask")
    r = server.post("/sdapi/v1/img2img", payload)
    assert r.status_code == 200, r.text


def test_client_extras_are_ignored_and_named(server):
    """What extension test templates and client libraries send beside the payload: unknown fields (top level, in
    a ControlNet unit and its image object) are ignored and named in info.warnings; a scheduler by its
    /schedulers name, a sampler in another case, a checkpoint by its short hash, image_cfg_scale on img2img,
    extension scripts in their disabled form are accepted; an enabled one is refused naming the script."""
    scheduler = server.get("/sdapi/v1/schedulers").json()[0]["name"]
    checkpoint = next(m for m in server.get("/sdapi/v1/sd-models").json() if m["model_name"] == "sdengine-demo")
    models = server.get("/controlnet/model_list").json()["model_list"]
    unit = {"enabled": True, "module": "none", "model": models[0], "image": {"image": _edges_png(), "mask": None,
            "origin": "upload"}, "foo": True, "is_ui": False, "guessmode": False, "processor_res": 64}
    disabled = {"ADetailer": {"args": [False, False, {"ad_model": "face_yolov8n.pt"}]},
                "Dynamic Prompts v2.17.1": {"args": [False]}, "Regional Prompter": {"args": [False, False]},
                "Self Attention Guidance": {"args": [False, 0.75, 1.0]}}
    payload = {**WEBUI_DEFAULT_PAYLOAD, "seed": 7, "steps": 3, "seed_enable_extras": True,
               "override_settings_texts": [], "scheduler": scheduler, "sampler_name": "euler A",
               "override_settings": {"sd_model_checkpoint": checkpoint["hash"]},
               "alwayson_scripts": {"ControlNet": {"args": [unit]}, **disabled}}
    r = server.post("/sdapi/v1/txt2img", payload)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    named = {w.split(":")[0] for w in info["warnings"] if "unknown field, ignored" in w}
    cn = "alwayson_scripts.controlnet.args[0]"
    assert named == {"seed_enable_extras", "override_settings_texts", f"{cn}.foo", f"{cn}.guessmode",
                     f"{cn}.image.origin"}, info["warnings"]
    # demo-copy holds the same weights: either is the checkpoint of that hash
    assert info["sd_model_hash"] == checkpoint["hash"] and "Sampler: Euler a," in info["infotexts"][0]
    # without what was ignored and with the canonical names: the same pixels
    plain_unit = {k: v for k, v in unit.items() if k not in ("foo", "is_ui", "guessmode")}
    plain_unit["image"] = _edges_png()
    plain = {**WEBUI_DEFAULT_PAYLOAD, "seed": 7, "steps": 3, "scheduler": "Automatic", "sampler_name": "Euler a",
             "override_settings": {"sd_model_checkpoint": info["sd_model_name"]},
             "alwayson_scripts": {"ControlNet": {"args": [plain_unit]}}}
    again = server.post("/sdapi/v1/txt2img", plain)
    assert again.status_code == 200 and not json.loads(again.json()["info"]).get("warnings"), again.text
    assert np.array_equal(b64_pixels(r.json()["images"][0]), b64_pixels(again.json()["images"][0]))
    r = server.post("/sdapi/v1/img2img", {**{k: v for k, v in WEBUI_DEFAULT_PAYLOAD.items() if k not in HIRES},
                                          "steps": 3, "init_images": [_edges_png()], "image_cfg_scale": 1.5})
    assert r.status_code == 200 and not json.loads(r.json()["info"]).get("warnings"), r.text
    enabled = {"ADetailer": {"args": [True, False, {"ad_model": "face_yolov8n.pt"}]}}
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_DEFAULT_PAYLOAD, "alwayson_scripts": enabled})
    # ADetailer runs here (tests/test_adetailer.py): a YOLO model that is not in models/adetailer is refused
    assert r.status_code == 422 and r.json()["error"]["field"] == "alwayson_scripts.ADetailer.args[2].ad_model", r.text
    assert r.json()["error"]["code"] == "invalid_request" and "face_yolov8n.pt" in r.json()["error"]["message"]
