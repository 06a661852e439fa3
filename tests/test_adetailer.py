"""ADetailer (engine.adetailer, api_compat.adetailer): the MediaPipe face detectors on the real photos of the shared
weights (boxes against boxes marked by hand), the extension's mask rules, the inpaint passes on the engine's own
inpaint path with the tiny model (only the masked region changes; the "Only masked" crop rule; a no-face image
unchanged with a note), tabs one after another, progress and cancel, the memory budget, the args forms and the
leniency policy, and both API faces of a real server.

The reference for the behaviour is the Bing-su/adetailer extension v25.3.0 (adetailer/args.py, adetailer/mask.py,
scripts/!adetailer.py), whose rules are written out here where a test needs them."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.errors import Cancelled, TooMuchMemory
from engine.adetailer import ADetailer, ADetailerTab, VERSION, masks as mask_rules
from engine.adetailer.detectors import Detectors, box_masks
from engine.img2img import blur_mask, prepare_init
from engine.request import GenerationRequest, InitImage

ROOT = Path(__file__).resolve().parents[1]


def shared_weights() -> Path | None:
    env = os.environ.get("SDENGINE_SHARED_WEIGHTS")
    candidates = [Path(env)] if env else []
    candidates += [parent / "shared" / "weights" for parent in ROOT.parents]
    return next((c for c in candidates if c.is_dir()), None)


SHARED = shared_weights()
HAVE = (importlib.util.find_spec("mediapipe") is not None and SHARED is not None and (SHARED / "photos").is_dir())
pytestmark = pytest.mark.skipif(not HAVE, reason="the adetailer extra (mediapipe) or the shared photos "
                                "(SDENGINE_SHARED_WEIGHTS: photos/) are absent")
# face boxes (x1, y1, x2, y2) marked by hand on the photos: cheek to cheek, hairline (under the cap) to chin
HAND = {"astronaut.png": (180, 75, 270, 180), "grace_hopper.jpg": (165, 140, 360, 330)}
SIZE = 128  # the inpaint passes' size: cheap on the tiny model


def photo(name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(SHARED / "photos" / name).convert("RGB"))


def two_faces() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """astronaut (512x512) beside grace_hopper (512x600, its top 512 rows): 1024x512, two faces."""
    a, g = photo("astronaut.png"), photo("grace_hopper.jpg")
    x1, y1, x2, y2 = HAND["grace_hopper.jpg"]
    return np.concatenate([a, g[:512]], axis=1), [HAND["astronaut.png"], (x1 + 512, y1, x2 + 512, y2)]


def no_face() -> np.ndarray:
    """The lower parts of both photos (the orange suit, the uniform) side by side: no face (540x212)."""
    return np.concatenate([photo("astronaut.png")[300:512, :270], photo("grace_hopper.jpg")[388:600, :270]], axis=1)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_store):
    """tiny-sd1; the MediaPipe face detectors are the bundled ones (engine/models/bundled/adetailer)."""
    root = tmp_path_factory.mktemp("adetailer") / "models"  # the server fixture serves the folder above it
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copyfile(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors",
                    root / "Stable-diffusion" / "tiny-sd1.safetensors")
    return root


class RecordingEngine:
    """The real Engine, with the requests it was given kept (to check the inpaint passes' requests)."""

    def __init__(self, engine):
        self.engine = engine
        self.requests: list[GenerationRequest] = []

    def generate(self, request, **kw):
        self.requests.append(request)
        return self.engine.generate(request, **kw)


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    from engine.pipeline import Engine

    return Engine(models_dir=models_dir, backend="torch", cache_dir=tmp_path_factory.mktemp("adetailer-cache"),
                  default_model="tiny-sd1")


# ------------------------------------------------------------------------------------------------ detectors
@pytest.mark.parametrize("model", ["mediapipe_face_short", "mediapipe_face_full"])
@pytest.mark.parametrize("name", sorted(HAND))
def test_the_detected_box_covers_the_face(models_dir, model, name):
    pred = Detectors(models_dir).predict(model, photo(name))
    assert len(pred.bboxes) == 1 and pred.confidences[0] > 0.5, pred
    assert iou(pred.bboxes[0], HAND[name]) >= 0.5, (pred.bboxes, HAND[name])
    # the mask is the box (the extension's create_mask_from_bbox)
    (mask,) = pred.masks
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min()) == (round(pred.bboxes[0][0]), round(pred.bboxes[0][1]))


def test_two_faces_and_no_face(models_dir):
    detectors = Detectors(models_dir)
    image, boxes = two_faces()
    pred = detectors.predict("mediapipe_face_full", image)
    assert len(pred.bboxes) == 2, pred.bboxes
    for hand in boxes:
        assert max(iou(b, hand) for b in pred.bboxes) >= 0.5, (pred.bboxes, hand)
    for model in ("mediapipe_face_short", "mediapipe_face_full"):
        assert detectors.predict(model, no_face()).bboxes == []


def test_models_are_listed_and_refused_naming_the_folder(models_dir, tmp_path):
    detectors = Detectors(models_dir)
    assert detectors.names() == ["mediapipe_face_full", "mediapipe_face_short"]  # no face_landmarker.task placed
    bundled = detectors.mediapipe_weights("mediapipe_face_short")
    assert bundled is not None and bundled.parent.name == "adetailer" and "bundled" in bundled.parts
    empty = Detectors(tmp_path)
    with pytest.raises(Exception) as exc:  # the mesh models' bundle is not shipped: the user's folder is named
        empty.check("mediapipe_face_mesh", "f")
    assert str(tmp_path / "adetailer") in str(exc.value) and exc.value.field == "f"
    with pytest.raises(Exception) as exc:
        detectors.check("face_yolov8n.pt", "f")
    assert str(models_dir / "adetailer") in str(exc.value)
    assert "mediapipe_face_full, mediapipe_face_short" in exc.value.allowed
    (tmp_path / "adetailer").mkdir()
    (tmp_path / "adetailer" / "face_yolov8n.pt").write_bytes(b"not read")
    assert Detectors(tmp_path).names() == ["mediapipe_face_full", "mediapipe_face_short", "face_yolov8n.pt"]
    # a file of the bundled name in the user's folder is the one used
    shutil.copyfile(bundled, tmp_path / "adetailer" / bundled.name)
    assert Detectors(tmp_path).mediapipe_weights("mediapipe_face_short") == tmp_path / "adetailer" / bundled.name
    with pytest.raises(Exception) as exc:  # a pickle: only with the opt-in
        Detectors(tmp_path).check("face_yolov8n.pt", "f")
    assert "--allow-pickle" in str(exc.value)


# ------------------------------------------------------------------------------------------------ mask rules
def _box(x1, y1, x2, y2, size=(64, 64)):
    m = np.zeros(size, np.uint8)
    m[y1:y2, x1:x2] = 255
    return m


def test_mask_rules_in_the_extensions_order():
    from engine.adetailer.detectors import Prediction

    small, big = [10, 10, 20, 20], [30, 30, 60, 60]
    pred = Prediction([small, big], [_box(10, 10, 20, 20), _box(30, 30, 60, 60)], [0.9, 0.4])
    assert mask_rules.filter_k(pred, 1, "Area").bboxes == [big]  # the k largest
    assert mask_rules.filter_k(pred, 1, "Confidence").bboxes == [small]  # the k most confident
    assert mask_rules.filter_k(pred, 0).bboxes == [small, big]
    assert mask_rules.filter_by_ratio(pred, 0.1, 1.0, (64, 64)).bboxes == [big]  # 900/4096 > 0.1 > 100/4096
    # dilate: a 4x4 square kernel (cv2, anchor at its centre (2, 2), reflected in dilation) grows a box by 1
    # up/left and 2 down/right
    grown = mask_rules.dilate_erode(_box(10, 10, 20, 20), 4)
    ys, xs = np.nonzero(grown)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (9, 9, 21, 21)
    # erode away a small box: dropped before merging
    out = mask_rules.preprocess([_box(10, 10, 12, 12), _box(30, 30, 60, 60)], kernel=-4)
    assert len(out) == 1
    # offset first (x right, y up), then dilate; merge ORs, invert flips
    moved = mask_rules.preprocess([_box(10, 10, 20, 20)], x_offset=5, y_offset=3)[0]
    assert np.array_equal(np.nonzero(moved)[0][[0, -1]], [7, 16]) and np.nonzero(moved)[1].min() == 15
    merged = mask_rules.preprocess([_box(0, 0, 5, 5), _box(10, 10, 20, 20)], mode="Merge")
    assert len(merged) == 1 and merged[0].sum() == 255 * (25 + 100)
    inverted = mask_rules.preprocess([_box(0, 0, 5, 5)], mode="Merge and Invert")[0]
    assert inverted.sum() == 255 * (64 * 64 - 25)


def test_infotext_fields_as_the_extension_writes_them():
    first = ADetailerTab(ad_model="mediapipe_face_full")
    second = ADetailerTab(ad_model="mediapipe_face_short", ad_prompt="a smile", ad_use_steps=True, ad_steps=3,
                          ad_mask_k=2)
    params = ADetailer((first, ADetailerTab(), second)).infotext()  # the middle tab is off: no fields
    assert params == {
        "ADetailer model": "mediapipe_face_full", "ADetailer confidence": 0.3, "ADetailer dilate erode": 4,
        "ADetailer mask blur": 4, "ADetailer denoising strength": 0.4, "ADetailer inpaint only masked": True,
        "ADetailer inpaint padding": 32,
        "ADetailer model 3rd": "mediapipe_face_short", "ADetailer prompt 3rd": "a smile",
        "ADetailer confidence 3rd": 0.3, "ADetailer method to decide top k masks 3rd": "Area",
        "ADetailer mask only top k 3rd": 2, "ADetailer dilate erode 3rd": 4, "ADetailer mask blur 3rd": 4,
        "ADetailer denoising strength 3rd": 0.4, "ADetailer inpaint only masked 3rd": True,
        "ADetailer inpaint padding 3rd": 32, "ADetailer use separate steps 3rd": True, "ADetailer steps 3rd": 3,
        "ADetailer version": VERSION}


# ------------------------------------------------------------------------------------------------ inpainting
def _img2img(image, tabs, **kw) -> GenerationRequest:
    """img2img with skip_img2img (the extension's 1 step at 128x128, then the tabs on the init image itself)."""
    return GenerationRequest(prompt="a portrait", steps=4, width=SIZE, height=SIZE, seed=11,
                             init=InitImage(image=image, denoising_strength=0.5),
                             adetailer=ADetailer(tuple(tabs), skip_img2img=True), **kw)


def _expected_crop(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The webui's "Only masked" crop, written out: the box of the (blurred) mask's non-zero pixels grown by the
    padding and clipped to the image, then grown around its centre to the pass's aspect ratio (inside the image)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x1, y1 = max(xs.min() - padding, 0), max(ys.min() - padding, 0)
    x2, y2 = min(xs.max() + 1 + padding, w), min(ys.max() + 1 + padding, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= h:
            y1, y2 = y1 - (y2 - h), h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= w:
            x1, x2 = x1 - (x2 - w), w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
    return int(x1), int(y1), int(min(x2, w)), int(min(y2, h))


@pytest.mark.slow
def test_only_the_masked_region_changes_and_tabs_run_one_after_another(engine, models_dir):
    image = photo("astronaut.png")
    tabs = [ADetailerTab(ad_model="mediapipe_face_short", ad_inpaint_only_masked_padding=16, ad_denoising_strength=0.6),
            ADetailerTab(ad_model="mediapipe_face_full", ad_prompt="[PROMPT], smiling", ad_dilate_erode=8,
                         ad_mask_blur=2)]
    rec = RecordingEngine(engine)
    from engine.adetailer import run

    result = run(rec, _img2img(image, tabs), engine.detectors)
    out = result.images[0]
    assert out.shape == image.shape
    # the second tab detects on the first one's result: the tiny random model's repaint is no face any more
    # (on the input it finds the face: test_the_detected_box_covers_the_face), so it leaves it and says so
    base, first = rec.requests
    assert (base.steps, base.width, base.height, base.sampler_name) == (1, 128, 128, "Euler")  # skip_img2img
    # the first tab's pass: on the init image, the detected box dilated by 4 (blurred by 4 in the pass)
    box = Detectors(models_dir).predict("mediapipe_face_short", image).bboxes[0]
    assert np.array_equal(first.init.mask, mask_rules.dilate_erode(box_masks([box], (512, 512))[0], 4))
    assert np.array_equal(np.asarray(first.init.image), image)
    assert (first.seed, first.steps, first.width, first.height) == (base.seed, 4, SIZE, SIZE)
    assert first.init.inpaint_full_res and first.init.inpaint_full_res_padding == 16
    assert first.init.denoising_strength == 0.6 and first.init.inpainting_fill == 1
    # the "Only masked" rule: the crop the pass paints (scaled to 128x128 and back)
    plan = prepare_init(first.init, SIZE, SIZE)
    blurred = blur_mask(first.init.mask, first.init.mask_blur_x, first.init.mask_blur_y)
    x1, y1, x2, y2 = _expected_crop(blurred, 16, SIZE, SIZE)
    assert plan.paste_to == (x1, y1, x2 - x1, y2 - y1) and plan.pixels.shape == (1, 3, SIZE, SIZE)
    # only the masked region changed: outside the dilated, blurred mask the pixels are the input's
    changed = np.abs(out.astype(int) - image).max(-1) > 0
    assert not changed[blurred == 0].any()
    assert not changed[:y1].any() and not changed[y2:].any() and not changed[:, :x1].any() and not changed[:, x2:].any()
    hx1, hy1, hx2, hy2 = HAND["astronaut.png"]
    assert changed[hy1:hy2, hx1:hx2].mean() > 0.9  # the face was repainted
    text = result.infotexts[0]
    assert "ADetailer model: mediapipe_face_short, " in text and "ADetailer model 2nd: mediapipe_face_full" in text
    assert "ADetailer inpaint padding: 16" in text and 'ADetailer prompt 2nd: "[PROMPT], smiling"' in text
    assert "ADetailer note 2nd: nothing detected" in text and "ADetailer note:" not in text
    assert text.endswith("ADetailer note 2nd: nothing detected")


def test_a_no_face_image_passes_through_with_a_note(engine):
    image = no_face()
    result = engine.generate(_img2img(image, [ADetailerTab(ad_model="mediapipe_face_full")]))
    assert np.array_equal(result.images[0], image)
    assert "ADetailer model: mediapipe_face_full, " in result.infotexts[0]
    assert "ADetailer note: nothing detected" in result.infotexts[0]
    assert any("nothing detected; the image is unchanged" in w for w in result.info["warnings"])


def test_txt2img_without_detections_is_the_plain_image(engine):
    """Where nothing is detected (the tiny model's noise-like txt2img images, at a confidence of 0.99: at the
    default 0.3 the full-range model finds "faces" in them), ADetailer leaves the request's own images."""
    req = GenerationRequest(prompt="noise", steps=2, width=64, height=64, seed=3, batch_size=2)
    plain = engine.generate(req)
    tab = ADetailerTab(ad_model="mediapipe_face_full", ad_confidence=0.99)
    detailed = engine.generate(replace(req, adetailer=ADetailer((tab,))))
    assert all(np.array_equal(a, b) for a, b in zip(plain.images, detailed.images))
    assert all(t.startswith(p) and "ADetailer note: nothing detected" in t
               for p, t in zip(plain.infotexts, detailed.infotexts))


@pytest.mark.slow
def test_progress_phases_and_cancel_between_passes(engine):
    image, _ = two_faces()
    events, cancel = [], threading.Event()
    tab = ADetailerTab(ad_model="mediapipe_face_full", ad_prompt="first face [SEP] second face")
    req = _img2img(image, [tab])
    rec = RecordingEngine(engine)
    from engine.adetailer import run

    def progress(event):
        events.append(event)
        if event.phase == "detailing" and "region 1 of 2: sampling" in event.detail:
            cancel.set()  # during the first region's pass: it stops there, the second never starts

    with pytest.raises(Cancelled):
        run(rec, req, engine.detectors, progress=progress, cancel=cancel)
    assert len(rec.requests) == 2  # the base request and the first region's pass
    detailing = [e for e in events if e.phase == "detailing"]
    assert detailing[0].detail.startswith("ADetailer 1st tab (mediapipe_face_full): detecting on image 1 of 1")
    assert any("region 1 of 2" in e.detail for e in detailing)
    # without cancel: both regions, the request's steps grown by each pass's
    events.clear()
    rec.requests.clear()
    result = run(rec, req, engine.detectors, progress=events.append)
    assert len(rec.requests) == 3 and result.images[0].shape == image.shape
    assert [r.prompt for r in rec.requests[1:]] == ["first face", "second face"]  # [SEP]: a prompt per region
    assert [r.seed for r in rec.requests[1:]] == [req.seed, req.seed + 1]  # the image's seed + the region's index
    last = events[-1]
    assert last.phase == "detailing" and last.step == last.steps == 1 + 2 * 2  # base 1 step; 2 passes of 2


# ------------------------------------------------------------------------------------------------ memory
def test_the_memory_budget_counts_the_inpaint_passes(tiny_store):
    from engine.admission import check_memory
    from engine.config import EngineConfig
    from engine.memory import architecture_of, estimate_request

    arch, native = architecture_of(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    plain = estimate_request(arch, 256, 256, 2, backend="torch")
    detail = estimate_request(arch, 256, 256, 2, backend="torch", detailer=(1024, 1024))
    assert detail.total > plain.total and detail.peak > plain.peak
    small = estimate_request(arch, 256, 256, 2, backend="torch", detailer=(64, 64))
    assert small.total >= plain.total  # the images are held while the passes run
    config = EngineConfig(models_dir=tiny_store, backend="torch")
    tab = ADetailerTab(ad_model="mediapipe_face_short", ad_use_inpaint_width_height=True, ad_inpaint_width=1024,
                       ad_inpaint_height=1024)
    req = GenerationRequest(width=256, height=256, batch_size=2, adetailer=ADetailer((tab,)))
    budget = (plain.total + detail.total) // 2
    with pytest.raises(TooMuchMemory) as exc:
        check_memory(arch, native, "tiny-sd1", config, req, budget)
    assert exc.value.field == "adetailer" and "ad_inpaint_width" in exc.value.allowed
    check_memory(arch, native, "tiny-sd1", config, replace(req, adetailer=None), budget)


# ------------------------------------------------------------------------------------------------ the API
def _payload(tabs, *, first=(True, False)):
    return {"prompt": "x", "steps": 2, "width": 64, "height": 64, "alwayson_scripts": {"ADetailer": {"args": [
        *first, *tabs]}}}


@pytest.fixture(scope="module")
def service(models_dir, tmp_path_factory):
    from api_compat.service import TaskService

    svc = TaskService(results_dir=tmp_path_factory.mktemp("adetailer-results"), models_dir=models_dir,
                      cache_dir=tmp_path_factory.mktemp("adetailer-svc-cache"), backend="torch",
                      default_model="tiny-sd1")
    yield svc
    svc.close()


def _translated(service, payload, kind="txt2img", strict=False):
    from api_compat.schema import parse_request
    from api_compat.translate import translate_request

    parsed = parse_request(kind, payload, strict=strict)
    return parsed, translate_request(kind, parsed, service.configs["default"]).request


def test_the_args_forms_and_the_leniency_policy(service):
    from api_compat.errors import ApiError

    tab = {"ad_model": "mediapipe_face_short", "ad_mask_k_largest": 1, "is_api": [], "ad_unknown": 5}
    for first in ((True, False), (True,), ()):  # the extension's older forms: the two booleans optional
        parsed, req = _translated(service, _payload([tab], first=first))
        assert req.adetailer.tabs == (ADetailerTab(ad_model="mediapipe_face_short", ad_mask_k=1),)
        assert parsed.ignored_fields == ("alwayson_scripts.ADetailer.args[%d].ad_unknown" % len(first),)
        assert any("ad_unknown: unknown field, ignored" in w for w in parsed.warnings())
    with pytest.raises(ApiError) as exc:  # strict: the unknown key is an error
        _translated(service, _payload([tab]), strict=True)
    assert exc.value.code == "unknown_field" and exc.value.field == "alwayson_scripts.ADetailer.args[2].ad_unknown"
    for off in (_payload([tab], first=(False, False)), _payload([{"ad_model": "None"}]),
                _payload([{"ad_model": "mediapipe_face_short", "ad_tab_enable": False}])):
        assert _translated(service, off)[1].adetailer is None  # disabled forms: nothing runs
    assert _translated(service, {"prompt": "x", "alwayson_scripts": {"adetailer": {"args": [
        {"ad_model": "mediapipe_face_full"}]}}})[1].adetailer is not None  # the title in any case
    refused = [({"ad_model": "face_yolov8n.pt"}, "ad_model", "invalid_request"),
               ({"ad_model": "mediapipe_face_short", "ad_confidence": 1.5}, "ad_confidence", "invalid_request"),
               ({"ad_model": "mediapipe_face_short", "ad_mask_merge_invert": "Invert"}, "ad_mask_merge_invert",
                "invalid_request"),
               ({"ad_model": "mediapipe_face_short", "ad_inpaint_width": 100}, "ad_inpaint_width", "invalid_request"),
               ({"ad_model": "mediapipe_face_short", "ad_controlnet_model": "control_v11p_sd15_inpaint"},
                "ad_controlnet_model", "not_supported"),
               ({"ad_model": "mediapipe_face_short", "ad_use_checkpoint": True, "ad_checkpoint": "other"},
                "ad_checkpoint", "not_supported"),
               ({"ad_model": "mediapipe_face_short", "ad_use_sampler": True, "ad_sampler": "Nope"}, "ad_sampler",
                "invalid_request")]
    for tab, key, code in refused:
        with pytest.raises(ApiError) as exc:
            service.check(_payload([tab]))
        assert (exc.value.field, exc.value.code) == (f"alwayson_scripts.ADetailer.args[2].{key}", code), exc.value
        assert exc.value.allowed


def _b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    from tests.test_webui_client import Server

    srv = Server(models_dir.parent, "--backend", "torch")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_both_api_faces(server):
    """The extension's routes, then the same img2img through /sdapi/v1 (the webui face) and /scc (the task API):
    the same pixels, the face repainted, the rest the input's, the infotext's ADetailer lines."""
    assert server.get("/adetailer/v1/version").json() == {"version": VERSION}
    assert server.get("/adetailer/v1/ad_model").json() == {"ad_model": ["mediapipe_face_full", "mediapipe_face_short"]}
    assert "ad_confidence" in server.get("/adetailer/v1/schema").json()["properties"]
    scripts = server.get("/sdapi/v1/scripts").json()
    assert "adetailer" in scripts["txt2img"] and "adetailer" in scripts["img2img"]
    image = photo("astronaut.png")
    tab = {"ad_model": "mediapipe_face_short", "ad_inpaint_only_masked_padding": 8, "ad_steps": 2, "ad_use_steps": True}
    script = {"ADetailer": {"args": [True, True, tab]}}
    payload = {"prompt": "a portrait", "steps": 2, "width": SIZE, "height": SIZE, "seed": 5, "denoising_strength": 0.5,
               "init_images": [_b64(image)], "alwayson_scripts": script,
               "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}
    r = server.post("/sdapi/v1/img2img", payload)
    assert r.status_code == 200, r.text
    webui = _pixels(r.json()["images"][0])
    info = json.loads(r.json()["info"])
    assert "ADetailer model: mediapipe_face_short" in info["infotexts"][0]
    assert "ADetailer inpaint padding: 8" in info["infotexts"][0]
    assert info["extra_generation_params"]["ADetailer model"] == "mediapipe_face_short"
    assert info["extra_generation_params"]["ADetailer version"] == VERSION
    r = server.post("/scc/sd_img2img", payload)
    assert r.status_code == 200, r.text
    task, end = r.json()["taskId"], time.monotonic() + 300
    while time.monotonic() < end:
        result = server.post("/scc/sd_get_result", {"taskId": task}).json()
        if result["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert result["status"] == "succeeded", result
    png = server.get("/" + result["images"][0].split("/", 3)[3]).content
    scc = _pixels(base64.b64encode(png).decode())
    assert "ADetailer model: mediapipe_face_short" in result["info"]["infotexts"][0]
    assert np.array_equal(webui, scc)
    changed = np.abs(webui.astype(int) - image).max(-1) > 0
    x1, y1, x2, y2 = HAND["astronaut.png"]
    assert changed[y1:y2, x1:x2].mean() > 0.9 and not changed[:40].any() and not changed[:, 400:].any()


@pytest.mark.slow
def test_the_celery_backend_makes_the_embedded_image(models_dir, service, tmp_path):
    """The same ADetailer img2img through `sdengine serve --queue` and a real Celery worker (the worker parses and
    translates the payload again): succeeded, the embedded backend's pixels and infotext."""
    import httpx

    from tests.queue_support import RedisServer, WorkerProcess, free_port

    if shutil.which("redis-server") is None or importlib.util.find_spec("celery") is None:
        pytest.skip("redis-server or the 'queue' extra (celery, redis) is absent")
    image = photo("grace_hopper.jpg")
    payload = {"prompt": "a portrait", "steps": 2, "width": SIZE, "height": SIZE, "seed": 9, "denoising_strength": 0.5,
               "init_images": [_b64(image)], "stable_diffusion_model": "tiny-sd1", "alwayson_scripts": {
                   "ADetailer": {"args": [True, True, {"ad_model": "mediapipe_face_full", "ad_steps": 2,
                                                       "ad_use_steps": True}]}}}
    embedded = service.wait(service.sd_img2img(payload)["taskId"], timeout=300)
    assert embedded["status"] == "succeeded", embedded
    expected = np.asarray(__import__("PIL.Image").Image.open(
        service.image_path(embedded["taskId"], 0)).convert("RGB"))
    (tmp_path / "redis").mkdir()
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    url, results = redis_server.url(3), tmp_path / "results"
    worker = WorkerProcess(url, results, tmp_path / "worker.log", "--models-dir", str(models_dir), "--backend",
                           "torch", "--cache-dir", str(tmp_path / "cache")).start()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    import subprocess
    import sys

    from tests.api_support import wait_healthy

    serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--queue", url,
                              "--results-dir", str(results), "--models-dir", str(models_dir), "--backend", "torch"],
                             cwd=ROOT, env=env, stdout=open(tmp_path / "serve.log", "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        client = redis_server.client(3)
        worker.wait_ready(client)
        client.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_healthy(f"http://127.0.0.1:{port}", serve, lambda: (tmp_path / "serve.log").read_text()[-3000:])
            task = http.post("/scc/sd_img2img", json=payload).json()["taskId"]
            end = time.monotonic() + 300
            while time.monotonic() < end:
                result = http.post("/scc/sd_get_result", json={"taskId": task}).json()
                if result["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.2)
            assert result["status"] == "succeeded", (result, (tmp_path / "worker.log").read_text()[-3000:])
            png = http.get(result["images"][0]).content
        assert np.array_equal(_pixels(base64.b64encode(png).decode()), expected)
        assert result["info"]["infotexts"][0] == embedded["info"]["infotexts"][0]
        assert "ADetailer model: mediapipe_face_full" in result["info"]["infotexts"][0]
    finally:
        import signal

        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(10)
        worker.kill()
        redis_server.kill()


def test_img2img_inpainting_keeps_the_regions_its_mask_touches(models_dir):
    """The extension's inpaint_mask_filter: with the request's own mask (not "Only masked"), only the regions
    that touch it are repainted; "Only masked" keeps them all."""
    from engine.adetailer import regions

    image, boxes = two_faces()
    user = np.zeros(image.shape[:2], np.uint8)
    user[:, :400] = 255  # the left photo's face only
    tab = ADetailerTab(ad_model="mediapipe_face_full")
    req = GenerationRequest(width=1024, height=512, init=InitImage(image=image, mask=user, inpaint_full_res=False))
    found, count = regions(Detectors(models_dir), tab, image, req, (1024, 512))
    assert count == 2 and len(found) == 1
    ys, xs = np.nonzero(found[0])
    assert iou((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), boxes[0]) >= 0.5
    inverted = replace(req, init=replace(req.init, inpainting_mask_invert=True))
    (other,), _ = regions(Detectors(models_dir), tab, image, inverted, (1024, 512))
    assert np.nonzero(other)[1].min() > 512  # the inverted mask touches the right face only
    only_masked = replace(req, init=replace(req.init, inpaint_full_res=True))
    assert len(regions(Detectors(models_dir), tab, image, only_masked, (1024, 512))[0]) == 2
