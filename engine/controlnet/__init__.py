"""ControlNet: preprocessors, control images, unit scheduling and control modes (sd-webui-controlnet v1.1.4xx).

``prepare_unit`` turns a validated :class:`engine.request.ControlNetUnit` into a :class:`PreparedUnit` for the
sampler: preprocess (pixel-perfect resolution if asked), fit the detected map to the generation size with the
unit's resize mode, and build the (1, 3, H, W) control tensor. The denoiser then calls
:func:`controlnet_residuals` at every model evaluation.

Nothing heavy is imported here: OpenCV is loaded on first use through ``core.lazy.require``.
"""

from __future__ import annotations

from engine.controlnet.images import (
    EncodedImage,
    ResizeMode,
    as_array,
    control_tensor,
    decode_image,
    fit_detected_map,
    fitted_size,
    hwc3,
    load_image,
    pixel_perfect_resolution,
)
from core.errors import InvalidRequest
from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS, Preprocessor, get_preprocessor, preprocess
from engine.controlnet.units import (
    ControlMode,
    HiresOption,
    PreparedUnit,
    active,
    active_units,
    combine_residuals,
    cond_rows_mask,
    controlnet_component,
    controlnet_residuals,
    residual_names,
    residual_scales,
    webui_sampling_step,
)

__all__ = [
    "ALIASES", "EncodedImage", "as_array", "check_unit_sizes", "load_image", "unit_sizes", "PREPROCESSORS", "ControlMode", "HiresOption", "PreparedUnit", "Preprocessor", "ResizeMode", "active",
    "active_units", "combine_residuals", "cond_rows_mask", "control_tensor", "controlnet_component",
    "controlnet_residuals", "decode_image", "fit_detected_map", "get_preprocessor", "hwc3",
    "pixel_perfect_resolution", "prepare_unit", "preprocess", "residual_names", "residual_scales",
    "webui_sampling_step",
]


def prepare_unit(unit, width: int, height: int, field: str = "controlnet_units[0]",
                 advanced_weighting: tuple[float, ...] | None = None, models_dir=None) -> PreparedUnit:
    """A request unit (``engine.request.ControlNetUnit``) -> a :class:`PreparedUnit` at ``width`` x ``height``.

    As the extension: ``processor_res`` comes from the target size when ``pixel_perfect`` (else the unit's
    value, -1 / out of range = the preprocessor's default;
    the pixel-perfect value is used unchecked, as the extension does); the detected map is fitted with the unit's
    resize mode; ``PreparedUnit.detected_map`` is that fitted map (what ``save_detected_map`` returns).
    ``advanced_weighting``: the unit's per-residual weights, checked against its ControlNet
    (engine.rules.check_layer_weights). ``models_dir``: where a model-based preprocessor's files are looked for
    (engine.controlnet.annotators.search_dirs).
    """
    resize_mode = ResizeMode.parse(unit.resize_mode, f"{field}.resize_mode")
    control_mode = ControlMode.parse(unit.control_mode, f"{field}.control_mode")
    pre = get_preprocessor(unit.module, f"{field}.module")
    pre.check_available(f"{field}.module", models_dir)  # a model-based one: its package and files
    image = hwc3(as_array(unit.image))
    exact = pixel_perfect_resolution(image, height, width, resize_mode) if unit.pixel_perfect else None
    detected = pre(image, unit.processor_res, unit.threshold_a, unit.threshold_b, exact_res=exact,
                   models_dir=models_dir)
    res, thr_a, thr_b = pre.resolve(unit.processor_res, unit.threshold_a, unit.threshold_b)
    if exact is not None and res is not None:
        res = max(1, int(exact))
    # as the extension's infotext: the values used; a slider the preprocessor does not have keeps its value
    used = {"processor_res": unit.processor_res if res is None else res,
            "threshold_a": unit.threshold_a if thr_a is None else thr_a,
            "threshold_b": unit.threshold_b if thr_b is None else thr_b}
    fitted = fit_detected_map(detected, resize_mode, height, width)
    return PreparedUnit(
        model=unit.model,
        image=control_tensor(fitted),
        weight=float(unit.weight),
        guidance_start=float(unit.guidance_start),
        guidance_end=float(unit.guidance_end),
        control_mode=control_mode,
        module=pre.name,
        detected_map=fitted,
        used=used,
        advanced_weighting=advanced_weighting,
        threshold_a=thr_a,
        threshold_b=thr_b,
    )


def unit_sizes(unit, width: int, height: int) -> list[tuple[str, int, int]]:
    """``(stage, h, w)`` of every image :func:`prepare_unit` makes from ``unit`` (its image given as an array or
    an :class:`EncodedImage`: only the shape is read), computed as prepare_unit computes them."""
    resize_mode = ResizeMode.parse(unit.resize_mode)
    pre = get_preprocessor(unit.module)
    h, w = unit.image.shape[:2]
    exact = pixel_perfect_resolution(unit.image, height, width, resize_mode) if unit.pixel_perfect else None
    work, out = pre.sizes(h, w, unit.processor_res, unit.threshold_a, unit.threshold_b, exact_res=exact)
    fit = fitted_size(*out, resize_mode, height, width)
    return [("input", h, w), ("preprocessor", *work), ("detected map", *out), ("fitted map", *fit),
            ("control image", height, width)]


def check_unit_sizes(unit, width: int, height: int, max_pixels: int, field: str) -> None:
    """Refuse (InvalidRequest naming ``field``) a unit whose preprocessing or fitting would make an image of
    more than ``max_pixels`` pixels or of no pixels: what a thin image (4096x1) or a large ``processor_res``
    on an elongated one turns into; and one whose working image is too small for its preprocessor
    (``Preprocessor.check_work``: depth_leres++, naming the unit's ``processor_res``)."""
    sizes = unit_sizes(unit, width, height)
    get_preprocessor(unit.module).check_work(sizes[1][1:], field.removesuffix(".image") + ".processor_res")
    for stage, h, w in sizes:
        if h < 1 or w < 1 or h * w > max_pixels:
            ih, iw = unit.image.shape[:2]
            raise InvalidRequest(field, f"this {iw}x{ih} image would become a {w}x{h} {stage} for a {width}x"
                                        f"{height} image (module {unit.module!r}, resize mode {unit.resize_mode!r}, "
                                        f"processor_res {unit.processor_res})",
                                 f"images whose every working size has 1 to {max_pixels} pixels: a less elongated "
                                 "image, a lower processor_res, or resize mode 'Just Resize'")
