"""The webui's ``/sdapi/v1/extra-single-image`` and ``/extra-batch-images`` as tasks: the body checked and the
images decoded at submit (:func:`parse_extras`, under the service's image limits, upscalers resolved, face
restoration refused when the engine has none, the output size and its memory checked), and :func:`run_extras`,
which a task backend's worker runs (engine.extras): the pixels are computed where the generations are, in the
same queue (docs/DECISIONS.md, "Extras as tasks"). Each output PNG keeps the input's text chunks (its
``parameters`` infotext) and adds the webui's ``postprocessing`` one."""

from __future__ import annotations

import io
import logging
import math
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_file
from core.errors import Cancelled, InvalidRequest
from engine.controlnet.images import _raw_bytes, decode_bytes
from engine.extras import Extras, check_faces, html_info, postprocess
from engine.progress import Progress as PhaseEvent
from engine.rules import RANGES
from engine.upscalers import DEFAULT_OVERLAP, DEFAULT_TILE, Upscaling, estimate_bytes, find, load, resolve

from api_compat.errors import ApiError, api_error_from
from api_compat.images import ImageLimits
from api_compat.tasks.backend import image_file

log = logging.getLogger(__name__)

EXTRAS_DEFAULTS = {f.name: f.default for f in fields(Extras)}
# the webui's request fields with no effect here (show_extras_results only picks what its UI shows)
INERT = ("show_extras_results", "save_output", "use_async")
TILE_FIELDS = ("ESRGAN_tile", "ESRGAN_tile_overlap")  # the options, put in the task's payload by the route
MAX_BATCH_IMAGES = 16


@dataclass(frozen=True)
class ExtrasRequest:
    """One extras call: the settings, the decoded RGB images with their PNG text chunks and names, tiling."""

    extras: Extras
    images: tuple[np.ndarray, ...]
    texts: tuple[dict[str, str], ...]
    names: tuple[str, ...]
    batch: bool
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    warnings: tuple[str, ...] = ()

    n_iter = 1

    @property
    def steps(self) -> int:  # what a backend's progress counts: one step per image
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(image.nbytes for image in self.images)

    def parameters(self) -> dict[str, Any]:
        """The task's ``parameters`` (sd_get_result): the request without its images."""
        return {**{f.name: getattr(self.extras, f.name) for f in fields(Extras)}, "images": len(self.images),
                "ESRGAN_tile": self.tile, "ESRGAN_tile_overlap": self.overlap}


def _number(body: dict, key: str, integer: bool, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return EXTRAS_DEFAULTS.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi or (integer and value != int(value)):
        raise InvalidRequest(key, f"must be {'an integer' if integer else 'a number'} from {lo:g} to {hi:g}",
                             f"{lo:g} to {hi:g}")
    return int(value) if integer else float(value)


def _decode(data: Any, field: str, limits: ImageLimits) -> tuple[np.ndarray, dict[str, str]]:
    from PIL import Image

    if not isinstance(data, str) or not data.strip():
        raise InvalidRequest(field, "must be a base64 image", "base64 PNG/JPEG/WebP")
    raw = _raw_bytes(data, field, limits.max_bytes, limits.allow_url_fetch)
    image = decode_bytes(raw, field, limits.max_pixels)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # text chunks after the pixels too
            texts = {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
    except Exception:  # noqa: BLE001 - decode_bytes read it; no text then
        texts = {}
    return image, texts


def parse_extras(body: Any, limits: ImageLimits, models_dir: Path | None, *, batch: bool, strict: bool = False,
                 memory_budget: int | None = None) -> ExtrasRequest:
    """The webui's extras body as an :class:`ExtrasRequest`; raises :class:`ApiError` naming the field."""
    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object", allowed="image, upscaler_1, ...")
    images_field = "imageList" if batch else "image"
    known = {*EXTRAS_DEFAULTS, *INERT, *TILE_FIELDS, "resize_mode", images_field}
    unknown = [str(k) for k in body if k not in known]
    if unknown and strict:
        raise ApiError("unknown_field", f"unknown field {unknown[0]!r}", field=unknown[0],
                       allowed=", ".join(sorted(known)))
    warnings = tuple(f"ignored unknown field {k!r}" for k in unknown[:20])
    try:
        values: dict[str, Any] = {
            "resize_mode": _number(body, "resize_mode", True, 0, 1),
            "upscaling_resize": _number(body, "upscaling_resize", False, 1.0, 8.0),
            "upscaling_resize_w": _number(body, "upscaling_resize_w", True, 64, 8192),
            "upscaling_resize_h": _number(body, "upscaling_resize_h", True, 64, 8192),
            "extras_upscaler_2_visibility": _number(body, "extras_upscaler_2_visibility", False, 0.0, 1.0),
            "gfpgan_visibility": _number(body, "gfpgan_visibility", False, 0.0, 1.0),
            "codeformer_visibility": _number(body, "codeformer_visibility", False, 0.0, 1.0),
            "codeformer_weight": _number(body, "codeformer_weight", False, 0.0, 1.0),
        }
        for key in ("upscaling_crop", "upscale_first"):
            value = body.get(key, EXTRAS_DEFAULTS[key])
            if not isinstance(value, bool):
                raise InvalidRequest(key, "must be true or false", "true, false")
            values[key] = value
        for key in ("upscaler_1", "upscaler_2"):
            value = body.get(key)
            values[key] = "None" if value in (None, "") else resolve(value, models_dir, key)
        extras = Extras(**values)
        check_faces(extras)
        tiles, overlaps = RANGES["upscaler_tile"], RANGES["upscaler_tile_overlap"]  # the request options' ranges
        tile = int(_number(body, "ESRGAN_tile", True, tiles.lo, tiles.hi)) if body.get("ESRGAN_tile") is not None \
            else DEFAULT_TILE
        overlap = int(_number(body, "ESRGAN_tile_overlap", True, overlaps.lo, overlaps.hi)) \
            if body.get("ESRGAN_tile_overlap") is not None else DEFAULT_OVERLAP
        if batch:
            items = body.get("imageList")
            if not isinstance(items, list) or not items or len(items) > MAX_BATCH_IMAGES:
                raise InvalidRequest("imageList", f"must be a list of 1 to {MAX_BATCH_IMAGES} images",
                                     '[{"data": "<base64>", "name": "..."}]')
            encoded, names = [], []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise InvalidRequest(f"imageList[{i}]", "must be an object", '{"data": "<base64>", "name": "..."}')
                encoded.append((item.get("data"), f"imageList[{i}].data"))
                names.append(str(item.get("name") or f"image {i}")[:200])
        else:
            encoded, names = [(body.get("image"), "image")], ["image"]
        images, texts = [], []
        for data, field in encoded:
            image, text = _decode(data, field, limits)
            h, w = image.shape[:2]
            _, (ow, oh) = extras.target(w, h) if extras.upscaler_1 != "None" else (1, (w, h))
            if ow * oh > limits.max_work_pixels or ow < 1 or oh < 1:
                size_field = "upscaling_resize_w" if extras.resize_mode == 1 else "upscaling_resize"
                raise InvalidRequest(size_field, f"makes a {ow}x{oh} image from the {w}x{h} {field}",
                                     f"an output of at most {limits.max_work_pixels} pixels")
            if memory_budget is not None:
                need = estimate_bytes(w, h, max(2, math.ceil(max(ow / w, oh / h))), tile)
                if need > memory_budget:
                    raise InvalidRequest("ESRGAN_tile" if tile == 0 or tile > 512 else
                                         ("upscaling_resize_w" if extras.resize_mode == 1 else "upscaling_resize"),
                                         f"upscaling the {w}x{h} {field} to {ow}x{oh} needs about "
                                         f"{need / 2**30:.1f} GiB, more than this server's memory budget of "
                                         f"{memory_budget / 2**30:.1f} GiB", "a smaller output or tile")
            images.append(image)
            texts.append(text)
    except InvalidRequest as exc:
        raise api_error_from(exc) from None
    return ExtrasRequest(extras=extras, images=tuple(images), texts=tuple(texts), names=tuple(names), batch=batch,
                         tile=tile, overlap=overlap, warnings=warnings)


def write_png_texts(path: Path, image: np.ndarray, texts: dict[str, str]) -> Path:
    """``image`` as a PNG written atomically with every text chunk of ``texts``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in texts.items():
        meta.add_text(key, value)
    with atomic_file(path) as f:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(f, format="PNG", pnginfo=meta)
    return path


def run_extras(request: ExtrasRequest, *, images_dir: Path, task_id: str, progress, cancel: threading.Event,
               models_dir: Path | None, device: str = "cpu") -> tuple[dict[str, Any], list[str]]:
    """Postprocess each image (engine.extras) and write it as the task's PNG with the input's text chunks and
    the ``postprocessing`` infotext. Returns ``(info, image file names)``, as run_generation does."""
    how = Upscaling(models_dir=models_dir, device=device, tile=request.tile, overlap=request.overlap)
    count = len(request.images)
    for name in (request.extras.upscaler_1, request.extras.upscaler_2):  # a vanished file fails before any pixel
        if name != "None" and find(name, models_dir) is not None:
            load(find(name, models_dir).path, device)
    names: list[str] = []
    infotexts: list[str] = []
    try:
        for i, image in enumerate(request.images):
            if cancel.is_set():
                raise Cancelled(f"cancelled after {i} of {count} images")

            def tiles(done: int, total: int, i=i) -> None:
                progress(PhaseEvent("upscaling", i, count, i, count, None, f"image {i + 1}: tile {done} of {total}"))

            out, text = postprocess(image, request.extras, how, cancel=cancel, progress=tiles)
            texts = dict(request.texts[i])
            if text:
                texts["postprocessing"] = text
            path = image_file(images_dir, task_id, i)
            write_png_texts(path, out, texts)
            names.append(path.name)
            infotexts.append(text)
            progress(PhaseEvent("saving", i + 1, count, i + 1, count, None, "extras"))
    except BaseException:
        for name in names:  # no image of a task that did not succeed stays behind (as run_generation)
            (Path(images_dir) / name).unlink(missing_ok=True)
        raise
    info: dict[str, Any] = {"html_info": html_info(infotexts[0] if infotexts else ""), "infotexts": infotexts}
    if request.warnings:
        info["warnings"] = list(request.warnings)
    return info, names
