"""The OpenAI images API (``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models``): a third
face of the same :class:`~api_compat.service.TaskService` as ``/scc`` and ``/sdapi/v1``, for the chat front-ends
and agent tools that speak it to any image backend (docs/API.md "The OpenAI images API").

api_compat translates; it does not compute: an OpenAI body becomes a ``/scc`` payload (``prompt``, ``n`` ->
``batch_size``, ``size`` "WxH" -> ``width``/``height``, ``model`` -> ``stable_diffusion_model``, and our own
extra fields ``negative_prompt``, ``steps``, ``cfg_scale``, ``sampler``, ``scheduler``, ``seed``,
``denoising_strength``), which is validated, queued, limited (queue, image bytes and pixels, the memory budget) and
run exactly as on ``/scc``; errors are answered in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with ``param`` naming the OpenAI field. An edit's mask follows OpenAI's convention (transparent =
edit) and becomes our inpainting mask (white = repaint): ``255 - alpha``, soft edges kept.

The leniency policy (:mod:`api_compat.leniency`, docs/DECISIONS.md) holds here too: fields that only act on
OpenAI's own models (``quality``, ``style``, ``user``, ``moderation``, ``input_fidelity``) are accepted and
ignored; a value that asks for something the engine does not do (``background: "transparent"``, ``stream: true``,
``output_format: "jpeg"``) is refused naming the field; unknown fields are ignored and logged (``strict``: refused).
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the route methods

import asyncio
import base64
import io
import logging
import re
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from api_compat.errors import ApiError
from api_compat.service import DEFAULT_CONFIG
from api_compat.webui.routes import RouteSet, json_body, route
from engine.models.checkpoints import Kind
from engine.rules import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE

log = logging.getLogger(__name__)

# what each OpenAI field becomes in the /scc payload (and back, for the ``param`` of an error)
EXTRA_FIELDS = {"negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "cfg_scale",
                "sampler": "sampler_name", "scheduler": "scheduler", "seed": "seed"}
EDIT_EXTRA_FIELDS = {**EXTRA_FIELDS, "denoising_strength": "denoising_strength"}
_PARAMS = {"batch_size": "n", "width": "size", "height": "size", "stable_diffusion_model": "model",
           "negtive_prompt": "negative_prompt", "sampler_name": "sampler", "init_images": "image",
           "init_images[0]": "image", "init": "image", "init.image": "image", "init.mask": "mask",
           **{v: k for k, v in EDIT_EXTRA_FIELDS.items() if k != v}}
# OpenAI's fields that only act on its own models: accepted with any of its values, ignored
INERT = {"quality": ("auto", "standard", "hd", "low", "medium", "high"), "style": ("vivid", "natural"),
         "moderation": ("auto", "low"), "input_fidelity": ("low", "high")}
# fields accepted in their default form only (anything else asks for what the engine does not do)
ONLY = {"background": ("auto", "opaque"), "output_format": ("png",), "stream": (False,), "partial_images": (0,),
        "output_compression": (100,)}
KNOWN = {"prompt", "n", "size", "response_format", "model", "user", *INERT, *ONLY}
RESPONSE_FORMATS = ("b64_json", "url")
DEFAULT_RESPONSE_FORMAT = "b64_json"  # docs/DECISIONS.md: a URL needs this server's credentials to fetch
_SIZE = re.compile(r"^\s*([0-9]{1,5})\s*[xX×]\s*([0-9]{1,5})\s*$")
SIZE_ALLOWED = (f'"WxH" (e.g. "512x512"; multiples of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}), or "auto" '
                "(the model's native size)")
EDIT_DENOISE_MASKED = 1.0  # an edit repaints its transparent area entirely, as OpenAI's edits do


def openai_param(field: str | None, params: dict[str, str] | None = None) -> str | None:
    """The OpenAI field a /scc payload path is about (``batch_size`` -> ``n``, ``width`` -> ``size``)."""
    if field is None:
        return None
    table = {**_PARAMS, **(params or {})}
    if field in table:
        return table[field]
    head = re.split(r"[.\[]", field, maxsplit=1)[0]
    return table.get(head, field)


def openai_error_body(exc: ApiError, params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body of an :class:`ApiError`: ``{"error": {"message", "type", "param",
    "code"}}``; a refused field (422 elsewhere) answers 400, as OpenAI does."""
    status = 400 if exc.http_status == 422 else exc.http_status
    kind = ("authentication_error" if status == 401 else "rate_limit_error" if status == 429
            else "server_error" if status >= 500 else "invalid_request_error")
    message = exc.message + (f" (allowed: {exc.allowed})" if exc.allowed else "")
    return status, {"error": {"message": message, "type": kind, "param": openai_param(exc.field, params),
                              "code": exc.code}}


def _bad(message: str, param: str, allowed: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(code, message, field=param, allowed=allowed)


def parse_size(value: Any) -> tuple[int, int] | None:
    """OpenAI's ``size`` ("WxH", "auto", null) -> (width, height), or None for the model's native size."""
    if value is None or value == "auto":
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _bad(f"{str(value)[:40]!r} is not a size", "size", SIZE_ALLOWED)
    return int(match.group(1)), int(match.group(2))


def _number(value: Any, param: str, integer: bool) -> Any:
    """A form field's text (edits are multipart) as the number the JSON body would carry."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
        return int(number) if integer and number.is_integer() else number
    except ValueError:
        raise _bad(f"{value[:40]!r} is not a number", param, "an integer" if integer else "a number") from None


def to_scc(body: dict[str, Any], *, extras: dict[str, str], strict: bool, form: bool = False
           ) -> tuple[dict[str, Any], str]:
    """An OpenAI images body -> (the /scc payload, the response format). ``form``: the values are multipart text."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", "body", '{"prompt": "..."}', "bad_request")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("is required: the text of the image to make", "prompt", "a non-empty string")
    payload: dict[str, Any] = {"prompt": prompt}
    if body.get("n") is not None:
        payload["batch_size"] = _number(body["n"], "n", True) if form else body["n"]
    size = parse_size(body.get("size"))
    if size is not None:
        payload["width"], payload["height"] = size
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad("must be a string", "model", "a checkpoint name (GET /v1/models)")
        payload["stable_diffusion_model"] = model
    fmt = body.get("response_format") or DEFAULT_RESPONSE_FORMAT
    if fmt not in RESPONSE_FORMATS:
        raise _bad(f"unknown value {str(fmt)[:40]!r}", "response_format", ", ".join(RESPONSE_FORMATS))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("must be a string", "user", "a string (an end-user id; not used here)")
    for name, values in INERT.items():
        if body.get(name) is not None and body[name] not in values:
            raise _bad(f"unknown value {str(body[name])[:40]!r}", name, ", ".join(values))
    for name, values in ONLY.items():
        value = body.get(name)
        if form and isinstance(value, str) and isinstance(values[0], (bool, int)):
            value = {"false": False, "true": True}.get(value.lower(), value) if isinstance(values[0], bool) \
                else _number(value, name, True)
        if value is not None and value not in values:
            raise ApiError("not_supported", f"not supported: {str(value)[:40]!r}", field=name,
                           allowed=" or ".join(repr(v) if isinstance(v, str) else str(v).lower() for v in values))
    for name, field in extras.items():
        if body.get(name) is not None:
            value = body[name]
            if form and name in ("steps", "seed"):
                value = _number(value, name, True)
            elif form and name in ("cfg_scale", "denoising_strength"):
                value = _number(value, name, False)
            payload[field] = value
    unknown = sorted(k for k in body if k not in KNOWN and k not in extras and k not in ("image", "image[]", "mask"))
    if unknown and strict:
        raise ApiError("unknown_field", "unknown field", field=unknown[0],
                       allowed=", ".join(sorted(KNOWN | set(extras))))
    if unknown:
        log.info("OpenAI images: unknown fields ignored: %s", ", ".join(u[:60] for u in unknown[:16]))
    return payload, fmt


# ------------------------------------------------------------------------------------------- edit images
def _png_b64(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _open_checked(raw: bytes, param: str, limits):
    """An uploaded file as a PIL image, under the service's image limits (bytes, pixels, formats) -- the
    checks every request image gets (``engine.controlnet.images.load_image``) -- before it is read here."""
    from PIL import Image

    from core.errors import InvalidRequest
    from engine.controlnet.images import load_image

    try:
        load_image(base64.b64encode(raw).decode("ascii"), param, max_bytes=limits.max_bytes,
                   max_pixels=limits.max_pixels, max_aspect=None)
    except InvalidRequest as exc:
        raise ApiError(exc.code, exc.message, field=param, allowed=exc.allowed) from None
    return Image.open(io.BytesIO(raw))


def _alpha(image):
    """The image's alpha channel (L), or None when it has none."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return None


def edit_images(image_raw: bytes, mask_raw: bytes | None, limits) -> tuple[str, str | None, tuple[int, int]]:
    """The uploaded ``image`` and ``mask`` -> (init image, our mask or None, the image's size). OpenAI's mask
    convention: the mask's transparent pixels (alpha 0) are where to edit; without a mask the image's own
    transparency is the mask; an opaque image with no mask is edited whole (img2img)."""
    from PIL import ImageOps

    image = _open_checked(image_raw, "image", limits)
    with image:
        size = image.size
        if mask_raw is not None:
            with _open_checked(mask_raw, "mask", limits) as mask_image:
                if mask_image.size != size:
                    raise _bad(f"is {mask_image.size[0]}x{mask_image.size[1]}, the image {size[0]}x{size[1]}",
                               "mask", "a PNG of the image's size")
                alpha = _alpha(mask_image)
                if alpha is None:
                    raise _bad("has no alpha channel: the mask's transparent pixels are where to edit", "mask",
                               "a PNG with transparency (alpha 0: edit, opaque: keep)")
        else:
            alpha = _alpha(image)
            if alpha is not None and alpha.getextrema()[0] == 255:
                alpha = None  # fully opaque: nothing marked
        mask = _png_b64(ImageOps.invert(alpha)) if alpha is not None else None
        init = base64.b64encode(image_raw).decode("ascii") if image.mode in ("RGB", "L") else \
            _png_b64(image.convert("RGB"))
    return init, mask, size


def _size_multiple(size: tuple[int, int]) -> tuple[int, int]:
    """An edit's image size as a generation size: each side rounded to the size multiple, within the range."""
    return tuple(max(MIN_SIZE, min(MAX_SIZE, int(round(side / SIZE_MULTIPLE)) * SIZE_MULTIPLE)) for side in size)


class OpenAIRoutes(RouteSet):
    """The OpenAI images API's routes over the task service (``state`` None: no webui options apply here)."""

    def __init__(self, service, read_json, read_form, heavy=None):
        super().__init__(service, read_json, None, heavy)
        self.read_form = read_form

    async def images_of(self, task_id: str, count: int) -> list[str]:
        """The task's PNGs as base64, as stored (OpenAI's clients read PNG; no webui options apply)."""
        paths = [self.service.image_path(task_id, i) for i in range(count)]
        return await asyncio.to_thread(lambda: [base64.b64encode(p.read_bytes()).decode("ascii")
                                                for p in paths if p is not None])

    def failure(self, exc: ApiError) -> JSONResponse:
        status, body = openai_error_body(exc)
        return JSONResponse(self.service.public_paths.value(body), status_code=status)

    async def answer(self, request: Request, kind: str, payload: dict[str, Any], fmt: str) -> dict[str, Any]:
        submit = self.service.sd_txt2img if kind == "txt2img" else self.service.sd_img2img
        if fmt == "b64_json":  # the answer holds every image as base64: the memory budget counts it
            submit = _inline(submit)
        result = await self.run_task(request, kind, submit, payload, track=False)
        task_id, count = result["_task_id"], len(result.get("images") or [])
        if fmt == "b64_json":
            data = [{"b64_json": b} for b in await self.images_of(task_id, count)]
        else:  # this server's /scc image URLs (the Host header was checked by the site guard), same credentials
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/scc/images/{task_id}/{i}.png"} for i in range(count)]
        info = result.get("info") or {}
        width, height = info.get("width"), info.get("height")
        answer: dict[str, Any] = {"created": int(time.time()), "data": data, "output_format": "png"}
        if width and height:
            answer["size"] = f"{width}x{height}"
        return answer

    @route("GET", "/v1/models", summary="OpenAI API: the checkpoints, as models (id = the name `model` takes)")
    async def models(self):
        from engine.models.store import ModelStore

        store = ModelStore.from_config(self.service.configs[DEFAULT_CONFIG])  # read afresh: a new file shows
        entries = await asyncio.to_thread(store.entries, Kind.CHECKPOINT)  # no hashing
        return {"object": "list", "data": [
            {"id": e.stem, "object": "model", "created": int(e.path.stat().st_mtime) if e.path.exists() else 0,
             "owned_by": "bundled" if e.bundled else "local"} for e in entries]}

    @route("POST", "/v1/images/generations", summary="OpenAI API: text to image",
           openapi_extra=json_body({"type": "object", "required": ["prompt"], "description": (
               "prompt, n, size (WxH), response_format (b64_json, url), model (a checkpoint name); extra fields: "
               "negative_prompt, steps, cfg_scale, sampler, scheduler, seed")}),
           description='Waits for the task; answers {"created", "data": [{"b64_json"} | {"url"}], "size", '
                       '"output_format"}. Errors: {"error": {"message", "type", "param", "code"}}.')
    async def generations(self, request: Request):
        try:
            body = await self.read_json(request)
            payload, fmt = to_scc(body, extras=EXTRA_FIELDS, strict=self.service.strict)
            return await self.answer(request, "txt2img", payload, fmt)
        except ApiError as exc:
            return self.failure(exc)

    @route("POST", "/v1/images/edits", summary="OpenAI API: edit an image (inpainting where the mask is transparent)",
           openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
               "type": "object", "required": ["image", "prompt"], "properties": {
                   "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                   "prompt": {"type": "string"}}}}}}},
           description="multipart: image (PNG, JPEG, WEBP), mask (PNG; transparent = edit; none: the image's own "
                       "transparency, or the whole image), prompt, n, size, response_format, model; extra fields "
                       "as generations plus denoising_strength (default 1.0 with a mask, 0.75 without).")
    async def edits(self, request: Request):
        try:
            fields, files = await self.read_form(request)
            images = files.get("image") or files.get("image[]") or []
            if not images:
                raise _bad("is required: the image to edit (a multipart file)", "image", "one PNG, JPEG or WEBP file")
            if len(images) > 1:
                raise ApiError("not_supported", f"not supported: {len(images)} images", field="image",
                               allowed="one image")
            masks = files.get("mask") or []
            if len(masks) > 1:
                raise _bad(f"{len(masks)} masks", "mask", "one PNG")
            payload, fmt = to_scc(fields, extras=EDIT_EXTRA_FIELDS, strict=self.service.strict, form=True)
            init, mask, size = await self.heavy.bound(request)(edit_images, images[0], masks[0] if masks else None,
                                                               self.service.limits)
            payload["init_images"] = [init]
            if mask is not None:
                payload["mask"] = mask
                payload.setdefault("denoising_strength", EDIT_DENOISE_MASKED)
            if "width" not in payload:
                payload["width"], payload["height"] = _size_multiple(size)
            return await self.answer(request, "img2img", payload, fmt)
        except ApiError as exc:
            return self.failure(exc)


def _inline(submit):
    def call(payload, headers):
        return submit(payload, headers, inline_images=True)

    return call


def openai_router(service, read_json, read_form, heavy=None):
    """The FastAPI router of the OpenAI images routes over ``service``; ``read_form(request) -> (fields, files)``
    reads a multipart body under the server's body limit and deadline."""
    return OpenAIRoutes(service, read_json, read_form, heavy).router()
