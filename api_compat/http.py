"""The HTTP server (FastAPI, the ``server`` extra): the sd_txt2img / sd_get_result contract over HTTP.

    POST /scc/sd_txt2img      payload as JSON (+ optional X-SP-RESOURCE-CONFIG-ID header) -> {"taskId", "status"}
    POST /scc/sd_get_result   {"taskId"} -> result; images are URLs served by this server
    POST /scc/sd_cancel       {"taskId"} -> result (extra: cancel a waiting or running task)
    GET  /scc/images/{taskId}/{index}.png
    GET  /health              (no API key needed)
    GET  /openapi.json, /docs

Errors are JSON ``{"error": {"code", "message", "field", "allowed"}, "errors": [...]}`` with 400/422 (bad
payload), 401 (API key), 404 (unknown task or image), 413 (body too large), 429 (queue full).
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the local import

import hmac
import json
import logging
import re
from typing import Any

from engine.lazy import require

from api_compat.errors import ApiError
from api_compat.schema import Txt2ImgPayload
from api_compat.service import CONFIG_HEADER, LocalService

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a 20 MB image in base64 plus the rest
_IMAGE_NAME = re.compile(r"^(0|[1-9][0-9]{0,3})\.png$")


class _AuthMiddleware:
    """Pure ASGI: requires ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` on every path but /health."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if given and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(ApiError("unauthorized", "a valid API key is required",
                                   allowed="Authorization: Bearer KEY or X-API-Key: KEY").to_dict()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def create_app(service: LocalService, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               close_service: bool = False):
    """The ASGI app over ``service``. ``close_service`` closes the service when the app shuts down."""
    fastapi = require("fastapi", "server", "The HTTP server (sdengine serve)")
    from fastapi import FastAPI, Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import FileResponse, JSONResponse

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_service:
            service.close()

    app = FastAPI(title="sdengine", version="0.1.0", lifespan=lifespan,
                  description="The sd_txt2img / sd_get_result task API (webui txt2img payload + ControlNet).")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # pragma: no cover - a bug; still answer in JSON
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": {"code": "internal_error", "message": f"{type(exc).__name__}",
                                       "field": None, "allowed": None}}, status_code=500)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise ApiError("payload_too_large", f"the body is larger than {max_body_bytes} bytes",
                           allowed=f"at most {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError("payload_too_large", f"the body is larger than {max_body_bytes} bytes",
                               allowed=f"at most {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError("bad_request", f"the body is not valid JSON ({exc})", allowed="a JSON object") from None

    def with_urls(result: dict[str, Any], request: Request) -> dict[str, Any]:
        base = str(request.base_url)
        count = len(result.get("images") or [])
        return {**result, "images": [f"{base}scc/images/{result['taskId']}/{i}.png" for i in range(count)]}

    @app.post("/scc/sd_txt2img", summary="Submit a text-to-image task", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Txt2ImgPayload"}}}},
        "parameters": [{"name": CONFIG_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "selects a named engine configuration"}]})
    async def sd_txt2img(request: Request):
        payload = await read_json(request)
        return JSONResponse(service.sd_txt2img(payload, dict(request.headers)))

    @app.post("/scc/sd_get_result", summary="Query a task's result", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"taskId": {"type": "string"}}, "required": ["taskId"]}}}}})
    async def sd_get_result(request: Request):
        query = await read_json(request)
        if not isinstance(query, dict):
            raise ApiError("bad_request", "the body must be a JSON object", allowed='{"taskId": "..."}')
        return JSONResponse(with_urls(service.sd_get_result(query), request))

    @app.post("/scc/sd_cancel", summary="Cancel a waiting or running task")
    async def sd_cancel(request: Request):
        query = await read_json(request)
        if not isinstance(query, dict):
            raise ApiError("bad_request", "the body must be a JSON object", allowed='{"taskId": "..."}')
        return JSONResponse(with_urls(service.cancel(query.get("taskId")), request))

    @app.get("/scc/images/{task_id}/{name}", summary="A result image (PNG)")
    async def image(task_id: str, name: str):
        match = _IMAGE_NAME.match(name)
        path = service.image_path(task_id, int(match.group(1))) if match else None
        if path is None:
            raise ApiError("not_found", "no such image", field="image", allowed="/scc/images/{taskId}/{index}.png")
        return FileResponse(path, media_type="image/png")

    @app.get("/health", summary="Liveness and queue depth")
    async def health():
        return service.health()

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            payload = Txt2ImgPayload.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(payload.pop("$defs", {}))
            components["Txt2ImgPayload"] = payload
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    del fastapi
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    return app
