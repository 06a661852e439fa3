"""The webui's routes (``/sdapi/v1/...``) as :class:`WebuiRoutes`: one method per route over a
:class:`~api_compat.service.TaskService`, registered on a FastAPI router by :meth:`RouteSet.router` (the
ControlNet extension's routes are :class:`api_compat.webui.controlnet.ControlNetRoutes`).

A synchronous ``POST /sdapi/v1/txt2img`` validates the payload with the same schema as ``/scc``, submits a task
to the same queue and task store (it shows in ``sd_get_result``, the queue limit answers 429), waits for it,
and answers in the webui's shapes (:mod:`api_compat.webui.adapter`). ``/sdapi/v1/interrupt`` cancels the
running webui task; a client that disconnects cancels its own task.
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the route methods

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api_compat.errors import HTTP_STATUS, ApiError, payload_path
from api_compat.guard import HeavyWork
from api_compat.service import DEFAULT_CONFIG
from api_compat.webui import listings
from api_compat.webui.adapter import api_error, png_info, webui_echo, webui_info, webui_to_scc
from api_compat.webui.option_table import DEFAULTS, EFFECTS, LOADING_OPTIONS, REQUEST_OPTIONS
from api_compat.webui.option_table import MAX_BODY_BYTES as MAX_OPTIONS_BODY
from api_compat.webui.options import PROBE_ORIGINS, WebuiState, option_of, probe_payload
from engine.rules import RANGES

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a synchronous call looks at its running task (and at its client's connection)
POLL_WAITING_S = 0.25  # ... at its task while it waits in the queue
QUEUE_OUTAGE_S = 30.0  # a synchronous call waits out a task queue (Redis) outage this long, then answers 503


def route(method: str, path: str, **options: Any) -> Callable:
    """Marks a method of a :class:`RouteSet` as the route ``method path`` (``options``: FastAPI's
    ``add_api_route`` keywords: summary, description, openapi_extra)."""

    def mark(fn: Callable) -> Callable:
        fn.webui_route = (method, path, options)
        return fn

    return mark


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class RouteSet:
    """Routes over ``service`` and the webui's shared ``state``, in definition order. ``read_json(request)``
    reads a POST body with the server's rules (JSON content type, size limit, body deadline, nesting depth) --
    the same reader as the /scc routes (``state`` None: a face without the webui's options, e.g. OpenAI's).
    ``heavy`` (:class:`api_compat.guard.HeavyWork`): where submits run (their
    validation decodes images, may fetch URLs), bounded per client and off the shared pool the polls use."""

    def __init__(self, service, read_json, state: WebuiState, heavy: HeavyWork | None = None):
        self.service = service
        self.read_json = read_json
        self.state = state
        self.heavy = heavy or HeavyWork()

    def router(self, router: APIRouter | None = None) -> APIRouter:
        """Registers every marked method on ``router`` (a new one by default), in the order they are defined."""
        router = router or APIRouter()
        for name, fn in vars(type(self)).items():
            spec = getattr(fn, "webui_route", None)
            if spec is not None:
                method, path, options = spec
                router.add_api_route(path, getattr(self, name), methods=[method], **options)
        return router

    def failure(self, exc: ApiError) -> JSONResponse:
        # the webui's clients read "detail" (FastAPI's error key); ours read "error"; no server paths
        public = self.service.public_paths
        return JSONResponse(public.value({**exc.to_dict(), "detail": str(exc)}), status_code=exc.http_status)

    async def run_task(self, request: Request, kind: str, submit, payload: Any, track: bool = True) -> dict[str, Any]:
        """Submit through the service, wait for the task (cancelled if the client goes away, or by /interrupt
        when ``track``)."""
        service, state = self.service, self.state
        headers = {k: v for k, v in request.headers.items()}
        task_id = (await self.heavy.bound(request)(submit, payload, headers))["taskId"]
        if track:
            state.track(task_id)
        since, outage = time.monotonic(), None
        try:
            while True:
                try:
                    result = await asyncio.to_thread(service.sd_get_result, {"taskId": task_id})
                except ApiError as exc:  # the queue is away (a Redis restart): the task is kept; wait a while
                    outage = outage or time.monotonic()
                    if exc.code != "backend_unavailable" or time.monotonic() - outage > QUEUE_OUTAGE_S:
                        raise
                    await asyncio.sleep(POLL_WAITING_S)
                    continue
                outage = None
                if result["status"] in ("succeeded", "failed"):
                    break
                if await request.is_disconnected():
                    log.info("%s: the client of task %s disconnected; cancelling it", kind, task_id)
                    await asyncio.to_thread(service.cancel, {"taskId": task_id})
                    raise api_error("cancelled", "the client disconnected", status=499)
                # a running task is watched closely; a waiting one (maybe behind many) more lightly
                await asyncio.sleep(POLL_S if result["status"] == "running" or time.monotonic() - since < 1.0
                                    else POLL_WAITING_S)
            interrupted = state is not None and task_id in state.interrupted
        finally:
            if track:
                state.untrack(task_id)
        if result["status"] == "failed":
            error = result.get("error") or {}
            code = error.get("code") or "internal_error"
            if code == "cancelled":
                why = "interrupted (POST /sdapi/v1/interrupt)" if interrupted else error.get("message", "cancelled")
                raise api_error("cancelled", f"task {task_id} was {why}; no images", status=409)
            raise api_error(code, f"task {task_id} failed: {error.get('message', '')}",
                            status=HTTP_STATUS.get(code, 500))
        result["_task_id"] = task_id
        return result

    async def images_of(self, task_id: str, count: int) -> list[str]:
        """The task's images as base64 (as the webui answers images), in the ``samples_format`` option's format
        (PNG as stored; JPEG/WebP with the infotext as EXIF UserComment, as the webui encodes them)."""
        paths = [self.service.image_path(task_id, i) for i in range(count)]
        fmt = str(self.state.value("samples_format")).lower()
        quality, lossless = self.state.value("jpeg_quality"), self.state.value("webp_lossless")
        return await asyncio.to_thread(lambda: [_b64_image(p, fmt, quality, lossless) for p in paths if p is not None])


def _b64_image(path: Path, fmt: str = "png", quality: int = 80, lossless: bool = False) -> str:
    data = Path(path).read_bytes()
    if fmt in ("jpg", "jpeg", "webp"):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            text = img.info.get("parameters")
            exif = Image.Exif()
            if isinstance(text, str) and text:
                # EXIF UserComment (in the Exif IFD), UTF-16 with its character-code prefix, as the webui writes it
                exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
            out = io.BytesIO()
            rgb = img.convert("RGB")
            if fmt == "webp":
                rgb.save(out, format="WEBP", quality=quality, lossless=lossless, exif=exif.tobytes())
            else:
                rgb.save(out, format="JPEG", quality=quality, exif=exif.tobytes())
            data = out.getvalue()
    return base64.b64encode(data).decode("ascii")


_ANSWER_DOC = ('{"images": [base64 PNG], "parameters": {the request as the webui echoes it}, '
               '"info": "<JSON string: seed, all_seeds, infotexts, ...>"}')


class WebuiRoutes(RouteSet):
    """The AUTOMATIC1111 webui's own API (``/sdapi/v1/...``; docs/WEBUI_API.md lists the routes)."""

    async def generate(self, request: Request, kind: str, submit) -> Any:
        state = self.state
        try:
            body = await self.read_json(request)
            send = not isinstance(body, dict) or body.get("send_images", True) is not False
            if send:  # the answer holds every image as base64: the memory budget counts it (engine.memory)
                submit = functools.partial(submit, inline_images=True)
            result, warnings = await self.run_with_options(request, kind, submit, body)
            task_id = result["_task_id"]
            count = len(result.get("images") or [])
            images = await self.images_of(task_id, count) if send else []
            info = webui_info(result.get("info") or {}, body)
            info["sdengine_task_id"] = task_id
            if warnings:
                info["warnings"] = [*(info.get("warnings") or []), *warnings]
            overrides = body.get("override_settings")
            if body.get("override_settings_restore_afterwards") is False and isinstance(overrides, dict):
                # the webui keeps the request's settings as the options afterwards (the request checked them)
                kept = {k: v for k, v in overrides.items() if k in REQUEST_OPTIONS and v is not None}
                if kept:
                    await asyncio.to_thread(state.save, {**state.options, **kept})
            return {"images": images, "parameters": webui_echo(body, kind),
                    "info": json.dumps(info, ensure_ascii=False)}
        except ApiError as exc:
            return self.failure(exc)

    async def run_with_options(self, request: Request, kind: str, submit, body: Any
                               ) -> tuple[dict[str, Any], list[str]]:
        """Run ``body`` with the options that act on requests (as override_settings it did not set). A stored
        option the request cannot take (e.g. a clip skip the current model has no layer for) is left out, with a
        warning in the answer's info and the log, rather than failing every request."""
        options = self.state.request_options()
        own = body.get("override_settings") if isinstance(body, dict) else None
        own = own if isinstance(own, dict) else {}
        warnings: list[str] = []
        while True:
            scc = webui_to_scc(body, options)
            try:
                return await self.run_task(request, kind, submit, scc), warnings
            except ApiError as exc:
                key = option_of(exc.field)
                if key is None or key not in options or own.get(key) is not None:
                    raise
                warnings.append(self.state.warn_unfit(key, exc))
                options = {k: v for k, v in options.items() if k != key}

    # ------------------------------------------------------------------------------------- generation
    @route("POST", "/sdapi/v1/txt2img", summary="txt2img, synchronous (webui API)",
           openapi_extra=json_body({"$ref": "#/components/schemas/Txt2ImgPayload"}),
           description=f"Waits for the task; answers {_ANSWER_DOC}. ControlNet detected maps are appended "
                       "to images as the extension does. 409 when interrupted, 429 when the queue is full.")
    async def txt2img(self, request: Request):
        return await self.generate(request, "txt2img", self.service.sd_txt2img)

    @route("POST", "/sdapi/v1/img2img", summary="img2img, synchronous (webui API)",
           openapi_extra=json_body({"type": "object", "description": "the webui img2img payload"}),
           description=f"Waits for the task (sd_img2img: init_images, denoising_strength, mask ...); answers "
                       f"{_ANSWER_DOC}. 409 when interrupted, 429 when the queue is full.")
    async def img2img(self, request: Request):
        return await self.generate(request, "img2img", self.service.sd_img2img)

    # ------------------------------------------------------------------------------------------- extras
    async def extras(self, request: Request, batch: bool) -> Any:
        """The extras body with the ESRGAN_tile options the request runs with, as a task; the webui's answer."""
        try:
            body = await self.read_json(request)
            if isinstance(body, dict):
                body = {**body, **{k: self.state.value(k) for k in ("ESRGAN_tile", "ESRGAN_tile_overlap")}}
            result = await self.run_task(request, "extras", lambda p, h: self.service.extras(p, h, batch), body)
            info = result.get("info") or {}
            images = await self.images_of(result["_task_id"], len(result.get("images") or []))
            if batch:
                return {"html_info": info.get("html_info", ""), "images": images}
            return {"html_info": info.get("html_info", ""), "image": images[0] if images else ""}
        except ApiError as exc:
            return self.failure(exc)

    @route("POST", "/sdapi/v1/extra-single-image", summary="Upscale one image (extras), as a queued task",
           openapi_extra=json_body({"type": "object", "required": ["image"], "description": "image, resize_mode, "
                                    "upscaling_resize(_w/_h), upscaling_crop, upscaler_1, upscaler_2, "
                                    "extras_upscaler_2_visibility, gfpgan_visibility, codeformer_visibility"}),
           description='Answers {"html_info", "image"}; the PNG keeps the input\'s infotext and adds '
                       '"postprocessing". 409 when interrupted, 429 when the queue is full.')
    async def extra_single_image(self, request: Request):
        return await self.extras(request, batch=False)

    @route("POST", "/sdapi/v1/extra-batch-images", summary="Upscale images (extras), as one queued task",
           openapi_extra=json_body({"type": "object", "required": ["imageList"], "description": "imageList: "
                                    "[{data, name}], and the fields of extra-single-image"}),
           description='Answers {"html_info", "images"}.')
    async def extra_batch_images(self, request: Request):
        return await self.extras(request, batch=True)

    # ----------------------------------------------------------------------------------------- listings
    @route("GET", "/sdapi/v1/sd-models", summary="Checkpoints (title 'name [hash]', model_name, hash, sha256)")
    async def sd_models(self):
        return await asyncio.to_thread(listings.sd_models, self.state.store)

    @route("GET", "/sdapi/v1/sd-vae", summary="VAEs")
    async def sd_vae(self):
        return await asyncio.to_thread(listings.sd_vaes, self.state.store)

    @route("GET", "/sdapi/v1/samplers", summary="Samplers (name, aliases, options)")
    async def samplers(self):
        return listings.samplers()

    @route("GET", "/sdapi/v1/schedulers", summary="Schedule types")
    async def schedulers(self):
        return listings.schedulers()

    @route("GET", "/sdapi/v1/upscalers", summary="Image upscalers: Lanczos, Nearest and the model files of the "
                                                  "folders ESRGAN/, RealESRGAN/, SwinIR/, HAT/, DAT/")
    async def upscalers(self):
        return await asyncio.to_thread(listings.upscalers, self.service.configs[DEFAULT_CONFIG].models_dir)

    @route("GET", "/sdapi/v1/latent-upscale-modes", summary="Latent upscale modes the engine has")
    async def latent_upscale_modes(self):
        return listings.latent_upscale_modes()

    @route("GET", "/sdapi/v1/loras", summary="LoRAs of the store (Lora/, LyCORIS/): use them as <lora:name:mult>")
    async def loras(self):
        return await asyncio.to_thread(listings.loras, self.state.store,
                                       self.service.configs[DEFAULT_CONFIG].allow_pickle)

    @route("GET", "/sdapi/v1/embeddings", summary="Textual-inversion embeddings of the store (embeddings/): loaded "
                                                  "= usable with the current checkpoint, skipped = the others")
    async def embeddings(self):
        return await asyncio.to_thread(listings.embeddings, self.state.store, dict(self.state.options),
                                       self.service.configs[DEFAULT_CONFIG])

    @route("GET", "/sdapi/v1/scripts", summary="Scripts by the names the webui and extensions use (ControlNet: "
                                               "\"controlnet\", always on; img2img: \"sd upscale\")")
    async def scripts(self):
        return listings.scripts()

    @route("GET", "/sdapi/v1/script-info", summary="The scripts with their arguments (ControlNet: one per unit)")
    async def script_info(self):
        return await asyncio.to_thread(listings.script_info, self.service.configs[DEFAULT_CONFIG].models_dir)

    @route("GET", "/sdapi/v1/hypernetworks", summary="Hypernetworks: none (the engine does not apply them)")
    async def hypernetworks(self):
        return listings.hypernetworks()

    @route("GET", "/sdapi/v1/face-restorers", summary="Face restorers: those with a file in models/Codeformer, "
                                                         "models/GFPGAN")
    async def face_restorers(self):
        return await asyncio.to_thread(listings.face_restorers, self.state.store)

    @route("GET", "/sdapi/v1/realesrgan-models", summary="Real-ESRGAN models (the models folder RealESRGAN/)")
    async def realesrgan_models(self):
        return await asyncio.to_thread(listings.realesrgan_models, self.service.configs[DEFAULT_CONFIG].models_dir)

    @route("GET", "/sdapi/v1/prompt-styles", summary="Prompt styles (styles.csv in the data folder, "
                                                     "the webui's format)")
    async def prompt_styles(self):
        return await asyncio.to_thread(listings.prompt_styles)

    @route("GET", "/sdapi/v1/cmd-flags", summary="The server's flags under the webui's names (no secrets)")
    async def cmd_flags(self):
        return listings.cmd_flags(self.service.configs[DEFAULT_CONFIG])

    @route("GET", "/sdapi/v1/memory", summary="RAM (CUDA not reported)")
    async def memory(self):
        return listings.memory()

    @route("POST", "/sdapi/v1/refresh-checkpoints", summary="Re-list the model store (it is listed on each call)")
    async def refresh_checkpoints(self, request: Request):
        self.state.refresh()
        return None

    @route("POST", "/sdapi/v1/refresh-vae", summary="Re-list the VAEs (listed on each call)")
    async def refresh_vae(self, request: Request):
        self.state.refresh()
        return None

    # ------------------------------------------------------------------------------------------ options
    @route("GET", "/sdapi/v1/options", summary="The webui options this server has")
    async def get_options(self):
        return await asyncio.to_thread(self.state.current_options)

    @route("POST", "/sdapi/v1/options", summary="Set options; setting sd_model_checkpoint (or sd_vae) loads it",
           openapi_extra=json_body({"type": "object", "properties": {
               "sd_model_checkpoint": {"type": "string"}, "sd_vae": {"type": "string"},
               "CLIP_stop_at_last_layers": {"type": "integer", "minimum": RANGES["clip_skip"].lo,
                                            "maximum": RANGES["clip_skip"].hi},
               "eta_noise_seed_delta": {"type": "integer", "minimum": 0},
               "samples_format": {"type": "string", "enum": ["png", "jpg", "jpeg", "webp"]}},
               "additionalProperties": True}),
           description="Takes any of the webui's options (GET shows them all); the ones with an effect here: "
                       + ", ".join(EFFECTS) + " (checked as a request's override_settings, on the current model); "
                       "the others are stored and shown, with no effect. An unknown option, a value of the wrong "
                       "type or over 4 KiB is refused (422) naming the option.")
    async def set_options(self, request: Request):
        state = self.state
        try:
            state.may_write(request.client.host if request.client else None)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_OPTIONS_BODY:
                raise ApiError("payload_too_large", f"the options body is {length} bytes",
                               allowed=f"at most {MAX_OPTIONS_BODY} bytes of options")
            body = await self.read_json(request)
            current = await asyncio.to_thread(state.current_options)
            wanted = state.parse(body, current)
            options = {**state.options, **wanted}
            headers = {k: v for k, v in request.headers.items()}
            # checked on the model they will run on, with the same error a request would get
            await asyncio.to_thread(state.check, options, headers)
            load = {k: options[k] for k in LOADING_OPTIONS
                    if k in wanted and options.get(k) not in (None, DEFAULTS[k], state.options.get(k))}
            if load:
                # the webui loads the checkpoint before answering: a one-step task on the queue does, through
                # the engine that serves the requests (the service has no other way into a worker's engine)
                try:
                    await self.run_task(request, "options", self.service.sd_txt2img,
                                        probe_payload(state.request_options(options)))
                except ApiError as exc:  # name the option, not the probe's override_settings
                    raise api_error(exc.code, exc.message, payload_path(exc.field, PROBE_ORIGINS), exc.allowed,
                                    status=exc.http_status) from None
            await asyncio.to_thread(state.save, options)
            return None
        except ApiError as exc:
            return self.failure(exc)

    # ------------------------------------------------------------------------------- progress, control
    @route("GET", "/sdapi/v1/progress", summary="Progress of the webui task running now")
    async def progress(self, skip_current_image: bool = False):
        state = self.state
        tracked = state.tracked()
        running = None
        for task_id in tracked:
            try:
                result = await asyncio.to_thread(self.service.sd_get_result,
                                                 {"taskId": task_id, "current_image": not skip_current_image})
            except ApiError as exc:
                if exc.code == "backend_unavailable":  # the queue is away: 503, not an idle answer
                    raise
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
        # the newest live preview (made at the show_progress_* options' interval, off the sampling thread)
        return {"progress": prog.get("fraction", 0.0), "eta_relative": prog.get("eta_seconds") or 0.0,
                "state": job_state, "current_image": result.get("current_image"), "textinfo": phase,
                "current_task": f"task({task_id})"}

    async def stop_running(self) -> dict:
        for task_id in self.state.tracked():
            try:
                result = await asyncio.to_thread(self.service.sd_get_result, {"taskId": task_id})
            except ApiError as exc:
                if exc.code == "backend_unavailable":  # the queue is away: 503, nothing was interrupted
                    raise
                continue
            if result["status"] == "running":
                with self.state.lock:
                    self.state.interrupted.add(task_id)
                await asyncio.to_thread(self.service.cancel, {"taskId": task_id})
        return {}

    @route("POST", "/sdapi/v1/interrupt", summary="Cancel the running webui task (its call answers 409)")
    async def interrupt(self):
        return await self.stop_running()

    @route("POST", "/sdapi/v1/skip", summary="As interrupt (the engine cannot skip one image of a batch)")
    async def skip(self):
        return await self.stop_running()

    @route("POST", "/sdapi/v1/png-info", summary="The infotext of a PNG (info, items, parameters)",
           openapi_extra=json_body({"type": "object", "required": ["image"], "properties": {
               "image": {"type": "string", "description": "base64 or a data:image/...;base64, URI"}}}))
    async def png_info_route(self, request: Request):
        try:
            body = await self.read_json(request)
            if not isinstance(body, dict):
                raise ApiError("bad_request", "the body must be a JSON object", allowed='{"image": "<base64>"}')
            return await self.heavy.bound(request)(png_info, body.get("image"), self.service.limits.max_bytes)
        except ApiError as exc:
            return self.failure(exc)
