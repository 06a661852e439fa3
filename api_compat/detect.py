"""sd-webui-controlnet's ``/controlnet/detect`` as a task: the body checked and translated into a
:class:`DetectRequest` at submit (the images decoded under the service's image limits, the preprocessor and its
working size checked), and :func:`run_detect`, which a task backend's worker runs (the preprocessors are the
engine's, the ones the ControlNet units run). The API process only validates; the pixels are computed where the
generations are (docs/DECISIONS.md, "/controlnet/detect through the task queue")."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.controlnet.images import decode_image
from engine.controlnet.preprocessors import get_preprocessor
from core.errors import Cancelled, InvalidRequest, TooMuchMemory
from engine.progress import Progress as PhaseEvent

from api_compat.errors import ApiError, api_error_from
from api_compat.images import ImageLimits, write_png
from api_compat.tasks.backend import image_file

DETECT_FIELDS = {"controlnet_module": "none", "controlnet_input_images": [], "controlnet_masks": [],
                 "controlnet_processor_res": -1, "controlnet_threshold_a": -1, "controlnet_threshold_b": -1,
                 "low_vram": False}
MAX_DETECT_IMAGES = 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectRequest:
    """One /controlnet/detect call: the preprocessor (its registry name), the decoded RGB images, its sliders."""

    module: str
    images: tuple[np.ndarray, ...]
    processor_res: float
    threshold_a: float
    threshold_b: float

    @property
    def steps(self) -> int:  # what a backend's progress counts: one step per image
        return len(self.images)

    n_iter = 1

    @property
    def nbytes(self) -> int:
        """The bytes of the decoded images a waiting task holds (the queue's byte bound)."""
        return sum(image.nbytes for image in self.images)

    def parameters(self) -> dict[str, Any]:
        """The task's ``parameters`` (sd_get_result): the request without its images."""
        return {"controlnet_module": self.module, "controlnet_processor_res": self.processor_res,
                "controlnet_threshold_a": self.threshold_a, "controlnet_threshold_b": self.threshold_b,
                "images": len(self.images)}


def _error(code: str, message: str, field: str, allowed: str) -> ApiError:
    return ApiError(code, message, field=field, allowed=allowed)


def parse_detect(body: Any, limits: ImageLimits, models_dir=None, memory_budget: int | None = None) -> DetectRequest:
    """The extension's detect body as a :class:`DetectRequest`; raises :class:`ApiError` naming the field (the
    same checks, in the same order, as the extension's route took them here before it became a task).
    ``models_dir``: where a model-based preprocessor's files are looked for (engine.controlnet.annotators);
    ``memory_budget`` (bytes, None: off): a model-based preprocessor's weights and the activations that grow with
    its working image (annotators.ModelRunner.work_bytes) must fit it, else ``controlnet_processor_res`` is
    refused."""
    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object", allowed="controlnet_module, "
                       "controlnet_input_images, ...")
    for key in body:
        if key not in DETECT_FIELDS:
            raise _error("unknown_field", f"unknown field {key!r}", str(key), ", ".join(DETECT_FIELDS))
    if body.get("controlnet_masks") not in (None, []):
        raise _error("not_supported", "not supported: the engine does not implement ControlNet masks",
                     "controlnet_masks", "[] or null")
    encoded = body.get("controlnet_input_images") or []
    if not isinstance(encoded, list) or not encoded or len(encoded) > MAX_DETECT_IMAGES:
        raise _error("invalid_request", "must be a list of 1 to 16 base64 images", "controlnet_input_images",
                     "a list of 1 to 16 base64 images")
    numbers = {}
    for key in ("controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"):
        value = body.get(key, DETECT_FIELDS[key])
        if value is None:
            value = DETECT_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                abs(value) > 2**31:
            raise _error("invalid_request", "must be a number", key, "a number (out of the preprocessor's range "
                         "or -1: its default)")
        numbers[key] = int(value) if key == "controlnet_processor_res" else float(value)
    given = str(body.get("controlnet_module") or "none")
    module = given.strip().lower()
    try:
        pre = get_preprocessor(module, field="controlnet_module")
        if "IP-Adapter" in pre.tags:  # the image becomes CLIP image tokens, not a map: the extension refuses too
            raise InvalidRequest("controlnet_module", f"{pre.name} makes no detected map (its image goes to the "
                                 "CLIP vision encoder of an IP-Adapter unit)", "a preprocessor that draws a map")
        pre.check_available("controlnet_module", models_dir)
        # the extension's bound check: out of the slider's range -> its default, logged as the extension does
        values, adjusted = pre.check_params(given, numbers["controlnet_processor_res"],
                                            numbers["controlnet_threshold_a"], numbers["controlnet_threshold_b"])
        for change in adjusted:
            log.warning("%s", change.message())
        res, a, b = values["processor_res"], values["threshold_a"], values["threshold_b"]
        images = []
        for i, data in enumerate(encoded):
            field = f"controlnet_input_images[{i}]"
            if not isinstance(data, str):
                raise InvalidRequest(field, "must be a base64 image", "base64 PNG/JPEG/WebP")
            image = decode_image(data, field, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                                 allow_urls=limits.url_policy)
            h, w = image.shape[:2]
            work, _ = pre.sizes(h, w, res, a, b)
            pre.check_work(work, "controlnet_processor_res")
            if work[0] * work[1] > limits.max_work_pixels:
                raise InvalidRequest("controlnet_processor_res", f"makes a {work[1]}x{work[0]} working image",
                                     f"at most {limits.max_work_pixels} pixels")
            if memory_budget is not None and pre.model_based:
                need = int(pre.fn.size_mb * 2**20) + pre.fn.work_bytes(*work)
                if need > memory_budget:
                    raise TooMuchMemory("controlnet_processor_res",
                                        f"{pre.label or pre.name} on a {work[1]}x{work[0]} working image needs "
                                        f"about {need / 2**30:.1f} GiB, more than this server's memory budget of "
                                        f"{memory_budget / 2**30:.1f} GiB", "a smaller controlnet_processor_res")
            images.append(image)
    except InvalidRequest as exc:
        raise api_error_from(exc) from None
    return DetectRequest(module=module, images=tuple(images), processor_res=res, threshold_a=a, threshold_b=b)


def run_detect(request: DetectRequest, *, images_dir: Path, task_id: str, progress,
               cancel: threading.Event, models_dir=None) -> tuple[dict[str, Any], list[str]]:
    """Run the preprocessor on each image and write the detected maps as the task's PNGs (atomically, no
    infotext). Returns ``(info, image file names)``, as :func:`api_compat.tasks.backend.run_generation` does; for
    the openpose modules ``info["poses"]`` holds each image's pose JSON (the extension's ``poses``).
    Progress: a "preprocessing" phase per image (a model-based one loads its network first), then "saving"."""
    pre = get_preprocessor(request.module, field="controlnet_module")
    names: list[str] = []
    poses: list[dict[str, Any]] = []
    count = len(request.images)
    for i, image in enumerate(request.images):
        if cancel.is_set():
            raise Cancelled(f"cancelled after {i} of {count} images")
        progress(PhaseEvent("preprocessing", i, count, i, count, None, pre.label or pre.name))
        detected = pre(image, request.processor_res, request.threshold_a, request.threshold_b,
                       models_dir=models_dir, pose_callback=poses.append if pre.makes_poses else None)
        path = image_file(images_dir, task_id, i)
        write_png(path, detected, None)
        names.append(path.name)
        progress(PhaseEvent("saving", i + 1, count, i + 1, count, None, "detected maps"))
    info: dict[str, Any] = {"controlnet_module": request.module, "detected_maps": count}
    if pre.makes_poses:  # the extension's "poses": one pose JSON per image (openpose modules)
        info["poses"] = poses
    return info, names
