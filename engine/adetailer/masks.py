"""ADetailer's mask rules (the extension's ``adetailer/mask.py`` and ``pred_preprocessing``), in its order:
filter by the box's share of the image (min/max ratio), keep the ``k`` largest (or most confident), then
``mask_preprocess``: offset, dilate (positive) or erode (negative) with a square kernel, drop masks that became
empty, merge / merge and invert. The blur (``ad_mask_blur``) is the inpaint's own mask blur
(engine.img2img.blur_mask), as the extension hands it to img2img.

Masks are uint8 (H, W) arrays, 255 inside."""

from __future__ import annotations

from functools import reduce

import numpy as np

from core.lazy import require
from engine.adetailer.detectors import Prediction

MERGE_INVERT = ("None", "Merge", "Merge and Invert")
FILTER_METHODS = ("Area", "Confidence")


def _cv2():
    return require("cv2", "controlnet", "ADetailer's mask dilation")


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _take(pred: Prediction, idx) -> Prediction:
    idx = list(idx)
    return Prediction([pred.bboxes[i] for i in idx], [pred.masks[i] for i in idx],
                      [pred.confidences[i] for i in idx] if pred.confidences else [])


def filter_by_ratio(pred: Prediction, low: float, high: float, size: tuple[int, int]) -> Prediction:
    """Boxes whose area over the image's (``size`` (width, height)) is within [low, high]."""
    if not pred.bboxes:
        return pred
    whole = size[0] * size[1]
    return _take(pred, (i for i, b in enumerate(pred.bboxes) if low <= _area(b) / whole <= high))


def filter_k(pred: Prediction, k: int = 0, by: str = "Area") -> Prediction:
    """The extension's ``filter_k_by``: the ``k`` largest boxes (``by`` "Area") or most confident ("Confidence"),
    largest first (numpy's argsort, as the extension); ``k`` 0 keeps all in their order."""
    if not pred.bboxes or k == 0:
        return pred
    if by == "Confidence":
        if not pred.confidences:
            return pred
        keys = pred.confidences
    else:
        keys = [_area(b) for b in pred.bboxes]
    return _take(pred, np.argsort(keys)[-k:][::-1])


def offset(mask: np.ndarray, x: int = 0, y: int = 0) -> np.ndarray:
    """PIL ``ImageChops.offset(mask, x, -y)``: the mask moved x right and y up, wrapping around."""
    return np.roll(mask, (-y, x), axis=(0, 1))


def dilate_erode(mask: np.ndarray, value: int) -> np.ndarray:
    """cv2.dilate (``value`` > 0) or cv2.erode (< 0) with a ``|value|`` square kernel, one iteration."""
    if value == 0:
        return mask
    cv2 = _cv2()
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (abs(value), abs(value)))
    op = cv2.dilate if value > 0 else cv2.erode
    return op(np.ascontiguousarray(mask), kernel, iterations=1)


def merge_invert(masks: list[np.ndarray], mode: str) -> list[np.ndarray]:
    if mode == "None" or not masks:
        return masks
    merged = reduce(np.bitwise_or, masks)
    return [merged] if mode == "Merge" else [255 - merged]


def preprocess(masks: list[np.ndarray], kernel: int = 0, x_offset: int = 0, y_offset: int = 0,
               mode: str = "None") -> list[np.ndarray]:
    """The extension's ``mask_preprocess``: offset, dilate/erode (empty masks dropped), merge/invert."""
    if not masks:
        return []
    if x_offset or y_offset:
        masks = [offset(m, x_offset, y_offset) for m in masks]
    if kernel:
        masks = [dilate_erode(m, kernel) for m in masks]
        masks = [m for m in masks if m.any()]
    return merge_invert(masks, mode)


def intersecting(user_mask: np.ndarray, masks: list[np.ndarray]) -> list[np.ndarray]:
    """The extension's ``inpaint_mask_filter`` (img2img inpainting, not "only masked"): the masks that touch the
    request's own (binary, at the generation size) mask, resized to theirs with Lanczos when the sizes differ."""
    if not masks:
        return masks
    if user_mask.shape != masks[0].shape:
        from PIL import Image

        h, w = masks[0].shape
        user_mask = np.asarray(Image.fromarray(user_mask).resize((w, h), Image.Resampling.LANCZOS))
    return [m for m in masks if np.logical_and(user_mask > 0, m > 0).any()]
