"""The AUTOMATIC1111 webui's own HTTP API (``/sdapi/v1/...``) and the sd-webui-controlnet extension's routes
(``/controlnet/...``), so that clients written for the webui work unchanged (docs/WEBUI_API.md lists the routes).

They are a second face of the same :class:`~api_compat.service.LocalService` as ``/scc/...``: a synchronous
``POST /sdapi/v1/txt2img`` validates the payload with the same schema, submits a task to the same queue and task
store (it shows in ``sd_get_result``, the queue limit answers 429), waits for it, and answers in the webui's
shapes (``images`` as base64 PNGs, ``parameters`` as the webui echoes the request, ``info`` as a JSON string).
``/sdapi/v1/interrupt`` cancels the running webui task; a client that disconnects cancels its own task.

api_compat translates; it does not compute: the webui payload becomes a ``/scc`` payload here
(:func:`webui_to_scc`: webui defaults, nulls, the extension's unit spellings, the options as
``override_settings``), the rest is the service's.
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the local import

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from engine.rules import RANGES

from api_compat.errors import HTTP_STATUS, ApiError, payload_path
from api_compat.schema import OverrideSettings

log = logging.getLogger(__name__)

WEBUI_VERSION = "v1.10.1"  # the webui API these routes follow
CONTROLNET_API_VERSION = 2  # sd-webui-controlnet external_code.get_api_version()
OPTIONS_FILE = "webui-options.json"
POLL_S = 0.05  # how often a synchronous call looks at its running task (and at its client's connection)
POLL_WAITING_S = 0.25  # ... at its task while it waits in the queue

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
    "advanced_weighting": (None,), "pulid_mode": (None, "Fidelity"),
}
_OPTION_NAMES = tuple(OverrideSettings.model_fields)  # the options GET/POST /sdapi/v1/options set
# the options face's field origins: POST /sdapi/v1/options loads a model through a probe payload that carries
# the options as override_settings; its errors name the option
_PROBE_ORIGINS = {f"override_settings.{name}": name for name in _OPTION_NAMES}


def _error(code: str, message: str, field: str | None = None, allowed: str | None = None,
           status: int | None = None) -> ApiError:
    exc = ApiError(code, message, field=field, allowed=allowed)
    if status is not None:
        exc.http_status = status
    return exc


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


# --------------------------------------------------------------------------------------- payload adapter
def _unit_to_scc(unit: Any, path: str) -> Any:
    """One sd-webui-controlnet unit dict as the /scc schema takes it: ``image`` given as the extension's
    ``{"image": b64, "mask": null}`` becomes the string; inert UI fields are dropped (other values refused);
    ``save_detected_map`` defaults to the extension's True."""
    if not isinstance(unit, dict):
        return unit  # the schema names the field and the type
    unit = dict(unit)
    for name, inert in _UNIT_INERT.items():
        if name in unit:
            value = unit.pop(name)
            if not any(_same(value, d) for d in inert):
                shown = ", ".join("null" if d is None else json.dumps(d) for d in inert)
                raise _error("not_supported", f"not supported: {name} is sd-webui-controlnet UI/batch state this "
                             "engine does not implement; leave it at its default", f"{path}.{name}", shown)
    for name in ("image", "input_image"):
        value = unit.get(name)
        if isinstance(value, dict):  # the extension's {"image": ..., "mask": ...}
            extra = sorted(set(value) - {"image", "mask"})
            if extra:
                raise _error("unknown_field", f"unknown field {extra[0]!r}", f"{path}.{name}.{extra[0]}",
                             "image, mask")
            if value.get("mask") not in (None, ""):
                raise _error("not_supported", "not supported: the engine does not implement ControlNet masks",
                             f"{path}.{name}.mask", "null")
            unit[name] = value.get("image")
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
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": info.get("sd_model_name"),
        "sd_model_hash": info.get("sd_model_hash"), "sd_vae_name": info.get("sd_vae_name"),
        "sd_vae_hash": info.get("sd_vae_hash"), "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": payload.get("denoising_strength"),
        "extra_generation_params": {k: v for k, v in _infotext_params(infotexts[0] if infotexts else "").items()
                                    if k.startswith("ControlNet") or k == "Schedule type"},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": info.get(
            "job_timestamp") or time.strftime("%Y%m%d%H%M%S"), "clip_skip": info.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": WEBUI_VERSION,
    }
    for key, value in info.items():  # the engine's own keys (scheduler, backend, timings, ...) after the webui's
        out.setdefault(key, value)
    return out


def _infotext_params(text: str) -> dict[str, str]:
    from engine.infotext import parse_infotext

    try:
        return parse_infotext(text)[2] if text else {}
    except (ValueError, IndexError):
        return {}


def webui_parameters(text: str) -> dict[str, Any]:
    """An infotext as the webui's png-info ``parameters``: Prompt, Negative prompt, then the key/values, with
    ``Size`` also split into ``Size-1``/``Size-2`` (webui's parse_generation_parameters)."""
    from engine.infotext import parse_infotext

    try:
        prompt, negative, params = parse_infotext(text)
    except (ValueError, IndexError):  # not our format: the whole text as the prompt
        return {"Prompt": text, "Negative prompt": ""}
    out: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **params}
    size = params.get("Size", "")
    if "x" in size:
        out["Size-1"], out["Size-2"] = size.split("x", 1)
    return out


# ----------------------------------------------------------------------------------------------- state
class WebuiState:
    """What the webui keeps between calls: its options (persisted in ``results_dir/webui-options.json``, so a
    restarted server keeps them) and the tasks its synchronous calls are waiting for (for /progress and
    /interrupt)."""

    def __init__(self, service):
        self.service = service
        self.path = Path(service.results_dir) / OPTIONS_FILE
        self.lock = threading.Lock()
        self.options: dict[str, Any] = self._load()
        self.tasks: dict[str, float] = {}  # task id -> submit time, in submit order
        self.interrupted: set[str] = set()
        self._store = None

    @property
    def store(self):
        """The default configuration's model store (lists and names; never loads a model)."""
        if self._store is None:
            from engine.models.store import ModelStore

            from api_compat.service import DEFAULT_CONFIG

            self._store = ModelStore.from_config(self.service.configs[DEFAULT_CONFIG])
        return self._store

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable webui options %s: %s", self.path, exc)
            return {}
        return {k: v for k, v in data.items() if k in _OPTION_NAMES} if isinstance(data, dict) else {}

    def save(self, options: dict[str, Any]) -> None:
        """Replace the options, written to a temp file then renamed."""
        from engine.atomic import atomic_file

        with atomic_file(self.path, "w", encoding="utf-8") as f:
            json.dump(options, f, indent=1)
        self.options = dict(options)

    def track(self, task_id: str) -> None:
        with self.lock:
            self.tasks[task_id] = time.time()

    def untrack(self, task_id: str) -> None:
        with self.lock:
            self.tasks.pop(task_id, None)
            self.interrupted.discard(task_id)

    def tracked(self) -> list[str]:
        with self.lock:
            return list(self.tasks)


# -------------------------------------------------------------------------------------- model listings
def _sd_models(store) -> list[dict[str, Any]]:
    from engine.models.checkpoints import Kind
    from engine.models.store import SUBDIRS

    out = []
    for e in store.list(Kind.CHECKPOINT):
        out.append({"title": e.title, "model_name": e.stem, "hash": e.short_hash, "sha256": e.sha256,
                    "filename": f"{'bundled/' if e.bundled else ''}{SUBDIRS[Kind.CHECKPOINT]}/{e.name}",
                    "config": None})
    return out


def _sd_vaes(store) -> list[dict[str, Any]]:
    from engine.models.checkpoints import Kind
    from engine.models.store import SUBDIRS

    return [{"model_name": e.name, "filename": f"{SUBDIRS[Kind.VAE]}/{e.name}"}
            for e in store.entries(Kind.VAE)]


def _loras(store) -> list[dict[str, Any]]:
    """The Lora extension's listing: name (what <lora:NAME> takes), alias, path inside the store, metadata."""
    from engine.models.checkpoints import Kind, read_safetensors_header
    from engine.models.store import folders

    out = []
    for e in store.entries(Kind.LORA):
        meta = {}
        if e.path.suffix.lower() == ".safetensors":
            try:
                meta = read_safetensors_header(e.path).metadata
            except Exception:  # noqa: BLE001 - a broken file is still listed; using it gives the error
                meta = {}
        sub = next((f for f in folders(Kind.LORA) if (e.root / f / e.name).exists()), "Lora")
        out.append({"name": e.stem, "alias": meta.get("ss_output_name", e.stem),
                    "path": f"{'bundled/' if e.bundled else ''}{sub}/{e.name}", "metadata": meta})
    return out


def _current_checkpoint(store, options: dict[str, Any], default_model: str | None):
    """The checkpoint the webui routes use now: the ``sd_model_checkpoint`` option, else the store's default."""
    from engine.models.checkpoints import Kind

    name = options.get("sd_model_checkpoint")
    return (store.resolve(name, Kind.CHECKPOINT, field="sd_model_checkpoint") if name
            else store.default_checkpoint(default_model))


def _embeddings(store, options: dict[str, Any], config) -> dict[str, dict[str, Any]]:
    """The webui's embedding listing: ``loaded`` = the store's embeddings the current checkpoint uses (its text
    encoders' widths, read from its header: nothing is loaded), ``skipped`` = the others (another architecture,
    more than 75 vectors). Without a known checkpoint (a pickle, an empty store) every readable one is
    ``loaded``, as the webui does before it knows the expected shape."""
    from engine.models.checkpoints import text_encoder_widths
    from engine.networks.embeddings import fits, store_embeddings

    widths = None
    try:
        found = text_encoder_widths(_current_checkpoint(store, options, config.default_model).path)
        widths = found[1] if found else None
    except Exception as exc:  # noqa: BLE001 - an empty or broken store still lists the embeddings
        log.warning("embeddings: the current checkpoint's text encoders are unknown: %s", exc)
    out: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
    for info in store_embeddings(store, config.allow_pickle):
        if info.name in out["loaded"]:
            continue  # the first usable file of a name wins (the engine's rule)
        usable = widths is None or fits(info.shapes, widths)
        if not usable and info.name in out["skipped"]:
            continue
        out["skipped"].pop(info.name, None)
        out["loaded" if usable else "skipped"][info.name] = {
            "step": info.step, "sd_checkpoint": info.sd_checkpoint, "sd_checkpoint_name": info.sd_checkpoint_name,
            "shape": info.shape, "vectors": info.vectors}
    return out


def _samplers() -> list[dict[str, Any]]:
    from engine.samplers import SPECS

    out = []
    for spec in SPECS.values():
        options: dict[str, str] = {}
        if spec.schedule and spec.schedule not in ("DDIM", "UniPC"):
            options["scheduler"] = spec.schedule.lower().replace(" ", "_")
        for flag, name in (("discard_penultimate", "discard_next_to_last_sigma"), ("second_order", "second_order"),
                           ("brownian", "brownian_noise"), ("uses_ensd", "uses_ensd")):
            if getattr(spec, flag):
                options[name] = "True"
        out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    return out


_SCHEDULE_RHO = {"Karras": 7.0, "Polyexponential": 1.0}


def _schedulers() -> list[dict[str, Any]]:
    from engine.samplers import SCHEDULE_NAMES

    return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
             "default_rho": _SCHEDULE_RHO.get(label, -1.0), "need_inner_model": False} for label in SCHEDULE_NAMES]


def _upscalers() -> list[dict[str, Any]]:
    """The image upscalers the engine has (engine.img2img, with the hires fix), else "None" only."""
    try:
        from engine.img2img import IMAGE_UPSCALERS
    except ImportError:
        IMAGE_UPSCALERS = ("None",)
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for n in IMAGE_UPSCALERS]


def _latent_upscale_modes() -> list[dict[str, Any]]:
    """The latent upscale modes of the hires fix (engine.img2img), else none."""
    try:
        from engine.img2img import LATENT_UPSCALERS
    except ImportError:
        return []
    return [{"name": n} for n in LATENT_UPSCALERS]


def _memory() -> dict[str, Any]:
    """RAM from the OS (cheap); CUDA is not queried (that would import torch in the server process)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram: dict[str, Any] = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "unavailable on this system"}
    return {"ram": ram, "cuda": {"error": "not reported by sdengine (the engine runs in its worker)"}}


def _modules(alias_names: bool) -> dict[str, Any]:
    from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS

    labels = {v: k for k, v in ALIASES.items()}
    names = [labels.get(n, n) if alias_names else n for n in PREPROCESSORS]
    detail = {}
    for name, pre in PREPROCESSORS.items():
        sliders = []
        for label, param in (("Preprocessor Resolution", pre.resolution), ("Threshold A", pre.threshold_a),
                             ("Threshold B", pre.threshold_b)):
            if param is not None:
                sliders.append({"name": label, "value": param.default, "min": param.minimum, "max": param.maximum})
        detail[labels.get(name, name) if alias_names else name] = {"model_free": True, "sliders": sliders}
    return {"module_list": names, "module_detail": detail}


# -------------------------------------------------------------------------------------------- images
def _b64_png(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _decode_b64(value: Any, field: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise _error("invalid_request", "must be a base64 image (or a data:image/...;base64, URI)", field,
                     "base64 PNG/JPEG/WebP")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise _error("invalid_request", "a data URI must be base64", field, "data:image/png;base64,...")
    if len(value) > max_bytes * 4 // 3 + 4:
        raise _error("invalid_request", "the image is too large", field, f"at most {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _error("invalid_request", "is not valid base64", field, "base64 PNG/JPEG/WebP") from None


def png_info(value: Any, max_bytes: int) -> dict[str, Any]:
    """The webui's /sdapi/v1/png-info answer for a base64 image: ``info`` (the infotext), ``items`` (the other
    text chunks), ``parameters`` (the infotext parsed)."""
    from PIL import Image, UnidentifiedImageError

    raw = _decode_b64(value, "image", max_bytes)
    try:
        with Image.open(io.BytesIO(raw)) as img:  # headers and text chunks only; no pixels are decoded
            items = {k: v for k, v in img.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _error("invalid_request", f"is not an image ({exc})", "image", "base64 PNG/JPEG/WebP") from None
    text = items.pop("parameters", None)
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": webui_parameters(text)}


# -------------------------------------------------------------------------------------------- routes
def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def webui_router(service, read_json):
    """The FastAPI router of the webui and ControlNet routes over ``service``. ``read_json(request)`` reads a
    POST body with the server's rules (JSON content type, size limit, body deadline, nesting depth) -- the
    same reader as the /scc routes."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

    from api_compat.service import DEFAULT_CONFIG

    state = WebuiState(service)
    router = APIRouter()
    max_image = service.limits.max_bytes

    def failure(exc: ApiError) -> JSONResponse:
        # the webui's clients read "detail" (FastAPI's error key); ours read "error"
        return JSONResponse({**exc.to_dict(), "detail": str(exc)}, status_code=exc.http_status)

    async def run_task(request: Request, kind: str, submit, scc: dict[str, Any]) -> dict[str, Any]:
        """Submit through the service, wait for the task (cancelled if the client goes away or /interrupt)."""
        headers = {k: v for k, v in request.headers.items()}
        task_id = (await asyncio.to_thread(submit, scc, headers))["taskId"]
        state.track(task_id)
        since = time.monotonic()
        try:
            while True:
                result = await asyncio.to_thread(service.sd_get_result, {"taskId": task_id})
                if result["status"] in ("succeeded", "failed"):
                    break
                if await request.is_disconnected():
                    log.info("%s: the client of task %s disconnected; cancelling it", kind, task_id)
                    await asyncio.to_thread(service.cancel, {"taskId": task_id})
                    raise _error("cancelled", "the client disconnected", status=499)
                # a running task is watched closely; a waiting one (maybe behind many) more lightly
                await asyncio.sleep(POLL_S if result["status"] == "running" or time.monotonic() - since < 1.0
                                    else POLL_WAITING_S)
            interrupted = task_id in state.interrupted
        finally:
            state.untrack(task_id)
        if result["status"] == "failed":
            error = result.get("error") or {}
            code = error.get("code") or "internal_error"
            if code == "cancelled":
                why = "interrupted (POST /sdapi/v1/interrupt)" if interrupted else error.get("message", "cancelled")
                raise _error("cancelled", f"task {task_id} was {why}; no images", status=409)
            raise _error(code, f"task {task_id} failed: {error.get('message', '')}",
                         status=HTTP_STATUS.get(code, 500))
        result["_task_id"] = task_id
        return result

    async def generate(request: Request, kind: str, submit) -> Any:
        try:
            body = await read_json(request)
            scc = webui_to_scc(body, state.options)
            result = await run_task(request, kind, submit, scc)
            task_id = result["_task_id"]
            count = len(result.get("images") or [])
            send = body.get("send_images", True) is not False
            paths = [service.image_path(task_id, i) for i in range(count)] if send else []
            images = await asyncio.to_thread(lambda: [_b64_png(p) for p in paths if p is not None])
            info = webui_info(result.get("info") or {}, body)
            info["sdengine_task_id"] = task_id
            overrides = body.get("override_settings")
            if body.get("override_settings_restore_afterwards") is False and isinstance(overrides, dict):
                # the webui keeps the request's settings as the options afterwards
                kept = {k: v for k, v in overrides.items() if k in _OPTION_NAMES and v is not None}
                if kept:
                    await asyncio.to_thread(state.save, {**state.options, **kept})
            return {"images": images, "parameters": webui_echo(body, kind),
                    "info": json.dumps(info, ensure_ascii=False)}
        except ApiError as exc:
            return failure(exc)

    body_schema = _json_body({"$ref": "#/components/schemas/Txt2ImgPayload"})
    answer_doc = ('{"images": [base64 PNG], "parameters": {the request as the webui echoes it}, '
                  '"info": "<JSON string: seed, all_seeds, infotexts, ...>"}')

    @router.post("/sdapi/v1/txt2img", summary="txt2img, synchronous (webui API)", openapi_extra=body_schema,
                 description=f"Waits for the task; answers {answer_doc}. ControlNet detected maps are appended "
                             "to images as the extension does. 409 when interrupted, 429 when the queue is full.")
    async def txt2img(request: Request):
        return await generate(request, "txt2img", service.sd_txt2img)

    @router.post("/sdapi/v1/img2img", summary="img2img, synchronous (webui API)", openapi_extra=_json_body(
                     {"type": "object", "description": "the webui img2img payload"}),
                 description="501 until the engine serves img2img (sd_img2img).")
    async def img2img(request: Request):
        submit = getattr(service, "sd_img2img", None)
        if submit is None:
            try:
                await read_json(request)
            except ApiError as exc:
                return failure(exc)
            return failure(_error("not_implemented", "img2img is not implemented by this server yet "
                                  "(sd_img2img); use /sdapi/v1/txt2img", allowed="/sdapi/v1/txt2img", status=501))
        return await generate(request, "img2img", submit)

    # ----------------------------------------------------------------------------------- listings
    @router.get("/sdapi/v1/sd-models", summary="Checkpoints (title 'name [hash]', model_name, hash, sha256)")
    async def sd_models():
        return await asyncio.to_thread(_sd_models, state.store)

    @router.get("/sdapi/v1/sd-vae", summary="VAEs")
    async def sd_vae():
        return await asyncio.to_thread(_sd_vaes, state.store)

    @router.get("/sdapi/v1/samplers", summary="Samplers (name, aliases, options)")
    async def samplers():
        return _samplers()

    @router.get("/sdapi/v1/schedulers", summary="Schedule types")
    async def schedulers():
        return _schedulers()

    @router.get("/sdapi/v1/upscalers", summary="Image upscalers the engine has")
    async def upscalers():
        return _upscalers()

    @router.get("/sdapi/v1/latent-upscale-modes", summary="Latent upscale modes the engine has")
    async def latent_upscale_modes():
        return _latent_upscale_modes()

    @router.get("/sdapi/v1/loras", summary="LoRAs of the store (Lora/, LyCORIS/): use them as <lora:name:mult>")
    async def loras():
        return await asyncio.to_thread(_loras, state.store)

    @router.get("/sdapi/v1/embeddings", summary="Textual-inversion embeddings of the store (embeddings/): loaded = "
                                                 "usable with the current checkpoint, skipped = the others")
    async def embeddings():
        return await asyncio.to_thread(_embeddings, state.store, dict(state.options), service.configs[DEFAULT_CONFIG])

    @router.get("/sdapi/v1/scripts", summary="Scripts (ControlNet is the one always-on script)")
    async def scripts():
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @router.get("/sdapi/v1/cmd-flags", summary="The server's flags under the webui's names (no secrets)")
    async def cmd_flags():
        config = service.configs[DEFAULT_CONFIG]
        return {"api": True, "nowebui": True, "api_auth": None, "listen": None, "port": None,
                "ckpt_dir": str(Path(config.models_dir) / "Stable-diffusion"), "device": config.device,
                "backend": config.backend.value, "precision": config.precision.value, "sdengine": True}

    @router.get("/sdapi/v1/memory", summary="RAM (CUDA not reported)")
    async def memory():
        return _memory()

    @router.post("/sdapi/v1/refresh-checkpoints", summary="Re-list the model store (it is listed on each call)")
    async def refresh_checkpoints(request: Request):
        state._store = None
        return None

    @router.post("/sdapi/v1/refresh-vae", summary="Re-list the VAEs (listed on each call)")
    async def refresh_vae(request: Request):
        state._store = None
        return None

    # ------------------------------------------------------------------------------------ options
    def current_options() -> dict[str, Any]:
        store = state.store
        opts = state.options
        name = opts.get("sd_model_checkpoint")
        try:
            entry = store.describe(_current_checkpoint(store, opts, service.configs[DEFAULT_CONFIG].default_model))
            title, sha = entry.title, entry.short_hash
        except Exception as exc:  # an empty or changed store: say so rather than fail the whole call
            log.warning("options: %s", exc)
            title, sha = name, None
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": sha,
                "sd_vae": opts.get("sd_vae") or "Automatic",
                "CLIP_stop_at_last_layers": opts.get("CLIP_stop_at_last_layers") or 1,
                "eta_noise_seed_delta": opts.get("eta_noise_seed_delta") or 0,
                "samples_format": "png", "sdengine_settable": list(_OPTION_NAMES)}

    @router.get("/sdapi/v1/options", summary="The webui options this server has")
    async def get_options():
        return await asyncio.to_thread(current_options)

    @router.post("/sdapi/v1/options", summary="Set options; setting sd_model_checkpoint (or sd_vae) loads it",
                 openapi_extra=_json_body({"type": "object", "properties": {
                     "sd_model_checkpoint": {"type": "string"}, "sd_vae": {"type": "string"},
                     "CLIP_stop_at_last_layers": {"type": "integer", "minimum": RANGES["clip_skip"].lo,
                                                  "maximum": RANGES["clip_skip"].hi},
                     "eta_noise_seed_delta": {"type": "integer", "minimum": 0}}}),
                 description="Settable: " + ", ".join(_OPTION_NAMES) + ". Any other option is refused (422) "
                             "naming it; read-only ones are accepted when they carry the current value.")
    async def set_options(request: Request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ApiError("bad_request", "the body must be a JSON object of options",
                               allowed='{"sd_model_checkpoint": "..."}')
            current = await asyncio.to_thread(current_options)
            wanted = {}
            for key, value in body.items():
                if key in _OPTION_NAMES:
                    wanted[key] = value
                elif key in current and current[key] == value:
                    continue  # a read-only option echoed back unchanged (clients post what GET gave them)
                else:
                    raise _error("not_supported", f"setting the option {key!r} is not supported", str(key),
                                 ", ".join(_OPTION_NAMES))
            from pydantic import ValidationError

            from api_compat.schema import validation_error_to_api

            try:
                parsed = OverrideSettings.model_validate(wanted)
            except ValidationError as exc:
                raise validation_error_to_api(exc) from None
            options = {**state.options, **parsed.model_dump(exclude_unset=True)}
            if options.get("sd_vae") == "Automatic":
                options.pop("sd_vae")
            load = {k: v for k, v in parsed.model_dump(exclude_unset=True).items()
                    if k in ("sd_model_checkpoint", "sd_vae") and v is not None
                    and v not in (current.get(k), state.options.get(k))}  # posting back the current one
            if load:
                # the webui loads the checkpoint before answering: a one-step task on the queue does, through
                # the engine that serves the requests (the service has no other way into a worker's engine)
                probe = {"prompt": "", "steps": 1, "n_iter": 1, "batch_size": 1, "seed": 0,
                         "sampler_name": "Euler", "override_settings": {**load}}
                try:
                    await run_task(request, "options", service.sd_txt2img, probe)
                except ApiError as exc:  # name the option, not the probe's override_settings
                    raise _error(exc.code, exc.message, payload_path(exc.field, _PROBE_ORIGINS), exc.allowed,
                                 status=exc.http_status) from None
            await asyncio.to_thread(state.save, {k: v for k, v in options.items() if v is not None})
            return None
        except ApiError as exc:
            return failure(exc)

    # ----------------------------------------------------------------------------- progress, control
    @router.get("/sdapi/v1/progress", summary="Progress of the webui task running now")
    async def progress(skip_current_image: bool = False):
        tracked = state.tracked()
        running = None
        for task_id in tracked:
            try:
                result = await asyncio.to_thread(service.sd_get_result, {"taskId": task_id})
            except ApiError:
                continue
            if result["status"] == "running":
                running = (task_id, result)
                break
        job_state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                     "job_count": len(tracked), "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                     "sampling_steps": 0}
        if running is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": job_state, "current_image": None,
                    "textinfo": None, "current_task": None}
        task_id, result = running
        prog = result.get("progress") or {}
        job_state.update(job=f"task({task_id})", interrupted=task_id in state.interrupted,
                         job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(state.tasks.get(task_id, 0))),
                         sampling_step=prog.get("step", 0), sampling_steps=prog.get("steps", 0))
        phase = " ".join(str(p) for p in (prog.get("phase"), prog.get("detail")) if p) or None
        return {"progress": prog.get("fraction", 0.0), "eta_relative": prog.get("eta_seconds") or 0.0,
                "state": job_state, "current_image": None, "textinfo": phase, "current_task": f"task({task_id})"}

    async def stop_running() -> dict:
        for task_id in state.tracked():
            try:
                result = await asyncio.to_thread(service.sd_get_result, {"taskId": task_id})
            except ApiError:
                continue
            if result["status"] == "running":
                with state.lock:
                    state.interrupted.add(task_id)
                await asyncio.to_thread(service.cancel, {"taskId": task_id})
        return {}

    @router.post("/sdapi/v1/interrupt", summary="Cancel the running webui task (its call answers 409)")
    async def interrupt():
        return await stop_running()

    @router.post("/sdapi/v1/skip", summary="As interrupt (the engine cannot skip one image of a batch)")
    async def skip():
        return await stop_running()

    @router.post("/sdapi/v1/png-info", summary="The infotext of a PNG (info, items, parameters)",
                 openapi_extra=_json_body({"type": "object", "required": ["image"], "properties": {
                     "image": {"type": "string", "description": "base64 or a data:image/...;base64, URI"}}}))
    async def png_info_route(request: Request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ApiError("bad_request", "the body must be a JSON object", allowed='{"image": "<base64>"}')
            return await asyncio.to_thread(png_info, body.get("image"), max_image)
        except ApiError as exc:
            return failure(exc)

    # ----------------------------------------------------------------------- sd-webui-controlnet routes
    @router.get("/controlnet/version", summary="sd-webui-controlnet API version")
    async def cn_version():
        return {"version": CONTROLNET_API_VERSION}

    @router.get("/controlnet/settings", summary="sd-webui-controlnet settings clients read (unit count)")
    async def cn_settings():
        from api_compat.schema import MAX_UNITS

        return {"control_net_unit_count": MAX_UNITS}

    @router.get("/controlnet/model_list", summary="ControlNet models ('name [hash]')")
    async def cn_model_list(update: bool = True):
        from engine.models.checkpoints import Kind

        def names():
            store = state.store
            return [store.controlnet_title(e) for e in store.entries(Kind.CONTROLNET)]

        return {"model_list": await asyncio.to_thread(names)}

    @router.get("/controlnet/module_list", summary="Preprocessors this engine runs (model-free ones)")
    async def cn_module_list(alias_names: bool = False):
        return _modules(alias_names)

    @router.post("/controlnet/detect", summary="Run a preprocessor on images (detected maps as base64 PNG)",
                 openapi_extra=_json_body({"type": "object", "properties": {
                     "controlnet_module": {"type": "string"},
                     "controlnet_input_images": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                     "controlnet_processor_res": {"type": "number"}, "controlnet_threshold_a": {"type": "number"},
                     "controlnet_threshold_b": {"type": "number"}, "controlnet_masks": {"type": "array"},
                     "low_vram": {"type": "boolean"}}}))
    async def cn_detect(request: Request):
        try:
            body = await read_json(request)
            return await asyncio.to_thread(_detect, body, service.limits)
        except ApiError as exc:
            return failure(exc)

    return router


_DETECT_FIELDS = {"controlnet_module": "none", "controlnet_input_images": [], "controlnet_masks": [],
                  "controlnet_processor_res": 512, "controlnet_threshold_a": 64, "controlnet_threshold_b": 64,
                  "low_vram": False}


def _detect(body: Any, limits) -> dict[str, Any]:
    """sd-webui-controlnet's /controlnet/detect: the preprocessor on each image, through the engine's own
    preprocessors (the ones the units run)."""
    from PIL import Image

    from engine.controlnet.images import decode_image
    from engine.controlnet.preprocessors import get_preprocessor
    from engine.errors import InvalidRequest

    from api_compat.errors import api_error_from

    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object", allowed="controlnet_module, "
                       "controlnet_input_images, ...")
    for key in body:
        if key not in _DETECT_FIELDS:
            raise _error("unknown_field", f"unknown field {key!r}", str(key), ", ".join(_DETECT_FIELDS))
    if body.get("controlnet_masks") not in (None, []):
        raise _error("not_supported", "not supported: the engine does not implement ControlNet masks",
                     "controlnet_masks", "[] or null")
    images = body.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images or len(images) > 16:
        raise _error("invalid_request", "must be a list of 1 to 16 base64 images", "controlnet_input_images",
                     "a list of 1 to 16 base64 images")
    numbers = {}
    for key in ("controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"):
        value = body.get(key, _DETECT_FIELDS[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 16384:
            raise _error("invalid_request", "must be a number", key, "a number from -1 to 16384")
        numbers[key] = float(value)
    try:
        pre = get_preprocessor(str(body.get("controlnet_module") or "none").strip().lower(),
                               field="controlnet_module")
        out = []
        for i, data in enumerate(images):
            field = f"controlnet_input_images[{i}]"
            if not isinstance(data, str):
                raise InvalidRequest(field, "must be a base64 image", "base64 PNG/JPEG/WebP")
            image = decode_image(data, field, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                                 allow_urls=limits.allow_url_fetch)
            h, w = image.shape[:2]
            work, _ = pre.sizes(h, w, numbers["controlnet_processor_res"], numbers["controlnet_threshold_a"],
                                numbers["controlnet_threshold_b"])
            if work[0] * work[1] > limits.max_work_pixels:
                raise InvalidRequest("controlnet_processor_res", f"makes a {work[1]}x{work[0]} working image",
                                     f"at most {limits.max_work_pixels} pixels")
            detected = pre(image, numbers["controlnet_processor_res"], numbers["controlnet_threshold_a"],
                           numbers["controlnet_threshold_b"])
            buf = io.BytesIO()
            Image.fromarray(detected).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    except InvalidRequest as exc:
        raise api_error_from(exc) from None
    return {"images": out, "info": "Success"}


__all__ = ["webui_router", "webui_to_scc", "webui_echo", "webui_info", "png_info", "WebuiState"]
