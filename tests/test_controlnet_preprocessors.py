"""ControlNet preprocessors (engine/controlnet/preprocessors.py) on synthetic images.

Reference: sd-webui-controlnet v1.1.4xx scripts/processor.py; canny is compared to ``cv2.Canny`` called
directly (the extension's annotator/canny is exactly that call) and must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS, get_preprocessor, preprocess  # noqa: E402
from core.errors import InvalidRequest  # noqa: E402


def rect_image(h=128, w=128, top=32, left=40, bottom=96, right=100, fg=(255, 255, 255), bg=(0, 0, 0)):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    img[top:bottom, left:right] = fg
    return img


def gradient_image(h=96, w=160, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=2)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def test_registry_names_and_aliases():
    for name in ("none", "invert", "canny", "threshold", "binary", "blur_gaussian", "scribble_xdog",
                 "lineart_standard", "color", "tile_resample"):
        assert name in PREPROCESSORS
    assert ALIASES["invert (from white bg & black line)"] == "invert"
    assert get_preprocessor("t2ia_color_grid").name == "color"
    assert get_preprocessor(None).name == "none"


def test_canny_equals_cv2_canny_at_defaults():
    """Reference cv2.Canny(img, 100, 200): at a 512x512 input nothing is resized or padded."""
    img = np.zeros((512, 512, 3), np.uint8)
    cv2.circle(img, (256, 256), 120, (200, 80, 30), -1)
    cv2.rectangle(img, (40, 60), (200, 180), (30, 160, 250), -1)
    img = cv2.GaussianBlur(img, (0, 0), 2.0)
    ours = preprocess("canny", img, -1, -1, -1)
    ref = cv2.Canny(img, 100, 200)
    assert ours.shape == (512, 512, 3)
    assert np.array_equal(ours[:, :, 0], ref) and np.array_equal(ours[:, :, 2], ref)
    assert ref.any()


def test_canny_edges_on_rectangle_boundary():
    img = rect_image(512, 512, 128, 160, 384, 400)
    edges = preprocess("canny", img, 512, 100, 200)[:, :, 0]
    ys, xs = np.nonzero(edges)
    assert edges.max() == 255 and set(np.unique(edges)) == {0, 255}
    # every edge pixel lies within 1 px of the drawn boundary, and every side is found
    on_h = (np.abs(ys - 128) <= 1) | (np.abs(ys - 383) <= 1)
    on_v = (np.abs(xs - 160) <= 1) | (np.abs(xs - 399) <= 1)
    assert np.all(on_h | on_v)
    for side in (np.abs(ys - 128) <= 1, np.abs(ys - 383) <= 1, np.abs(xs - 160) <= 1, np.abs(xs - 399) <= 1):
        assert side.sum() > 200


def test_canny_resolution_and_thresholds():
    img = gradient_image(96, 160)
    out = preprocess("canny", img, 256, 50, 120)
    # short side 96 -> 256: 160 * 256/96 = 426.67 -> 427, as the extension's resize_image_with_pad
    assert out.shape == (256, 427, 3)
    assert np.array_equal(preprocess("canny", img, -1, -1, -1), preprocess("canny", img, 512, 100, 200))
    # out of range thresholds (0, 300) fall back to the defaults too (API.md)
    assert np.array_equal(preprocess("canny", img, 512, 0, 300), preprocess("canny", img, 512, 100, 200))
    assert not np.array_equal(preprocess("canny", img, 512, 10, 20), preprocess("canny", img, 512, 100, 200))


def test_defaults_applied_for_minus_one():
    img = gradient_image()
    for name, pre in PREPROCESSORS.items():
        if pre.model_based:  # networks with weight files: tests/test_controlnet_annotators.py
            continue
        res, a, b = pre.resolve(-1, -1, -1)
        assert res == (None if pre.resolution is None else pre.resolution.default), name
        assert a == (None if pre.threshold_a is None else pre.threshold_a.default), name
        assert b == (None if pre.threshold_b is None else pre.threshold_b.default), name
        if pre.resolution is not None:
            explicit = pre(img, pre.resolution.default,
                           pre.threshold_a.default if pre.threshold_a else -1,
                           pre.threshold_b.default if pre.threshold_b else -1)
            assert np.array_equal(pre(img), explicit), name
    assert get_preprocessor("threshold").resolve(-1, -1, -1) == (512, 127, None)
    assert get_preprocessor("scribble_xdog").resolve(5000, 100, -1) == (512, 32, None)


def test_invert_inverts():
    img = gradient_image()
    out = preprocess("invert (from white bg & black line)", img)
    assert np.array_equal(out, 255 - img)


def test_none_is_identity_and_gray_becomes_rgb():
    img = gradient_image()
    assert np.array_equal(preprocess("none", img), img)
    gray = img[:, :, 0]
    assert np.array_equal(preprocess("none", gray), np.stack([gray] * 3, axis=2))


def test_threshold_binarises_at_threshold():
    # pixels whose smallest channel is > thr become white, the rest black; size 128 = res keeps the pixels
    vals = np.arange(128, dtype=np.uint8) * 2  # 0..254
    img = np.repeat(np.stack([vals, vals, np.full(128, 255, np.uint8)], axis=1)[None], 128, axis=0)
    out = preprocess("threshold", img, 128, 100)
    assert set(np.unique(out)) == {0, 255}
    expected = np.where(vals > 100, 255, 0)
    assert np.array_equal(out[0, :, 0], expected) and np.array_equal(out[-1, :, 1], expected)
    default = preprocess("threshold", img, 128, -1)[0, :, 0]
    assert np.array_equal(default, np.where(vals > 127, 255, 0))


def test_binary_inverted_with_otsu_default():
    img = rect_image(128, 128, fg=(220, 220, 220), bg=(30, 30, 30))
    out = preprocess("binary", img, 128)
    assert out[64, 64, 0] == 0 and out[5, 5, 0] == 255  # dark background -> white (inverted)
    fixed = preprocess("binary", img, 128, 100)
    assert np.array_equal(out, fixed)


def test_blur_gaussian_smooths_and_keeps_size():
    img = rect_image(128, 128)
    out = preprocess("blur_gaussian", img, 128, 4.0)
    assert out.shape == img.shape
    assert 0 < out[64, 40, 0] < 255 and out[64, 70, 0] == 255 and out[5, 5, 0] == 0
    assert np.array_equal(out, cv2.GaussianBlur(img, (0, 0), 4.0))


def test_scribble_xdog_marks_edges_only():
    img = rect_image(256, 256, 64, 64, 192, 192, fg=(0, 0, 0), bg=(255, 255, 255))
    out = preprocess("scribble_xdog", img, 256)[:, :, 0]
    assert set(np.unique(out)) <= {0, 255}
    assert out[64, 128] == 255 or out[63, 128] == 255  # boundary
    assert out[128, 128] == 0 and out[10, 10] == 0  # flat areas


def test_lineart_standard_lines_bright_on_black():
    img = np.full((128, 128, 3), 255, np.uint8)
    cv2.line(img, (10, 64), (118, 64), (0, 0, 0), 2)
    out = preprocess("lineart_standard", img, 128)[:, :, 0]
    assert out[64, 64] > 100 and out[10, 10] == 0


def test_color_grid_is_piecewise_constant():
    img = gradient_image(128, 256)
    out = preprocess("color", img, 128)
    assert out.shape == (128, 256, 3)
    # a 2 x 4 grid of 64 px cells
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 8
    assert np.all(out[:64, :64] == out[0, 0])


def test_tile_resample_downsamples():
    img = gradient_image(96, 160)
    assert np.array_equal(preprocess("tile_resample", img, -1, -1), img)
    assert preprocess("tile_resample", img, -1, 2.0).shape == (48, 80, 3)


def test_unknown_and_model_based_modules_are_invalid_requests():
    field = "alwayson_scripts.controlnet.units[1].module"
    with pytest.raises(InvalidRequest) as err:
        get_preprocessor("seg_ufade20k", field)
    assert err.value.field == field and "not available in this engine" in str(err.value)
    assert "UniFormer" in str(err.value)
    assert "canny" in err.value.allowed
    with pytest.raises(InvalidRequest, match="not supported"):
        get_preprocessor("reference_adain", field)
    with pytest.raises(InvalidRequest, match="unknown preprocessor"):
        get_preprocessor("cany", field)
