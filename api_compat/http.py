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

import asyncio
import hmac
import json
import logging
import re
from typing import Any

from engine.lazy import require

from api_compat.apidoc import annotate_openapi
from api_compat.errors import ApiError
from api_compat.schema import Txt2ImgPayload
from api_compat.service import CONFIG_HEADER, LocalService

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a 20 MB image in base64 plus the rest
HEAVY_BODY = 64 * 1024  # larger submits are validated on a worker thread, off the event loop
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


class _ApiRoutes:
    """The high-rate routes as plain ASGI (POST /scc/sd_txt2img, /scc/sd_get_result, /scc/sd_cancel): read the
    body under the size limit, call the service, answer JSON. FastAPI's routing, dependency solving and
    encoders cost about as much as the whole submit, so these skip them; everything else goes to ``app``."""

    def __init__(self, app, service: LocalService, max_body_bytes: int):
        self.app = app
        self.service = service
        self.max_body = max_body_bytes
        self.routes = {"/scc/sd_txt2img": self._submit, "/scc/sd_get_result": self._result,
                       "/scc/sd_cancel": self._cancel}

    async def __call__(self, scope, receive, send):
        handler = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if handler is None:
            return await self.app(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise ApiError("method_not_allowed", f"use POST for {scope['path']}", allowed="POST")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            body, size = await self._read_json(headers, receive)
            if size > HEAVY_BODY or (isinstance(body, dict) and "alwayson_scripts" in body):
                # image decoding (or an allowed URL fetch) must not stall the other requests
                answer = await asyncio.to_thread(handler, body, headers, scope)
            else:
                answer = handler(body, headers, scope)
            status = 200
        except ApiError as exc:
            status, answer = exc.http_status, exc.to_dict()
        except Exception as exc:  # a bug; still answer in JSON
            log.exception("internal error on %s", scope.get("path"))
            status, answer = 500, {"error": {"code": "internal_error", "message": type(exc).__name__,
                                             "field": None, "allowed": None}}
        data = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _read_json(self, headers: dict[str, str], receive) -> tuple[Any, int]:
        too_large = ApiError("payload_too_large", f"the body is larger than {self.max_body} bytes",
                             allowed=f"at most {self.max_body} bytes")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError("bad_request", "the client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            return json.loads(b"".join(chunks)), size
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError("bad_request", f"the body is not valid JSON ({exc})", allowed="a JSON object") from None

    @staticmethod
    def _query(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError("bad_request", "the body must be a JSON object", allowed='{"taskId": "..."}')
        return body

    @staticmethod
    def _with_urls(result: dict[str, Any], headers: dict[str, str], scope) -> dict[str, Any]:
        count = len(result.get("images") or [])
        if not count:
            return result
        host = headers.get("host")
        if not host:
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        base = f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"
        return {**result, "images": [f"{base}/scc/images/{result['taskId']}/{i}.png" for i in range(count)]}

    def _submit(self, body, headers, scope):
        return self.service.sd_txt2img(body, headers)

    def _result(self, body, headers, scope):
        return self._with_urls(self.service.sd_get_result(self._query(body)), headers, scope)

    def _cancel(self, body, headers, scope):
        return self._with_urls(self.service.cancel(self._query(body).get("taskId")), headers, scope)


_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"taskId": {"type": "string"}}, "required": ["taskId"]}}}}
_ERROR = {"description": "error: {error: {code, message, field, allowed}, errors: [...]}"}


def _openapi_paths() -> dict[str, Any]:
    """OpenAPI entries of the routes served by :class:`_ApiRoutes`."""
    errors = {"400": _ERROR, "401": _ERROR, "404": _ERROR, "413": _ERROR, "422": _ERROR, "429": _ERROR}
    return {
        "/scc/sd_txt2img": {"post": {
            "summary": "Submit a text-to-image task", "operationId": "sd_txt2img",
            "parameters": [{"name": CONFIG_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                            "description": "selects a named engine configuration"}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Txt2ImgPayload"}}}},
            "responses": {"200": {"description": '{"taskId", "status"}'}, **errors}}},
        "/scc/sd_get_result": {"post": {
            "summary": "Query a task's result (images are URLs of this server)", "operationId": "sd_get_result",
            "requestBody": _JSON_BODY,
            "responses": {"200": {"description": "taskId, status, images, parameters, info, progress, error"},
                          **errors}}},
        "/scc/sd_cancel": {"post": {
            "summary": "Cancel a waiting or running task", "operationId": "sd_cancel", "requestBody": _JSON_BODY,
            "responses": {"200": {"description": "the task's result after cancelling"}, **errors}}},
    }


def create_app(service: LocalService, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               close_service: bool = False):
    """The ASGI app over ``service``. ``close_service`` closes the service when the app shuts down."""
    require("fastapi", "server", "The HTTP server (sdengine serve)")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_service:
            service.close()

    app = FastAPI(title="sdengine", version="0.1.0", lifespan=lifespan,
                  description="The sd_txt2img / sd_get_result task API (webui txt2img payload + ControlNet). Every "
                              "field, default, range and error: docs/API.md in the sdengine repository.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown paths, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        body = {"error": {"code": code, "message": str(exc.detail), "field": None, "allowed": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

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
            schema.setdefault("paths", {}).update(_openapi_paths())
            payload = Txt2ImgPayload.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(payload.pop("$defs", {}))
            components["Txt2ImgPayload"] = payload
            annotate_openapi(components)  # each field's meaning, and the pointer to docs/API.md
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    asgi = _ApiRoutes(app, service, max_body_bytes)
    return _AuthMiddleware(asgi, api_key) if api_key else asgi
