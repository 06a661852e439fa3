"""sd_txt2img payload -> frozen :class:`engine.request.GenerationRequest` (api_compat translates; it does not
compute).

The checks that need the engine (size and batch limits of the configuration; sampler, schedule and
preprocessor names from the engine's registries; unit images decoded by the engine's decoder) or more than one
field (negative prompt alias, guidance order, unit image alias) happen here, each raising ``InvalidRequest``
with the field path. Model names are collected in :attr:`Translation.models` and resolved in the model store
by the service (:func:`api_compat.engine_api.check_models`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.controlnet import check_unit_sizes
from engine.controlnet.images import load_image
from engine.controlnet.preprocessors import get_preprocessor
from engine.errors import InvalidRequest
from engine.models.checkpoints import Kind
from engine.request import ControlNetUnit, GenerationRequest
from engine.samplers import resolve

from api_compat.images import ImageLimits
from api_compat.schema import INT64_MAX, Txt2ImgPayload, units_of

DEFAULT_SAMPLER = "Euler a"
# the size a unit image is planned for when the request leaves width/height to the model (the largest native
# size of the supported families, SDXL's)
PLAN_NATIVE_SIZE = 1024


@dataclass(frozen=True)
class Translation:
    """The engine request, the request echo for ``parameters``, and the model names to check in the store
    (kind, name, field path)."""

    request: GenerationRequest
    parameters: dict[str, Any]
    models: tuple[tuple[Kind, str, str], ...]


def _negative_prompt(payload: Txt2ImgPayload) -> str:
    sic, alias = payload.negtive_prompt, payload.negative_prompt
    if sic is not None and alias is not None and sic != alias:
        raise InvalidRequest("negative_prompt", "both negtive_prompt and its alias negative_prompt are given, "
                             "with different values", "one of them, or both equal")
    return sic if sic is not None else (alias or "")


def _check_limits(payload: Txt2ImgPayload, config: EngineConfig) -> None:
    for name in ("width", "height"):
        value = getattr(payload, name)
        if value is not None and value > config.max_size:
            raise InvalidRequest(name, f"{value} is larger than this engine allows",
                                 f"a multiple of 8 from 64 to {config.max_size}")
    if payload.batch_size > config.max_batch_size:
        raise InvalidRequest("batch_size", f"{payload.batch_size} is larger than this engine allows",
                             f"an integer from 1 to {config.max_batch_size}")
    total = payload.batch_size * payload.n_iter
    for name in ("seed", "subseed"):
        value = getattr(payload, name)
        if value != -1 and value + total - 1 > INT64_MAX:
            raise InvalidRequest(name, f"{value} + {total - 1} (one seed per image) overflows int64",
                                 f"-1 or an integer from 0 to {INT64_MAX - total + 1}")


def _unit(path: str, unit, limits: ImageLimits, width: int, height: int) -> ControlNetUnit:
    if unit.model is None:
        raise InvalidRequest(f"{path}.model", "is required for an enabled unit", "a ControlNet model name")
    if unit.input_image is not None and unit.image is not None and unit.input_image != unit.image:
        raise InvalidRequest(f"{path}.image", "both input_image and its alias image are given, with different values",
                             "one of them")
    source = unit.input_image if unit.input_image is not None else unit.image
    field = f"{path}.input_image" if unit.input_image is not None else f"{path}.image"
    if not source:
        raise InvalidRequest(f"{path}.input_image", "is required for an enabled unit",
                             "base64 or a data:image/...;base64, URI")
    if unit.guidance_start > unit.guidance_end:
        raise InvalidRequest(f"{path}.guidance_end", f"{unit.guidance_end:g} is before guidance_start "
                             f"{unit.guidance_start:g}", f"a number from {unit.guidance_start:g} to 1")
    preprocessor = get_preprocessor(unit.module.strip().lower(), field=f"{path}.module")  # "Canny" too
    # decoded once to validate it; the task keeps the compressed bytes (decoded again when the unit runs)
    image = load_image(source, field, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                       allow_urls=limits.allow_url_fetch)
    built = ControlNetUnit(
        model=unit.model,
        image=image,
        module=preprocessor.name,
        weight=unit.weight,
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
        resize_mode=unit.resize_mode,
        processor_res=unit.processor_res,
        threshold_a=unit.threshold_a,
        threshold_b=unit.threshold_b,
        control_mode=unit.control_mode,
        pixel_perfect=unit.pixel_perfect,
        save_detected_map=unit.save_detected_map,
    )
    check_unit_sizes(built, width, height, limits.max_work_pixels, field)
    return built


def _image_summary(value: Any) -> Any:
    if not isinstance(value, str) or len(value) <= 256:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    return f"<image: {len(value)} characters, sha256 {digest}>"


def echo_parameters(payload: Txt2ImgPayload, request: GenerationRequest) -> dict[str, Any]:
    """The request as ``parameters`` of sd_get_result: the payload with defaults filled in (null fields left
    out), resolved negative prompt and sampler, and unit images replaced by a short summary."""
    params = payload.model_dump(mode="json", exclude_none=True)
    params["negtive_prompt"] = params["negative_prompt"] = request.negative_prompt
    params["sampler_name"] = request.sampler_name
    params.pop("sampler_index", None)
    scripts = params.get("alwayson_scripts", {}).get("controlnet", {})
    for key in ("units", "args"):
        for unit in scripts.get(key) or []:
            for name in ("input_image", "image"):
                if name in unit:
                    unit[name] = _image_summary(unit[name])
    return params


def translate(payload: Txt2ImgPayload, config: EngineConfig, limits: ImageLimits | None = None) -> Translation:
    """Validate what needs the configuration and build the engine request (decoding unit images)."""
    limits = limits or ImageLimits()
    negative = _negative_prompt(payload)
    _check_limits(payload, config)
    sampler = payload.sampler_name or payload.sampler_index or DEFAULT_SAMPLER
    try:
        resolve(sampler, payload.scheduler)
    except InvalidRequest as exc:
        if exc.field == "sampler_name" and payload.sampler_name is None and payload.sampler_index is not None:
            exc.field = "sampler_index"
        raise

    overrides = payload.override_settings
    model = payload.stable_diffusion_model
    vae = payload.sd_vae or "Automatic"
    clip_skip = payload.clip_skip
    ensd = 0
    models: list[tuple[Kind, str, str]] = []
    if overrides is not None:  # the webui applies override_settings over the request's own fields
        if overrides.CLIP_stop_at_last_layers is not None:
            clip_skip = overrides.CLIP_stop_at_last_layers
        if overrides.sd_model_checkpoint is not None:
            model = overrides.sd_model_checkpoint
            models.append((Kind.CHECKPOINT, model, "override_settings.sd_model_checkpoint"))
        if overrides.sd_vae is not None:
            vae = overrides.sd_vae
        if overrides.eta_noise_seed_delta is not None:
            ensd = overrides.eta_noise_seed_delta
    if payload.stable_diffusion_model is not None and not models:
        models.append((Kind.CHECKPOINT, payload.stable_diffusion_model, "stable_diffusion_model"))
    if vae not in ("Automatic", "None"):
        field = "override_settings.sd_vae" if overrides and overrides.sd_vae else "sd_vae"
        models.append((Kind.VAE, vae, field))

    units = []
    for path, unit in units_of(payload):
        if not unit.enabled:
            continue
        units.append(_unit(path, unit, limits, payload.width or PLAN_NATIVE_SIZE, payload.height or PLAN_NATIVE_SIZE))
        models.append((Kind.CONTROLNET, unit.model, f"{path}.model"))

    request = GenerationRequest(
        model=model,
        prompt=payload.prompt,
        negative_prompt=negative,
        vae=vae,
        clip_skip=clip_skip,
        batch_size=payload.batch_size,
        n_iter=payload.n_iter,
        steps=payload.steps,
        cfg_scale=payload.cfg_scale,
        width=payload.width,
        height=payload.height,
        sampler_name=sampler,
        scheduler=payload.scheduler,
        seed=payload.seed,
        subseed=payload.subseed,
        subseed_strength=payload.subseed_strength,
        eta=payload.eta,
        s_churn=payload.s_churn,
        s_tmin=payload.s_tmin,
        s_tmax=float("inf") if payload.s_tmax is None else payload.s_tmax,
        s_noise=payload.s_noise,
        eta_noise_seed_delta=ensd,
        controlnet_units=tuple(units),
        disable_extra_networks=bool(payload.disable_extra_networks),
    )
    return Translation(request=request, parameters=echo_parameters(payload, request), models=tuple(models))
