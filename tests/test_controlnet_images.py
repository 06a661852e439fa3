"""ControlNet image handling (engine/controlnet/images.py): decoding, resize modes, pixel perfect, tensor.

Reference: sd-webui-controlnet v1.1.4xx scripts/controlnet.py detectmap_proc / high_quality_resize and
internal_controlnet/external_code.py pixel_perfect_resolution (formulas restated in the tests).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from engine.controlnet import ControlMode, prepare_unit  # noqa: E402
from engine.controlnet.images import (  # noqa: E402
    ResizeMode,
    control_tensor,
    decode_image,
    fit_detected_map,
    high_quality_resize,
    hwc3,
    pixel_perfect_resolution,
)
from core.errors import InvalidRequest  # noqa: E402
from engine.request import ControlNetUnit  # noqa: E402

FIELD = "alwayson_scripts.controlnet.units[0].input_image"


def png_b64(arr: np.ndarray, mode=None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming width x height (RGB 8-bit) + an empty IDAT + IEND: no pixels allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------- decoding


def test_decode_base64_and_data_uri_roundtrip():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    b64 = png_b64(arr)
    assert np.array_equal(decode_image(b64, FIELD), arr)
    assert np.array_equal(decode_image("data:image/png;base64," + b64, FIELD), arr)
    # line-wrapped base64 and missing padding are accepted, like Python's decoder after stripping
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)).rstrip("=")
    assert np.array_equal(decode_image(wrapped, FIELD), arr)


def test_decode_gray_and_rgba_like_hwc3():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert np.array_equal(decode_image(png_b64(gray), FIELD), np.stack([gray] * 3, axis=2))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.array([0, 128, 255, 64], np.uint8)[None, :]
    out = decode_image(png_b64(rgba, "RGBA"), FIELD)
    # composited on white: color * a + 255 * (1 - a), truncated to uint8
    a = rgba[..., 3:4].astype(np.float32) / 255
    expected = (rgba[..., :3].astype(np.float32) * a + 255 * (1 - a)).clip(0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.array_equal(hwc3(rgba), expected)


@pytest.mark.parametrize("data, message", [
    ("not base64 !!!", "not valid base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    (base64.b64encode(b"hello, this is not an image").decode(), "not a readable image"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("", "empty image"),
    ("https://example.com/a.png", "URLs are not allowed"),
])
def test_decode_errors_name_the_field(data, message):
    with pytest.raises(InvalidRequest) as err:
        decode_image(data, FIELD)
    assert err.value.field == FIELD and message in str(err.value)
    assert str(err.value).startswith(FIELD)


def test_decode_non_string():
    with pytest.raises(InvalidRequest) as err:
        decode_image(123, FIELD)  # type: ignore[arg-type]
    assert err.value.field == FIELD


def test_decode_too_many_bytes():
    b64 = png_b64(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(InvalidRequest) as err:
        decode_image(b64, FIELD, max_bytes=1000)
    assert err.value.field == FIELD and "larger than 1000 bytes" in str(err.value)


def test_decode_too_many_pixels_from_header():
    """A PNG header claiming 100k x 100k (1e10 px, 30 GB as RGB) is rejected from its header, without decoding."""
    huge = base64.b64encode(png_header_only(100_000, 100_000)).decode()
    with pytest.raises(InvalidRequest) as err:
        decode_image(huge, FIELD, max_pixels=4096 * 4096)
    assert err.value.field == FIELD and "too many pixels" in str(err.value)
    # below PIL's own bomb limit, our max_pixels decides (3000 x 3000 > 2048 x 2048)
    mid = base64.b64encode(png_header_only(3000, 3000)).decode()
    with pytest.raises(InvalidRequest, match=r"too many pixels \(3000x3000\)"):
        decode_image(mid, FIELD, max_pixels=2048 * 2048)


def test_decode_truncated_image():
    b64 = png_b64(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    raw = base64.b64decode(b64)[:200]
    with pytest.raises(InvalidRequest) as err:
        decode_image(base64.b64encode(raw).decode(), FIELD)
    assert err.value.field == FIELD


# ------------------------------------------------------------------------------------------- resizing


def smooth_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def test_just_resize_exact_size():
    x = smooth_image(100, 300)
    out = fit_detected_map(x, "Just Resize", 64, 96)
    assert out.shape == (64, 96, 3)
    # many colours, shrinking: INTER_AREA
    assert np.array_equal(out, cv2.resize(x, (96, 64), interpolation=cv2.INTER_AREA))


def test_crop_and_resize_geometry():
    """Cover the target (k = max(H/h, W/w)), then centre-crop: the middle of the source stays in the middle."""
    x = smooth_image(100, 300)
    out = fit_detected_map(x, ResizeMode.INNER_FIT, 64, 96)
    assert out.shape == (64, 96, 3)
    k = max(64 / 100, 96 / 300)  # 0.64 -> 192 x 64, crop 48 px each side
    scaled = cv2.resize(x, (int(round(300 * k)), int(round(100 * k))), interpolation=cv2.INTER_AREA)
    assert scaled.shape == (64, 192, 3)
    assert np.array_equal(out, scaled[:, 48:48 + 96])
    # default mode of the API is Crop and Resize
    assert ResizeMode.parse("Crop and Resize") is ResizeMode.INNER_FIT and ResizeMode.parse(1) is ResizeMode.INNER_FIT


def test_resize_and_fill_geometry_and_border_median():
    x = np.zeros((100, 300, 3), np.uint8)
    x[:] = (10, 20, 30)  # border colour
    x[20:80, 50:250] = smooth_image(60, 200)
    out = fit_detected_map(x, "Resize and Fill", 96, 96)
    assert out.shape == (96, 96, 3)
    # k = min(0.96, 0.32) = 0.32 -> 96 x 32, centred: rows 32..63 hold the image, the rest the median border
    assert np.all(out[:32] == (10, 20, 30)) and np.all(out[64:] == (10, 20, 30))
    inner = high_quality_resize(x, (96, 32))
    assert np.array_equal(out[32:64], inner)


def test_upscale_uses_cubic_and_few_colours_nearest():
    x = smooth_image(32, 32)
    assert np.array_equal(high_quality_resize(x, (64, 64)), cv2.resize(x, (64, 64), interpolation=cv2.INTER_CUBIC))
    seg = np.zeros((32, 32, 3), np.uint8)
    seg[:16] = (255, 0, 0)
    seg[16:, :16] = (0, 255, 0)
    seg[16:, 16:] = (0, 0, 255)
    up = high_quality_resize(seg, (48, 48))
    assert len(np.unique(up.reshape(-1, 3), axis=0)) == 3  # nearest keeps the segment colours


def test_binary_edge_map_stays_binary_and_thin_when_upscaled():
    edges = cv2.Canny(cv2.GaussianBlur(smooth_image(64, 64, 3), (0, 0), 1.0), 20, 60)
    edges3 = np.stack([edges] * 3, axis=2)
    assert edges.any()
    up = high_quality_resize(edges3, (128, 128))
    assert up.shape == (128, 128, 3) and set(np.unique(up)) <= {0, 255}
    # still one-pixel-ish edges: at most ~2.5x the edge pixels of the source for a 2x upscale (not a 4x blob)
    assert np.count_nonzero(up[:, :, 0]) < 2.5 * np.count_nonzero(edges)


def test_pixel_perfect_resolution_formula():
    img = np.zeros((300, 500, 3), np.uint8)
    # Crop and Resize / Just Resize: max(512/300, 768/500) * 300 = 1.7067 * 300 = 512
    assert pixel_perfect_resolution(img, 512, 768, "Crop and Resize") == 512
    assert pixel_perfect_resolution(img, 512, 768, "Just Resize") == 512
    # Resize and Fill: min(1.7067, 1.536) * 300 = 460.8 -> 461
    assert pixel_perfect_resolution(img, 512, 768, "Resize and Fill") == 461


def test_control_tensor_layout():
    x = smooth_image(8, 12)
    t = control_tensor(x)
    assert t.shape == (1, 3, 8, 12) and t.dtype == np.float32
    assert np.allclose(t[0, 1], x[:, :, 1] / 255.0) and t.min() >= 0 and t.max() <= 1


def test_prepare_unit_end_to_end():
    img = np.zeros((200, 300, 3), np.uint8)
    cv2.rectangle(img, (60, 50), (240, 150), (255, 255, 255), -1)
    unit = ControlNetUnit(model="cn", image=img, module="canny", weight=0.8, guidance_end=0.6,
                          resize_mode="Crop and Resize", control_mode="My prompt is more important",
                          pixel_perfect=True)
    p = prepare_unit(unit, width=96, height=64)
    assert p.image.shape == (1, 3, 64, 96) and p.detected_map.shape == (64, 96, 3)
    assert p.control_mode is ControlMode.PROMPT and p.weight == 0.8 and p.module == "canny"
    # pixel perfect: max(64/200, 96/300) * 200 = 64 -> canny at 64 px short side, no resize needed after
    assert np.array_equal(p.detected_map[:, :, 0], cv2.Canny(
        np.pad(cv2.resize(img, (96, 64), interpolation=cv2.INTER_AREA), [[0, 0], [0, 32], [0, 0]], mode="edge"),
        100, 200)[:, :96])
    with pytest.raises(InvalidRequest, match=r"units\[2\]\.module"):
        prepare_unit(ControlNetUnit(model="cn", image=img, module="openpose"), 64, 64,
                     field="alwayson_scripts.controlnet.units[2]")


def test_decode_url_when_allowed(tmp_path):
    """http(s) URLs are fetched only with allow_urls (served here by a local http.server: a loopback address,
    fetched only by a policy that allows private addresses)."""
    import functools

    from core.urlfetch import UrlPolicy
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    arr = np.random.default_rng(4).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(base64.b64decode(png_b64(arr)))
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        local = UrlPolicy(allow_private=True)
        assert np.array_equal(decode_image(url, FIELD, allow_urls=local), arr)
        with pytest.raises(InvalidRequest, match="private, loopback or link-local"):  # the default policy
            decode_image(url, FIELD, allow_urls=True)
        with pytest.raises(InvalidRequest, match="URLs are not allowed"):
            decode_image(url, FIELD)
        with pytest.raises(InvalidRequest, match="larger than 10 bytes"):
            decode_image(url, FIELD, max_bytes=10, allow_urls=local)
        with pytest.raises(InvalidRequest, match="could not be fetched") as err:
            decode_image(url.replace("a.png", "missing.png"), FIELD, allow_urls=local)
        assert err.value.field == FIELD
    finally:
        server.shutdown()
        server.server_close()


def test_decode_16bit_gray_keeps_high_byte():
    a = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    out = decode_image(base64.b64encode(buf.getvalue()).decode(), FIELD)
    assert out.shape == (16, 16, 3) and np.array_equal(out[:, :, 0], (a >> 8).astype(np.uint8))
