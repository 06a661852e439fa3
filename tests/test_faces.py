"""Face restoration (engine.faces; the webui's restore_faces, face_restoration_model, code_former_weight).

- Detection and crop/paste on real photos (the shared test weights' ``photos``: astronaut.png and grace_hopper.jpg, one
  face each; skipped with a reason where the folder is absent): exactly one face is found, its box covers the face
  (hand-measured face centres and sizes below), the aligned crop pasted back through an identity "restorer" leaves
  the photo within 3/255 mean inside the face and bit-equal far from it; a restorer that paints the crop puts the
  paint on the face and nowhere far from it. Photos without a face (a cat, a cup) give none.
- Models: random-weight GFPGAN (v1.4 "clean") and CodeFormer of the real architectures (spandrel's and
  spandrel_extra_arches' classes), written by the test in the webui's layout (``models/GFPGAN/GFPGANv1.4.pth``,
  ``models/Codeformer/codeformer-v0.1.0.pth``: ``{"params_ema": state dict}``): listed, detected, a file of the
  other architecture refused naming it; restoring the astronaut changes pixels on the face only.
- GFPGAN and CodeFormer through restore(): pixels on the face change, pixels far from it do not; visibility 0
  returns the input.
- The webui's API test payloads (test_txt2img_with_restore_faces_performed, ..._with_tiling_performed) through
  the real server with that GFPGAN file placed in models/GFPGAN: 200, the infotext's "Face restoration: GFPGAN"
  (after Seed, as the webui writes it) and "Tiling: True"; /sdapi/v1/face-restorers lists it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidRequest, ModelError
from engine import faces
from tests.weights_support import WEIGHTS as SHARED

# found, not imported: spandrel_extra_arches' __init__ imports every extra architecture (engine.faces does not)
FACES_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("spandrel", "spandrel_extra_arches", "dlib"))
needs_photos = pytest.mark.skipif(not FACES_EXTRA or SHARED is None or not (SHARED / "photos").is_dir(),
                                  reason="the faces extra (dlib) or the shared real photos (SDENGINE_SHARED_WEIGHTS, or "
                                         "shared/weights beside a parent folder of the repository) are absent")
# hand-measured on the photos: (face centre x, y), face width in pixels
FACES = {"astronaut.png": ((220, 122), 90), "grace_hopper.jpg": ((272, 236), 180)}


def photo(name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(SHARED / "photos" / name).convert("RGB"))


def far_from(face: faces.Face, shape, margin: float = 1.0) -> np.ndarray:
    """Mask of the pixels more than ``margin`` box sizes away from the face box."""
    x0, y0, x1, y1 = face.box
    m = margin * max(x1 - x0, y1 - y0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx < x0 - m) | (xx > x1 + m) | (yy < y0 - m) | (yy > y1 + m)


@needs_photos
@pytest.mark.parametrize("name", sorted(FACES))
def test_detection_finds_the_one_face(name):
    img = photo(name)
    found = faces.detect(img)
    assert len(found) == 1, [f.box for f in found]
    (cx, cy), size = FACES[name]
    x0, y0, x1, y1 = found[0].box
    assert x0 < cx < x1 and y0 < cy < y1, (found[0].box, (cx, cy))
    assert 0.6 * size <= x1 - x0 <= 1.5 * size
    # the landmarks (eyes above the nose above the mouth) lie inside the box
    eyes, nose, mouth = found[0].landmarks[:2], found[0].landmarks[2], found[0].landmarks[3:]
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()


@needs_photos
@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png"])
def test_no_face_no_detection(name):
    assert faces.detect(photo(name)) == []


@needs_photos
@pytest.mark.parametrize("name", sorted(FACES))
def test_crop_and_paste_back(name):
    img = photo(name)
    (face,) = faces.detect(img)
    crop, affine = faces.align(img, face)
    assert crop.shape == (512, 512, 3)
    # identity restorer: the photo comes back (two interpolations inside the face, bit-equal far from it)
    back = np.clip(faces.paste(img.astype(np.float32), crop.astype(np.float32), affine), 0, 255).astype(np.uint8)
    far = far_from(face, img.shape)
    assert np.array_equal(back[far], img[far])
    x0, y0, x1, y1 = face.box
    inner = np.abs(back[y0:y1, x0:x1].astype(float) - img[y0:y1, x0:x1]).mean()
    assert inner <= 3.0, inner
    # a painting restorer: the paint lands on the face, not far from it
    paint = np.zeros_like(crop, dtype=np.float32)
    paint[..., 1] = 255.0
    painted = faces.paste(img.astype(np.float32), paint, affine)
    (cx, cy), _ = FACES[name]
    assert painted[cy, cx, 1] > 250 and painted[cy, cx, 0] < 5
    assert np.array_equal(painted[far], img[far].astype(np.float32))


# ------------------------------------------------------------------------------------------------ models
def write_gfpgan(folder: Path) -> Path:
    import torch

    faces._extra_arches()
    from spandrel.architectures.GFPGAN import GFPGAN  # spandrel's GFPGANv1Clean, the v1.3/v1.4 architecture

    torch.manual_seed(0)
    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                 num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "GFPGANv1.4.pth"
    # the release files' layout ({"params_ema": ...}); fp16 halves the test file (loaded into the fp32 model)
    torch.save({"params_ema": {k: v.half() for k, v in net.state_dict().items()}}, path)
    return path


def write_codeformer(folder: Path) -> Path:
    import torch

    faces._extra_arches()
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(1)
    net = CodeFormer(dim_embd=512, n_head=8, n_layers=9, codebook_size=1024, latent_size=256,
                     connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "codeformer-v0.1.0.pth"
    torch.save({"params_ema": {k: v.half() for k, v in net.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    if not FACES_EXTRA:
        pytest.skip("the faces extra (spandrel, spandrel_extra_arches, dlib) is not installed")
    root = tmp_path_factory.mktemp("face-models")
    write_gfpgan(root / "GFPGAN")
    write_codeformer(root / "Codeformer")
    return root


def test_no_model_is_an_error_naming_the_folders(tmp_path):
    with pytest.raises(InvalidRequest) as exc:
        faces.check(tmp_path, None)
    assert exc.value.field == "face_restoration"
    assert str(tmp_path / "GFPGAN") in str(exc.value) and str(tmp_path / "Codeformer") in str(exc.value)


def test_models_are_listed_and_detected(models_dir, tmp_path):
    assert list(faces.installed(models_dir)) == ["CodeFormer", "GFPGAN"]
    assert faces.check(models_dir, None) == "CodeFormer" and faces.check(models_dir, "gfpgan") == "GFPGAN"
    with pytest.raises(InvalidRequest) as exc:
        faces.check(models_dir, "RestoreFormer")
    assert exc.value.field == "face_restoration.model" and "CodeFormer, GFPGAN" in str(exc.value)
    only = tmp_path / "only-gfpgan"
    (only / "GFPGAN").mkdir(parents=True)
    (only / "GFPGAN" / "GFPGANv1.4.pth").symlink_to(models_dir / "GFPGAN" / "GFPGANv1.4.pth")
    with pytest.raises(InvalidRequest) as exc:
        faces.check(only, "CodeFormer")
    assert str(only / "Codeformer") in str(exc.value)
    # a CodeFormer file in the GFPGAN folder: refused naming the file
    wrong = tmp_path / "wrong.pth"
    wrong.symlink_to(models_dir / "Codeformer" / "codeformer-v0.1.0.pth")
    with pytest.raises(ModelError) as exc:
        faces.load_restorer(wrong, "GFPGAN")
    assert "wrong.pth" in str(exc.value)


@needs_photos
@pytest.mark.parametrize("model", ["CodeFormer", "GFPGAN"])
def test_restores_the_face_only(models_dir, model):
    img = photo("astronaut.png")
    (face,) = faces.detect(img)
    models = faces.FaceModels(models_dir)
    out = faces.restore(img, model, 1.0, 0.5, models=models)
    changed = np.abs(out.astype(int) - img).max(-1) > 0
    far = far_from(face, img.shape)
    assert changed[face.box[1]:face.box[3], face.box[0]:face.box[2]].mean() > 0.9
    assert not changed[far].any()
    assert np.array_equal(faces.restore(img, model, 0.0, models=models), img)  # visibility 0: the input


# ------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.test_webui_client import Server

    if not FACES_EXTRA:
        pytest.skip("the faces extra (spandrel, spandrel_extra_arches, dlib) is not installed")
    root = tmp_path_factory.mktemp("faces-server")
    write_gfpgan(root / "models" / "GFPGAN")  # the test setup places a (random-weight) restorer, as a user would
    srv = Server(root, "--backend", "torch")
    yield srv
    srv.stop()


# the webui's own API test payload (test/test_txt2img.py, v1.9.x)
WEBUI_SUITE_TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
    "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
    "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
    "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
    "subseed_strength": 0, "tiling": False, "width": 64,
}


def test_webui_suite_restore_faces_and_tiling(server):
    r = server.get("/sdapi/v1/face-restorers")
    assert r.status_code == 200 and r.json() == [{"name": "GFPGAN", "cmd_dir": str(server.root / "models" / "GFPGAN")}]
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_SUITE_TXT2IMG, "restore_faces": True})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["restore_faces"] is True and info["face_restoration_model"] == "GFPGAN"
    assert ", Face restoration: GFPGAN, Size: 64x64, " in info["infotexts"][0]
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_SUITE_TXT2IMG, "tiling": True})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Tiling: True" in info["infotexts"][0] and "Face restoration" not in info["infotexts"][0]
    # the option decides a request that leaves the field null; a named restorer that is not installed is refused
    r = server.post("/sdapi/v1/txt2img", {**WEBUI_SUITE_TXT2IMG, "restore_faces": None,
                                          "override_settings": {"face_restoration": True,
                                                                "face_restoration_model": "CodeFormer"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "override_settings.face_restoration_model", r.text
    assert "Codeformer" in r.json()["error"]["message"]
