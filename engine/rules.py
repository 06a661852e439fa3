"""The rules of a request, each defined once: defaults, ranges and limits, the hires pass's sampler rule, and the
one parser of webui choices (an index or a name).

- **Defaults** are the :mod:`engine.request` dataclasses' own (:func:`default` reads them; nothing restates
  them). The webui API's img2img defaults that differ from :class:`~engine.request.InitImage`'s are
  :data:`WEBUI_IMG2IMG_DEFAULTS`.
- **Ranges** (:data:`RANGES`) are keyed by :class:`~engine.request.GenerationRequest` path (``steps``,
  ``hires.scale``, ``init.mask_blur_x``, ``controlnet_units.weight``); the size rule is :data:`MIN_SIZE`,
  :data:`MAX_SIZE` and the pixel multiple (:data:`SIZE_MULTIPLE` for every family, a model's own
  ``ModelFamily.pixel_multiple``: :func:`check_size`); an engine configuration lowers some of them
  (:func:`check_limits`).
- **The hires pass's sampler** ("Use same sampler", "Use same scheduler", "Automatic"): :func:`hires_sampler`.
- **Choices** given by index or name: :func:`parse_choice`.

``api_compat.schema`` builds its field types, bounds and defaults from here; api_compat keeps only the shape of
its payloads (types, aliases, which fields exist), and with it the leniency policy (unknown fields ignored and
named, or refused with ``--strict``; disabled extension scripts accepted): :mod:`api_compat.leniency`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from core.errors import InvalidRequest
from engine.request import ControlNetUnit, GenerationRequest, Hires, InitImage

INT64_MAX = 2**63 - 1
MAX_SEED = 4294967294  # webui: -1 draws a seed in [0, 4294967294)

MIN_SIZE = 64  # pixels a side
MAX_SIZE = 2048  # pixels a side any configuration allows (EngineConfig.max_size may lower it)
SIZE_MULTIPLE = 8  # every family's sizes are multiples of this; a model's own: ModelFamily.pixel_multiple
MAX_HIRES_RESIZE = 8192  # hires.resize_x / resize_y as given (the second pass itself is held to MAX_SIZE)
MAX_UNITS = 10  # ControlNet units in one request
MAX_UNIT_IMAGES = 8  # reference images of one IP-Adapter unit (the extension's multi-input form)
# sd-webui-controlnet's advanced_weighting: one weight per ControlNet residual (down residuals in UNet order, then
# the middle block), 13 for SD1.x/SD2.x ControlNets (12 + 1), 10 for SDXL ones (9 + 1)
MAX_LAYER_WEIGHTS = 13

USE_SAME_SAMPLER = "Use same sampler"
USE_SAME_SCHEDULER = "Use same scheduler"
HIRES_SCHEDULER = "Automatic"  # the webui's hires pass when hr_scheduler is unset

_SECTIONS: Mapping[str, type] = MappingProxyType({
    "": GenerationRequest, "hires": Hires, "init": InitImage, "controlnet_units": ControlNetUnit})

# the webui API's img2img defaults where they differ from InitImage's (whose defaults are plain img2img)
WEBUI_IMG2IMG_DEFAULTS: Mapping[str, Any] = MappingProxyType({"init.inpainting_fill": 0,
                                                              "init.inpaint_full_res": True})


def default(path: str) -> Any:
    """The default of a request field (``steps``, ``hires.scale``, ``init.denoising_strength``,
    ``controlnet_units.weight``), read from its dataclass."""
    section, _, name = path.rpartition(".")
    cls = _SECTIONS[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"{path} has no default")
            return f.default
    raise KeyError(path)


# --------------------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Range:
    """``lo``..``hi`` (and ``special`` values outside it), integers when ``integer``, multiples of ``multiple``;
    ``allowed`` is how an error describes it where "an integer from lo to hi" / "a number from lo to hi" would not
    say it all."""

    lo: float
    hi: float
    integer: bool = False
    multiple: int = 1
    special: tuple = ()
    allowed: str | None = None


def _int(lo: int, hi: int, **kw: Any) -> Range:
    return Range(lo, hi, integer=True, **kw)


_SIZE = _int(MIN_SIZE, MAX_SIZE, multiple=SIZE_MULTIPLE,
             allowed=f"a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}")
_SEED = _int(-1, INT64_MAX, allowed="-1 (random) or an integer from 0 to 2**63-1")

RANGES: Mapping[str, Range] = MappingProxyType({
    "clip_skip": _int(1, 12),
    "batch_size": _int(1, 64),
    "n_iter": _int(1, 100),
    "steps": _int(1, 150),
    "cfg_scale": Range(0.0, 30.0),
    "width": _SIZE,
    "height": _SIZE,
    "seed": _SEED,
    "subseed": _SEED,
    "subseed_strength": Range(0.0, 1.0),
    "eta": Range(0.0, 1.0),
    "s_churn": Range(0.0, 100.0),
    "s_tmin": Range(0.0, 1e4),
    "s_tmax": Range(0.0, 1e4),
    "s_noise": Range(0.0, 2.0),
    "eta_noise_seed_delta": _int(0, INT64_MAX),
    "s_min_uncond": Range(0.0, 15.0),  # the webui's slider (negative guidance minimum sigma)
    "token_merging_ratio": Range(0.0, 0.9),  # the webui's slider; tomesd merges at most this share
    "token_merging_ratio_hr": Range(0.0, 0.9),
    "hires.scale": Range(1.0, 8.0),
    "hires.steps": _int(0, 150),
    "hires.resize_x": _int(0, MAX_HIRES_RESIZE),
    "hires.resize_y": _int(0, MAX_HIRES_RESIZE),
    "hires.denoising_strength": Range(0.0, 1.0),
    "hires.cfg_scale": Range(0.0, 30.0),
    "init.denoising_strength": Range(0.0, 1.0),
    "init.mask_blur_x": _int(0, 64),
    "init.mask_blur_y": _int(0, 64),
    "init.inpaint_full_res_padding": _int(0, 1024),
    "init.initial_noise_multiplier": Range(0.0, 1.5),
    "controlnet_units.weight": Range(0.0, 2.0),
    "controlnet_units.guidance_start": Range(0.0, 1.0),
    "controlnet_units.guidance_end": Range(0.0, 1.0),
    # any value: outside the preprocessor's own range (and -1) it gets the preprocessor's default, logged
    # (sd-webui-controlnet's bound check; engine.controlnet.preprocessors.Preprocessor.check_params)
    "controlnet_units.processor_res": _int(-(2**31), 2**31 - 1),
    "controlnet_units.threshold_a": Range(-1e6, 1e6),
    "controlnet_units.threshold_b": Range(-1e6, 1e6),
    "controlnet_units.advanced_weighting": Range(0.0, 2.0),  # each weight (the range of ``weight``)
    # the webui's ESRGAN_tile / ESRGAN_tile_overlap (request options, and the extras' body fields)
    "upscaler_tile": _int(0, 8192),
    "upscaler_tile_overlap": _int(0, 512),
})


# ``<lora:NAME:MULT>`` multipliers (te and unet alike): the webui parses any float, but its UI offers 0..2 (the
# extra networks' default multiplier, a LoRA's preferred weight) and "slider" LoRAs are used to about +-5; beyond
# +-10 a LoRA's delta outweighs what it was trained for (noise), and far beyond it fp16 weights overflow to inf (a
# black or NaN image in the webui). Outside this range: an InvalidRequest naming the prompt.
LORA_MULTIPLIER = Range(-10.0, 10.0)


def check_size(width: int, height: int, multiple: int, max_size: int) -> None:
    """InvalidRequest naming ``width``/``height`` unless both are multiples of ``multiple`` (a model's
    ``ModelFamily.pixel_multiple``) from :data:`MIN_SIZE` to ``max_size``."""
    for name, value in (("width", width), ("height", height)):
        if value % multiple and MIN_SIZE <= value <= max_size:
            raise InvalidRequest(name, f"{value} is not a multiple of {multiple} (this model's pixel multiple)",
                                 f"multiples of {multiple} from {MIN_SIZE} to {max_size}")
        if value % multiple or not MIN_SIZE <= value <= max_size:
            raise InvalidRequest(name, f"{value} is not allowed for this model",
                                 f"multiples of {multiple} from {MIN_SIZE} to {max_size}")


def size_fits(width: int, height: int, max_size: int) -> bool:
    """Whether both sides are within :data:`MIN_SIZE`..``max_size`` (the multiple aside)."""
    return MIN_SIZE <= width <= max_size and MIN_SIZE <= height <= max_size


def check_limits(config: Any, *, width: int | None, height: int | None, batch_size: int, n_iter: int, seed: int,
                 subseed: int) -> None:
    """The limits an engine configuration (``EngineConfig``: max_size, max_batch_size) puts over
    :data:`RANGES`, and seeds that stay within int64 for every image of the request."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and value > config.max_size:
            raise InvalidRequest(name, f"{value} is larger than this engine allows",
                                 f"a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {config.max_size}")
    if batch_size > config.max_batch_size:
        raise InvalidRequest("batch_size", f"{batch_size} is larger than this engine allows",
                             f"an integer from {RANGES['batch_size'].lo} to {config.max_batch_size}")
    total = batch_size * n_iter
    for name, value in (("seed", seed), ("subseed", subseed)):
        if value != -1 and value + total - 1 > INT64_MAX:
            raise InvalidRequest(name, f"{value} + {total - 1} (one seed per image) overflows int64",
                                 f"-1 or an integer from 0 to {INT64_MAX - total + 1}")


def check_layer_weights(weights: Any, n_residuals: int, field: str, layout: int | None = None) -> tuple[float, ...]:
    """A unit's ``advanced_weighting`` against its ControlNet: one weight per residual (``n_residuals``), each in
    ``RANGES["controlnet_units.advanced_weighting"]``. ``layout`` is the extension's count for the model's family
    (13 SD1.x/SD2.x, 10 SDXL): a list of that length is accepted too and, as the extension pairs weights with
    residuals (``zip``), its first ``n_residuals`` weights are used (a ControlNet with fewer residuals than its
    family's, as the demo one). Returns the weights used; anything else is an InvalidRequest naming ``field``."""
    rng = RANGES["controlnet_units.advanced_weighting"]
    counts = sorted({n_residuals} | ({layout} if layout and layout > n_residuals else set()))
    shown = " or ".join(str(c) for c in counts)
    allowed = (f"a list of {shown} numbers from {rng.lo:g} to {rng.hi:g} (down residuals in UNet order, then the "
               "middle block), or null")
    if not isinstance(weights, (list, tuple)) or len(weights) not in counts:
        got = f"{len(weights)} weights" if isinstance(weights, (list, tuple)) else repr(weights)[:100]
        raise InvalidRequest(field, f"{got} for a ControlNet with {n_residuals} residuals", allowed)
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not rng.lo <= w <= rng.hi:
            raise InvalidRequest(field, f"weight {w!r} is out of range", allowed)
    return tuple(float(w) for w in weights[:n_residuals])


# ------------------------------------------------------------------------------------------------ hires fix
def hires_sampler(sampler_name: str, scheduler: str, hires: Hires) -> tuple[str, str]:
    """The hires pass's (sampler, scheduler) by the webui rules: ``hires.sampler_name`` (None, "" or "Use same
    sampler": the first pass's); ``hires.scheduler`` None is "Automatic", "Use same scheduler" the first pass's."""
    name = sampler_name if _same(hires.sampler_name, USE_SAME_SAMPLER) else hires.sampler_name
    chosen = scheduler if hires.scheduler and _same(hires.scheduler, USE_SAME_SCHEDULER) \
        else (hires.scheduler or HIRES_SCHEDULER)
    return name, chosen


def _same(value: str | None, use_same: str) -> bool:
    """None, "" or the "Use same ..." choice, in any case."""
    return not value or value.strip().lower() == use_same.lower()


def resolve_hires_sampler(sampler_name: str, scheduler: str, hires: Hires, resolve: Callable[[str, str], Any]) -> Any:
    """``resolve`` (engine.samplers.resolve) of the hires pass's sampler; an unknown name is an InvalidRequest
    naming ``hires.sampler_name`` / ``hires.scheduler`` when the hires fix chose it."""
    name, chosen = hires_sampler(sampler_name, scheduler, hires)
    try:
        return resolve(name, chosen)
    except InvalidRequest as exc:
        if exc.field == "sampler_name" and name == hires.sampler_name:
            raise exc.at("hires.sampler_name") from None
        if exc.field == "scheduler" and not _same(hires.scheduler, USE_SAME_SCHEDULER):
            raise exc.at("hires.scheduler") from None
        raise


# -------------------------------------------------------------------------------------------------- choices
def parse_choice(value: Any, names: tuple[str, ...] | list[str], field: str, *, what: str = "value",
                 aliases: Mapping[str, str] | None = None, ints: Mapping[int, int] | None = None,
                 allowed: str | None = None) -> int:
    """A webui choice given as its index (``ints`` adds legacy numbers) or its name or an alias (case-insensitive,
    surrounding spaces ignored) -> its index in ``names``. Anything else (a bool too) is an InvalidRequest naming
    ``field`` with the allowed names (``allowed``, default the names quoted)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if ints and value in ints:
            return ints[value]
        if 0 <= value < len(names):
            return value
    elif isinstance(value, str):
        key = value.strip().lower()
        key = {k.lower(): v for k, v in (aliases or {}).items()}.get(key, key).lower()
        for i, name in enumerate(names):
            if key == name.lower():
                return i
    shown = value[:100] if isinstance(value, str) else value
    raise InvalidRequest(field, f"unknown {what} {shown!r}", allowed or ", ".join(repr(n) for n in names))
