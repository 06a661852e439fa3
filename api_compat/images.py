"""Input images (base64 / data URI / optional http(s) fetch, bounded decode) and result PNGs (atomic writes
with the webui infotext in the ``parameters`` text chunk)."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

_DATA_URI = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+)?(;[a-zA-Z0-9=.-]+)*;base64,", re.ASCII)
_WS = re.compile(r"\s+")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an input image: encoded bytes, decoded pixels, and whether http(s) URLs are fetched."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    allow_url_fetch: bool = False
    fetch_timeout: float = 10.0


def _fetch(url: str, field: str, limits: ImageLimits) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout) as response:  # noqa: S310 (scheme checked)
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InvalidRequest(field, f"could not fetch the image URL: {exc}", "a reachable http(s) image URL") from None
    if len(data) > limits.max_bytes:
        raise InvalidRequest(field, "the fetched image is too large", f"at most {limits.max_bytes} bytes")
    return data


def image_bytes(value: str, field: str, limits: ImageLimits) -> bytes:
    """The encoded image bytes of a base64 string, a ``data:image/...;base64,`` URI or (if allowed) a URL."""
    allowed = "base64 or a data:image/...;base64, URI" + (" or an http(s) URL" if limits.allow_url_fetch else "")
    text = value.strip()
    lower = text[:8].lower()
    if lower.startswith(("http://", "https://")):
        if not limits.allow_url_fetch:
            raise InvalidRequest(field, "image URLs are not fetched (the service was started without allow_url_fetch)",
                                 allowed)
        return _fetch(text, field, limits)
    if lower.startswith("data:"):
        match = _DATA_URI.match(text)
        if not match:
            raise InvalidRequest(field, "malformed data URI", allowed)
        text = text[match.end():]
    if len(text) > limits.max_bytes * 4 // 3 + 1024 * 1024:
        raise InvalidRequest(field, "the image is too large", f"at most {limits.max_bytes} bytes")
    text = _WS.sub("", text)
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "not valid base64", allowed) from None
    if not data:
        raise InvalidRequest(field, "the image is empty", allowed)
    if len(data) > limits.max_bytes:
        raise InvalidRequest(field, "the image is too large", f"at most {limits.max_bytes} bytes")
    return data


def decode_image(value: str, field: str, limits: ImageLimits) -> np.ndarray:
    """An RGB uint8 array (H, W, 3); the size is checked from the header before any pixel is decoded."""
    from PIL import Image

    data = image_bytes(value, field, limits)
    side = int(limits.max_pixels**0.5)
    allowed = f"a PNG/JPEG/WebP/BMP/GIF/TIFF image of at most {limits.max_pixels} pixels (e.g. {side}x{side})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                width, height = img.size
                if width < 1 or height < 1 or width * height > limits.max_pixels:
                    raise InvalidRequest(field, f"the image is {width}x{height} pixels", allowed)
                rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(field, "the image has too many pixels", allowed) from None
    except Exception as exc:  # PIL raises many types for corrupt input (OSError, SyntaxError, struct.error ...)
        raise InvalidRequest(field, f"not a decodable image ({type(exc).__name__})", allowed) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidRequest(field, "the image could not be converted to RGB", allowed)
    return rgb


def write_png(path: str | os.PathLike, image: np.ndarray, infotext: str | None) -> Path:
    """Write ``image`` (H, W, 3 uint8) to ``path`` atomically (temp file + fsync + os.replace), with the
    webui infotext in the ``parameters`` text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    meta = PngInfo()
    if infotext:
        meta.add_text("parameters", infotext)
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
