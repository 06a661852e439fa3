"""The sd_txt2img and sd_img2img payloads (pydantic v2): the cloud API's fields, the webui v1.10 txt2img extras
(with the hires fix) and img2img fields (init image, inpainting), ControlNet units.

Every field is checked here for its type and its own range; the ranges, limits and defaults are the engine's
(:mod:`engine.rules`, read when this module is imported): this module only says which payload field is which
request field, and its type. Checks that need the engine configuration or more than one field (size limits,
negative prompt alias, guidance order, images) live in ``translate.py``.
Errors carry the field path and the allowed values; :func:`validation_error_to_api` turns them into an
:class:`~api_compat.errors.ApiError`.

Webui fields the engine does not implement (seed resize, s_min_uncond, ...) are accepted
at their default value and rejected otherwise with a "not supported" error; fields that only matter when such a
feature is on (the hr_* fields without enable_hr, refiner_switch_at, image_cfg_scale of instruct-pix2pix models
...) are accepted with their type checked and ignored, as the webui does. Unknown fields follow the leniency
policy (:mod:`api_compat.leniency`): ignored and named in ``info.warnings``, or an error with ``strict``.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from api_compat import leniency
from api_compat.errors import ApiError
from engine import rules
from engine.controlnet.images import ResizeMode
from engine.controlnet.units import ControlMode, HiresOption
from core.errors import InvalidRequest
from engine.img2img import IMAGE_UPSCALERS, INPAINTING_FILLS, LATENT_UPSCALERS, RESIZE_MODES
from engine.models.store import unsafe_name_reasons
from engine.request import DEFAULT_HIRES_UPSCALER, PREVIEW_CONTENTS, PREVIEW_METHODS, VAE_METHODS
from engine.rules import MAX_SIZE, MAX_UNIT_IMAGES, MAX_UNITS, default

MAX_TEXT = 65536  # characters of a prompt
MAX_NAME = 255
# characters of a unit image string: the real limits are the decoded file's bytes and pixels (ImageLimits,
# checked when it is decoded) and the HTTP body limit; this only bounds what is held before decoding
MAX_IMAGE_TEXT = 48 * 1024 * 1024
MAX_JSON_DEPTH = 16  # a payload needs 6 (alwayson_scripts.controlnet.units[i].field)
MAX_LISTED_ERRORS = 32  # problems listed one by one in an error answer; more are counted


# ----------------------------------------------------------------------------------------------- validators
def _err(kind: str, message: str, allowed: str | None = None, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, {"allowed": allowed, **ctx})


def _int_type(lo: int, hi: int, *, special: tuple[int, ...] = (), nullable: bool = False, multiple: int = 1,
              allowed: str | None = None):
    text = allowed or f"an integer from {lo} to {hi}"
    if special:
        text = " or ".join(str(s) for s in special) + ", or " + text

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err("int_type", "must be an integer, got {got}", text, got=type(value).__name__)
        if isinstance(value, float):
            if not value.is_integer():
                raise _err("int_type", "must be an integer, got {value}", text, value=value)
            value = int(value)
        if value in special:
            return value
        if not lo <= value <= hi:
            raise _err("out_of_range", "{value} is out of range", text, value=value)
        if value % multiple:
            raise _err("out_of_range", "{value} is not a multiple of {multiple}", text, value=value,
                       multiple=multiple)
        return value

    schema: dict[str, Any] = {"minimum": min((lo, *special)), "maximum": hi, "description": f"allowed: {text}"}
    base = int | None if nullable else int
    return Annotated[base, BeforeValidator(check), Field(json_schema_extra=schema)]


def _ranged(path: str, *, nullable: bool = False):
    """The type of a payload field that carries the request field ``path``, with its range from engine.rules."""
    r = rules.RANGES[path]
    if r.integer:
        return _int_type(r.lo, r.hi, special=r.special, nullable=nullable, multiple=r.multiple, allowed=r.allowed)
    return _float_type(r.lo, r.hi, nullable=nullable, special=r.special)


def _float_type(lo: float, hi: float, *, nullable: bool = False, special: tuple[float, ...] = ()):
    text = f"a number from {lo:g} to {hi:g}"
    if special:
        text = " or ".join(f"{s:g}" for s in special) + ", or " + text

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err("float_type", "must be a number, got {got}", text, got=type(value).__name__)
        value = float(value)
        if not math.isfinite(value):
            raise _err("out_of_range", "must be finite", text)
        if value in special:
            return value
        if not lo <= value <= hi:
            raise _err("out_of_range", "{value} is out of range", text, value=value)
        return value

    base = float | None if nullable else float
    return Annotated[base, BeforeValidator(check),
                     Field(json_schema_extra={"minimum": min((lo, *special)), "maximum": hi})]


def _check_unicode(value: str, allowed: str) -> None:
    """JSON's "\\ud800" escapes decode to lone surrogates, which no UTF-8 file, database or answer can hold."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _err("string_type", "is not valid Unicode (it contains a lone surrogate)", allowed) from None


def _str_type(max_len: int = MAX_TEXT, *, nullable: bool = False):
    text = f"a string of at most {max_len} characters"

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise _err("string_type", "must be a string, got {got}", text, got=type(value).__name__)
        if len(value) > max_len:
            raise _err("too_long", "is {n} characters long", text, n=len(value))
        if "\x00" in value:
            raise _err("string_type", "must not contain NUL characters", text)
        _check_unicode(value, text)
        return value

    base = str | None if nullable else str
    return Annotated[base, BeforeValidator(check), Field(json_schema_extra={"maxLength": max_len})]


def _image_text_type(*, nullable: bool = True):
    """An image string (base64, data URI, allowed URL): limited by the decoded file's bytes and pixels
    (``ImageLimits``, checked when it is decoded) and the HTTP body limit, not by a prompt's character cap;
    ``MAX_IMAGE_TEXT`` only bounds what is held before decoding, and its error speaks of bytes."""
    text = (f"an image (base64, data:image/...;base64, URI) of at most {MAX_IMAGE_TEXT // (1024 * 1024)} MiB "
            "encoded; the decoded file is limited by the server's image bytes and pixels")

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise _err("string_type", "must be an image string, got {got}", text, got=type(value).__name__)
        if len(value) > MAX_IMAGE_TEXT:
            raise _err("too_long", "is {mb} MiB encoded", text, mb=f"{len(value) / (1024 * 1024):.1f}")
        return value

    base = str | None if nullable else str
    return Annotated[base, BeforeValidator(check), Field(json_schema_extra={"description": f"allowed: {text}"})]


def _unit_images_type(max_items: int):
    """Null, one image string (:func:`_image_text_type`), or (the extension's multi-input form, IP-Adapter units) a
    list of 1 to ``max_items`` image strings."""
    one = _image_text_type().__metadata__[0].func
    text = f"an image string, or a list of 1 to {max_items} of them (IP-Adapter units)"

    def check(value: Any) -> Any:
        if not isinstance(value, list):
            return one(value)
        if not 1 <= len(value) <= max_items:
            raise _err("list_type", "must be a list of 1 to {n} images", text, n=max_items)
        return [one(v) if isinstance(v, str) else _bad_image(v, text) for v in value]

    return Annotated[str | list[str] | None, BeforeValidator(check),
                     Field(json_schema_extra={"description": f"allowed: {text}"})]


def _bad_image(value: Any, text: str):
    raise _err("string_type", "must be a string, got {got}", text, got=type(value).__name__)


def check_model_name(value: str, *, allowed: str = "a model file or folder name from the model store") -> str:
    """A name from the model store, never a path (the store's rule: engine.models.store.unsafe_name_reasons);
    surrounding whitespace is refused too."""
    if unsafe_name_reasons(value) or value != value.strip():
        raise _err("unsafe_model_path", "{value} is a path, not a model name", allowed, value=repr(value[:100]))
    return value


def _name_type(*, special: tuple[str, ...] = (), kind: str = "model"):
    text = f"a {kind} name from the model store (no path)"
    if special:
        text = ", ".join(f'"{s}"' for s in special) + ", or " + text

    def check(value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _err("string_type", "must be a string, got {got}", text, got=type(value).__name__)
        if len(value) > MAX_NAME:
            raise _err("too_long", "is {n} characters long", text, n=len(value))
        if value in special:
            return value
        _check_unicode(value, text)
        return check_model_name(value, allowed=text)

    return Annotated[str | None, BeforeValidator(check), Field(json_schema_extra={"description": f"allowed: {text}"})]


def _only_default(*defaults: Any, feature: str):
    """A webui field the engine does not implement: accepted at its default value(s), else "not supported"."""
    shown = ", ".join("null" if d is None else repr(d).replace("'", '"').replace("False", "false")
                      .replace("True", "true") for d in defaults)

    def check(value: Any) -> Any:
        for default in defaults:
            if value is default or (type(value) is type(default) and value == default):
                return value
        raise _err("not_supported", "not supported: the engine does not implement {feature}; leave it at its default",
                   shown, feature=feature)

    return Annotated[Any, BeforeValidator(check), Field(json_schema_extra={"description": f"not supported; only {shown}"})]


def _styles_type():
    """Prompt style names (engine.styles: styles.csv in the data folder), applied in order; null or []: none."""

    def check(value: Any) -> Any:
        if value is None or (isinstance(value, list) and len(value) <= 64 and
                             all(isinstance(v, str) and len(v) <= 200 for v in value)):
            return value
        raise _err("invalid_type", "must be a list of style names", "a list of at most 64 names from "
                   "/sdapi/v1/prompt-styles, or null")

    return Annotated[Any, BeforeValidator(check), Field(json_schema_extra={
        "description": "prompt styles by name (GET /sdapi/v1/prompt-styles), applied in order"})]


def _script_args_type():
    """A script's arguments: a list of at most 64 values (their meaning is the script's), or null."""

    def check(value: Any) -> Any:
        if value is None or (isinstance(value, list) and len(value) <= 64):
            return value
        raise _err("invalid_type", "must be a list of at most 64 values", "a list, or null")

    return Annotated[Any, BeforeValidator(check), Field(json_schema_extra={
        "description": 'the script\'s arguments ("sd upscale": ["", overlap, upscaler, scale])'})]


def _mode(enum: Any, default_text: str):
    """An extension enum (engine.controlnet ResizeMode / ControlMode), parsed by the enum's own ``parse`` (names,
    aliases, case-insensitive, or the extension's int); returns the canonical name."""
    names = [m.value for m in enum]
    text = ", ".join(f'"{n}"' for n in names) + f" (or {default_text})"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _err("enum", "must be one of the listed names, got {got}", text, got=type(value).__name__)
        try:
            return enum.parse(value).value
        except InvalidRequest:
            raise _err("enum", "unknown value {value}", text,
                       value=repr(value if isinstance(value, int) else value[:100])) from None

    return Annotated[str, BeforeValidator(check), Field(json_schema_extra={"enum": names})]


def _bool_type(*, nullable: bool = True):
    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _err("bool_type", "must be true or false", "true, false")

    base = bool | None if nullable else bool
    return Annotated[base, BeforeValidator(check)]


def _list_type(max_len: int, *, item: str = "string"):
    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise _err("list_type", "must be a list", f"a list of {item}s")
        if len(value) > max_len:
            raise _err("too_long", "has {n} entries", f"at most {max_len} {item}s", n=len(value))
        return value

    return Annotated[list[Any] | None, BeforeValidator(check)]


def _comments_type():
    """webui ``comments``: a small object of plain values (kept in ``parameters``)."""
    text = "an object of at most 64 strings, finite numbers, booleans or nulls"

    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) > 64:
            raise _err("dict_type", "must be a small object", text)
        for key, item in value.items():
            ok = item is None or isinstance(item, (str, bool, int)) or (isinstance(item, float) and math.isfinite(item))
            if not ok or len(str(key)) > 200 or (isinstance(item, str) and len(item) > MAX_TEXT):
                raise _err("dict_type", "entry {key} is not a plain value", text, key=repr(str(key)[:50]))
        return value

    return Annotated[dict[str, Any] | None, BeforeValidator(check)]


Seed = _ranged("seed")
ModelName = _name_type(kind="checkpoint")
Text = _str_type()
OptText = _str_type(nullable=True)
ShortText = _str_type(200)
OptShortText = _str_type(200, nullable=True)
Flag = _bool_type()

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _weights_type(path: str, max_len: int):
    """Null, or a list of 1 to ``max_len`` numbers, each in the range of ``path`` (engine.rules.RANGES)."""
    r = rules.RANGES[path]
    text = f"a list of 1 to {max_len} numbers from {r.lo:g} to {r.hi:g}, or null"

    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_len:
            raise _err("list_type", "must be a list of 1 to {n} numbers", text, n=max_len)
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    not r.lo <= v <= r.hi:
                raise _err("out_of_range", "{value} is not a number in range", text, value=v)
        return [float(v) for v in value]

    return Annotated[list[float] | None, BeforeValidator(check)]


# --------------------------------------------------------------------------------------------------- models
class ControlNetUnitPayload(_Model):
    """One sd-webui-controlnet unit (docs/API.md "ControlNet unit")."""

    enabled: _bool_type(nullable=False) = True
    module: ShortText = default("controlnet_units.module")
    model: _name_type(special=("None",), kind="ControlNet model") = Field(
        None, description='"None" (or null) only for modules that need no ControlNet model (reference_*)')
    input_image: _unit_images_type(MAX_UNIT_IMAGES) = Field(
        None, description="base64 or data:image/...;base64, URI (http(s) if allowed); limited by the decoded "
                          "file's bytes and pixels. IP-Adapter units take a list of images too (the extension's "
                          "multi-input form: their image prompts are averaged)")
    image: _unit_images_type(MAX_UNIT_IMAGES) = Field(None, description="alias of input_image")
    weight: _ranged("controlnet_units.weight") = default("controlnet_units.weight")
    guidance_start: _ranged("controlnet_units.guidance_start") = default("controlnet_units.guidance_start")
    guidance_end: _ranged("controlnet_units.guidance_end") = default("controlnet_units.guidance_end")
    resize_mode: _mode(ResizeMode, "0, 1, 2") = default("controlnet_units.resize_mode")
    processor_res: _ranged("controlnet_units.processor_res") = default("controlnet_units.processor_res")
    threshold_a: _ranged("controlnet_units.threshold_a") = default("controlnet_units.threshold_a")
    threshold_b: _ranged("controlnet_units.threshold_b") = default("controlnet_units.threshold_b")
    control_mode: _mode(ControlMode, "0, 1, 2") = default("controlnet_units.control_mode")
    pixel_perfect: _bool_type(nullable=False) = default("controlnet_units.pixel_perfect")
    save_detected_map: _bool_type(nullable=False) = default("controlnet_units.save_detected_map")
    hr_option: _mode(HiresOption, "0, 1, 2") = Field(default("controlnet_units.hr_option"), description=(
        "with the hires fix: the passes the unit acts in (its detected maps are returned for both passes)"))
    advanced_weighting: _weights_type("controlnet_units.advanced_weighting", rules.MAX_LAYER_WEIGHTS) = Field(
        None, description="per-residual control weights (down residuals in UNet order, then the middle block: 13 "
                          "for SD1.x/SD2.x ControlNets, 10 for SDXL); they replace weight and the control mode's "
                          "scales")
    # sd-webui-controlnet fields with no effect here (memory hints, UI state, hires-fix routing)
    low_vram: Flag = None
    lowvram: Flag = None
    is_ui: Flag = None
    inpaint_crop_input_image: Flag = None
    # sd-webui-controlnet features the engine does not implement
    guess_mode: _only_default(False, None, feature="guess mode (use control_mode)") = None
    mask: _only_default(None, "", feature="ControlNet masks") = None
    mask_image: _only_default(None, "", feature="ControlNet masks") = None
    effective_region_mask: _only_default(None, "", feature="ControlNet region masks") = None
    input_mode: _only_default("simple", None, feature="ControlNet batch input") = None
    batch_images: _only_default("", None, [], feature="ControlNet batch input") = None
    loopback: _only_default(False, None, feature="ControlNet loopback") = None
    ipadapter_input: _only_default(None, feature="IP-Adapter inputs") = None
    union_control_type: _only_default(None, "Unknown", feature="ControlNet union models") = None


UnitList = Annotated[list[ControlNetUnitPayload] | None, Field(max_length=MAX_UNITS)]


class ControlNetArgs(_Model):
    """``alwayson_scripts.controlnet``: the units as ``units`` (docs/API.md) or ``args`` (the webui's spelling)."""

    units: UnitList = None
    args: UnitList = None

    def unit_list(self) -> tuple[str, list[ControlNetUnitPayload]]:
        if self.units is not None:
            return "units", self.units
        return "args", self.args or []


class AlwaysOnScripts(_Model):
    controlnet: ControlNetArgs | None = None
    # the ADetailer extension's args as given: read by api_compat.adetailer.parse (its tabs, with the leniency
    # policy), when the request is translated
    adetailer: Any = Field(None, description="ADetailer: {\"args\": [enable, skip_img2img, {tab}, ...]} (docs/API.md)")

    @model_validator(mode="before")
    @classmethod
    def _script_titles(cls, data: Any) -> Any:
        # the webui matches script titles case-insensitively ("ControlNet", "ADetailer")
        if isinstance(data, dict):
            return {(k.lower() if isinstance(k, str) and k.lower() in ("controlnet", "adetailer") else k): v
                    for k, v in data.items()}
        return data


Ignored = Annotated[Any, Field(json_schema_extra={"description": "accepted and ignored: no effect on the result"})]


def _names_type(names: tuple[str, ...]):
    """Null, or one of the webui's names for a setting (exactly as the webui spells them)."""
    text = ", ".join(f'"{n}"' for n in names)

    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _err("enum", "must be a string, got {got}", text, got=type(value).__name__)
        if value not in names:
            raise _err("enum", "unknown value {value}", text, value=repr(value[:100]))
        return value

    return Annotated[str | None, BeforeValidator(check), Field(json_schema_extra={"description": f"allowed: {text}"})]


class OverrideSettings(_Model):
    """The webui settings a request may override (``override_settings``). ``img2img_fix_steps``,
    ``initial_noise_multiplier`` and ``upscaler_for_img2img`` only act on img2img (as in the webui: the hires
    pass always runs its exact steps). Settings about saving and display have no effect on the result and are
    ignored; any other key is an error naming it."""

    CLIP_stop_at_last_layers: _ranged("clip_skip", nullable=True) = None
    sd_model_checkpoint: ModelName = None
    sd_vae: _name_type(special=("Automatic", "None"), kind="VAE") = None
    eta_noise_seed_delta: _ranged("eta_noise_seed_delta", nullable=True) = None
    img2img_fix_steps: Flag = None
    initial_noise_multiplier: _ranged("init.initial_noise_multiplier", nullable=True) = None
    upscaler_for_img2img: OptShortText = None
    # face restoration (restore_faces) and seamless tiling: the webui options a request's null field falls back to
    face_restoration: Flag = None
    face_restoration_model: OptShortText = None
    code_former_weight: _float_type(0.0, 1.0, nullable=True) = None
    tiling: Flag = None
    # the webui's speed levers (opt-in): NGMS (payload s_min_uncond wins) and token merging (torch backend)
    s_min_uncond: _ranged("s_min_uncond", nullable=True) = None
    s_min_uncond_all: Flag = None
    token_merging_ratio: _ranged("token_merging_ratio", nullable=True) = None
    token_merging_ratio_hr: _ranged("token_merging_ratio_hr", nullable=True) = None
    token_merging_ratio_img2img: _ranged("token_merging_ratio", nullable=True) = None
    # the VAE's encode / decode method: "TAESD" (TAESDXL for SDXL) instead of the model's VAE
    sd_vae_encode_method: _names_type(VAE_METHODS) = None
    sd_vae_decode_method: _names_type(VAE_METHODS) = None
    # the model upscalers' tiles (hires fix, SD upscale; the extras take them as body fields)
    ESRGAN_tile: _ranged("upscaler_tile", nullable=True) = None
    ESRGAN_tile_overlap: _ranged("upscaler_tile_overlap", nullable=True) = None
    # live previews (no effect on the images): the webui's options; on this request's progress (docs/API.md)
    live_previews_enable: Flag = None
    show_progress_every_n_steps: _int_type(-1, 1000, nullable=True) = None
    show_progress_type: _names_type(PREVIEW_METHODS) = None
    live_preview_content: _names_type(PREVIEW_CONTENTS) = None
    # webui settings about saving files: no effect on the images or the infotext here
    samples_save: Ignored = None
    samples_format: Ignored = None
    grid_save: Ignored = None
    save_to_dirs: Ignored = None
    show_progressbar: Ignored = None


class GenerationPayload(_Model):
    """The fields sd_txt2img and sd_img2img share (cloud fields first, then webui v1.10 extras)."""

    _ignored: tuple[str, ...] = PrivateAttr(default=())  # unknown fields parse_payload left out (their paths)
    _strict: bool = PrivateAttr(default=False)  # parsed with strict (api_compat.adetailer reads its tabs so too)

    @property
    def ignored_fields(self) -> tuple[str, ...]:
        """The payload paths of the unknown fields that were ignored (api_compat.leniency)."""
        return self._ignored

    def warnings(self) -> tuple[str, ...]:
        """``info.warnings`` entries of the payload itself (the ignored unknown fields)."""
        return leniency.ignored_warnings(self._ignored)

    # the cloud API's fields
    stable_diffusion_model: ModelName = default("model")
    sd_vae: _name_type(special=("Automatic", "None"), kind="VAE") = default("vae")
    clip_skip: _ranged("clip_skip") = default("clip_skip")
    prompt: Text = default("prompt")
    negtive_prompt: OptText = Field(None, description="negative prompt (sic, as the cloud API spells it)")
    negative_prompt: OptText = Field(None, description="alias of negtive_prompt")
    batch_size: _ranged("batch_size") = default("batch_size")
    steps: _ranged("steps") = default("steps")
    cfg_scale: _ranged("cfg_scale") = default("cfg_scale")
    width: _ranged("width", nullable=True) = default("width")
    height: _ranged("height", nullable=True) = default("height")
    sampler_name: OptShortText = None
    seed: Seed = default("seed")
    alwayson_scripts: AlwaysOnScripts | None = None
    # webui extras the engine implements
    n_iter: _ranged("n_iter") = default("n_iter")
    scheduler: ShortText = default("scheduler")
    subseed: Seed = default("subseed")
    subseed_strength: _ranged("subseed_strength") = default("subseed_strength")
    eta: _ranged("eta", nullable=True) = default("eta")
    s_churn: _ranged("s_churn") = default("s_churn")
    s_tmin: _ranged("s_tmin") = default("s_tmin")
    s_tmax: _ranged("s_tmax", nullable=True) = None  # null: infinity (the request's default)
    s_noise: _ranged("s_noise") = default("s_noise")
    sampler_index: OptShortText = Field(None, description="legacy webui name of sampler_name")
    override_settings: OverrideSettings | None = None
    # webui fields with no effect on the result here
    override_settings_restore_afterwards: Flag = None
    do_not_save_samples: Flag = None
    do_not_save_grid: Flag = None
    send_images: Flag = None
    save_images: Flag = None
    disable_extra_networks: Flag = None
    comments: _comments_type() = None
    # the SDXL refiner (engine.refiner): the checkpoint that takes over at the switch point; null/""/"None": off
    refiner_checkpoint: _name_type(special=("None",), kind="checkpoint") = None
    refiner_switch_at: _float_type(0.0, 1.0, nullable=True) = None  # ignored without refiner_checkpoint (webui)
    # null: the webui options face_restoration / tiling (override_settings, /sdapi/v1/options), default false
    restore_faces: Flag = None
    tiling: Flag = None
    # webui features the engine does not implement: default only
    styles: _styles_type() = None
    seed_resize_from_h: _only_default(-1, 0, None, feature="seed resize") = None
    seed_resize_from_w: _only_default(-1, 0, None, feature="seed resize") = None
    s_min_uncond: _ranged("s_min_uncond", nullable=True) = None  # null: override_settings / the option
    force_task_id: _only_default(None, "", feature="client-chosen task ids") = None
    # selectable scripts: "sd upscale" on img2img (api_compat.translate checks the name and its arguments)
    script_name: OptShortText = None
    script_args: _script_args_type() = None
    infotext: _only_default(None, "", feature="infotext parameters") = None




class Txt2ImgPayload(GenerationPayload):
    """The sd_txt2img request: the shared fields and the hires fix (webui ``enable_hr``)."""

    enable_hr: Flag = None
    denoising_strength: _ranged("hires.denoising_strength", nullable=True) = Field(
        None, description="hires fix: the second pass's denoising strength "
                          f"(default {default('hires.denoising_strength'):g})")
    hr_scale: _ranged("hires.scale", nullable=True) = Field(None, description=f"default {default('hires.scale'):g}")
    hr_upscaler: OptShortText = Field(None, description=f'default "{DEFAULT_HIRES_UPSCALER}"; ' + ", ".join(
        f'"{name}"' for name in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)))
    hr_second_pass_steps: _ranged("hires.steps", nullable=True) = None
    hr_resize_x: _ranged("hires.resize_x", nullable=True) = None
    hr_resize_y: _ranged("hires.resize_y", nullable=True) = None
    hr_sampler_name: OptShortText = None
    hr_scheduler: OptShortText = None
    hr_prompt: OptText = None
    hr_negative_prompt: OptText = None
    hr_cfg: _ranged("hires.cfg_scale", nullable=True) = None
    # hires fields with no effect here
    firstphase_width: _int_type(0, MAX_SIZE, nullable=True) = None
    firstphase_height: _int_type(0, MAX_SIZE, nullable=True) = None
    hr_additional_modules: _list_type(16) = None
    hr_checkpoint_name: _name_type(special=("Use same checkpoint",), kind="checkpoint") = None
    firstpass_image: _only_default(None, "", feature="a first-pass image") = None


def _choice_type(names: tuple[str, ...]):
    """A webui enum given as its index or its name (engine.rules.parse_choice) -> the index."""
    text = ", ".join(f'{i} or "{n}"' for i, n in enumerate(names))

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _err("enum", "must be an index or a name, got {got}", text, got=type(value).__name__)
        try:
            return rules.parse_choice(value, names, "")
        except InvalidRequest:
            raise _err("enum", "unknown value {value}", text,
                       value=repr(value if isinstance(value, int) else value[:100])) from None

    return Annotated[int, BeforeValidator(check), Field(json_schema_extra={"description": f"allowed: {text}"})]


def _images_type(max_len: int = 16):
    text = f"a list of 1 to {max_len} base64 images (or data:image/...;base64, URIs)"

    def check(value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise _err("list_type", "must be a non-empty list of images", text)
        if len(value) > max_len:
            raise _err("too_long", "has {n} entries", text, n=len(value))
        for item in value:
            if not isinstance(item, str) or not item:
                raise _err("string_type", "every entry must be a base64 image string", text)
        return value

    return Annotated[list[str], BeforeValidator(check), Field(json_schema_extra={"description": text})]


class Img2ImgPayload(GenerationPayload):
    """The sd_img2img request: the shared fields, the init image and inpainting (webui v1.10 img2img)."""

    init_images: _images_type() = Field(..., description="the first image is used, as the webui")
    denoising_strength: _ranged("init.denoising_strength") = default("init.denoising_strength")
    resize_mode: _choice_type(RESIZE_MODES) = default("init.resize_mode")
    mask: _image_text_type() = Field(None, description="inpainting mask (white: repaint), base64 or data URI; "
                                                        "limited by the decoded file's bytes and pixels")
    mask_blur: _ranged("init.mask_blur_x", nullable=True) = Field(None, description="sets mask_blur_x and "
                                                                                     "mask_blur_y")
    mask_blur_x: _ranged("init.mask_blur_x") = default("init.mask_blur_x")
    mask_blur_y: _ranged("init.mask_blur_y") = default("init.mask_blur_y")
    mask_round: _bool_type(nullable=False) = default("init.mask_round")
    inpainting_fill: _choice_type(INPAINTING_FILLS) = rules.WEBUI_IMG2IMG_DEFAULTS["init.inpainting_fill"]
    inpaint_full_res: _bool_type(nullable=False) = rules.WEBUI_IMG2IMG_DEFAULTS["init.inpaint_full_res"]
    inpaint_full_res_padding: _ranged("init.inpaint_full_res_padding") = default("init.inpaint_full_res_padding")
    inpainting_mask_invert: _bool_type(nullable=False) = default("init.inpainting_mask_invert")
    initial_noise_multiplier: _ranged("init.initial_noise_multiplier", nullable=True) = None
    include_init_images: Flag = None
    # instruct-pix2pix models only (the webui ignores it on any other model; this engine runs none): inert
    image_cfg_scale: _float_type(0.0, 30.0, nullable=True) = Field(
        None, description="instruct-pix2pix models only: accepted and ignored (no model here uses it)")
    latent_mask: _only_default(None, "", feature="a separate latent mask") = None


FIELD_NAMES = {
    (): set(Txt2ImgPayload.model_fields),
    "img2img": set(Img2ImgPayload.model_fields),
    ("override_settings",): set(OverrideSettings.model_fields),
    ("alwayson_scripts", "controlnet"): set(ControlNetArgs.model_fields),
    "unit": set(ControlNetUnitPayload.model_fields),
}


# ------------------------------------------------------------------------------------------------ errors
def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("alwayson_scripts", "controlnet", "units", 1, "weight")`` -> ``alwayson_scripts.controlnet.units[1].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_ALLOWED_BY_TYPE = {
    "too_long": f"at most {MAX_UNITS} units",
    "model_type": "a JSON object",
    "dict_type": "a JSON object",
    "list_type": "a JSON list",
    "missing": None,
}


def _known_fields(loc: tuple[Any, ...], top: str | tuple = ()) -> set[str]:
    parent = tuple(loc[:-1])
    if len(parent) >= 2 and isinstance(parent[-1], int):
        return FIELD_NAMES["unit"]
    return FIELD_NAMES.get(top if not parent else parent, set())


def _convert(err: dict[str, Any], prefix: tuple[Any, ...], top: str | tuple = ()) -> dict[str, Any]:
    loc = prefix + tuple(err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    allowed = ctx.get("allowed") if isinstance(ctx, dict) else None
    name = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden":
        if loc[:1] == ("alwayson_scripts",) and len(loc) == 2:
            return {"code": "not_supported", "field": field_path(loc),
                    "message": f"the script {name!r} is not supported", "allowed": "controlnet"}
        if loc[:1] == ("override_settings",) and len(loc) == 2:
            known = ", ".join(sorted(FIELD_NAMES[("override_settings",)]))
            return {"code": "not_supported", "field": field_path(loc),
                    "message": f"overriding the setting {name!r} is not supported", "allowed": known}
        known = _known_fields(loc, top)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        message = f"unknown field {name!r}" + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")
        return {"code": "unknown_field", "field": field_path(loc), "message": message,
                "allowed": ", ".join(sorted(known)) if known and len(known) <= 20 else "the fields listed in docs/API.md"}
    code = {"not_supported": "not_supported", "unsafe_model_path": "unsafe_model_path"}.get(kind, "invalid_request")
    message = "is required" if kind == "missing" else err.get("msg", "is invalid")
    return {"code": code, "field": field_path(loc), "message": message,
            "allowed": allowed if allowed is not None else _ALLOWED_BY_TYPE.get(kind)}


def validation_error_to_api(exc: ValidationError, prefix: tuple[Any, ...] = (), top: str | tuple = ()) -> ApiError:
    """Every problem pydantic found, the first one as the error's code/field/message (``top``: the key of the
    payload's field names in FIELD_NAMES, for "did you mean")."""
    found = exc.errors(include_url=False, include_input=False)
    errors = [_convert(e, prefix, top) for e in found[:MAX_LISTED_ERRORS]]
    if len(found) > MAX_LISTED_ERRORS:  # bounded answer (and "did you mean" work) whatever the body holds
        errors.append({"code": errors[0]["code"], "field": None, "allowed": None,
                       "message": f"... and {len(found) - MAX_LISTED_ERRORS} more problems, not listed"})
    first = errors[0]
    return ApiError(first["code"], first["message"], field=first["field"] or None, allowed=first["allowed"],
                    errors=errors)


NON_FINITE_ALLOWED = "a finite number (NaN, Infinity and numbers beyond 1.8e308 are not JSON numbers, RFC 8259)"
NOT_TEXT_ALLOWED = ("Unicode text: a \\ud800-\\udfff escape only as half of a surrogate pair (a lone one is no "
                    "character, RFC 8259 section 8.2)")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair into one character


def _printable(key: str) -> str:
    """A key as it can be written back in an answer (a lone surrogate as its escape)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def body_problem(value: Any, limit: int = MAX_JSON_DEPTH) -> tuple[str, str] | None:
    """What no field of any face can mean in a decoded JSON value, as ``(path, kind)`` ("" for the value itself),
    or None; one iterative walk (any depth json.loads accepted is measured without recursion):

    - ``"depth"``: a list/object nested deeper than ``limit`` levels;
    - ``"number"``: NaN or an infinite number (Python's json module reads ``NaN``, ``Infinity`` and ``1e999``);
      no JSON answer can echo one back;
    - ``"text"``: a string or key holding a lone surrogate (``"\\ud800"``): not Unicode, so it cannot be stored,
      logged or answered as UTF-8.

    Every face refuses them wherever they are, even in a field it ignores (docs/DECISIONS.md)."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return field_path(path), "number"
            continue
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return field_path(path), "text"
            continue
        if isinstance(item, dict):
            for key in item:
                if isinstance(key, str) and _LONE_SURROGATE.search(key):
                    return field_path((*path, _printable(key))), "text"
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth > limit:
            return field_path(path), "depth"
        stack.extend((child, depth + 1, (*path, key)) for key, child in children
                     if isinstance(child, (float, str, dict, list)))
    return None


def check_body(value: Any, depth_code: str = "invalid_request", *, prefix: str = "") -> None:
    """Raises :class:`ApiError` for :func:`body_problem`'s finding: ``depth_code`` for too deep a nesting (the
    HTTP layer's ``bad_request``, the in-process parse's ``invalid_request``), ``invalid_request`` naming the field
    for a non-finite number or text that is not Unicode."""
    found = body_problem(value)
    if found is None:
        return
    where, kind = found
    if kind == "depth":
        raise ApiError(depth_code, f"{prefix}is nested more than {MAX_JSON_DEPTH} levels deep", field=where or None,
                       allowed=f"at most {MAX_JSON_DEPTH} levels of nesting (a payload needs 6)")
    if kind == "number":
        raise ApiError("invalid_request", "must be a finite number (NaN and Infinity are not JSON)",
                       field=where or None, allowed=NON_FINITE_ALLOWED)
    raise ApiError("invalid_request", "is not Unicode text (it holds a lone surrogate escape)", field=where or None,
                   allowed=NOT_TEXT_ALLOWED)


def parse_payload(payload: Any, model: type[GenerationPayload] = Txt2ImgPayload, *,
                  strict: bool = False) -> GenerationPayload:
    """Validate a decoded JSON payload (sd_txt2img; ``model=Img2ImgPayload`` for sd_img2img); raises
    :class:`ApiError` naming the field path. Unknown fields are left out and listed in the result's
    ``ignored_fields`` (``strict``: an ``unknown_field`` error); disabled extension scripts are left out
    (api_compat.leniency)."""
    if not isinstance(payload, dict):
        raise ApiError("bad_request", f"the payload must be a JSON object, got {type(payload).__name__}")
    check_body(payload)
    top = "img2img" if model is Img2ImgPayload else ()
    payload = leniency.check_scripts(payload)
    ignored: list[str] = []
    for _ in range(3):  # unknown keys nested in objects that failed otherwise show once those are valid
        try:
            parsed = model.model_validate(payload)
            break
        except ValidationError as exc:
            unknown = [] if strict else [tuple(e["loc"]) for e in exc.errors(include_url=False, include_input=False)
                                         if e["type"] == "extra_forbidden"]
            if not unknown:
                raise validation_error_to_api(exc, top=top) from None
            ignored += [field_path(loc) for loc in unknown]
            payload = leniency.without(payload, unknown)
    else:
        raise validation_error_to_api(exc, top=top) from None
    parsed._ignored = tuple(ignored)
    parsed._strict = strict
    script = parsed.alwayson_scripts.controlnet if parsed.alwayson_scripts else None
    if script is not None and script.units is not None and script.args is not None:
        raise ApiError("invalid_request", "give the units either as 'units' or as 'args', not both",
                       field="alwayson_scripts.controlnet.args", allowed="units or args")
    return parsed


def parse_img2img(payload: Any, *, strict: bool = False) -> Img2ImgPayload:
    """Validate a decoded sd_img2img payload; raises :class:`ApiError` naming the field path."""
    return parse_payload(payload, Img2ImgPayload, strict=strict)


def parse_request(kind: str, payload: Any, *, strict: bool = False) -> GenerationPayload:
    """``kind`` "txt2img" (sd_txt2img) or "img2img" (sd_img2img): the payload validated by its model
    (``strict``: unknown fields are errors, api_compat.leniency)."""
    return parse_img2img(payload, strict=strict) if kind == "img2img" else parse_payload(payload, strict=strict)


def units_of(payload: GenerationPayload) -> tuple[tuple[str, ControlNetUnitPayload], ...]:
    """The ControlNet units with their field path (``alwayson_scripts.controlnet.units[i]``)."""
    script = payload.alwayson_scripts.controlnet if payload.alwayson_scripts else None
    if script is None:
        return ()
    key, units = script.unit_list()
    return tuple((f"alwayson_scripts.controlnet.{key}[{i}]", u) for i, u in enumerate(units))
