"""Real photos (the shared weights' ``photos/``: public domain / CC0) as img2img init images, inpainting images and
ControlNet images, through the real pipeline (tiny models, torch backend, small sizes: the photos are resized
down). The drawn scenes of tests/test_img2img.py test the same paths against references; these check that a
real photo goes through them with a meaningful result:

- img2img keeps the photo at a low denoising strength: with the real TAESD encoder/decoder (the bundled files,
  ``sd_vae_encode_method`` / ``sd_vae_decode_method`` "TAESD") at 128x128, strength 0.05 (one step of 10):
  PSNR vs the photo >= 16 dB (measured 18.7 dB; TAESD's own round trip at this size is 18.7 dB, the tiny model's
  random-weights VAE scores ~9 dB whatever the strength), and strength 0.5 loses at least 5 dB of it
  (measured 6.7 dB at 0.5: the tiny model's random UNet repaints);
- inpainting (whole picture, no mask blur) leaves every pixel outside the mask equal to the photo's and repaints
  the masked square (mean absolute difference > 10/255);
- canny on a photo gives edges (1-30 % of the pixels at the extension's default thresholds; a flat image none),
  and a canny ControlNet unit with the photo changes the image and returns that edge map as its detected map.

Skips with a reason where the shared folder is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.controlnet.preprocessors import preprocess
from engine.pipeline import Engine
from engine.request import ControlNetUnit, GenerationRequest, InitImage
from tests.weights_support import needs, photo_rgb, psnr

pytestmark = needs("photos", "the real photos")

MODEL = "tiny-sd1"
PSNR_KEPT = 16.0  # dB, img2img at strength 0.05 through TAESD at 128x128 (measured 18.7)


@pytest.fixture(scope="module")
def engine(tiny_store, tmp_path_factory):
    return Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path_factory.mktemp("photo-artefacts"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_img2img_low_denoising_keeps_the_photo(engine):
    photo = photo_rgb("astronaut.png", 128)
    base = dict(model=MODEL, prompt="a photo of an astronaut", steps=10, seed=1, sampler_name="Euler", width=128,
                height=128, vae_encode_method="TAESD", vae_decode_method="TAESD")
    kept = engine.generate(GenerationRequest(**base, init=InitImage(photo, 0.05))).images[0]
    repainted = engine.generate(GenerationRequest(**base, init=InitImage(photo, 0.5))).images[0]
    assert kept.shape == photo.shape
    assert psnr(kept, photo) >= PSNR_KEPT, psnr(kept, photo)
    assert psnr(repainted, photo) <= psnr(kept, photo) - 5.0, (psnr(repainted, photo), psnr(kept, photo))


def test_inpainting_a_photo_changes_only_the_mask(engine):
    photo = photo_rgb("chelsea.png", 96)
    mask = np.zeros((96, 96), np.uint8)
    mask[32:64, 40:72] = 255
    res = engine.generate(GenerationRequest(
        model=MODEL, prompt="a cat", steps=4, seed=3, sampler_name="Euler", width=96, height=96,
        init=InitImage(photo, 0.75, mask=mask, mask_blur_x=0, mask_blur_y=0, inpaint_full_res=False)))
    img = res.images[0]
    keep = mask == 0
    assert np.array_equal(img[keep], photo[keep]), "pixels outside the mask must be the photo's"
    assert mad(img[~keep], photo[~keep]) > 10.0, mad(img[~keep], photo[~keep])


def test_canny_on_photos_gives_edges():
    flat = np.full((128, 128, 3), 128, np.uint8)
    assert preprocess("canny", flat, -1, -1, -1).max() == 0
    for name in ("astronaut.png", "coffee.png", "camera.png", "rocket.jpg"):
        edges = preprocess("canny", photo_rgb(name, 256), -1, -1, -1)[:, :, 0]
        assert set(np.unique(edges)) <= {0, 255}
        share = float((edges == 255).mean())
        assert 0.01 < share < 0.30, (name, share)


def test_controlnet_canny_unit_on_a_photo(engine):
    photo = photo_rgb("motorcycle_left.png", 64)
    base = dict(model=MODEL, prompt="a motorcycle", steps=3, seed=4, sampler_name="Euler", width=64, height=64)
    plain = engine.generate(GenerationRequest(**base)).images[0]
    unit = ControlNetUnit(model="tiny-controlnet-sd1", image=photo, module="canny", save_detected_map=True)
    res = engine.generate(GenerationRequest(**base, controlnet_units=(unit,)))
    (detected,) = res.detected_maps
    detected = np.asarray(detected)
    edges = detected[..., 0] if detected.ndim == 3 else detected
    assert 0.01 < float((edges > 127).mean()) < 0.5, float((edges > 127).mean())
    assert mad(res.images[0], plain) > 1.0, "the canny unit must change the image"
