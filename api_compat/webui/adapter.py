"""The webui payload adapter: a webui (or sd-webui-controlnet) payload as the /scc payload with the same meaning,
and the /scc answer in the webui's shapes (``parameters`` echo, ``info``, png-info). No state, no HTTP."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import struct
import time
from typing import Any

from engine.infotext import parse_infotext

from api_compat.errors import ApiError

log = logging.getLogger(__name__)
# the unit fields the schema knows (the extension's legacy "guidance" is read as guidance_end)

WEBUI_VERSION = "v1.10.1"  # the webui API these routes follow
# the webui's StableDiffusionProcessingTxt2Img defaults for fields a client leaves out, where they differ from
# the /scc defaults (sampler_index "Euler" is the webui API's own default)
WEBUI_TXT2IMG_DEFAULTS: dict[str, Any] = {"steps": 50, "width": 512, "height": 512, "cfg_scale": 7.0}
WEBUI_DEFAULT_SAMPLER = "Euler"

# the webui's echo of a txt2img request: every field of StableDiffusionTxt2ImgProcessingAPI with its default
WEBUI_TXT2IMG_ECHO: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None,
    "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None,
    "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    "infotext": None,
}

_HIRES_ONLY = ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
               "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
               "hr_scheduler", "hr_prompt", "hr_negative_prompt", "firstpass_image")
# ... of StableDiffusionImg2ImgProcessingAPI
WEBUI_IMG2IMG_ECHO: dict[str, Any] = {
    **{k: v for k, v in WEBUI_TXT2IMG_ECHO.items() if k not in _HIRES_ONLY},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": 0.75,
}

# sd-webui-controlnet unit fields that carry UI or batch state; accepted at these inert values only
_UNIT_INERT: dict[str, tuple[Any, ...]] = {
    "output_dir": ("", None), "use_preview_as_input": (False, None), "generated_image": (None, ""),
    "batch_input_gallery": (None, []), "batch_mask_gallery": (None, []), "batch_mask_dir": (None, ""),
    "animatediff_batch": (False, None), "batch_modifiers": (None, []), "enabled_advanced_weighting": (None, False),
    "pulid_mode": (None, "Fidelity"),
}


def api_error(code: str, message: str, field: str | None = None, allowed: str | None = None,
              status: int | None = None) -> ApiError:
    """An :class:`ApiError`, with an HTTP status other than its code's when ``status`` is given."""
    exc = ApiError(code, message, field=field, allowed=allowed)
    if status is not None:
        exc.http_status = status
    return exc


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _unit_image(value: Any, path: str) -> Any:
    """A unit's ``image`` in any of the extension's forms -> the one image string (or None): a string;
    ``{"image": b64, "mask": null}``; ``[image, mask]``; ``[{"image": ..., "mask": ...}]``. Several
    ``{"image": ...}`` entries (the extension's multi-input form) become a list of image strings (IP-Adapter units
    take it; other modules are refused at translation); masks are refused naming the field."""
    if isinstance(value, list):
        if not value:
            raise api_error("invalid_request", "is an empty list", path, "an image, or a list of one image")
        if isinstance(value[0], dict):  # [{"image": ..., "mask": ...}, ...]
            if len(value) > 1:  # the extension's multi-input (IP-Adapter units; other modules are refused later)
                return [_unit_image(v, f"{path}[{i}]") if isinstance(v, dict) else v for i, v in enumerate(value)]
            return _unit_image(value[0], f"{path}[0]")
        if len(value) > 2 or any(not isinstance(v, (str, type(None))) for v in value):
            raise api_error("invalid_request", "must be [image, mask] or a list of {image, mask} objects", path,
                            "an image, {\"image\": ..., \"mask\": null}, [image, null]")
        if len(value) == 2 and value[1] not in (None, ""):
            raise api_error("not_supported", "not supported: the engine does not implement ControlNet masks",
                            f"{path}[1]", "null")
        return value[0]
    if isinstance(value, dict):  # the extension's {"image": ..., "mask": ...}
        if value.get("mask") not in (None, ""):
            raise api_error("not_supported", "not supported: the engine does not implement ControlNet masks",
                            f"{path}.mask", "null")
        return value.get("image")
    return value


def _unit_to_scc(unit: Any, path: str) -> Any:
    """One sd-webui-controlnet unit dict as the /scc schema takes it: ``image`` in the extension's other forms
    becomes the string (:func:`_unit_image`; other keys of an ``{"image", "mask"}`` object go to the unit as
    ``image.KEY``); inert UI fields are dropped (other values refused); keys the extension's unit model does not
    know are left to the schema's leniency (api_compat.leniency: ignored and named in info.warnings, refused with
    --strict); ``save_detected_map`` defaults to the extension's True."""
    if not isinstance(unit, dict):
        return unit  # the schema names the field and the type
    unit = dict(unit)
    for name, inert in _UNIT_INERT.items():
        if name in unit:
            value = unit.pop(name)
            if not any(_same(value, d) for d in inert):
                shown = ", ".join("null" if d is None else json.dumps(d) for d in inert)
                raise api_error("not_supported", f"not supported: {name} is sd-webui-controlnet UI/batch state this "
                             "engine does not implement; leave it at its default", f"{path}.{name}", shown)
    if "guidance" in unit and "guidance_end" not in unit:  # the extension's legacy name
        unit["guidance_end"] = unit.pop("guidance")
    for name in ("image", "input_image"):
        value = unit.get(name)
        if isinstance(value, dict):  # the extension's {"image": ..., "mask": ...}
            for key in sorted(set(value) - {"image", "mask"}, key=str):
                # unknown keys: the schema's leniency (ignored and named, or refused with --strict) at their path
                unit[f"{name}.{key}"] = value[key]
        if name in unit:
            unit[name] = _unit_image(unit[name], f"{path}.{name}")
    for name in ("image", "input_image"):  # a null alias next to the given one is not a second image
        other = "input_image" if name == "image" else "image"
        if name in unit and unit[name] is None and unit.get(other) is not None:
            unit.pop(name)
    unit.setdefault("save_detected_map", True)
    return unit


def webui_to_scc(payload: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A webui txt2img payload as the /scc payload with the same meaning.

    - fields left out take the webui's defaults (steps 50, 512x512, sampler "Euler"); null means "the default"
      in the webui, so null fields are dropped;
    - ControlNet under ``alwayson_scripts`` as ``"controlnet"`` or ``"ControlNet"`` with ``"args"`` (the schema
      reads both); unit dicts go through :func:`_unit_to_scc`;
    - the server's options (POST /sdapi/v1/options) apply as ``override_settings`` the request did not set.
    """
    if not isinstance(payload, dict):
        raise ApiError("bad_request", f"the payload must be a JSON object, got {type(payload).__name__}")
    out = {k: v for k, v in payload.items() if v is not None}
    for name, default in WEBUI_TXT2IMG_DEFAULTS.items():
        out.setdefault(name, default)
    if "sampler_name" not in out and "sampler_index" not in out:
        out["sampler_index"] = WEBUI_DEFAULT_SAMPLER
    scripts = out.get("alwayson_scripts")
    if isinstance(scripts, dict):
        scripts = dict(scripts)
        for key, script in list(scripts.items()):
            if isinstance(key, str) and key.lower() == "controlnet" and isinstance(script, dict):
                script = dict(script)
                for units_key in ("args", "units"):
                    if isinstance(script.get(units_key), list):
                        script[units_key] = [_unit_to_scc(u, f"alwayson_scripts.{key}.{units_key}[{i}]")
                                             for i, u in enumerate(script[units_key])]
                scripts[key] = script
        out["alwayson_scripts"] = scripts
    if options:
        overrides = out.get("override_settings")
        if overrides is None or isinstance(overrides, dict):
            merged = {k: v for k, v in options.items() if v is not None}
            merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
            if merged:
                out["override_settings"] = merged
    return out


def webui_echo(payload: dict[str, Any], kind: str = "txt2img") -> dict[str, Any]:
    """``parameters`` of an answer: the request as the webui echoes it (every field, defaults filled)."""
    return {**(WEBUI_IMG2IMG_ECHO if kind == "img2img" else WEBUI_TXT2IMG_ECHO), **payload}


def webui_info(info: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The webui's ``Processed.js()`` keys over the engine's info dict (which has most of them)."""
    infotexts = list(info.get("infotexts") or [])
    out = {
        "prompt": info.get("prompt", ""), "all_prompts": info.get("all_prompts", []),
        "negative_prompt": info.get("negative_prompt", ""), "all_negative_prompts": info.get("all_negative_prompts", []),
        "seed": info.get("seed"), "all_seeds": info.get("all_seeds", []), "subseed": info.get("subseed"),
        "all_subseeds": info.get("all_subseeds", []), "subseed_strength": info.get("subseed_strength", 0),
        "width": info.get("width"), "height": info.get("height"), "sampler_name": info.get("sampler_name"),
        "cfg_scale": info.get("cfg_scale"), "steps": info.get("steps"), "batch_size": info.get("batch_size"),
        "restore_faces": bool(info.get("restore_faces")),
        "face_restoration_model": info.get("face_restoration_model"), "sd_model_name": info.get("sd_model_name"),
        "sd_model_hash": info.get("sd_model_hash"), "sd_vae_name": info.get("sd_vae_name"),
        "sd_vae_hash": info.get("sd_vae_hash"), "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": payload.get("denoising_strength"),
        "extra_generation_params": {k: v for k, v in _infotext_params(infotexts[0] if infotexts else "").items()
                                    if k.startswith(("ControlNet", "ADetailer")) or k == "Schedule type"},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": info.get(
            "job_timestamp") or time.strftime("%Y%m%d%H%M%S"), "clip_skip": info.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": WEBUI_VERSION,
    }
    for key, value in info.items():  # the engine's own keys (scheduler, backend, timings, ...) after the webui's
        out.setdefault(key, value)
    return out


def _infotext_params(text: str) -> dict[str, str]:
    try:
        return parse_infotext(text)[2] if text else {}
    except (ValueError, IndexError):
        return {}


def webui_parameters(text: str) -> dict[str, Any]:
    """An infotext as the webui's png-info ``parameters``: Prompt, Negative prompt, then the key/values, with
    ``Size`` also split into ``Size-1``/``Size-2`` (webui's parse_generation_parameters)."""
    try:
        prompt, negative, params = parse_infotext(text)
    except (ValueError, IndexError):  # not our format: the whole text as the prompt
        return {"Prompt": text, "Negative prompt": ""}
    out: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **params}
    size = params.get("Size", "")
    if "x" in size:
        out["Size-1"], out["Size-2"] = size.split("x", 1)
    return out


def _decode_b64(value: Any, field: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise api_error("invalid_request", "must be a base64 image (or a data:image/...;base64, URI)", field,
                     "base64 PNG/JPEG/WebP")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise api_error("invalid_request", "a data URI must be base64", field, "data:image/png;base64,...")
    if len(value) > max_bytes * 4 // 3 + 4:
        raise api_error("invalid_request", "the image is too large", field, f"at most {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise api_error("invalid_request", "is not valid base64", field, "base64 PNG/JPEG/WebP") from None


def png_info(value: Any, max_bytes: int) -> dict[str, Any]:
    """The webui's /sdapi/v1/png-info answer for a base64 image: ``info`` (the infotext), ``items`` (the other
    text chunks), ``parameters`` (the infotext parsed)."""
    from PIL import Image, UnidentifiedImageError

    raw = _decode_b64(value, "image", max_bytes)
    try:
        with Image.open(io.BytesIO(raw)) as img:  # headers and text chunks only; no pixels are decoded
            items = {k: v for k, v in img.info.items() if isinstance(v, str)}
    except Image.DecompressionBombError:  # the header declares more pixels than Pillow opens (2 x 89,478,485)
        raise api_error("invalid_request", "the image declares too many pixels", "image",
                        f"at most {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise api_error("invalid_request", f"is not an image ({exc})", "image", "base64 PNG/JPEG/WebP") from None
    text = items.pop("parameters", None)
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": webui_parameters(text)}
