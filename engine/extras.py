"""The webui's "Extras" postprocessing (v1.9 ``scripts/postprocessing_upscale.py``, then the face restorers) on one
image: the upscale by a factor or to a size (with the crop), the second upscaler blended in, face restoration
through ``engine.faces`` when that module is present, and the ``postprocessing`` infotext the webui writes."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import NotSupported
from engine.upscalers import Upscaling, upscale

FACES_MODULE = "engine.faces"  # restore(image, model, visibility, weight) -> image (the face-restoration room)
FACE_FOLDERS = {"GFPGAN": "GFPGAN", "CodeFormer": "Codeformer"}


@dataclass(frozen=True)
class Extras:
    """One extras request's settings, webui field semantics (``resize_mode`` 0: by ``upscaling_resize``,
    1: to ``upscaling_resize_w`` x ``upscaling_resize_h``, cropped to it when ``upscaling_crop``)."""

    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscale_first: bool = False

    def target(self, width: int, height: int) -> tuple[float, tuple[int, int]]:
        """(the upscale factor, the output (width, height)) for an image of that size."""
        if self.resize_mode == 1:
            scale = max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
            if self.upscaling_crop:
                return scale, (self.upscaling_resize_w, self.upscaling_resize_h)
        else:
            scale = self.upscaling_resize
        return scale, (int((width * scale) // 8 * 8), int((height * scale) // 8 * 8))


def faces_available() -> bool:
    return importlib.util.find_spec(FACES_MODULE) is not None


def check_faces(extras: Extras, field_prefix: str = "") -> None:
    """Face restoration asked for (a visibility above 0) needs the face-restoration module; refused otherwise,
    naming the field and the models folder."""
    for field, model in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        if getattr(extras, field) > 0 and not faces_available():
            raise NotSupported(field_prefix + field, f"not supported: face restoration ({model}) is not available in this "
                                 f"engine; put a {model} model in the models folder {FACE_FOLDERS[model]}/ of an "
                                 "engine with face restoration", "0")


def _upscale_step(image: np.ndarray, extras: Extras, how: Upscaling, info: dict[str, Any], cancel, progress):
    if extras.upscaler_1 == "None":
        return image
    h, w = image.shape[:2]
    scale, (tw, th) = extras.target(w, h)

    def one(name: str) -> np.ndarray:
        out = upscale(image, scale, name, how, cancel=cancel, progress=progress)
        if extras.resize_mode == 1 and extras.upscaling_crop:  # pasted centred on a black canvas of the size
            canvas = np.zeros((th, tw, 3), np.uint8)
            oy, ox = th // 2 - out.shape[0] // 2, tw // 2 - out.shape[1] // 2
            sy, sx = max(0, -oy), max(0, -ox)
            dy, dx = max(0, oy), max(0, ox)
            hh, ww = min(out.shape[0] - sy, th - dy), min(out.shape[1] - sx, tw - dx)
            canvas[dy:dy + hh, dx:dx + ww] = out[sy:sy + hh, sx:sx + ww]
            out = canvas
        return out

    if extras.resize_mode == 1:
        info["Postprocess upscale to"] = f"{extras.upscaling_resize_w}x{extras.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = extras.upscaling_resize
    result = one(extras.upscaler_1)
    if extras.resize_mode == 1 and extras.upscaling_crop:
        info["Postprocess crop to"] = f"{tw}x{th}"
    info["Postprocess upscaler"] = extras.upscaler_1
    if extras.upscaler_2 != "None" and extras.extras_upscaler_2_visibility > 0:
        second = one(extras.upscaler_2)
        a = float(extras.extras_upscaler_2_visibility)
        # PIL Image.blend: out = im1 * (1 - alpha) + im2 * alpha, rounded
        result = np.clip(result.astype(np.float32) * (1.0 - a) + second.astype(np.float32) * a + 0.5, 0, 255
                         ).astype(np.uint8)
        info["Postprocess upscaler 2"] = extras.upscaler_2
    return result


def _faces_step(image: np.ndarray, extras: Extras, info: dict[str, Any]) -> np.ndarray:
    if extras.gfpgan_visibility <= 0 and extras.codeformer_visibility <= 0:
        return image
    faces = importlib.import_module(FACES_MODULE)
    if extras.gfpgan_visibility > 0:
        image = faces.restore(image, "GFPGAN", extras.gfpgan_visibility, None)
        info["GFPGAN visibility"] = round(extras.gfpgan_visibility, 3)
    if extras.codeformer_visibility > 0:
        image = faces.restore(image, "CodeFormer", extras.codeformer_visibility, extras.codeformer_weight)
        info["CodeFormer visibility"] = round(extras.codeformer_visibility, 3)
        info["CodeFormer weight"] = round(extras.codeformer_weight, 3)
    return image


def postprocess(image: np.ndarray, extras: Extras, how: Upscaling, *, cancel: threading.Event | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, str]:
    """One image through the extras: (the image, the webui's ``postprocessing`` infotext). The upscale runs
    before the face restorers (the webui's operation order; its ``upscale_first`` field is ignored since v1.6)."""
    check_faces(extras)
    info: dict[str, Any] = {}
    image = _faces_step(_upscale_step(image, extras, how, info, cancel, progress), extras, info)
    return image, infotext(info)


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    import json

    return json.dumps(text, ensure_ascii=False)


def infotext(info: dict[str, Any]) -> str:
    """webui run_postprocessing: ``"key: value, ..."`` of the steps' info (values quoted as infotexts are)."""
    return ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in info.items() if v is not None)


def html_info(text: str) -> str:
    """webui ``ui_common.plaintext_to_html``: the infotext as one HTML paragraph."""
    import html

    return "<p>" + "<br>\n".join(html.escape(x) for x in text.split("\n")) + "</p>"
