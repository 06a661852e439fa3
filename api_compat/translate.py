"""sd_txt2img / sd_img2img payload -> frozen :class:`engine.request.GenerationRequest` (api_compat translates; it does not
compute).

The checks that need the engine (the configuration's limits: engine.rules.check_limits; sampler, schedule and
preprocessor names from the engine's registries; unit images decoded by the engine's decoder) raise
``InvalidRequest`` naming the ``GenerationRequest`` path; :func:`field_origins` records which payload field each
request field came from, and :func:`translate` / :func:`translate_img2img` raise it naming the payload's field
(``api_compat.errors.payload_path``, the one mapping; the service maps the later checks' errors, and a failed
task's, by the same origins). The payload's own shape rules that involve more than one field (negative prompt
alias, unit image alias) raise :class:`ApiError` with the payload path. Model names are collected in :attr:`Translation.models` and resolved in the model store
by the service (:func:`api_compat.engine_api.check_models`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.controlnet import check_unit_sizes
from engine.controlnet.images import ResizeMode, load_image
from engine.controlnet.preprocessors import get_preprocessor
from core.errors import InvalidRequest, NotSupported
from engine.models.checkpoints import Kind
from engine.img2img import check_image_upscaler, hires_size
from engine.ip_adapter import is_ip_module
from engine import faces
from engine.request import (ControlNetUnit, FaceRestoration, GenerationRequest, Hires, InitImage, LivePreview,
                            Refiner)
from engine.networks.syntax import parse_prompt
from engine.rules import SIZE_MULTIPLE, check_limits, default, hires_sampler, resolve_hires_sampler, size_fits
from engine.samplers import resolve
from engine.styles import apply_styles, load_styles
from engine.sd_upscale import MAX_OVERLAP, SdUpscale
from engine.sd_upscale import SCRIPT_NAME as SD_UPSCALE_SCRIPT
from engine.upscalers import upscaler_names

from api_compat import adetailer
from api_compat.errors import ApiError, in_payload_terms
from api_compat.images import ImageLimits
from api_compat.schema import GenerationPayload, Img2ImgPayload, Txt2ImgPayload, units_of

log = logging.getLogger(__name__)

# the size a unit image is planned for when the request leaves width/height to the model (the largest native
# size of the supported families, SDXL's)
PLAN_NATIVE_SIZE = 1024


@dataclass(frozen=True)
class Translation:
    """The engine request, the request echo for ``parameters``, and the model names to check in the store
    (kind, name, request path)."""

    request: GenerationRequest
    parameters: dict[str, Any]
    models: tuple[tuple[Kind, str, str], ...]


# request path -> payload path where the names differ (and the field is not one of the choices below)
_HIRES_ORIGINS = {"hires": "enable_hr", "hires.scale": "hr_scale", "hires.resize_x": "hr_resize_x",
                  "hires.resize_y": "hr_resize_y", "hires.upscaler": "hr_upscaler",
                  "hires.steps": "hr_second_pass_steps", "hires.denoising_strength": "denoising_strength",
                  "hires.sampler_name": "hr_sampler_name", "hires.scheduler": "hr_scheduler",
                  "hires.prompt": "hr_prompt", "hires.negative_prompt": "hr_negative_prompt",
                  "hires.cfg_scale": "hr_cfg", "hires.checkpoint": "hr_checkpoint_name"}
_INIT_ORIGINS = {f"init.{f.name}": f.name for f in dataclasses.fields(InitImage)} | {
    "init": "init_images", "init.image": "init_images[0]", "init.fix_steps": "override_settings.img2img_fix_steps",
    "init.upscaler": "override_settings.upscaler_for_img2img"}


def field_origins(payload: GenerationPayload) -> dict[str, str]:
    """Which payload field each ``GenerationRequest`` field comes from (request path -> payload path), for
    /scc payloads and the webui's (which become one): the alias given, override_settings over the request's
    own fields, a unit's place among the payload's units (disabled ones are not in the request), the hires fix's
    and img2img's names. Fields named alike in both are left out."""
    overrides = payload.override_settings
    given = overrides.model_dump(exclude_none=True) if overrides is not None else {}
    origins = {
        "negative_prompt": "negative_prompt" if payload.negtive_prompt is None and payload.negative_prompt is not None
        else "negtive_prompt",
        "sampler_name": "sampler_index" if payload.sampler_name is None and payload.sampler_index is not None
        else "sampler_name",
        "model": "override_settings.sd_model_checkpoint" if "sd_model_checkpoint" in given
        else "stable_diffusion_model",
        "vae": "override_settings.sd_vae" if given.get("sd_vae") else "sd_vae",
        "eta_noise_seed_delta": "override_settings.eta_noise_seed_delta",
        "refiner": "refiner_checkpoint", "refiner.checkpoint": "refiner_checkpoint",
        "refiner.switch_at": "refiner_switch_at",
        "s_min_uncond": "s_min_uncond" if payload.s_min_uncond is not None or "s_min_uncond" not in given
        else "override_settings.s_min_uncond",
        "s_min_uncond_all": "override_settings.s_min_uncond_all",
        "token_merging_ratio": "override_settings.token_merging_ratio" if given.get("token_merging_ratio")
        or not given.get("token_merging_ratio_img2img") else "override_settings.token_merging_ratio_img2img",
        "token_merging_ratio_hr": "override_settings.token_merging_ratio_hr" if given.get("token_merging_ratio_hr")
        else "override_settings.token_merging_ratio",
    }
    if "CLIP_stop_at_last_layers" in given:  # the webui's clip skip wins over clip_skip
        origins["clip_skip"] = "override_settings.CLIP_stop_at_last_layers"
    # restore_faces / tiling null: the webui options (override_settings) decide
    origins["face_restoration"] = "restore_faces" if payload.restore_faces is not None or "face_restoration" not in \
        given else "override_settings.face_restoration"
    origins["face_restoration.model"] = "override_settings.face_restoration_model"
    origins["tiling"] = "tiling" if payload.tiling is not None or "tiling" not in given else "override_settings.tiling"
    k = 0
    for path, unit in units_of(payload):
        if unit.enabled:
            origins[f"controlnet_units[{k}]"] = path
            image_given = unit.input_image is None and unit.image  # the alias alone (else input_image is named)
            origins[f"controlnet_units[{k}].image"] = f"{path}.image" if image_given else f"{path}.input_image"
            if isinstance(payload, Img2ImgPayload) and not unit.input_image and not unit.image:
                origins[f"controlnet_units[{k}].image"] = "init_images[0]"  # the unit takes the init image
            k += 1
    if isinstance(payload, Img2ImgPayload):
        origins.update(_INIT_ORIGINS)
        if payload.mask_blur is not None:
            origins["init.mask_blur_x"] = origins["init.mask_blur_y"] = "mask_blur"
        if payload.initial_noise_multiplier is None and "initial_noise_multiplier" in given:
            origins["init.initial_noise_multiplier"] = "override_settings.initial_noise_multiplier"
    else:
        origins.update(_HIRES_ORIGINS)
    origins.update(adetailer.origins(payload))
    return origins


def _negative_prompt(payload: GenerationPayload) -> str:
    sic, alias = payload.negtive_prompt, payload.negative_prompt
    if sic is not None and alias is not None and sic != alias:
        raise ApiError("invalid_request", "both negtive_prompt and its alias negative_prompt are given, with "
                       "different values", field="negative_prompt", allowed="one of them, or both equal")
    return sic if sic is not None else (alias or "")


def _unit(path: str, field: str, unit, limits: ImageLimits, width: int, height: int,
          init: tuple[Any, str] | None = None) -> ControlNetUnit:
    """A payload unit at ``path`` (its payload path, for the alias rule) as the request's unit at ``field``
    (``controlnet_units[k]``). ``init``: img2img's init image and the unit resize mode it implies, taken by a
    unit without an image of its own (as sd-webui-controlnet does). A model-free module (reference_only) takes no model: the one
    given is ignored, as the extension ignores it ("None" by convention)."""
    if unit.input_image is not None and unit.image is not None and unit.input_image != unit.image:
        raise ApiError("invalid_request", "both input_image and its alias image are given, with different values",
                       field=f"{path}.image", allowed="one of them")
    preprocessor = get_preprocessor(unit.module.strip().lower(), field=f"{field}.module")  # "Canny" too
    # the extension ignores a model-free unit's model ("None" by convention); any other unit needs one
    model = "None" if preprocessor.model_free else None if unit.model == "None" else unit.model
    if model is None:
        raise InvalidRequest(f"{field}.model", f"is required for an enabled unit with module {unit.module!r}",
                             "a ControlNet model name")
    if unit.guidance_start > unit.guidance_end:
        raise InvalidRequest(f"{field}.guidance_end", f"{unit.guidance_end:g} is before guidance_start "
                             f"{unit.guidance_start:g}", f"a number from {unit.guidance_start:g} to 1")
    # the extension's bound check: a slider value out of the preprocessor's range becomes its default, logged
    sliders, adjusted = preprocessor.check_params(unit.module, unit.processor_res, unit.threshold_a,
                                                  unit.threshold_b)
    for change in adjusted:
        log.warning("%s", change.message())
    source = unit.input_image if unit.input_image is not None else unit.image
    resize_mode = unit.resize_mode
    ip = is_ip_module(preprocessor.name)
    if isinstance(source, list):  # the extension's multi-input form: IP-Adapter modules only
        if not ip:
            raise InvalidRequest(f"{field}.image", f"a list of images is the multi-input form of IP-Adapter "
                                 f"modules, not of {preprocessor.name!r}", "one image")
        image = tuple(load_image(s, f"{field}.image[{i}]", max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                                 allow_urls=limits.url_policy) for i, s in enumerate(source))
    elif source:
        # decoded once to validate it; the task keeps the compressed bytes (decoded again when the unit runs)
        image = load_image(source, f"{field}.image", max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                           allow_urls=limits.url_policy)
    elif init is not None:
        image, resize_mode = init
    else:
        raise InvalidRequest(f"{field}.image", "is required for an enabled unit (in img2img the init image is "
                             "used when a unit has none)", "base64 or a data:image/...;base64, URI")
    built = ControlNetUnit(
        model=model,
        image=image,
        module=preprocessor.name,
        weight=unit.weight,
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
        resize_mode=resize_mode,
        processor_res=int(sliders["processor_res"]),
        threshold_a=sliders["threshold_a"],
        threshold_b=sliders["threshold_b"],
        control_mode=unit.control_mode,
        pixel_perfect=unit.pixel_perfect,
        save_detected_map=unit.save_detected_map,
        hr_option=unit.hr_option,
        advanced_weighting=None if unit.advanced_weighting is None else tuple(unit.advanced_weighting),
    )
    if not ip:  # an IP-Adapter image goes to the CLIP encoder at its own size (engine.ip_adapter)
        check_unit_sizes(built, width, height, limits.max_work_pixels, f"{field}.image")
    return built


def _image_summary(value: Any) -> Any:
    if not isinstance(value, str) or len(value) <= 256:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    return f"<image: {len(value)} characters, sha256 {digest}>"


def echo_parameters(payload: GenerationPayload, request: GenerationRequest) -> dict[str, Any]:
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
                if isinstance(unit.get(name), list):
                    unit[name] = [_image_summary(v) for v in unit[name]]
                elif name in unit:
                    unit[name] = _image_summary(unit[name])
    return params


def _request_fields(payload: GenerationPayload, config: EngineConfig, limits: ImageLimits,
                    init: tuple[Any, str] | None = None) -> tuple[dict[str, Any], list[tuple[Kind, str, str]]]:
    """The GenerationRequest fields sd_txt2img and sd_img2img share, and the model names to check (``init``:
    img2img's init image and the resize mode it implies, for units without an image)."""
    negative = _negative_prompt(payload)
    check_limits(config, width=payload.width, height=payload.height, batch_size=payload.batch_size,
                 n_iter=payload.n_iter, seed=payload.seed, subseed=payload.subseed)
    sampler = payload.sampler_name or payload.sampler_index or default("sampler_name")
    resolved = resolve(sampler, payload.scheduler)
    if init is not None:
        resolved.check_init()  # img2img starts from the init image

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
        if overrides.sd_vae is not None:
            vae = overrides.sd_vae
        if overrides.eta_noise_seed_delta is not None:
            ensd = overrides.eta_noise_seed_delta
    # the prompt's <lora:...> tags, parsed as the engine parses them (multipliers in range), their names checked
    # in the store with the other models (the tags are parsed, and malformed ones refused, even when disabled)
    loras = parse_prompt(payload.prompt, "prompt").loras
    if not payload.disable_extra_networks:
        models += [(Kind.LORA, name, "prompt") for name in dict.fromkeys(tag.name for tag in loras)]
    if model is not None:
        models.append((Kind.CHECKPOINT, model, "model"))
    if vae not in ("Automatic", "None"):
        models.append((Kind.VAE, vae, "vae"))
    refiner = None  # "None" / empty: off; refiner_switch_at alone is ignored (webui)
    if payload.refiner_checkpoint not in (None, "None"):
        refiner = Refiner(payload.refiner_checkpoint, payload.refiner_switch_at)
        models.append((Kind.CHECKPOINT, refiner.checkpoint, "refiner.checkpoint"))

    units = []
    for path, unit in units_of(payload):
        if not unit.enabled:
            continue
        field = f"controlnet_units[{len(units)}]"
        units.append(_unit(path, field, unit, limits, payload.width or PLAN_NATIVE_SIZE,
                           payload.height or PLAN_NATIVE_SIZE, init))
        # a model-based preprocessor's package and files are checked here, at submit (named in the error)
        get_preprocessor(units[-1].module).check_available(f"{field}.module", config.models_dir)
        if not get_preprocessor(units[-1].module).model_free:  # model-free units name no model
            models.append((Kind.CONTROLNET, units[-1].model, f"{field}.model"))

    prompt = payload.prompt
    if payload.styles:  # the webui's prompt styles (engine.styles: styles.csv in the data folder)
        prompt, negative = apply_styles(prompt, negative, payload.styles, load_styles())
    fields = dict(
        model=model,
        prompt=prompt,
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
        tiling=_flag(payload.tiling, overrides, "tiling"),
        face_restoration=_face_restoration(payload, overrides, config),
        refiner=refiner,
        **_vae_and_preview(overrides),
        **_speed_levers(payload, overrides),
        **_upscaler_tiles(overrides),
    )
    return fields, models


def _speed_levers(payload: GenerationPayload, overrides) -> dict[str, Any]:
    """The webui's NGMS and token merging (processing.StableDiffusionProcessing): the payload's s_min_uncond,
    else the option; ToMe from the options only (get_token_merging_ratio: img2img falls back to
    token_merging_ratio_img2img, the hires pass takes token_merging_ratio_hr, else the first pass's)."""
    def opt(name: str) -> Any:
        return getattr(overrides, name) if overrides is not None else None

    s_min_uncond = payload.s_min_uncond if payload.s_min_uncond is not None else opt("s_min_uncond")
    ratio = opt("token_merging_ratio") or 0.0
    if isinstance(payload, Img2ImgPayload):
        ratio = ratio or opt("token_merging_ratio_img2img") or 0.0
    return dict(s_min_uncond=float(s_min_uncond or 0.0), s_min_uncond_all=bool(opt("s_min_uncond_all")),
                token_merging_ratio=float(ratio), token_merging_ratio_hr=float(opt("token_merging_ratio_hr") or ratio))


def _upscaler_tiles(overrides) -> dict[str, int]:
    """override_settings' ESRGAN_tile / ESRGAN_tile_overlap (the webui routes carry the server's options) -> the
    tiles of the request's model upscalers (hires fix, SD upscale); unset: the webui's defaults."""
    out = {}
    for option, field in (("ESRGAN_tile", "upscaler_tile"), ("ESRGAN_tile_overlap", "upscaler_tile_overlap")):
        if overrides is not None and getattr(overrides, option) is not None:
            out[field] = getattr(overrides, option)
    return out


def _flag(value: bool | None, overrides, option: str) -> bool:
    """A webui flag field: its value, else (null) the webui option of ``override_settings``, else false."""
    if value is None and overrides is not None:
        value = getattr(overrides, option)
    return bool(value)


def _face_restoration(payload: GenerationPayload, overrides, config: EngineConfig) -> FaceRestoration | None:
    """``restore_faces`` (null: the face_restoration option) with the face_restoration_model and
    code_former_weight options; the restorer is checked at submit (engine.faces: none installed names the
    folder to put one in)."""
    if not _flag(payload.restore_faces, overrides, "face_restoration"):
        return None
    model = getattr(overrides, "face_restoration_model", None) if overrides is not None else None
    weight = getattr(overrides, "code_former_weight", None) if overrides is not None else None
    faces.check(config.models_dir, model)
    return FaceRestoration(model=model, codeformer_weight=0.5 if weight is None else weight)


PREVIEW_DEFAULTS = LivePreview()  # the webui's defaults: "Approx NN", every 10 steps, "Prompt"


def _vae_and_preview(overrides) -> dict[str, Any]:
    """override_settings' VAE methods and live previews -> request fields. Previews are made only when
    ``live_previews_enable`` is true (the webui routes carry the server's options, on by default as in the webui;
    a /scc payload opts in) and the interval is not -1 (the webui's "only after the batch": no live previews)."""
    if overrides is None:
        return {}
    out: dict[str, Any] = {}
    if overrides.sd_vae_encode_method is not None:
        out["vae_encode_method"] = overrides.sd_vae_encode_method
    if overrides.sd_vae_decode_method is not None:
        out["vae_decode_method"] = overrides.sd_vae_decode_method
    every = overrides.show_progress_every_n_steps
    every = PREVIEW_DEFAULTS.every_n_steps if every is None else every
    if overrides.live_previews_enable and every != -1:
        out["live_preview"] = LivePreview(method=overrides.show_progress_type or PREVIEW_DEFAULTS.method,
                                          every_n_steps=max(int(every), 1),  # 0: every step
                                          content=overrides.live_preview_content or PREVIEW_DEFAULTS.content)
    return out


def _hires(payload: Txt2ImgPayload, config: EngineConfig, fields: dict[str, Any]) -> Hires | None:
    """The hires fix of a txt2img payload (None unless enable_hr), its names and sizes checked (``fields``: the
    first pass's request fields)."""
    if not payload.enable_hr:
        return None
    # None (not given): "Latent", and no "Hires upscaler" in the infotext (webui)
    upscaler = check_image_upscaler(payload.hr_upscaler, "hires.upscaler", latent=True,
                                    models_dir=config.models_dir) if payload.hr_upscaler else None
    hr_prompt, hr_negative = payload.hr_prompt or None, payload.hr_negative_prompt or None
    if payload.styles and (hr_prompt or hr_negative):  # the webui styles the second pass's own prompts too
        styled = apply_styles(hr_prompt or "", hr_negative or "", payload.styles, load_styles())
        hr_prompt, hr_negative = (styled[0] if hr_prompt else None), (styled[1] if hr_negative else None)
    hires = Hires(
        scale=default("hires.scale") if payload.hr_scale is None else payload.hr_scale,
        resize_x=payload.hr_resize_x or 0,
        resize_y=payload.hr_resize_y or 0,
        upscaler=upscaler,
        steps=payload.hr_second_pass_steps or 0,
        denoising_strength=default("hires.denoising_strength") if payload.denoising_strength is None
        else payload.denoising_strength,
        sampler_name=payload.hr_sampler_name or None,
        scheduler=payload.hr_scheduler or None,
        prompt=hr_prompt,  # "" means the first pass's prompt, as the webui
        negative_prompt=hr_negative,
        cfg_scale=payload.hr_cfg,
        checkpoint=None if payload.hr_checkpoint_name in (None, "Use same checkpoint") else payload.hr_checkpoint_name,
    )
    try:
        resolve_hires_sampler(fields["sampler_name"], fields["scheduler"], hires, resolve).check_init()
    except InvalidRequest as exc:  # the second pass starts from the upscaled first pass's image
        own = hires.sampler_name and hires_sampler(fields["sampler_name"], fields["scheduler"], hires)[0] == \
            hires.sampler_name
        raise (exc.at("hires.sampler_name") if own and exc.field == "sampler_name" else exc) from None
    if payload.width is not None and payload.height is not None:  # else the model's native size, checked later
        size = hires_size(payload.width, payload.height, hires)
        if not size_fits(size.width, size.height, config.max_size):
            raise InvalidRequest(size.field, f"gives a second pass of {size.width}x{size.height}, larger or smaller "
                                 "than this engine allows", size.allowed(SIZE_MULTIPLE, config.max_size))
    return hires


def _payload_terms(build):
    """``build`` (a translation) with its InvalidRequest naming the payload's field instead of the request's."""

    @functools.wraps(build)
    def translated(payload: GenerationPayload, *args: Any, **kw: Any) -> Translation:
        try:
            return build(payload, *args, **kw)
        except InvalidRequest as exc:
            raise in_payload_terms(exc, field_origins(payload)) from None

    return translated


def _script(payload: GenerationPayload, kind: str, config: EngineConfig, limits: ImageLimits, image=None):
    """The selectable script of ``script_name`` (webui scripts by title, any case): "sd upscale" on img2img
    (engine.sd_upscale; ``script_args`` ["", overlap, upscaler, scale], missing ones at the script's defaults);
    None without one. Any other script is refused naming it."""
    name = (payload.script_name or "").strip()
    if not name:
        return None
    if name.lower() != SD_UPSCALE_SCRIPT or kind != "img2img":
        where = "img2img: \"sd upscale\"" if kind == "img2img" else "none on txt2img"
        raise NotSupported("script_name", f"not supported: the script {name[:100]!r} is not available in this engine "
                             f"({kind})", f"{where} (or null)")
    args = list(payload.script_args or [])
    overlap = args[1] if len(args) > 1 and args[1] is not None else SdUpscale.overlap
    upscaler = args[2] if len(args) > 2 and args[2] is not None else "None"
    scale = args[3] if len(args) > 3 and args[3] is not None else SdUpscale.scale
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or overlap != int(overlap) or \
            not 0 <= overlap <= MAX_OVERLAP:
        raise InvalidRequest("script_args[1]", "the tile overlap must be an integer", f"0 to {MAX_OVERLAP}")
    width, height = payload.width or 512, payload.height or 512
    if overlap >= min(width, height):
        raise InvalidRequest("script_args[1]", f"the tile overlap {overlap} is not smaller than the tile "
                             f"({width}x{height}: width x height)", f"0 to {min(width, height) - 1}")
    if isinstance(upscaler, int) and not isinstance(upscaler, bool):  # the webui's upscaler index
        names = upscaler_names(config.models_dir)
        if not 0 <= upscaler < len(names):
            raise InvalidRequest("script_args[2]", f"no upscaler at index {upscaler}", ", ".join(names))
        upscaler = names[upscaler]
    if not isinstance(upscaler, str):
        raise InvalidRequest("script_args[2]", "must be an upscaler name", ", ".join(upscaler_names(config.models_dir)))
    upscaler = check_image_upscaler(upscaler, "script_args[2]", latent=False, models_dir=config.models_dir)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 8.0:
        raise InvalidRequest("script_args[3]", "the scale factor must be a number", "1 to 8")
    if image is not None:
        out_w, out_h = int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8
        if upscaler == "None":
            out_w, out_h = image.width, image.height
        if out_w * out_h > limits.max_work_pixels:
            raise InvalidRequest("script_args[3]", f"makes a {out_w}x{out_h} image to tile",
                                 f"an upscaled image of at most {limits.max_work_pixels} pixels")
        if out_w < width or out_h < height:
            raise InvalidRequest("script_args[3]", f"makes a {out_w}x{out_h} image, smaller than a "
                                 f"{width}x{height} tile", "a scale that makes the image at least width x height")
    if payload.mask:
        raise InvalidRequest("mask", "the \"sd upscale\" script does not inpaint", "null with script_name "
                             "\"sd upscale\"")
    return SdUpscale(overlap=int(overlap), upscaler=upscaler, scale=float(scale))


@_payload_terms
def translate(payload: Txt2ImgPayload, config: EngineConfig, limits: ImageLimits | None = None) -> Translation:
    """Validate what needs the configuration and build the engine request (decoding unit images); an
    InvalidRequest names the payload's field."""
    limits = limits or ImageLimits()
    fields, models = _request_fields(payload, config, limits)
    _script(payload, "txt2img", config, limits or ImageLimits())
    request = GenerationRequest(**fields, hires=_hires(payload, config, fields),
                                adetailer=adetailer.of_payload(payload, config, img2img=False))
    if request.hires is not None and request.hires.checkpoint:
        models.append((Kind.CHECKPOINT, request.hires.checkpoint, "hires.checkpoint"))
    return Translation(request=request, parameters=echo_parameters(payload, request), models=tuple(models))


@_payload_terms
def translate_img2img(payload: Img2ImgPayload, config: EngineConfig,
                      limits: ImageLimits | None = None) -> Translation:
    """sd_img2img: the shared fields, the first init image (as the webui) and the mask, decoded once to check
    them and kept compressed; override_settings' img2img settings. An InvalidRequest names the payload's
    field."""
    limits = limits or ImageLimits()
    image = load_image(payload.init_images[0], "init.image", max_bytes=limits.max_bytes,
                       max_pixels=limits.max_pixels, allow_urls=limits.url_policy)
    fields, models = _request_fields(payload, config, limits,
                                     (image, ResizeMode.of_img2img(payload.resize_mode).value))
    overrides = payload.override_settings
    upscaler = default("init.upscaler")
    if overrides is not None and overrides.upscaler_for_img2img is not None:
        upscaler = check_image_upscaler(overrides.upscaler_for_img2img, "init.upscaler", latent=False)
    multiplier = payload.initial_noise_multiplier
    if multiplier is None:
        multiplier = overrides.initial_noise_multiplier if overrides is not None and \
            overrides.initial_noise_multiplier is not None else default("init.initial_noise_multiplier")
    fix_steps = bool(overrides is not None and overrides.img2img_fix_steps)
    if fix_steps and payload.denoising_strength <= 0:
        raise InvalidRequest("init.denoising_strength", "0 with img2img_fix_steps leaves no steps to run",
                             "a number above 0 and at most 1")
    mask = None
    if payload.mask:
        mask = load_image(payload.mask, "init.mask", max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                          allow_urls=limits.url_policy)
        if payload.inpaint_full_res and (mask.width, mask.height) != (image.width, image.height):
            raise InvalidRequest("init.mask", f"is {mask.width}x{mask.height}, the init image {image.width}x"
                                 f"{image.height}", "a mask of the init image's size (inpaint_full_res)")
    blur_x = payload.mask_blur_x if payload.mask_blur is None else payload.mask_blur
    blur_y = payload.mask_blur_y if payload.mask_blur is None else payload.mask_blur
    init = InitImage(
        image=image,
        denoising_strength=payload.denoising_strength,
        resize_mode=payload.resize_mode,
        mask=mask,
        mask_blur_x=blur_x,
        mask_blur_y=blur_y,
        mask_round=payload.mask_round,
        inpainting_fill=payload.inpainting_fill,
        inpaint_full_res=payload.inpaint_full_res,
        inpaint_full_res_padding=payload.inpaint_full_res_padding,
        inpainting_mask_invert=payload.inpainting_mask_invert,
        initial_noise_multiplier=multiplier,
        fix_steps=fix_steps,
        upscaler=upscaler,
    )
    sd_upscale = _script(payload, "img2img", config, limits, image)
    request = GenerationRequest(**fields, init=init, sd_upscale=sd_upscale, adetailer=adetailer.of_payload(
        payload, config, img2img=True, mask=mask is not None, script=sd_upscale is not None))
    params = echo_parameters(payload, request)
    params["init_images"] = [_image_summary(v) for v in payload.init_images]
    if "mask" in params:
        params["mask"] = _image_summary(params["mask"])
    return Translation(request=request, parameters=params, models=tuple(models))


def translate_request(kind: str, payload: GenerationPayload, config: EngineConfig,
                      limits: ImageLimits | None = None) -> Translation:
    """``kind`` "txt2img" (:func:`translate`) or "img2img" (:func:`translate_img2img`)."""
    return (translate_img2img if kind == "img2img" else translate)(payload, config, limits)


def image_bytes(request: GenerationRequest) -> int:
    """The compressed bytes of a request's images (ControlNet units, init image, mask) a waiting task holds."""
    images = [img for u in request.controlnet_units
              for img in (u.image if isinstance(u.image, tuple) else (u.image,))]
    if request.init is not None:
        images += [request.init.image, request.init.mask]
    unique = {id(image): image for image in images if image is not None}  # units may share the init image
    return sum(getattr(image, "nbytes", 0) for image in unique.values())
