"""The webui's extras, upscaler listings, prompt styles and the "SD upscale" script against the real server
(``python -m cli serve``, torch backend, the bundled demo model), with random-weight upscaler files of the real
architectures in the webui's folders (tests.upscaler_support), and the payloads of the webui's own API tests
(``test/test_extras.py``, ``test_img2img.py``'s sd-upscale test) at small sizes.

References: the engine functions the tasks run (engine.extras.postprocess, engine.upscalers) on the same input:
pixel-equal (the task runs the same code on the same bytes); the PNG text chunks: the input's kept as they were.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests

from tests import upscaler_support as us
from tests.test_webui_client import Server, b64_pixels

PROMPT = "a large red circle in the middle on a blue background"
STYLES = ('name,prompt,negative_prompt\n"Cinematic","cinematic still of {prompt}, film grain","cartoon"\n'
          'Sharp,"sharp, detailed",blurry\n')


def _png(array: np.ndarray, parameters: str | None = None) -> str:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=meta)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _texts(data: str) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        img.load()
        return {k: v for k, v in img.info.items() if isinstance(v, str)}


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((32, 24), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def server(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("webui-extras")
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    us.write_esrgan_old(models / "ESRGAN" / "4x-Tiny.pth")
    us.write_compact(models / "RealESRGAN" / "realesr-general-x4v3.pth")
    home = root / "home"
    home.mkdir()
    (home / "styles.csv").write_text(STYLES, encoding="utf-8")
    monkeypatch_module.setenv("SDENGINE_HOME", str(home))
    srv = Server(root, "--backend", "torch")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_listings(server):
    ups = server.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest", "4x-Tiny", "R-ESRGAN General 4xV3"]
    assert ups[3]["model_name"] == "ESRGAN_4x" and ups[3]["model_path"].endswith("ESRGAN/4x-Tiny.pth")
    assert server.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN General 4xV3", "path": ups[4]["model_path"], "scale": 4}]
    assert server.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Cinematic", "prompt": "cinematic still of {prompt}, film grain", "negative_prompt": "cartoon"},
        {"name": "Sharp", "prompt": "sharp, detailed", "negative_prompt": "blurry"}]
    assert server.get("/sdapi/v1/hypernetworks").json() == []
    assert "sd upscale" in server.get("/sdapi/v1/scripts").json()["img2img"]


def test_webui_suite_extras_payloads(server, picture):
    """test_extras.py's three payloads (upscale with Lanczos to 128x128 cropped; the png-info and interrogate
    ones, which post only the image, and a "model" field the webui ignores)."""
    image = _png(picture)
    payload = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
               "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
               "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None",
               "extras_upscaler_2_visibility": 0, "image": image}
    r = server.post("/sdapi/v1/extra-single-image", payload)
    assert r.status_code == 200, r.text
    assert b64_pixels(r.json()["image"]).shape == (48, 64, 3)  # resize_mode 0: by 2
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"  # a float, as the webui
    for body in ({"image": image}, {"image": image, "model": "clip"}):
        r = server.post("/sdapi/v1/extra-single-image", body)
        assert r.status_code == 200, r.text
        assert np.array_equal(b64_pixels(r.json()["image"]), picture)  # upscaler_1 "None": the image as it was


def test_model_upscaler_as_the_engine_runs_it(server, picture, tmp_path):
    from engine.extras import Extras, postprocess
    from engine.upscalers import Upscaling

    infotext = f"{PROMPT}\nSteps: 3, Sampler: Euler a, Seed: 7, Size: 32x24"
    body = {"image": _png(picture, infotext), "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64,
            "upscaler_1": "R-ESRGAN General 4xV3", "upscaler_2": "4x-Tiny", "extras_upscaler_2_visibility": 0.25}
    r = server.post("/sdapi/v1/extra-single-image", body)
    assert r.status_code == 200, r.text
    out = b64_pixels(r.json()["image"])
    how = Upscaling(models_dir=server.root / "models")
    want, text = postprocess(picture, Extras(resize_mode=1, upscaling_resize_w=96, upscaling_resize_h=64,
                                             upscaler_1="R-ESRGAN General 4xV3", upscaler_2="4x-Tiny",
                                             extras_upscaler_2_visibility=0.25), how)
    assert out.shape == (64, 96, 3) and np.array_equal(out, want)
    texts = _texts(r.json()["image"])
    assert texts["parameters"] == infotext and texts["postprocessing"] == text  # the infotext kept
    assert "Postprocess upscaler 2: 4x-Tiny" in r.json()["html_info"]


def test_batch_images(server, picture):
    body = {"imageList": [{"data": _png(picture), "name": "a.png"}, {"data": _png(picture[:, ::-1].copy()),
                                                                      "name": "b.png"}],
            "upscaling_resize": 2, "upscaler_1": "Nearest"}
    r = server.post("/sdapi/v1/extra-batch-images", body)
    assert r.status_code == 200, r.text
    images = [b64_pixels(i) for i in r.json()["images"]]
    assert [i.shape for i in images] == [(48, 64, 3)] * 2
    assert np.array_equal(images[0][::2, ::2], picture)  # Nearest by 2


def test_extras_refusals_name_the_field(server, picture):
    image = _png(picture)
    for body, field in (({"image": image, "upscaler_1": "4x-UltraSharp"}, "upscaler_1"),
                        ({"image": image, "upscaler_1": "Lanczos", "upscaling_resize": 99}, "upscaling_resize"),
                        ({"image": "not base64!!"}, "image"),
                        ({"imageList": []}, "imageList")):
        r = server.post("/sdapi/v1/extra-single-image" if "image" in body else "/sdapi/v1/extra-batch-images",
                        body)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    import importlib.util

    if importlib.util.find_spec("engine.faces") is None:
        r = server.post("/sdapi/v1/extra-single-image", {"image": image, "gfpgan_visibility": 1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "gfpgan_visibility"
        assert "GFPGAN/" in r.json()["error"]["message"]


def test_extras_task_shows_progress_and_is_interrupted(server):
    """An extras call is a task of the queue: /progress shows its upscaler tiles (the ESRGAN_tile option in
    effect), /interrupt cancels it between tiles and the call answers 409."""
    import threading
    import time

    assert server.post("/sdapi/v1/options", {"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 8}).status_code == 200
    try:
        big = np.random.default_rng(1).integers(0, 256, (160, 160, 3)).astype(np.uint8)
        answer = {}
        call = threading.Thread(target=lambda: answer.update(r=server.post(
            "/sdapi/v1/extra-single-image", {"image": _png(big), "upscaler_1": "4x-Tiny", "upscaling_resize": 4})))
        call.start()
        seen, end = None, time.monotonic() + 120
        while time.monotonic() < end and call.is_alive():
            prog = server.get("/sdapi/v1/progress").json()
            if prog["textinfo"] and prog["textinfo"].startswith("upscaling"):
                seen = prog["textinfo"]
                break
            time.sleep(0.05)
        assert seen and "of 361" in seen, seen  # 160 px in 16-px tiles every 8 px: 19 x 19
        server.post("/sdapi/v1/interrupt")
        call.join(120)
        assert answer["r"].status_code == 409, answer["r"].text
    finally:
        server.post("/sdapi/v1/options", {"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8})


def test_styles_are_applied_and_recorded(server):
    payload = {"prompt": PROMPT, "negative_prompt": "ugly", "styles": ["Cinematic", "Sharp"], "steps": 2,
               "width": 64, "height": 64, "seed": 3, "cfg_scale": 1.5}
    r = server.post("/sdapi/v1/txt2img", payload)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    styled = f"cinematic still of {PROMPT}, film grain, sharp, detailed"
    assert info["infotexts"][0].startswith(styled + "\nNegative prompt: ugly, cartoon, blurry\n")
    plain = server.post("/sdapi/v1/txt2img", {**payload, "styles": [], "prompt": styled,
                                              "negative_prompt": "ugly, cartoon, blurry"})
    assert np.array_equal(b64_pixels(r.json()["images"][0]), b64_pixels(plain.json()["images"][0]))
    r = server.post("/sdapi/v1/txt2img", {**payload, "styles": ["Nope"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "styles[0]"


def test_hires_with_a_model_upscaler(server):
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 1.5,
               "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "4x-Tiny", "denoising_strength": 0.5}
    r = server.post("/sdapi/v1/txt2img", payload)
    assert r.status_code == 200, r.text
    assert b64_pixels(r.json()["images"][0]).shape == (96, 96, 3)
    assert "Hires upscaler: 4x-Tiny" in json.loads(r.json()["info"])["infotexts"][0]
    r = server.post("/sdapi/v1/txt2img", {**payload, "hr_upscaler": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "hr_upscaler"
    assert "RealESRGAN_x4plus.pth" in r.json()["error"]["message"]


def test_sd_upscale_script(server, picture):
    """test_img2img.py's sd-upscale payload (script_args ["", overlap, upscaler, scale]) at a small size: the
    init image upscaled 2x with Lanczos, 64x64 tiles overlapping by 16, one image of the upscaled size with the
    script's parameters in its infotext; the seams blend (no tile edge stands out)."""
    from PIL import Image

    init = np.asarray(Image.fromarray(picture).resize((48, 40)))  # -> 96x80 upscaled: 2x2 tiles of 64
    payload = {"init_images": [_png(init)], "prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 5,
               "cfg_scale": 1.5, "denoising_strength": 0.3, "sampler_index": "Euler a",
               "script_name": "sd upscale", "script_args": ["", 16, "Lanczos", 2.0]}
    r = server.post("/sdapi/v1/img2img", payload)
    assert r.status_code == 200, r.text
    out = b64_pixels(r.json()["images"][0])
    assert out.shape == (80, 96, 3)
    info = json.loads(r.json()["info"])
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in info["infotexts"][0]
    assert "Size: 64x64" in info["infotexts"][0]
    for name, args, field in (("x/y/z plot", [], "script_name"), ("sd upscale", ["", 16, "Nope", 2], "script_args[2]"),
                              ("sd upscale", ["", 64, "Lanczos", 2], "script_args[1]")):
        r = server.post("/sdapi/v1/img2img", {**payload, "script_name": name, "script_args": args})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    r = server.post("/sdapi/v1/txt2img", {"prompt": "x", "script_name": "sd upscale"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "script_name"


def test_unauthenticated_extras_are_refused(server, picture):
    r = requests.post(server.url + "/sdapi/v1/extra-single-image", json={"image": _png(picture)}, timeout=30)
    assert r.status_code == 401
