"""sd-webui-controlnet's API as its own web-API tests call it, against the real server (``python -m cli serve``)
on the demo model, with the demo canny ControlNet stored as ``control_v11p_sd15_canny`` (the name that suite's CI
downloads): the payloads are the ones that suite sends (its txt2img/img2img templates at 64x64, 3 steps, the
default unit: canny, pixel perfect, "Crop and Resize"), the assertions the ones it makes (image counts, the
module detail, the control types, the console log lines), and ours on the pixels where the extension defines
them (a unit without an image takes the init image; the detected maps of a hires-fix request).

The generation cases that depend on the task backend run on both: the embedded queue, and Redis + a
``sdengine worker`` (tests/queue_support.py). The translation rules (units without a model, advanced weighting,
the unit image forms) are tested in-process at the end.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from api_compat import ApiError
from api_compat.schema import parse_img2img, parse_payload
from api_compat.translate import translate, translate_img2img
from api_compat.webui import webui_to_scc
from core.errors import InvalidRequest
from engine.config import EngineConfig
from engine.controlnet import preprocessors
from engine.controlnet.preprocessors import PREPROCESSORS, Preprocessor
from tests.queue_support import WorkerProcess, free_port, redis_server  # noqa: F401 (fixture)
from tests.api_support import wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "engine" / "models" / "bundled"
CN_NAME = "control_v11p_sd15_canny"


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img.convert("RGB"))


def _picture(h: int = 96, w: int = 80) -> np.ndarray:
    """A picture with edges (a disc and a bar on a gradient), not square, so that resize modes differ."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    img[(yy - h // 3) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 5) ** 2] = (250, 250, 40)
    img[2 * h // 3: 2 * h // 3 + 8, w // 6: 5 * w // 6] = (20, 20, 200)
    return img


PICTURE = _png(_picture())


def _real_pidinet() -> Path | None:
    from tests.test_taesd import WEIGHTS

    path = None if WEIGHTS is None else WEIGHTS / "annotators" / "pidinet" / "table5_pidinet.pth"
    return path if path is not None and path.is_file() else None


REAL_PIDINET = _real_pidinet()


# ------------------------------------------------------------------------------------------ the payloads
def unit(**over):
    """The extension suite's default unit (its model as /controlnet/model_list names it, filled in by the test)."""
    return {"control_mode": "Balanced", "enabled": True, "guidance_end": 1, "guidance_start": 0,
            "pixel_perfect": True, "processor_res": 512, "resize_mode": "Crop and Resize", "threshold_a": -1,
            "threshold_b": -1, "weight": 1, "module": "canny", "model": None, **over}


def txt2img(units, **over):
    return {"alwayson_scripts": {"ControlNet": {"args": units}}, "batch_size": 1, "cfg_scale": 7, "comments": {},
            "disable_extra_networks": False, "do_not_save_grid": False, "do_not_save_samples": False,
            "enable_hr": False, "height": 64, "hr_negative_prompt": "", "hr_prompt": "", "hr_resize_x": 0,
            "hr_resize_y": 0, "hr_scale": 2, "hr_second_pass_steps": 0, "hr_upscaler": "Latent", "n_iter": 1,
            "negative_prompt": "", "override_settings": {}, "override_settings_restore_afterwards": True,
            "prompt": "a large red circle in the middle on a blue background", "restore_faces": False,
            "s_churn": 0.0, "s_min_uncond": 0, "s_noise": 1.0, "s_tmax": None, "s_tmin": 0.0,
            "sampler_name": "Euler a", "script_args": [], "script_name": None, "seed": 42,
            "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
            "subseed_strength": 0, "tiling": False, "width": 64, **over}


def img2img(units, **over):
    return {"batch_size": 1, "cfg_scale": 7, "height": 64, "width": 64, "n_iter": 1, "steps": 3,
            "sampler_name": "Euler a", "prompt": "a large red circle in the middle on a blue background",
            "negative_prompt": "", "seed": 42, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "subseed": -1,
            "subseed_strength": 0, "override_settings": {}, "override_settings_restore_afterwards": False,
            "do_not_save_grid": False, "do_not_save_samples": False, "s_churn": 0, "s_min_uncond": 0, "s_noise": 1,
            "s_tmax": None, "s_tmin": 0, "script_args": [], "script_name": None, "styles": [],
            "alwayson_scripts": {"ControlNet": {"args": units}}, "denoising_strength": 0.75,
            "initial_noise_multiplier": 1, "inpaint_full_res": 0, "inpaint_full_res_padding": 32,
            "inpainting_fill": 1, "inpainting_mask_invert": 0, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": 4,
            "resize_mode": 0, "init_images": [PICTURE], **over}


# ------------------------------------------------------------------------------------------------ servers
class Server:
    """``python -m cli serve`` (onnxruntime, or ``--queue`` on Redis) with its console in a log file."""

    def __init__(self, root: Path, *extra: str, cache_dir: Path | None = None):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # OMP_NUM_THREADS: the test run's (tests/conftest.py)
        if cache_dir is not None:  # serve takes its export cache from the environment
            env["SDENGINE_CACHE_DIR"] = str(cache_dir)
        env.pop("SDENGINE_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port), "--models-dir", str(root / "models"),
             "--results-dir", str(root / "results"), *extra],
            env=env, cwd=ROOT, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, lambda: self.console()[-3000:])
        models = requests.get(self.url + "/controlnet/model_list").json()["model_list"]
        self.model = next(m for m in models if m.startswith(CN_NAME))

    def console(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def get(self, path: str):
        return requests.get(self.url + path, timeout=60)

    def post(self, path: str, payload):
        return requests.post(self.url + path, json=payload, timeout=600)

    def generate(self, kind: str, payload) -> list[np.ndarray]:
        for u in payload["alwayson_scripts"]["ControlNet"]["args"]:
            if u.get("model", 0) is None:
                u["model"] = self.model
        r = self.post(f"/sdapi/v1/{kind}", payload)
        assert r.status_code == 200, r.text
        return [_pixels(b) for b in r.json()["images"]]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _store(root: Path, midas_dir: Path | None = None) -> None:
    (root / "models" / "ControlNet").mkdir(parents=True)
    shutil.copyfile(BUNDLED / "ControlNet" / "sdengine-demo-canny.safetensors",
                    root / "models" / "ControlNet" / f"{CN_NAME}.safetensors")
    if REAL_PIDINET is not None:  # Forge's annotator folder, the extension's sub-folder layout
        (root / "models" / "ControlNetPreprocessor" / "pidinet").mkdir(parents=True)
        shutil.copyfile(REAL_PIDINET, root / "models" / "ControlNetPreprocessor" / "pidinet" / REAL_PIDINET.name)
    # DWPose's two files (small stand-ins with the real interfaces, tests/dwpose_support.py), Forge's flat layout:
    # a person box over a square image (the same fraction of it at any processor_res), keypoints on seven dots
    from tests import dwpose_support as ds

    box = tuple(v * 640 for v in ds.PERSON_BOX)
    ds.detector_graph(root / "models" / "ControlNetPreprocessor" / "yolox_l.onnx", [(box, 0.95, 0, 0.95, 32)])
    ds.estimator_graph(root / "models" / "ControlNetPreprocessor" / "dw-ll_ucoco_384.onnx", *ds.person())
    if midas_dir is not None:  # random weights of the real MiDaS DPT-Hybrid (the session's file, linked)
        (root / "models" / "ControlNetPreprocessor" / "midas").mkdir()
        (root / "models" / "ControlNetPreprocessor" / "midas" / "dpt_hybrid-midas-501f0c75.pt").symlink_to(
            midas_dir / "midas" / "dpt_hybrid-midas-501f0c75.pt")
    # depth_zoe: ZoeD_M12_N.pt in the real file's layout, a reduced network of the same family (tests/zoe_support.py)
    from tests import zoe_support

    zoe_support.write_reduced_file(root / "models" / "ControlNetPreprocessor")


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache, midas_dir):
    root = tmp_path_factory.mktemp("cn-server")
    _store(root, midas_dir)
    srv = Server(root, "--backend", "onnxruntime", cache_dir=demo_cache)  # the run's demo exports
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def queued_server(redis_server, tmp_path_factory, demo_cache):  # noqa: F811
    """``serve --queue`` and one ``sdengine worker`` (onnxruntime, the run's demo exports) sharing the results
    folder."""
    root = tmp_path_factory.mktemp("cn-queue")
    _store(root)
    url = redis_server.url(5)
    worker = WorkerProcess(url, root / "results", root / "worker.log", "--models-dir", str(root / "models"),
                           "--backend", "onnxruntime", "--cache-dir", str(demo_cache)).start()
    worker.wait_ready(redis_server.client(5))
    srv = Server(root, "--queue", url)
    yield srv
    srv.stop()
    worker.stop()


@pytest.fixture(params=["embedded", "celery"])
def any_server(request):
    return request.getfixturevalue("server" if request.param == "embedded" else "queued_server")


# ------------------------------------------------------------------------------- generation: both backends
@pytest.mark.slow
def test_img2img_unit_without_an_image_takes_the_init_image(any_server):
    """Fault 4: a unit with no image of its own uses img2img's init image, fitted with img2img's resize_mode
    (0 "Just resize" -> "Just Resize"), exactly as if that image had been sent with that mode."""
    taken = any_server.generate("img2img", img2img([unit()]))
    given = any_server.generate("img2img", img2img([unit(image=PICTURE, resize_mode="Just Resize")]))
    assert len(taken) == 2 and all(np.array_equal(a, b) for a, b in zip(taken, given))
    assert taken[1].any()  # the detected map: canny edges of the init image
    cropped = any_server.generate("img2img", img2img([unit(image=PICTURE, resize_mode="Crop and Resize")]))
    assert not np.array_equal(taken[1], cropped[1])  # the mode matters, so the equality above says something
    # img2img resize_mode 1 ("Crop and resize") -> the unit's "Crop and Resize"
    taken_crop = any_server.generate("img2img", img2img([unit()], resize_mode=1))
    assert np.array_equal(taken_crop[1], cropped[1])


def test_hires_fix_returns_both_passes_maps(any_server):
    """Fault 9: with the hires fix, each unit's detected maps of both passes (the hires pass's first), whatever
    hr_option says; hr_option picks the passes the unit acts in; without the hires fix it is ignored."""
    both = any_server.generate("txt2img", txt2img([unit(image=PICTURE, hr_option="Both")], enable_hr=True,
                                                  denoising_strength=0.75))
    assert [im.shape[:2] for im in both] == [(128, 128), (128, 128), (64, 64)]
    low = any_server.generate("txt2img", txt2img([unit(image=PICTURE, hr_option="Low res only")], enable_hr=True,
                                                 denoising_strength=0.75))
    assert len(low) == 3 and np.array_equal(low[1], both[1]) and np.array_equal(low[2], both[2])
    assert not np.array_equal(low[0], both[0])  # the unit is off in the hires pass
    plain = any_server.generate("txt2img", txt2img([unit(image=PICTURE, hr_option="High res only")]))
    default = any_server.generate("txt2img", txt2img([unit(image=PICTURE)]))
    assert len(plain) == 2 and all(np.array_equal(a, b) for a, b in zip(plain, default))


# ------------------------------------------------------------------------------- generation: the suite's cases
@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_image_counts_as_the_extension_suite_expects(server, kind):
    """n_iter * batch_size images, then one detected map per unit that saves it (save_detected_map defaults to
    true); unknown unit keys are ignored (and logged) as the extension's unit model ignores them."""
    build = txt2img if kind == "txt2img" else img2img
    image = {"image": PICTURE} if kind == "txt2img" else {}
    cases = [([], {}, 1), ([unit(**image)], {"n_iter": 2}, 3), ([unit(**image)], {"batch_size": 2}, 3),
             ([unit(**image), unit(**image)], {}, 3), ([unit(**image, save_detected_map=False)], {}, 1),
             ([unit(**image, foo=True, is_ui=False)], {}, 2)]
    for units, over, count in cases:
        assert len(server.generate(kind, build(units, **over))) == count, (units, over)
    # the leniency policy (api_compat.leniency): ignored, and named in the log (and in info.warnings)
    assert "controlnet.args[0].foo (serve --strict refuses them)" in server.console()


@pytest.mark.parametrize("name,given,default", [("processor_res", "-100", 512), ("threshold_a", "-100.0", 100),
                                                ("threshold_b", "-100.0", 200)])
def test_out_of_range_slider_gets_the_default_with_the_extensions_log_line(server, name, given, default):
    """Fault 8: -100 is not refused: the preprocessor's default is used, and the server's console says so in
    the extension's words (its suite reads that line)."""
    images = server.generate("txt2img", txt2img([unit(image=PICTURE, **{name: -100})]))
    reference = server.generate("txt2img", txt2img([unit(image=PICTURE, **{name: default})]))
    assert all(np.array_equal(a, b) for a, b in zip(images, reference))
    assert f"[canny.{name}] Invalid value({given}), using default value {default}." in server.console()


def test_detect_out_of_range_and_default_params(server):
    body = {"controlnet_input_images": [PICTURE], "controlnet_module": "canny"}
    r = server.post("/controlnet/detect", {**body, "controlnet_threshold_a": -100, "controlnet_threshold_b": -100,
                                           "controlnet_processor_res": -100})
    assert r.status_code == 200, r.text
    assert list(r.json()) == ["info", "images"]  # the extension's keys: no "poses" for a module that is not openpose
    reference = server.post("/controlnet/detect", {**body, "controlnet_threshold_a": 100,
                                                   "controlnet_threshold_b": 200, "controlnet_processor_res": 512})
    assert np.array_equal(_pixels(r.json()["images"][0]), _pixels(reference.json()["images"][0]))
    console = server.console()
    for line in ("[canny.processor_res] Invalid value(-100), using default value 512.",
                 "[canny.threshold_a] Invalid value(-100.0), using default value 100.",
                 "[canny.threshold_b] Invalid value(-100.0), using default value 200."):
        assert line in console
    # -1 means "the default" and is not logged; a module that does not exist and no images are still 422
    assert server.post("/controlnet/detect", {**body, "controlnet_processor_res": -1}).status_code == 200
    assert "Invalid value(-1)" not in server.console()
    assert server.post("/controlnet/detect", {"controlnet_module": "INVALID"}).status_code == 422
    assert server.post("/controlnet/detect", {"controlnet_input_images": []}).status_code == 422


def test_unit_image_as_a_list(server):
    """Fault 12: the extension's list forms of one image ([image, null], [{"image", "mask"}]) are that image;
    several images (its multi-input form) are IP-Adapter units' alone: refused naming the field for a canny unit."""
    plain = server.generate("txt2img", txt2img([unit(image=PICTURE)]))
    for form in ([PICTURE, None], [{"image": PICTURE, "mask": None}]):
        assert all(np.array_equal(a, b) for a, b in zip(server.generate("txt2img", txt2img([unit(image=form)])),
                                                         plain))
    r = server.post("/sdapi/v1/txt2img", txt2img([unit(model=server.model, image=[{"image": PICTURE}] * 2)]))
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "alwayson_scripts.controlnet.args[0].image"
    assert r.json()["error"]["code"] == "invalid_request"
    assert "multi-input form of IP-Adapter modules" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ listings
def test_module_list_detail_as_the_extension(server):
    """Fault 7: module_detail has the extension's shape: model_free means "needs no ControlNet model" (canny:
    false), the sliders' names, values, ranges and steps."""
    for alias in ("true", "false"):
        body = server.get(f"/controlnet/module_list?alias_names={alias}").json()
        assert set(body["module_list"]) == set(body["module_detail"])
        assert body["module_list"][0] == "none"
        assert body["module_detail"]["canny"] == {"model_free": False, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    labels = server.get("/controlnet/module_list?alias_names=true").json()["module_list"]
    assert "invert (from white bg & black line)" in labels and "t2ia_color_grid" in labels


def test_module_list_has_every_extension_module_and_flags_what_does_not_run(server):
    """The list has every module of the extension (its module checks compare the list with the extension's
    names and UI labels; a sample of each here, ours not theirs): the ones this engine runs with their
    sliders, the others after them with no sliders and ``sdengine_unavailable`` naming why; a request for a
    flagged one is refused at submit (422) naming the field and carrying the same reason."""
    names = server.get("/controlnet/module_list?alias_names=false").json()
    labels = server.get("/controlnet/module_list?alias_names=true").json()
    for body in (names, labels):
        assert set(body["module_list"]) == set(body["module_detail"])
        assert len(body["module_list"]) == len(set(body["module_list"]))
        assert not any("sdengine_unavailable" in d for d in (body["module_detail"][m] for m in ("canny", "none")))
    assert {"depth", "depth_anything", "segmentation", "oneformer_ade20k", "densepose", "shuffle",
            "reference_adain", "inpaint_only+lama", "normal_map"} <= set(names["module_list"])
    assert {"depth_midas", "normal_midas", "seg_ufade20k", "seg_ofade20k", "inpaint_global_harmonious",
            "densepose (pruple bg & purple torso)", "t2ia_style_clipvision"} <= set(labels["module_list"])
    assert "depth" not in labels["module_list"] and "depth_midas" not in names["module_list"]
    flagged = [m for m in names["module_list"] if "sdengine_unavailable" in names["module_detail"][m]]
    runs = [m for m in names["module_list"] if m not in flagged]
    assert flagged and names["module_list"] == runs + flagged  # the modules that run come first
    depth = names["module_detail"]["segmentation"]
    assert depth["sliders"] == [] and "UniFormer" in depth["sdengine_unavailable"]
    assert names["module_detail"]["reference_adain"]["model_free"] is True
    r = server.post("/controlnet/detect", {"controlnet_module": "seg_ufade20k", "controlnet_input_images": [PICTURE]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "controlnet_module"
    assert depth["sdengine_unavailable"] in r.json()["error"]["message"]
    r = server.post("/sdapi/v1/txt2img", txt2img([unit(image=PICTURE, module="seg_ufade20k", model=server.model)]))
    assert r.status_code == 422 and "module" in r.json()["error"]["field"]


@pytest.mark.skipif(REAL_PIDINET is None, reason="the shared real-weights folder (the real PiDiNet file) is absent")
def test_model_based_preprocessors_through_the_server(server):
    """softedge_pidinet (the real file in the server's models/ControlNetPreprocessor/pidinet/) through
    /controlnet/detect and txt2img and img2img units: the maps the engine makes in this process from the same folder, and
    edges on a real photo; a module whose file is missing is refused at submit (422) naming the file and the
    folder; the module list shows them with the extension's labels and sliders."""
    from PIL import Image

    from engine.controlnet.images import fit_detected_map
    from tests.test_taesd import WEIGHTS

    models = server.root / "models"
    photo = np.asarray(Image.open(WEIGHTS / "photos" / "camera.png").convert("RGB").resize((128, 96)))
    r = server.post("/controlnet/detect", {"controlnet_module": "softedge_pidinet", "controlnet_processor_res": 96,
                                           "controlnet_input_images": [_png(photo)]})
    assert r.status_code == 200, r.text
    got = _pixels(r.json()["images"][0])
    assert np.array_equal(got, PREPROCESSORS["pidinet"](photo, 96, models_dir=models))
    assert got.astype(np.float32).mean() > 15  # edges of a real photo (a flat image: < 1)
    images = server.generate("txt2img", txt2img([unit(image=_png(photo), module="softedge_pidinet",
                                                      pixel_perfect=False, processor_res=64)]))
    assert len(images) == 2
    detected = PREPROCESSORS["pidinet"](photo, 64, models_dir=models)
    assert np.array_equal(images[1], fit_detected_map(detected, "Crop and Resize", 64, 64))
    # img2img: a unit without an image takes the init image (and img2img's resize mode 0, "Just Resize")
    images = server.generate("img2img", img2img([unit(module="softedge_pidinet", pixel_perfect=False,
                                                      processor_res=64)]))
    detected = PREPROCESSORS["pidinet"](_picture(), 64, models_dir=models)
    assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Just Resize", 64, 64))
    r = server.post("/controlnet/detect", {"controlnet_module": "softedge_hed", "controlnet_input_images": [PICTURE]})
    assert r.status_code == 422 and "ControlNetHED.pth" in r.text
    # the folders, as error messages show server paths: relative to the models folder, extensions/ beside it
    assert "put it in ControlNetPreprocessor/hed or extensions/sd-webui-controlnet/annotator/downloads/hed" in r.text
    r = server.post("/sdapi/v1/txt2img", txt2img([unit(image=PICTURE, module="lineart_realistic", model=server.model)]))
    assert r.status_code == 422 and "sk_model.pth" in r.text and "module" in r.text
    body = server.get("/controlnet/module_list?alias_names=true").json()
    for label in ("softedge_pidinet", "scribble_pidinet", "softedge_hed", "lineart_realistic", "openpose_full",
                  "normal_bae", "mlsd"):
        assert label in body["module_list"], label
    assert body["module_detail"]["mlsd"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01},
        {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20.0, "step": 0.01}]}
    types = server.get("/controlnet/control_types").json()["control_types"]
    assert types["SoftEdge"]["default_option"] == "softedge_pidinet"  # listed whether or not its file is here
    assert {"openpose_full", "openpose"} <= set(types["OpenPose"]["module_list"])


def _detect_refuses_the_missing_file(server, module: str, file: str, folder: str) -> None:
    """/controlnet/detect for a model-based module whose file is absent: 422 naming controlnet_module, the file and
    both folders (as error messages show server paths: relative to the models folder, extensions/ beside it)."""
    r = server.post("/controlnet/detect", {"controlnet_module": module, "controlnet_input_images": [PICTURE]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "controlnet_module"
    assert file in r.text
    assert (f"put it in ControlNetPreprocessor/{folder} or "
            f"extensions/sd-webui-controlnet/annotator/downloads/{folder}") in r.text


def test_dw_openpose_full_poses_through_both_backends(any_server):
    """The detect answer's ``poses`` travel in the task's info: the same from a Celery worker as embedded."""
    from tests import dwpose_support as ds

    dots = {g: (round(x * 96), round(y * 96)) for g, (x, y) in ds.LAYOUT.items()}
    image = ds.dots(96, 96, dots, 3)
    poses = []
    PREPROCESSORS["dw_openpose_full"](image, 96, models_dir=any_server.root / "models", pose_callback=poses.append)
    r = any_server.post("/controlnet/detect", {"controlnet_module": "dw_openpose_full", "controlnet_processor_res": 96,
                                               "controlnet_input_images": [_png(image), _png(image)]})
    assert r.status_code == 200, r.text
    assert r.json()["poses"] == poses * 2 and len(r.json()["images"]) == 2


def test_dw_openpose_full_through_the_server(server):
    """dw_openpose_full (DWPose's two files in the server's models/ControlNetPreprocessor/) through
    /controlnet/detect and a txt2img unit: the maps the engine makes in this process from the same folder, with
    the joints where the dots are (the nose's colour at the nose dot)."""
    from engine.controlnet.images import fit_detected_map
    from tests import dwpose_support as ds

    models = server.root / "models"
    dots = {g: (round(x * 128), round(y * 128)) for g, (x, y) in ds.LAYOUT.items()}
    image = ds.dots(128, 128, dots, 4)
    r = server.post("/controlnet/detect", {"controlnet_module": "dw_openpose_full", "controlnet_processor_res": 128,
                                           "controlnet_input_images": [_png(image)]})
    assert r.status_code == 200, r.text
    got = _pixels(r.json()["images"][0])
    poses = []
    assert np.array_equal(got, PREPROCESSORS["dw_openpose_full"](image, 128, models_dir=models,
                                                                 pose_callback=poses.append))
    assert tuple(got[dots[ds.NOSE][1], dots[ds.NOSE][0]]) == (255, 0, 0)
    # the extension's "poses": the pose JSON of each image, as the engine finds it in this process
    assert list(r.json()) == ["info", "poses", "images"] and r.json()["poses"] == poses
    assert len(poses[0]["people"]) == 1
    images = server.generate("txt2img", txt2img([unit(image=_png(image), module="dw_openpose_full",
                                                      pixel_perfect=False, processor_res=64)]))
    detected = PREPROCESSORS["dw_openpose_full"](image, 64, models_dir=models)
    assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Crop and Resize", 64, 64))
    nose = detected[round(dots[ds.NOSE][1] / 2), round(dots[ds.NOSE][0] / 2)]
    assert tuple(nose) == (255, 0, 0)


def test_midas_through_the_server(server):
    """depth_midas and normal_midas (random weights of the real DPT-Hybrid in the server's
    models/ControlNetPreprocessor/midas/) through /controlnet/detect (the normal background threshold as
    controlnet_threshold_a), a txt2img unit and an img2img unit: the maps the engine makes in this process from the same folder;
    module_detail has the extension's sliders."""
    from engine.controlnet.images import fit_detected_map

    models = server.root / "models"
    image = _picture(72, 96)
    for module, name, thr in (("depth_midas", "depth", -1), ("normal_midas", "normal_map", 0.2)):
        r = server.post("/controlnet/detect", {"controlnet_module": module, "controlnet_processor_res": 64,
                                               "controlnet_threshold_a": thr, "controlnet_input_images": [_png(image)]})
        assert r.status_code == 200, r.text
        got = _pixels(r.json()["images"][0])
        assert got.shape == (64, 85, 3) and got.std() > 0
        assert np.array_equal(got, PREPROCESSORS[name](image, 64, thr, models_dir=models))
    images = server.generate("txt2img", txt2img([unit(image=_png(image), module="depth_midas", pixel_perfect=False,
                                                      processor_res=64)]))
    detected = PREPROCESSORS["depth"](image, 64, models_dir=models)
    assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Crop and Resize", 64, 64))
    # img2img: the unit takes the init image; normal_midas's threshold_a is its background threshold
    images = server.generate("img2img", img2img([unit(module="normal_midas", pixel_perfect=False, processor_res=64,
                                                      threshold_a=0.2)]))
    detected = PREPROCESSORS["normal_map"](_picture(), 64, 0.2, models_dir=models)
    assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Just Resize", 64, 64))
    detail = server.get("/controlnet/module_list?alias_names=true").json()["module_detail"]
    assert detail["depth_midas"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}
    assert detail["normal_midas"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Normal Background Threshold", "value": 0.4, "min": 0.0, "max": 1.0, "step": 0.01}]}


@pytest.mark.slow
def test_depth_anything_through_the_server(server):
    """depth_anything and depth_anything_v2 (random ViT-S weights in the original files' layouts and names,
    tests/depth_anything_support.py): while a file is missing, refused at submit (422) naming the file and the
    folders; with v1's file in Forge's folder and v2's in the extension's downloads, /controlnet/detect and a
    txt2img unit give the maps the engine makes in this process from the same folders; the module list shows
    them with the extension's slider."""
    from tests import depth_anything_support as das

    models = server.root / "models"
    _detect_refuses_the_missing_file(server, "depth_anything", "depth_anything_vitl14.pth", "depth_anything")
    r = server.post("/sdapi/v1/txt2img", txt2img([unit(image=PICTURE, module="depth_anything_v2", model=server.model)]))
    assert r.status_code == 422 and "depth_anything_v2_vitl.safetensors" in r.text and "module" in r.text
    files = [das.write_file(models / "ControlNetPreprocessor" / "depth_anything", "v1", 31),
             das.write_file(server.root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" /
                            "depth_anything_v2", "v2", 32)]
    try:
        _depth_anything_maps(server, models)
    finally:  # ~100 MB of random weights (tests/README.md)
        for path in files:
            path.unlink()


def _depth_anything_maps(server, models):
    from engine.controlnet.images import fit_detected_map

    image = _picture(64, 64)
    maps = {}
    for module in ("depth_anything", "depth_anything_v2"):
        r = server.post("/controlnet/detect", {"controlnet_module": module, "controlnet_processor_res": 64,
                                               "controlnet_input_images": [_png(image)]})
        assert r.status_code == 200, r.text
        maps[module] = _pixels(r.json()["images"][0])
        assert np.array_equal(maps[module], PREPROCESSORS[module](image, 64, models_dir=models))
        assert maps[module].std() > 1
    assert not np.array_equal(maps["depth_anything"], maps["depth_anything_v2"])
    # a txt2img unit at the same processor_res: its detected map is that map fitted to the request's size
    images = server.generate("txt2img", txt2img([unit(image=_png(image), module="depth_anything_v2",
                                                      pixel_perfect=False, processor_res=64)]))
    assert len(images) == 2
    assert np.array_equal(images[1], fit_detected_map(maps["depth_anything_v2"], "Crop and Resize", 64, 64))
    body = server.get("/controlnet/module_list?alias_names=true").json()
    for module in ("depth_anything", "depth_anything_v2"):
        assert body["module_detail"][module] == {"model_free": False, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}


@pytest.mark.slow
def test_oneformer_through_the_server(server):
    """seg_ofade20k and seg_ofcoco (reduced random OneFormer files in the original layout and names,
    tests/oneformer_support.py): while a file is missing, refused at submit (422) naming the file and the folders;
    with the ADE20K file in Forge's folder and the COCO one in the extension's downloads, /controlnet/detect (by
    module name and by UI label) and a txt2img unit give the maps the engine makes in this process from the same
    folders; the module list shows them with the extension's labels and slider."""
    from engine.controlnet.images import fit_detected_map
    from tests import oneformer_support as ofs

    models = server.root / "models"
    _detect_refuses_the_missing_file(server, "seg_ofade20k", "250_16_swin_l_oneformer_ade20k_160k.pth", "oneformer")
    r = server.post("/sdapi/v1/txt2img", txt2img([unit(image=PICTURE, module="seg_ofcoco", model=server.model)]))
    assert r.status_code == 422 and "150_16_swin_l_oneformer_coco_100ep.pth" in r.text and "module" in r.text
    files = [ofs.write_file(models / "ControlNetPreprocessor", "ade20k", 31),
             ofs.write_file(server.root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads", "coco",
                            32)]
    try:
        image = _picture(64, 96)
        for module, name in (("seg_ofade20k", "oneformer_ade20k"), ("oneformer_coco", "oneformer_coco")):
            r = server.post("/controlnet/detect", {"controlnet_module": module, "controlnet_processor_res": 64,
                                                   "controlnet_input_images": [_png(image)]})
            assert r.status_code == 200, r.text
            got = _pixels(r.json()["images"][0])
            assert got.shape == (64, 96, 3)
            assert np.array_equal(got, PREPROCESSORS[name](image, 64, models_dir=models))
        images = server.generate("txt2img", txt2img([unit(image=_png(image), module="seg_ofade20k",
                                                          pixel_perfect=False, processor_res=64)]))
        detected = PREPROCESSORS["oneformer_ade20k"](image, 64, models_dir=models)
        assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Crop and Resize", 64, 64))
    finally:
        for path in files:
            path.unlink()
    body = server.get("/controlnet/module_list?alias_names=true").json()
    for label in ("seg_ofade20k", "seg_ofcoco"):
        assert body["module_detail"][label] == {"model_free": False, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}
    types = server.get("/controlnet/control_types").json()["control_types"]
    assert {"seg_ofade20k", "seg_ofcoco"} <= set(types["Segmentation"]["module_list"])


def test_depth_zoe_through_the_server(server):
    """depth_zoe (the reduced ZoeD_M12_N.pt in the server's models/ControlNetPreprocessor/zoedepth/) through
    /controlnet/detect and a txt2img unit: the maps the engine makes in this process from the same folder (they
    vary: random weights draw no meaningful depth, so equality is the check); its module_detail slider."""
    from engine.controlnet.images import fit_detected_map

    models = server.root / "models"
    image = _picture(96, 128)
    r = server.post("/controlnet/detect", {"controlnet_module": "depth_zoe", "controlnet_processor_res": 96,
                                           "controlnet_input_images": [_png(image)]})
    assert r.status_code == 200, r.text
    got = _pixels(r.json()["images"][0])
    assert np.array_equal(got, PREPROCESSORS["depth_zoe"](image, 96, models_dir=models))
    assert got.shape == (96, 128, 3) and got.std() > 5
    images = server.generate("txt2img", txt2img([unit(image=_png(image), module="depth_zoe", pixel_perfect=False,
                                                      processor_res=64)]))
    detected = PREPROCESSORS["depth_zoe"](image, 64, models_dir=models)
    assert len(images) == 2 and np.array_equal(images[1], fit_detected_map(detected, "Crop and Resize", 64, 64))
    detail = server.get("/controlnet/module_list?alias_names=true").json()["module_detail"]["depth_zoe"]
    assert detail == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}


def test_control_types(server):
    types = server.get("/controlnet/control_types").json()["control_types"]
    assert set(types) >= {"Canny", "Revision", "Inpaint", "Instant-ID", "InstructP2P", "Shuffle", "Scribble",
                          "SparseCtrl", "MLSD", "OpenPose", "Depth", "All", "Lineart", "SoftEdge", "NormalMap",
                          "IP-Adapter", "Reference", "T2I-Adapter", "Segmentation", "Tile", "Recolor"}
    canny = types["Canny"]
    assert canny["module_list"][:2] == ["none", "canny"] and "invert (from white bg & black line)" in canny["module_list"]
    models = server.get("/controlnet/model_list").json()["model_list"]  # ours and the bundled demo canny
    assert len(models) == 2 and canny["model_list"] == ["None", *models]
    assert canny["default_model"].startswith(CN_NAME)  # the extension prefers a v1.1 ("11") model
    assert canny["default_option"] == "canny"
    # a type with nothing here: only "none" / "None", as the extension answers for it
    assert types["Shuffle"] == {"module_list": ["none"], "model_list": ["None"], "default_option": "none",
                                "default_model": "None"}
    assert types["Segmentation"] == {"module_list": ["none", "seg_ofade20k", "seg_ofcoco"], "model_list": ["None"],
                                     "default_option": "seg_ofade20k", "default_model": "None"}
    assert types["Tile"]["module_list"] == ["none", "tile_resample", "tile_colorfix+sharp", "tile_colorfix",
                                            "blur_gaussian"]
    # a model-based module is listed whether or not its file is installed
    assert types["Depth"] == {"module_list": ["none", "depth_midas", "depth_zoe", "depth_leres++", "depth_leres",
                                              "depth_anything_v2", "depth_anything"],
                              "model_list": ["None"], "default_option": "depth_midas", "default_model": "None"}
    assert types["All"]["model_list"] == ["None", *models]


def _pose() -> dict:
    points = [(32, 10), (32, 20), (22, 20), (18, 32), (16, 44), (42, 20), (46, 32), (48, 44), (26, 44), (26, 56),
              (26, 62), (38, 44), (38, 56), (38, 62), (30, 8), (34, 8), (28, 9), (36, 9)]
    flat = [v for x, y in points for v in (x, y, 1)]
    flat[-3:] = [60, 70, 0.5]  # a keypoint below confidence 1 is absent
    return {"people": [{"pose_keypoints_2d": flat, "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": None,
                        "face_keypoints_2d": None}], "canvas_width": 64, "canvas_height": 72}


def test_render_openpose_json(server):
    """Fault 11: the extension's model-free pose renderer."""
    r = server.post("/controlnet/render_openpose_json", [_pose(), _pose()])
    assert r.status_code == 200 and r.json()["info"] == "Success"
    a, b = (_pixels(i) for i in r.json()["images"])
    assert a.shape == (72, 64, 3) and np.array_equal(a, b)
    assert tuple(a[20, 32]) == (255, 85, 0)  # the neck joint, the second colour
    assert tuple(a[44, 16]) == (170, 255, 0)  # the right wrist, the fifth
    assert tuple(a[70, 60]) == (0, 0, 0)  # the absent keypoint is not drawn
    assert server.post("/controlnet/render_openpose_json", []).json()["info"] == "No pose data detected."
    bad = server.post("/controlnet/render_openpose_json", [{"foo": 10, "bar": 100}])
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "[0].canvas_height"


# ---------------------------------------------------------------------------------------- in-process rules
CONFIG = EngineConfig()


def _translate_unit(**fields):
    payload = webui_to_scc(txt2img([unit(**{"model": "m", "image": PICTURE, **fields})]))
    return translate(parse_payload(payload), CONFIG)


def test_unit_without_a_model_reaches_the_engine_for_model_free_modules(monkeypatch):
    """A module that needs no ControlNet model (the extension's reference_*, registered here as one) goes to the
    engine with model "None" (whatever the payload named) and no ControlNet to look up; any other module still
    needs a model."""
    monkeypatch.setitem(PREPROCESSORS, "reference_test", Preprocessor("reference_test", lambda img, r, a, b: img,
                                                                     model_free=True))
    done = _translate_unit(module="reference_test", model="None")
    assert done.request.controlnet_units[0].model == "None"
    assert not [m for m in done.models if m[2].startswith("controlnet_units")]
    with pytest.raises(InvalidRequest) as exc:
        _translate_unit(module="canny", model="None")
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].model"
    assert preprocessors.get_preprocessor("canny").model_free is False


def test_hr_option_reaches_the_engine():
    assert _translate_unit(hr_option="low res only").request.controlnet_units[0].hr_option == "Low res only"
    assert _translate_unit().request.controlnet_units[0].hr_option == "Both"
    with pytest.raises(ApiError) as exc:
        _translate_unit(hr_option="Sometimes")
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].hr_option"


def test_img2img_unit_takes_the_init_image_and_its_resize_mode():
    payload = webui_to_scc(img2img([unit(model="m")], resize_mode=2))
    done = translate_img2img(parse_img2img(payload), CONFIG)
    built = done.request.controlnet_units[0]
    assert built.image is done.request.init.image and built.resize_mode == "Resize and Fill"
    with pytest.raises(InvalidRequest) as exc:  # txt2img has no init image to take
        translate(parse_payload(webui_to_scc(txt2img([unit(model="m")]))), CONFIG)
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].input_image"
