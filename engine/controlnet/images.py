"""ControlNet input images: decoding request images and fitting detected maps to the generation size.

Follows sd-webui-controlnet v1.1.4xx (scripts/controlnet.py ``detectmap_proc`` / ``high_quality_resize``,
internal_controlnet/external_code.py ``pixel_perfect_resolution``, annotator/util.py ``HWC3``):

* "Just Resize": the map is resized to exactly W x H (aspect ratio not kept).
* "Crop and Resize" (default): scaled by ``max(H/h, W/w)`` so it covers the target, then centre-cropped.
* "Resize and Fill": scaled by ``min(H/h, W/w)`` so it fits, centred on a background of the median colour of
  the map's four borders.
* Every resize is the extension's "high quality" resize: maps with 3..199 colours use nearest neighbour
  (segmentation maps stay exact), otherwise INTER_AREA when the pixel count shrinks and INTER_CUBIC when it
  grows; binary maps (2 colours, min < 16, max > 240) are re-binarised with Otsu after resizing, one-pixel edge
  maps (canny, scribbles) are first thinned with non-maximum suppression and Lvmin's hit-or-miss thinning.
* The control tensor is ``map / 255`` as (1, 3, H, W) float32.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field as dc_field
from enum import Enum
from typing import Any, Callable

import numpy as np

from core.errors import InvalidRequest
from core.lazy import require
from core.urlfetch import FetchRefused, UrlPolicy, fetch
from engine.controlnet.units import parse_mode

# Formats PIL may open for a request image (no EPS/PDF/... decoders reachable from a request).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def _cv2():
    return require("cv2", "controlnet", "ControlNet preprocessing")


class ResizeMode(str, Enum):
    """How a control map is fitted to the generation size (external_code.ResizeMode)."""

    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"

    @classmethod
    def parse(cls, value: Any, field_name: str = "resize_mode") -> "ResizeMode":
        """A mode from its name or a legacy alias (case-insensitive), or the extension's int (0, 1, 2).
        The one parser: the API schema uses it too."""
        return parse_mode(cls, value, field_name, "resize mode", RESIZE_MODE_ALIASES)

    @classmethod
    def of_img2img(cls, mode: int) -> "ResizeMode":
        """The mode of a unit that takes img2img's init image: the img2img ``resize_mode`` (0 "Just resize",
        1 "Crop and resize", 2 "Resize and fill", 3 "Just resize (latent upscale)") as the extension maps it."""
        return [cls.RESIZE, cls.INNER_FIT, cls.OUTER_FIT][mode] if 0 <= mode < 3 else cls.RESIZE


RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}


# --------------------------------------------------------------------------------------------- decoding
# long side / short side of a request image: thinner images are blown up by every resize that fits them
MAX_ASPECT = 16.0


@dataclass(frozen=True)
class EncodedImage:
    """A request image that was decoded once to validate it, kept as its compressed file bytes: what a queued
    task holds (a 4096x4096 PNG is 48 MiB decoded, often < 1 MiB compressed). :func:`as_array` decodes it when
    the unit runs. ``shape`` is (H, W, 3) as the decoded array's."""

    data: bytes = dc_field(repr=False)
    width: int
    height: int
    max_pixels: int = 4096 * 4096

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self) -> np.ndarray:
        return decode_bytes(self.data, "image", self.max_pixels)


def as_array(image) -> np.ndarray:
    """A unit image as RGB uint8: an :class:`EncodedImage` decoded, an array as is."""
    return image.decode() if isinstance(image, EncodedImage) else np.asarray(image)



def _base64_payload(data: str, field: str) -> str:
    text = data.strip()
    match = _DATA_URI.match(text)
    if match:
        if not match.group("mime").lower().startswith("image/"):
            raise InvalidRequest(field, f"data URI of type {match.group('mime')!r} is not an image",
                                 "data:image/...;base64,...")
        if "base64" not in [p.strip().lower() for p in match.group("params").split(";")]:
            raise InvalidRequest(field, "data URI is not base64-encoded", "data:image/...;base64,...")
        text = text[match.end():]
    elif text.lower().startswith("data:"):
        raise InvalidRequest(field, "malformed data URI", "data:image/...;base64,...")
    return _WHITESPACE.sub("", text)


def _b64decode(payload: str, field: str, max_bytes: int) -> bytes:
    if not payload:
        raise InvalidRequest(field, "empty image", "a base64-encoded PNG/JPEG/WEBP/BMP/GIF")
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise InvalidRequest(field, f"image is larger than {max_bytes} bytes", f"at most {max_bytes} bytes")
    if "-" in payload or "_" in payload:
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "not valid base64", "base64, or a data:image/...;base64, URI") from None
    if len(raw) > max_bytes:
        raise InvalidRequest(field, f"image is larger than {max_bytes} bytes", f"at most {max_bytes} bytes")
    return raw


def _fetch(url: str, field: str, max_bytes: int, policy: UrlPolicy) -> bytes:
    """The image at ``url`` by ``policy`` (core.urlfetch: total deadline, size cap, public addresses only unless
    allowed, one message for every network failure)."""
    try:
        raw = fetch(url, max_bytes, policy)
    except FetchRefused as exc:
        raise InvalidRequest(field, str(exc), "a public http(s) image URL that answers in time") from None
    if len(raw) > max_bytes:
        raise InvalidRequest(field, f"image is larger than {max_bytes} bytes", f"at most {max_bytes} bytes")
    return raw


def hwc3(x: np.ndarray) -> np.ndarray:
    """The extension's HWC3: gray -> RGB, RGBA -> RGB composited on white (uint8 in, uint8 out)."""
    if x.dtype != np.uint8:
        raise ValueError(f"hwc3 expects uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"hwc3 expects (H, W[, 1|3|4]), got {x.shape}")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def decode_bytes(raw: bytes, field: str, max_pixels: int, max_aspect: float | None = None) -> np.ndarray:
    """Image file bytes -> RGB uint8 (H, W, 3); the pixel count (and the aspect ratio, long side / short side,
    when ``max_aspect`` is given) is checked from the header first."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidRequest(field, "image has too many pixels", f"at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequest(field, "not a readable image", ", ".join(IMAGE_FORMATS)) from None
    with img:
        w, h = img.size
        if w < 1 or h < 1:
            raise InvalidRequest(field, f"image has no pixels ({w}x{h})", f"1 to {max_pixels} pixels")
        if w * h > max_pixels:
            raise InvalidRequest(field, f"image has too many pixels ({w}x{h})", f"at most {max_pixels} pixels")
        if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
            raise InvalidRequest(field, f"image is too elongated ({w}x{h}): fitting it to the generation size "
                                        "would blow it up", f"an aspect ratio of at most {max_aspect:g}:1")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                if img.mode.startswith("I"):  # 16-bit gray PNG: keep the high byte (PIL's convert clips)
                    arr = (np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                else:
                    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                        img.mode == "P" and "transparency" in img.info
                    )
                    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(field, f"image data is corrupt or truncated ({exc})",
                                 f"a complete {'/'.join(IMAGE_FORMATS)} image") from None
    return np.ascontiguousarray(hwc3(arr))


def load_image(data: str, field: str, max_bytes: int = 32 << 20, max_pixels: int = 4096 * 4096,
               allow_urls: bool | UrlPolicy = False, max_aspect: float | None = MAX_ASPECT) -> EncodedImage:
    """:func:`decode_image`'s checks (the image is decoded once, then dropped), keeping the compressed bytes."""
    raw = _raw_bytes(data, field, max_bytes, allow_urls)
    decoded = decode_bytes(raw, field, max_pixels, max_aspect)
    return EncodedImage(raw, width=decoded.shape[1], height=decoded.shape[0], max_pixels=max_pixels)


def decode_image(data: str, field: str, max_bytes: int = 32 << 20, max_pixels: int = 4096 * 4096,
                 allow_urls: bool | UrlPolicy = False) -> np.ndarray:
    """A request image (base64, ``data:image/...;base64,`` URI, or http(s) URL if allowed) -> RGB uint8.

    Transparent images are composited on white as the extension's HWC3 does. Errors are
    :class:`InvalidRequest` naming ``field``: bad base64, not an image, more than ``max_bytes`` bytes,
    more than ``max_pixels`` pixels (checked from the header, before any pixel is decoded), URLs when
    ``allow_urls`` is False (else fetched by that :class:`core.urlfetch.UrlPolicy`; True: the default policy).
    """
    return decode_bytes(_raw_bytes(data, field, max_bytes, allow_urls), field, max_pixels)


def _raw_bytes(data: str, field: str, max_bytes: int, allow_urls: bool | UrlPolicy) -> bytes:
    if not isinstance(data, str):
        raise InvalidRequest(field, f"expected a base64 string, got {type(data).__name__}",
                             "base64, or a data:image/...;base64, URI")
    stripped = data.strip()
    if re.match(r"^https?://", stripped, re.IGNORECASE):
        if not allow_urls:
            raise InvalidRequest(field, "image URLs are not allowed by this engine's configuration",
                                 "base64, or a data:image/...;base64, URI")
        return _fetch(stripped, field, max_bytes, allow_urls if isinstance(allow_urls, UrlPolicy) else UrlPolicy())
    return _b64decode(_base64_payload(stripped, field), field, max_bytes)


# --------------------------------------------------------------------------------------------- resizing


def _unique_colors(x: np.ndarray) -> int:
    flat = x.reshape(-1, x.shape[2])
    packed = flat[:, 0].astype(np.uint32) << 16 | flat[:, 1].astype(np.uint32) << 8 | flat[:, 2].astype(np.uint32)
    return int(np.unique(packed).size)


def _nake_nms(x: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    kernels = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    y = np.zeros_like(x)
    for k in kernels:
        np.putmask(y, cv2.dilate(x, kernel=k) == x, x)
    return y


def _rotations(raw: list[list[list[int]]]) -> list[np.ndarray]:
    mats = [np.array(m, dtype=np.int32) for m in raw]
    return [np.rot90(m, k=k, axes=(0, 1)) for k in range(4) for m in mats]


_THIN_KERNELS = _rotations([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
_PRUNE_KERNELS = _rotations([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])


def _thin_once(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    cv2 = _cv2()
    done = True
    for k in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, k) > 127)
        if hits[0].size:
            x[hits] = 0
            done = False
    return done


def _lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    """Lvmin Zhang's hit-or-miss edge thinning (the extension's lvminthin.py), in place on a copy."""
    y = x.copy()
    for _ in range(32):
        if _thin_once(y, _THIN_KERNELS):
            break
    if prunings:
        _thin_once(y, _PRUNE_KERNELS)
    return y


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's control-map resize to ``size = (width, height)`` (see the module docstring)."""
    cv2 = _cv2()
    w, h = size
    if x.shape[0] == h and x.shape[1] == w:
        return x
    smaller = w * h < x.shape[0] * x.shape[1]
    bigger = w * h > x.shape[0] * x.shape[1]
    colors = _unique_colors(x)
    is_binary = is_one_pixel_edge = False
    if colors == 2:
        is_binary = bool(x.min() < 16 and x.max() > 240)
        if is_binary:
            opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8), iterations=1),
                                np.ones((3, 3), np.uint8), iterations=1)
            one_pixel = int(np.count_nonzero(opened < x))
            all_edges = int(np.count_nonzero(x > 127))
            is_one_pixel_edge = one_pixel * 2 > all_edges
    if 2 < colors < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (w, h), interpolation=interpolation)
    if is_binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if is_one_pixel_edge:
            y = _nake_nms(y)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = _lvmin_thin(y, prunings=bigger)
        else:
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([y] * 3, axis=2)
    return y


def fit_detected_map(detected_map: np.ndarray, resize_mode: ResizeMode | str, height: int, width: int) -> np.ndarray:
    """Fit a detected map (H, W[, C]) uint8 to ``height`` x ``width`` as the extension's detectmap_proc does."""
    mode = ResizeMode.parse(resize_mode)
    x = hwc3(np.asarray(detected_map))
    if mode is ResizeMode.RESIZE:
        return np.ascontiguousarray(high_quality_resize(x, (width, height)))
    fit_h, fit_w = fitted_size(x.shape[0], x.shape[1], mode, height, width)
    if mode is ResizeMode.OUTER_FIT:
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        fill = np.median(borders, axis=0).astype(x.dtype)
        out = np.tile(fill[None, None], [height, width, 1])
        y = high_quality_resize(x, (fit_w, fit_h))
        new_h, new_w = y.shape[:2]
        pad_h, pad_w = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        out[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = y
        return np.ascontiguousarray(out)
    y = high_quality_resize(x, (fit_w, fit_h))
    new_h, new_w = y.shape[:2]
    pad_h, pad_w = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(y[pad_h:pad_h + height, pad_w:pad_w + width])


def fitted_size(height: int, width: int, resize_mode: ResizeMode | str, target_h: int, target_w: int) -> tuple[int, int]:
    """The size :func:`fit_detected_map` resizes a (height, width) map to before it crops or pads it."""
    mode = ResizeMode.parse(resize_mode)
    if mode is ResizeMode.RESIZE:
        return target_h, target_w
    k0, k1 = float(target_h) / float(height), float(target_w) / float(width)
    k = min(k0, k1) if mode is ResizeMode.OUTER_FIT else max(k0, k1)
    return int(np.round(float(height) * k)), int(np.round(float(width) * k))


def control_tensor(detected_map: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> the ControlNet's ``controlnet_cond`` (1, 3, H, W) float32 in [0, 1]."""
    x = np.asarray(detected_map)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"control_tensor expects RGB uint8 (H, W, 3), got {x.dtype} {x.shape}")
    return np.ascontiguousarray((x.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])


def pixel_perfect_resolution(image: np.ndarray, target_h: int, target_w: int, resize_mode: ResizeMode | str) -> int:
    """The extension's pixel-perfect preprocessor resolution for an input image and target size.

    ``round(k * min(h, w))`` with ``k = min(target_h/h, target_w/w)`` for "Resize and Fill", else ``max``.
    """
    raw_h, raw_w = image.shape[:2]
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if ResizeMode.parse(resize_mode) is ResizeMode.OUTER_FIT else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def _pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The extension's resize_image_with_pad: short side -> ``resolution``, edge-pad to multiples of 64.

    Returns the padded image and a function that crops a result back to the unpadded size.
    """
    cv2 = require("cv2", "controlnet", "ControlNet preprocessing")
    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    padded = np.pad(img, [[0, _pad64(h_target)], [0, _pad64(w_target)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:h_target, :w_target])

    return np.ascontiguousarray(padded), remove_pad
