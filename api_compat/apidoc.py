"""docs/API.md's field tables, generated from the pydantic schema so that they cannot drift.

    python -m api_compat.apidoc          # rewrite the generated blocks of docs/API.md
    python -m api_compat.apidoc --check  # exit 1 when docs/API.md is out of date (tests/test_api_docs.py)

Type, default and allowed values come from the schema (``api_compat.schema``); the one-line meaning of each
field comes from :data:`FIELD_DOCS` here (a field without one is a test failure). The same meanings are put
into the OpenAPI document (:func:`annotate_openapi`). Every payload model in :data:`DOCUMENTED` that exists in
the schema gets a table; a sibling task's payload (``Img2ImgPayload``) is picked up when the schema defines it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.request import DEFAULT_HIRES_UPSCALER
from engine.rules import default

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "API.md"
DOC_REF = "docs/API.md"  # how errors and the OpenAPI document name it

# block name in docs/API.md -> pydantic model name in api_compat.schema
DOCUMENTED: dict[str, str] = {
    "txt2img": "Txt2ImgPayload",
    "img2img": "Img2ImgPayload",
    "override_settings": "OverrideSettings",
    "controlnet_args": "ControlNetArgs",
    "controlnet_unit": "ControlNetUnitPayload",
}

_SEE_UNIT = "ControlNet units, see \"ControlNet unit\""
# field -> meaning; "Model.field" overrides for a field whose meaning differs between models
FIELD_DOCS: dict[str, str] = {
    # the cloud API's fields
    "stable_diffusion_model": "checkpoint to use (file name with or without extension, or folder name, or "
                              "\"name [hash]\"); empty: the engine's default model (the bundled demo model)",
    "sd_vae": "\"Automatic\": a VAE named like the checkpoint if present, else the checkpoint's own; \"None\": the "
              "checkpoint's own; else a file of the store's VAE/ folder",
    "clip_skip": "webui clip skip: N takes the N-th hidden state from the end (1 = last layer)",
    "prompt": "positive prompt in the webui attention syntax: (a), (a:1.3), [a], BREAK, AND; chunks of 75 tokens; "
              "<lora:NAME:MULT> tags (MULT from -10 to 10, names checked at submit) and embedding names (webui extra "
              "networks)",
    "negtive_prompt": "negative prompt (sic, the cloud API's spelling)",
    "negative_prompt": "alias of negtive_prompt; both given and different is an error",
    "batch_size": "images per batch (the engine's max_batch_size may lower the maximum, default "
                  f"{EngineConfig.max_batch_size})",
    "steps": "sampling steps",
    "cfg_scale": "classifier-free guidance scale; 1 or less skips the negative pass",
    "width": "image width in pixels; empty: the model's native size (see `sdengine models info`); must also be a "
             "multiple of the model's pixel multiple (64 for SD); far from the native size the result carries a "
             "warning",
    "height": "image height in pixels; as width",
    "sampler_name": "webui sampler name or alias (\"Euler a\", \"DPM++ 2M Karras\", ...); empty: "
                    f"\"{default('sampler_name')}\"; an unknown name is an error listing the valid ones",
    "seed": "-1 draws a random seed; image i of the request uses seed + i",
    "alwayson_scripts": "extension arguments: `controlnet` and `ADetailer` (see their sections)",
    # webui extras
    "n_iter": "number of batches; total images = batch_size x n_iter",
    "scheduler": "schedule type: Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform, Simple, "
                 "Normal, DDIM, Beta, KL Optimal, Align Your Steps",
    "subseed": "variation seed (-1: random)",
    "subseed_strength": "how much of the variation seed's noise is slerped in",
    "eta": "ancestral / DDIM eta; empty: the sampler's default (1.0 ancestral, 0.0 DDIM)",
    "s_churn": "sampler option of Euler, Heun, DPM2 (webui setting)",
    "s_tmin": "sampler option of Euler, Heun, DPM2 (webui setting)",
    "s_tmax": "sampler option of Euler, Heun, DPM2 (webui setting); empty: infinity",
    "s_noise": "sampler option (noise multiplier of the ancestral / churn samplers)",
    "sampler_index": "legacy webui name of sampler_name",
    "override_settings": "webui settings for this request, see \"override_settings\"",
    "override_settings_restore_afterwards": "accepted, no effect (settings never persist here)",
    "do_not_save_samples": "accepted, no effect (results are always kept in the results folder)",
    "do_not_save_grid": "accepted, no effect (no grids are made)",
    "send_images": "accepted, no effect (images are always returned)",
    "save_images": "accepted, no effect (images are always saved)",
    "disable_extra_networks": "true: <lora:...> tags are removed from the prompt but not applied (webui)",
    "comments": "free comments, kept in the task's parameters",
    "denoising_strength": "hires fix: the second pass's denoising strength (default "
                          f"{default('hires.denoising_strength'):g}); ignored while enable_hr is off",
    "firstphase_width": "legacy hires fix field; type-checked and ignored",
    "firstphase_height": "legacy hires fix field; type-checked and ignored",
    "hr_scale": f"hires fix upscale factor (default {default('hires.scale'):g}; the second pass must fit the size "
                "limits); ignored while enable_hr is off",
    "hr_upscaler": f"hires fix upscaler: {DEFAULT_HIRES_UPSCALER} (default), Latent (antialiased), Latent (bicubic), Latent (bicubic "
                   "antialiased), Latent (nearest), Latent (nearest-exact), None, Lanczos, Nearest, or a model upscaler "
                   "of the models folders ESRGAN/, RealESRGAN/, SwinIR/, HAT/, DAT/ (GET /sdapi/v1/upscalers)",
    "hr_second_pass_steps": "hires fix steps of the second pass (0: steps); it runs exactly these steps",
    "hr_resize_x": "hires fix target width (0: from hr_scale, or from hr_resize_y keeping the aspect ratio)",
    "hr_resize_y": "hires fix target height (0: from hr_scale, or from hr_resize_x keeping the aspect ratio)",
    "hr_checkpoint_name": "hires fix: the second pass's checkpoint (empty / \"Use same checkpoint\": the model); one "
                          "of the same latent space (SDXL and the SDXL refiner; SD1 and SD2), not with ControlNet "
                          "units",
    "hr_sampler_name": "hires fix sampler (empty: the first pass's)",
    "hr_scheduler": "hires fix schedule type (empty: Automatic, the webui's hires rule; \"Use same scheduler\")",
    "hr_prompt": "hires fix prompt (empty: the prompt)",
    "hr_negative_prompt": "hires fix negative prompt (empty: the negative prompt)",
    "hr_additional_modules": "hires fix modules; accepted, no effect",
    "hr_cfg": "hires fix CFG scale (empty: cfg_scale)",
    "refiner_switch_at": "the fraction of the run where refiner_checkpoint takes over (the webui's rule on the "
                         "model's sigmas; 1: never; null: from the first step); ignored without refiner_checkpoint",
    "enable_hr": "hires fix (second pass at a larger size)",
    "restore_faces": "restore the faces of every image (GFPGAN / CodeFormer: a file in the model store's GFPGAN/ or "
                     "Codeformer/ folder; none installed is an error naming them); null: the face_restoration option",
    "tiling": "seamless tiling: circular padding in the UNet and VAE convolutions, the image wraps around; null: "
              "the tiling option",
    "styles": "prompt styles by name (styles.csv in the data folder; GET /sdapi/v1/prompt-styles), applied in "
              "order: {prompt} in a style is replaced by the prompt, else the style is appended",
    "seed_resize_from_h": "seed resize",
    "seed_resize_from_w": "seed resize",
    "s_min_uncond": "negative guidance minimum sigma (webui NGMS, opt-in speed lever): below this sigma every "
                    "other step skips the negative prompt; null: override_settings.s_min_uncond, else 0 (off)",
    "refiner_checkpoint": "the SDXL refiner (any checkpoint of the model's latent space) that takes over the same "
                          "sampling run at refiner_switch_at; with the hires fix, in the second pass; "
                          "empty / \"None\": off",
    "firstpass_image": "a given first-pass image",
    "force_task_id": "client-chosen task ids",
    "script_name": "a selectable script: \"sd upscale\" (img2img only); any other is refused naming it",
    "script_args": "the script's arguments; \"sd upscale\": [\"\", tile overlap (0-256, default 64), upscaler "
                   "(name or index, default \"None\"), scale factor (1-8, default 2)]",
    "infotext": "parameters given as an infotext",
    # override_settings
    "CLIP_stop_at_last_layers": "clip skip (wins over clip_skip)",
    "OverrideSettings.sd_model_checkpoint": "checkpoint (wins over stable_diffusion_model)",
    "OverrideSettings.sd_vae": "VAE (wins over sd_vae)",
    "eta_noise_seed_delta": "ENSD: added to the seed of the sampler's extra noise",
    "img2img_fix_steps": "img2img: run exactly `steps` steps instead of steps x denoising_strength",
    "initial_noise_multiplier": "img2img: multiplier of the initial noise",
    "upscaler_for_img2img": "img2img: the upscaler used to resize the init image",
    "face_restoration": "restore_faces when the request leaves it null",
    "face_restoration_model": "the face restorer: \"CodeFormer\" or \"GFPGAN\" (installed; null: the first installed, "
                              "CodeFormer first)",
    "code_former_weight": "CodeFormer's fidelity weight (0: strongest restoration, 1: weakest; default 0.5)",
    "OverrideSettings.tiling": "tiling when the request leaves it null",
    "OverrideSettings.s_min_uncond": "NGMS when the request's s_min_uncond is null (0: off)",
    "s_min_uncond_all": "NGMS skips the negative prompt at every step below the sigma, not every other one",
    "token_merging_ratio": "ToMe (opt-in speed lever, torch backend only; other backends refuse it): share of the "
                           "self-attention tokens merged in the highest-resolution blocks (0: off, at most 0.9)",
    "token_merging_ratio_hr": "ToMe ratio of the hires pass (0: token_merging_ratio)",
    "token_merging_ratio_img2img": "ToMe ratio of img2img when token_merging_ratio is 0",
    "sd_vae_encode_method": "VAE encoder (img2img, hires fix): \"Full\" (the model's VAE) or \"TAESD\" (TAESDXL for "
                            "SDXL; the bundled MIT files or `models/VAE-approx/`)",
    "sd_vae_decode_method": "VAE decoder: \"Full\" or \"TAESD\" (as sd_vae_encode_method)",
    "ESRGAN_tile": "tile size, in input pixels, of the model upscalers of the hires fix and the SD upscale script "
                   "(0: the whole image at once; default 192); the extras take it as a body field",
    "ESRGAN_tile_overlap": "overlap of those tiles, in input pixels (default 8)",
    "live_previews_enable": "live previews while the task runs (/scc: opt-in, default off; the webui routes: the "
                            "option, default on); shown by sd_get_result with `current_image: true`",
    "show_progress_every_n_steps": "live previews every N sampling steps (default 10; 0: every step; -1: none)",
    "show_progress_type": "how previews are decoded (default \"Approx NN\", needs `models/VAE-approx/model.pt` "
                          "with allow_pickle, else \"Approx cheap\")",
    "live_preview_content": "what previews show: the prompt's x0 (default), the negative prompt's, or the CFG result",
    # alwayson_scripts.controlnet
    "units": _SEE_UNIT,
    "args": _SEE_UNIT + " (the webui's spelling of units)",
    # ControlNet unit
    "enabled": "a listed unit runs unless false (the webui defaults to false; a listed unit is meant to run)",
    "module": "preprocessor: none, canny, invert, threshold, blur_gaussian, scribble_xdog, ...; reference_only "
              "(model-free attention injection from the image, threshold_a = style fidelity, default 0.5); "
              "model-based ones (softedge_pidinet, scribble_hed, mlsd, lineart_realistic, openpose_full, "
              "dw_openpose_full, normal_bae, depth_leres++, depth_zoe, ...) need their annotator files installed "
              "(refused naming the file and folder); "
              "ip-adapter_clip_sd15, ip-adapter_clip_h, ip-adapter_clip_sdxl_plus_vith (CLIP ViT-H), "
              "ip-adapter_clip_sdxl, ip-adapter_clip_g (CLIP ViT-bigG), ip-adapter-auto (the installed encoder "
              "that fits the adapter): IP-Adapter, the image as a prompt (see \"IP-Adapter units\"); unknown is "
              "an error listing the valid ones",
    "model": "ControlNet (or, with an ip-adapter module, IP-Adapter) from the model store's ControlNet/ or "
             "ipadapter/ folder, webui matching (exact, case-insensitive, \"name [hash]\"); required for an enabled "
             "unit (\"None\" for a module that needs no model: reference_only); must fit the checkpoint's family",
    "input_image": "the control image: base64 or data:image/...;base64, URI (http(s) only when the engine allows "
                   "fetching); required for an enabled unit, except in img2img, where a unit without one takes "
                   "the init image (and the img2img resize_mode), as sd-webui-controlnet does. IP-Adapter units "
                   "also take a list of 1 to 8 images (the extension's multi-input form): their image prompts "
                   "are averaged",
    "image": "alias of input_image",
    "weight": "residual weight (IP-Adapter units: the weight of the image-prompt attention; 0 = no adapter)",
    "guidance_start": "the unit runs at step i of n when guidance_start <= i/n <= guidance_end",
    "guidance_end": "see guidance_start; must not be below it",
    "ControlNetUnitPayload.resize_mode": "how the control image is fitted to the image size",
    "processor_res": "preprocessor resolution; -1 or out of range: the preprocessor's default (512), logged "
                     "(\"[canny.processor_res] Invalid value(-100), using default value 512.\"); the infotext "
                     "shows the value used",
    "threshold_a": "preprocessor's first parameter (canny: low threshold); -1 or out of range: its default "
                   "(canny 100); the infotext shows the value used",
    "threshold_b": "preprocessor's second parameter (canny: high threshold); -1 or out of range: its default "
                   "(canny 200); the infotext shows the value used",
    "control_mode": "Balanced; My prompt is more important; ControlNet is more important",
    "pixel_perfect": "processor_res from the image size (the webui's pixel perfect)",
    "save_detected_map": "also return the preprocessed control image with the result",
    "advanced_weighting": "per-residual weights (down residuals in UNet order, then the middle block: 13 for "
                          "SD1.x/SD2.x ControlNets, 10 for SDXL, or the ControlNet's own count); they replace "
                          "weight and the control mode's scales (the extension's rule); null: not used",
    "low_vram": "accepted, no effect (memory hint)",
    "lowvram": "accepted, no effect (memory hint)",
    "is_ui": "accepted, no effect (UI state)",
    "hr_option": "with the hires fix: the passes the unit acts in; its detected maps are returned for both "
                 "passes (the hires pass's first), as sd-webui-controlnet does",
    "inpaint_crop_input_image": "accepted, no effect",
    "guess_mode": "guess mode; use control_mode",
    "mask": "ControlNet masks",
    "mask_image": "ControlNet masks",
    "effective_region_mask": "ControlNet region masks",
    "input_mode": "ControlNet batch input",
    "batch_images": "ControlNet batch input",
    "loopback": "ControlNet loopback",
    "ipadapter_input": "IP-Adapter inputs",
    "union_control_type": "ControlNet union models",
    # sd_img2img (issue 14): the img2img payload's own fields
    "init_images": "img2img: the init image(s), base64 or data URI; the first is used, as the webui",
    "Img2ImgPayload.resize_mode": "img2img: Just resize / Crop and resize / Resize and fill / Just resize "
                                  "(latent upscale)",
    "Img2ImgPayload.denoising_strength": "img2img: how much of the init image is replaced (steps x strength are "
                                         "run unless img2img_fix_steps)",
    "Img2ImgPayload.mask": "img2img inpainting mask (base64 / data URI); white is repainted",
    "mask_blur": "img2img: Gaussian blur of the mask in pixels",
    "mask_blur_x": "img2img: horizontal mask blur",
    "mask_blur_y": "img2img: vertical mask blur",
    "inpainting_fill": "img2img: masked content: fill, original, latent noise, latent nothing",
    "inpaint_full_res": "img2img: inpaint the masked area at full resolution",
    "inpaint_full_res_padding": "img2img: padding around the masked area in pixels",
    "inpainting_mask_invert": "img2img: repaint the black part of the mask instead",
    "image_cfg_scale": "img2img: instruct-pix2pix image guidance; accepted and ignored (no model here is instruct-pix2pix)",
    "include_init_images": "img2img: return the init images too",
    "mask_round": "img2img: round the blurred mask",
    "latent_mask": "img2img: a separate mask for the latent blend (webui)",
    # webui settings accepted in override_settings with no effect on the result here
    "samples_save": "webui setting; accepted, no effect (results are always saved)",
    "samples_format": "webui setting; accepted, no effect (PNG)",
    "grid_save": "webui setting; accepted, no effect (no grids)",
    "save_to_dirs": "webui setting; accepted, no effect",
    "show_progressbar": "webui setting; accepted, no effect (progress is in sd_get_result)",
}


def _schema_module():
    import api_compat.schema as schema

    return schema


def documented_models() -> dict[str, Any]:
    """block name -> pydantic model class, for the models the schema defines."""
    schema = _schema_module()
    return {block: getattr(schema, name) for block, name in DOCUMENTED.items() if hasattr(schema, name)}


def field_doc(model: Any, name: str) -> str | None:
    return FIELD_DOCS.get(f"{model.__name__}.{name}") or FIELD_DOCS.get(name)


def undocumented() -> list[str]:
    """``Model.field`` of every schema field without a meaning in FIELD_DOCS."""
    return [f"{m.__name__}.{f}" for m in documented_models().values() for f in m.model_fields
            if not field_doc(m, f)]


# ------------------------------------------------------------------------------------------ schema -> text
def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "object"
    if "anyOf" in prop:
        kinds = [_type(p) for p in prop["anyOf"] if p.get("type") != "null"]
        return " | ".join(kinds) + " | null" if kinds else "null"
    kind = prop.get("type")
    if kind == "array":
        return "list"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind or "any")


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    return json.dumps(prop["default"])


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _allowed(prop: dict[str, Any]) -> str:
    text = prop.get("description") or ""
    if text.startswith("allowed: "):
        return text[len("allowed: "):]
    if text.startswith("not supported; only "):
        return "not supported: only " + text[len("not supported; only "):]
    if "enum" in prop:
        return ", ".join(json.dumps(e) for e in prop["enum"])
    if "minimum" in prop or "maximum" in prop:
        kind = _type(prop)
        return f"{_num(prop.get('minimum', '-inf'))}..{_num(prop.get('maximum', 'inf'))}" + (
            " (empty: default)" if kind.endswith("| null") else "")
    if "maxLength" in prop:
        return f"at most {prop['maxLength']} characters"
    return ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def field_table(model: Any) -> str:
    """The markdown table of ``model``'s fields (name, type, default, allowed, meaning)."""
    props = model.model_json_schema()["properties"]
    lines = ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name in model.model_fields:
        prop = props.get(name, {})
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"`{name}`", _type(prop), _default(prop), _allowed(prop), field_doc(model, name) or "")) + " |")
    return "\n".join(lines)


def generated_blocks() -> dict[str, str]:
    """block name -> generated text (a model the schema does not define yet says so)."""
    models = documented_models()
    out = {}
    for block, name in DOCUMENTED.items():
        model = models.get(block)
        out[block] = field_table(model) if model is not None else f"(`{name}` is not in this version's schema.)"
    return out


_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)\n?(<!-- /generated:\2 -->)", re.S)


def render(text: str) -> str:
    """``text`` (docs/API.md) with every generated block replaced by its current content."""
    blocks = generated_blocks()
    return _BLOCK.sub(lambda m: m[1] + blocks.get(m[2], m[3]) + "\n" + m[4], text)


def block_names(text: str) -> list[str]:
    return [m[2] for m in _BLOCK.finditer(text)]


# ------------------------------------------------------------------------------------------ OpenAPI
def annotate_openapi(schemas: dict[str, Any]) -> None:
    """Put each field's meaning (and the pointer to docs/API.md) into the OpenAPI component schemas."""
    for model in documented_models().values():
        schema = schemas.get(model.__name__)
        if not schema:
            continue
        schema["description"] = f"{(model.__doc__ or '').strip().splitlines()[0]} Field reference: {DOC_REF}."
        for name, prop in schema.get("properties", {}).items():
            meaning = field_doc(model, name)
            if meaning:
                allowed = prop.get("description")
                prop["description"] = meaning + (f" ({allowed})" if allowed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the field tables of docs/API.md from the schema.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    args = parser.parse_args(argv)
    text = DOC_PATH.read_text(encoding="utf-8")
    new = render(text)
    missing = undocumented()
    if missing:
        print("fields without a meaning in api_compat/apidoc.py FIELD_DOCS: " + ", ".join(missing), file=sys.stderr)
    if args.check:
        if new != text:
            print(f"{DOC_PATH} is out of date: run python -m api_compat.apidoc", file=sys.stderr)
            return 1
        return 1 if missing else 0
    if new != text:
        tmp = DOC_PATH.with_suffix(".md.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(DOC_PATH)
        print(f"updated {DOC_PATH}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
