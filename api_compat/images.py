"""Images at the API's edges: the limits the service applies to request images (decoded by the engine's
``engine.controlnet.images.decode_image``), and result PNGs written atomically with the webui infotext in
the ``parameters`` text chunk."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_file
from core.urlfetch import FETCH_DEADLINE_S, UrlPolicy


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on a request image: encoded bytes, decoded pixels, the pixels of every image preprocessing and
    fitting make from it (``max_work_pixels``), and whether http(s) URLs are fetched (``allow_url_fetch``;
    ``url_policy``: how, core.urlfetch: a total deadline of ``url_fetch_seconds``, public addresses only
    unless ``allow_private_urls``)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    allow_url_fetch: bool = False
    max_work_pixels: int = 4096 * 4096
    allow_private_urls: bool = False
    url_fetch_seconds: float = FETCH_DEADLINE_S

    @property
    def url_policy(self) -> UrlPolicy | bool:
        """What image decoding takes as ``allow_urls``: False, or the policy URLs are fetched by."""
        if not self.allow_url_fetch:
            return False
        return UrlPolicy(deadline=self.url_fetch_seconds, allow_private=self.allow_private_urls)


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
    with atomic_file(path) as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=meta)
    return path


def png_base64(image: np.ndarray) -> str:
    """``image`` (H, W, 3 uint8) as a base64 PNG, as the webui answers images it does not keep."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8))).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
