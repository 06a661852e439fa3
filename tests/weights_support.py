"""The shared real weights, photos and prompts (``$SDENGINE_SHARED_WEIGHTS``, else a ``shared/weights`` folder
beside the repository or above it): where they are, a skip marker for tests that need them, and the photo /
PSNR helpers the real-input tests share."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def shared_weights() -> Path | None:
    """``$SDENGINE_SHARED_WEIGHTS``, else a ``shared/weights`` folder beside the repository or above it."""
    env = os.environ.get("SDENGINE_SHARED_WEIGHTS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve().parent.parent
    for parent in (here, *here.parents):
        candidate = parent.parent / "shared" / "weights"
        if candidate.is_dir():
            return candidate
    return None


WEIGHTS = shared_weights()


def needs(sub: str, what: str):
    """Skip marker: the test needs ``{shared weights}/{sub}`` (``what`` says what it is, for the reason)."""
    return pytest.mark.skipif(WEIGHTS is None or not (WEIGHTS / sub).exists(),
                              reason=f"the shared real-weights folder ({what}: {sub}) is absent "
                                     "(SDENGINE_SHARED_WEIGHTS, or shared/weights beside the repository)")


def photo_rgb(name: str, width: int, height: int | None = None) -> np.ndarray:
    """A real photo of ``photos/``, centre-cropped to the aspect of ``width x height`` and resized down
    (Lanczos): (height, width, 3) uint8."""
    from PIL import Image

    height = height or width
    img = Image.open(WEIGHTS / "photos" / name).convert("RGB")
    scale = min(img.width / width, img.height / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    img = img.crop((left, top, left + cw, top + ch)).resize((width, height), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images of the same shape (uint8 by default: ``peak`` 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def photo_or_scene(h: int, w: int) -> np.ndarray:
    """A real photo (the shared folder's chelsea.png) resized to h x w (RGB uint8), or a drawn scene (a yellow disc
    on a gradient) where the folder is absent."""
    import cv2

    if WEIGHTS is not None and (WEIGHTS / "photos" / "chelsea.png").is_file():
        photo = cv2.cvtColor(cv2.imread(str(WEIGHTS / "photos" / "chelsea.png")), cv2.COLOR_BGR2RGB)
        return cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    img[(yy - h // 3) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 4) ** 2] = (250, 250, 40)
    return img
