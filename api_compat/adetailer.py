"""``alwayson_scripts.ADetailer`` as the Bing-su/adetailer extension's API takes it (docs/API.md "ADetailer"):
``{"args": [enable, skip_img2img, {tab}, {tab}, ...]}``, the two booleans optional (the extension's older forms:
``[{tab}, ...]``, ``[enable, {tab}, ...]``), each tab the extension's ``ADetailerArgs`` (same keys, defaults and
ranges: :class:`TabPayload`). The title matches case-insensitively, as the webui matches scripts.

Unknown keys in a tab follow the leniency policy (api_compat.leniency: ignored and named in ``info.warnings``;
``strict``: an error) -- the extension itself drops a tab with an unknown key. ``is_api`` (the extension's UI
marker) is accepted and ignored; ``ad_mask_k_largest`` (its name before v24.4) is read as ``ad_mask_k``.
What the engine does not do is refused naming the key: a tab's own ControlNet (``ad_controlnet_model``), another
checkpoint or VAE for the inpaint passes (``ad_use_checkpoint`` / ``ad_use_vae`` with a name).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from api_compat import leniency
from api_compat.errors import ApiError
from api_compat.schema import (_bool_type, _err, _float_type, _int_type, _Model, _str_type, field_path,
                               validation_error_to_api)
from engine import rules
from engine.adetailer import (SAME_CHECKPOINT, SAME_VAE, USE_SAME_SAMPLER, USE_SAME_SCHEDULER, ADetailer, ADetailerTab,
                              Detectors)
from engine.adetailer.masks import FILTER_METHODS, MERGE_INVERT

TITLE = "ADetailer"
OLD_NAMES = {"ad_mask_k_largest": "ad_mask_k"}
MAX_TABS = 16
_D = {f.name: f.default for f in dataclasses.fields(ADetailerTab)}
_Size = _int_type(rules.MIN_SIZE, rules.MAX_SIZE, multiple=rules.SIZE_MULTIPLE,
                  allowed=f"a multiple of {rules.SIZE_MULTIPLE} from {rules.MIN_SIZE} to {rules.MAX_SIZE}")
_Count = _int_type(0, 10_000)
_Offset = _int_type(-4096, 4096)
_Flag = _bool_type(nullable=False)
_Name = _str_type(200)
_OptName = _str_type(200, nullable=True)
_Unit = _float_type(0.0, 1.0)


def _choice(names: tuple[str, ...]):
    """One of the extension's choices, spelled as it spells them."""
    text = ", ".join(f'"{n}"' for n in names)

    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in names:
            raise _err("enum", "unknown value {value}", text, value=repr(value)[:100])
        return value

    return Annotated[str, BeforeValidator(check), Field(json_schema_extra={"enum": list(names)})]


class TabPayload(_Model):
    """One ADetailer tab: the extension's ``ADetailerArgs`` (adetailer/args.py), same keys and defaults."""

    ad_model: _Name = _D["ad_model"]
    ad_model_classes: _str_type(1000) = _D["ad_model_classes"]
    ad_tab_enable: _Flag = _D["ad_tab_enable"]
    ad_prompt: _str_type() = _D["ad_prompt"]
    ad_negative_prompt: _str_type() = _D["ad_negative_prompt"]
    ad_confidence: _Unit = _D["ad_confidence"]
    ad_mask_filter_method: _choice(FILTER_METHODS) = _D["ad_mask_filter_method"]
    ad_mask_k: _Count = _D["ad_mask_k"]
    ad_mask_min_ratio: _Unit = _D["ad_mask_min_ratio"]
    ad_mask_max_ratio: _Unit = _D["ad_mask_max_ratio"]
    ad_dilate_erode: _int_type(-128, 128) = _D["ad_dilate_erode"]
    ad_x_offset: _Offset = _D["ad_x_offset"]
    ad_y_offset: _Offset = _D["ad_y_offset"]
    ad_mask_merge_invert: _choice(MERGE_INVERT) = _D["ad_mask_merge_invert"]
    ad_mask_blur: _int_type(0, 256) = _D["ad_mask_blur"]
    ad_denoising_strength: _Unit = _D["ad_denoising_strength"]
    ad_inpaint_only_masked: _Flag = _D["ad_inpaint_only_masked"]
    ad_inpaint_only_masked_padding: _int_type(0, 2048) = _D["ad_inpaint_only_masked_padding"]
    ad_use_inpaint_width_height: _Flag = _D["ad_use_inpaint_width_height"]
    ad_inpaint_width: _Size = _D["ad_inpaint_width"]
    ad_inpaint_height: _Size = _D["ad_inpaint_height"]
    ad_use_steps: _Flag = _D["ad_use_steps"]
    ad_steps: _int_type(1, rules.RANGES["steps"].hi) = _D["ad_steps"]
    ad_use_cfg_scale: _Flag = _D["ad_use_cfg_scale"]
    ad_cfg_scale: _float_type(0.0, rules.RANGES["cfg_scale"].hi) = _D["ad_cfg_scale"]
    ad_use_checkpoint: _Flag = _D["ad_use_checkpoint"]
    ad_checkpoint: _OptName = _D["ad_checkpoint"]
    ad_use_vae: _Flag = _D["ad_use_vae"]
    ad_vae: _OptName = _D["ad_vae"]
    ad_use_sampler: _Flag = _D["ad_use_sampler"]
    ad_sampler: _Name = _D["ad_sampler"]
    ad_scheduler: _Name = _D["ad_scheduler"]
    ad_use_noise_multiplier: _Flag = _D["ad_use_noise_multiplier"]
    ad_noise_multiplier: _float_type(0.5, 1.5) = _D["ad_noise_multiplier"]
    ad_use_clip_skip: _Flag = _D["ad_use_clip_skip"]
    ad_clip_skip: _int_type(1, 12) = _D["ad_clip_skip"]
    ad_restore_face: _Flag = _D["ad_restore_face"]
    ad_controlnet_model: _Name = _D["ad_controlnet_model"]
    ad_controlnet_module: _Name = _D["ad_controlnet_module"]
    ad_controlnet_weight: _Unit = _D["ad_controlnet_weight"]
    ad_controlnet_guidance_start: _Unit = _D["ad_controlnet_guidance_start"]
    ad_controlnet_guidance_end: _Unit = _D["ad_controlnet_guidance_end"]
    is_api: Any = None  # the extension's UI marker: accepted, no effect

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in OLD_NAMES):
            data = dict(data)
            for old, new in OLD_NAMES.items():
                if old in data:
                    value = data.pop(old)
                    data.setdefault(new, value)
        return data

    def tab(self) -> ADetailerTab:
        return ADetailerTab(**self.model_dump(exclude={"is_api"}))


@dataclasses.dataclass(frozen=True)
class Parsed:
    """The script's args read as the extension reads them: ``enable``, ``skip_img2img``, the tabs with the index
    of each in ``args`` (its payload path)."""

    key: str
    enable: bool
    skip_img2img: bool
    tabs: tuple[tuple[int, TabPayload], ...]
    ignored: tuple[str, ...] = ()

    def path(self, n: int) -> str:
        return f"alwayson_scripts.{self.key}.args[{self.tabs[n][0]}]"

    @property
    def enabled(self) -> bool:
        """The extension's ``is_ad_enabled``: enable not false and some tab with a model."""
        return self.enable and any(not t.tab().need_skip() for _, t in self.tabs)


def parse(value: Any, *, strict: bool = False, key: str = TITLE) -> Parsed:
    """The value of ``alwayson_scripts.ADetailer`` (api_compat.schema.AlwaysOnScripts keeps it as given),
    validated; raises ApiError naming the payload path. Unknown keys of a tab are left out and listed in
    ``ignored`` (``strict``: an ``unknown_field`` error)."""
    where = f"alwayson_scripts.{key}"
    if value is None:
        return Parsed(key, False, False, ())
    args = value.get("args", []) if isinstance(value, dict) else None
    if not isinstance(args, list):
        raise ApiError("invalid_request", 'must be {"args": [enable, skip_img2img, {tab}, ...]}', where,
                       '{"args": [true, false, {"ad_model": "mediapipe_face_short"}]}')
    extra = [k for k in value if k != "args"]
    ignored = [f"{where}.{k}" for k in extra]
    if extra and strict:
        raise ApiError("unknown_field", f"unknown field {extra[0]!r}", f"{where}.{extra[0]}", "args")
    enable = args[0] if args and isinstance(args[0], bool) else True
    skip = len(args) >= 2 and isinstance(args[1], bool) and args[1]
    tabs = []
    for i, arg in enumerate(args):
        path = ("alwayson_scripts", key, "args", i)
        if isinstance(arg, bool) and i < 2 or arg is None:
            continue
        if not isinstance(arg, dict):
            raise ApiError("invalid_request", "must be a JSON object of ADetailer settings", field_path(path),
                           "enable and skip_img2img (booleans) first, then one object per tab")
        for _ in range(3):
            try:
                tabs.append((i, TabPayload.model_validate(arg)))
                break
            except ValidationError as exc:
                unknown = [] if strict else [tuple(e["loc"]) for e in exc.errors(include_url=False)
                                             if e["type"] == "extra_forbidden"]
                if not unknown:
                    raise validation_error_to_api(exc, prefix=path) from None
                ignored += [field_path(path + loc) for loc in unknown]
                arg = leniency.without(arg, unknown)
        if len(tabs) > MAX_TABS:
            raise ApiError("invalid_request", f"more than {MAX_TABS} tabs", field_path(path),
                           f"at most {MAX_TABS} tabs")
    return Parsed(key, enable, skip, tuple(tabs), tuple(ignored))


def translate(parsed: Parsed | None, *, img2img: bool) -> ADetailer | None:
    """The engine's :class:`engine.adetailer.ADetailer` of an enabled script (None: off); what the engine does
    not do is refused naming the key."""
    if parsed is None or not parsed.enabled:
        return None
    tabs = []
    for n, (_, payload) in enumerate(parsed.tabs):
        tab, path = payload.tab(), parsed.path(n)
        if not tab.need_skip():
            _refuse_unsupported(tab, path)
        tabs.append(tab)
    return ADetailer(tuple(tabs), skip_img2img=parsed.skip_img2img and img2img)


def _refuse_unsupported(tab: ADetailerTab, path: str) -> None:
    from engine.samplers import resolve

    if tab.ad_controlnet_model != "None":
        raise ApiError("not_supported", "not supported: a ControlNet for the ADetailer passes",
                       f"{path}.ad_controlnet_model", '"None" (the passes run without ControlNet, as the default)')
    if tab.ad_use_checkpoint and tab.ad_checkpoint not in (None, *SAME_CHECKPOINT):
        raise ApiError("not_supported", "not supported: another checkpoint for the ADetailer passes",
                       f"{path}.ad_checkpoint", '"Use same checkpoint", or ad_use_checkpoint false')
    if tab.ad_use_vae and tab.ad_vae not in (None, *SAME_VAE):
        raise ApiError("not_supported", "not supported: another VAE for the ADetailer passes", f"{path}.ad_vae",
                       '"Use same VAE", or ad_use_vae false')
    if tab.ad_use_sampler:
        sampler = None if tab.ad_sampler == USE_SAME_SAMPLER else tab.ad_sampler
        scheduler = "Automatic" if tab.ad_scheduler == USE_SAME_SCHEDULER else tab.ad_scheduler
        try:
            resolve(sampler or "Euler", scheduler)
        except Exception as exc:  # the sampler registry's InvalidRequest names its own field
            which = "ad_sampler" if "sampler" in str(getattr(exc, "field", "sampler")) else "ad_scheduler"
            raise ApiError("invalid_request", str(getattr(exc, "message", exc)), f"{path}.{which}",
                           getattr(exc, "allowed", None)) from None


def check_models(ad: ADetailer, parsed: Parsed, config) -> None:
    """The tabs' detectors at submit (engine.adetailer.Detectors.check: the MediaPipe weights, a YOLO file in
    models/adetailer with the pickle opt-in and ultralytics), and skip_img2img's rule."""
    detectors = Detectors(config.models_dir, config.allow_pickle)
    for n, tab in ad.active:
        detectors.check(tab.ad_model, f"{parsed.path(n)}.ad_model")


def of_payload(payload, config, *, img2img: bool, mask: bool = False, script: bool = False) -> ADetailer | None:
    """The engine's ADetailer of a parsed payload (api_compat.schema.GenerationPayload), checked; the tabs'
    ignored unknown keys are added to the payload's (its ``info.warnings``)."""
    scripts = payload.alwayson_scripts
    value = scripts.adetailer if scripts is not None else None
    if value is None:
        return None
    parsed = parse(value, strict=payload._strict)
    new = [p for p in parsed.ignored if p not in payload._ignored]
    if new:
        payload._ignored = (*payload._ignored, *new)
    ad = translate(parsed, img2img=img2img)
    if ad is None:
        return None
    if ad.skip_img2img and mask:
        raise ApiError("not_supported", "skip_img2img with an inpainting mask (the extension does not run it "
                       "either)", f"alwayson_scripts.{parsed.key}.args[1]", "false, or a request without a mask")
    if script:
        raise ApiError("not_supported", "not supported: ADetailer with the \"SD upscale\" script",
                       f"alwayson_scripts.{parsed.key}", "one of the two")
    check_models(ad, parsed, config)
    return ad


def origins(payload) -> dict[str, str]:
    """Request path -> payload path of the script's fields (engine errors name ``adetailer.tabs[n].key``)."""
    scripts = payload.alwayson_scripts
    if scripts is None or scripts.adetailer is None:
        return {}
    try:
        parsed = parse(scripts.adetailer)
    except ApiError:
        return {}
    out = {f"adetailer.tabs[{n}]": parsed.path(n) for n in range(len(parsed.tabs))}
    out["adetailer.skip_img2img"] = f"alwayson_scripts.{parsed.key}.args[1]"
    out["adetailer"] = f"alwayson_scripts.{parsed.key}"
    return out
