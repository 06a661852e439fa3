"""The HTTP server (FastAPI, the ``server`` extra): the sd_txt2img / sd_get_result contract over HTTP.

    POST /scc/sd_txt2img      payload as JSON (+ optional X-SP-RESOURCE-CONFIG-ID header) -> {"taskId", "status"}
    POST /scc/sd_img2img      the same for an img2img payload (init_images, denoising_strength, mask ...)
    POST /scc/sd_get_result   {"taskId"} -> result; images are URLs served by this server
    POST /scc/sd_cancel       {"taskId"} -> result (extra: cancel a waiting or running task)
    GET  /scc/images/{taskId}/{index}.png
    GET  /health              (no API key needed)
    GET  /openapi.json
    GET  /, /docs, /redoc     the browser page and the API docs, static files served from the package with no
                              API key (api_compat.page; the page asks for the key and sends it)
    /sdapi/v1/..., /controlnet/...   the webui's own API over the same service (api_compat/webui/,
                                     docs/WEBUI_API.md)
    /v1/images/generations, /v1/images/edits (multipart), /v1/models
                                     the OpenAI images API over the same service (api_compat/openai_images.py)

Errors are JSON ``{"error": {"code", "message", "field", "allowed"}, "errors": [...]}`` with 400/422 (bad
payload), 401 (API key), 403 (cross-site Origin), 404 (unknown task or image), 408 (body too slow), 413 (body too
large, or more than MAX_JSON_KEYS keys), 415 (POST body not JSON), 429 (queue full), 507/503 (results disk full or
failing: api_compat.storage); the webui routes also 409 (interrupted). Heavy request work runs on its own pool,
bounded per client (api_compat.guard); messages name no server path (api_compat.paths).

Cross-site and DNS-rebinding safety (``sdengine serve`` sets these from its bind address): POST bodies must be
``Content-Type: application/json`` (an HTML form cannot send that without a CORS preflight); the ``Host`` header
must name an allowed host (the bound address, loopback names on a loopback bind, ``--allowed-host`` names); an
``Origin`` other than the server's own is refused unless listed with ``--cors-origin``; headers must arrive
within ``header_timeout`` seconds of the connection (or of the previous response) and a body within
``read_timeout`` seconds.
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the local import

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import sqlite3
from collections.abc import Iterable
from typing import Any

from core.lazy import require

from api_compat.apidoc import annotate_openapi
from api_compat.errors import ApiError
from api_compat.guard import HeavyWork, too_many_keys
from api_compat.page import add_page_routes, is_public
from api_compat.schema import MAX_JSON_DEPTH, Img2ImgPayload, Txt2ImgPayload, check_body
from api_compat.service import CONFIG_HEADER, TaskService
from api_compat.storage import StorageWatch

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a 20 MB image in base64 plus the rest
HEAVY_BODY = 64 * 1024  # larger submits are validated on a worker thread, off the event loop
DEFAULT_READ_TIMEOUT = 60.0  # seconds for a whole request body
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for the request line and headers
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::")
# POST routes whose body is multipart/form-data (OpenAI's image edits); every other POST body must be JSON.
# A cross-site HTML form can send multipart, so these rely on the Origin check (and the API key) alone
MULTIPART_PATHS = frozenset({"/v1/images/edits"})
_CORS_HEADERS = b"authorization, content-type, x-api-key, x-sp-resource-config-id"


async def _answer(send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


_HOST_SYNTAX = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?)(:[0-9]{1,5})?$")


def host_syntax_ok(value: str) -> bool:
    """Whether a ``Host`` header is a host (name, IPv4, [IPv6]) with an optional port, and nothing else (no
    userinfo ``a@b``, path, spaces): what may be echoed into the URLs of result images."""
    return bool(_HOST_SYNTAX.match(value)) and len(value) <= 255


def split_host(value: str) -> str:
    """The host name of a ``Host`` header or an origin's netloc, lower case, without port or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _origin_of(scheme: str, host: str) -> str:
    """The web origin of a request to ``host`` over ``scheme`` (default port left out, as browsers write it)."""
    host = host.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def allowed_hosts_for(bind: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The host names a server bound to ``bind`` answers to: the bound address itself, the loopback names on a
    loopback bind, and ``extra`` (configured names, or "*" for any). A wildcard bind (0.0.0.0, ::) admits any IP
    literal (a DNS rebinding attack needs a name); names must be configured."""
    names = {split_host(bind)} | {split_host(e) if e != "*" else "*" for e in extra}
    host = split_host(bind)
    if host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback) or host in WILDCARD_BINDS:
        names.update(LOOPBACK_NAMES)
    return tuple(sorted(names))


class _SiteGuard:
    """Pure ASGI, outermost: refuses a ``Host`` that is not allowed (DNS rebinding) and an ``Origin`` of another
    site (cross-site submits from a web page), answers CORS preflights for ``cors_origins``."""

    def __init__(self, app, allowed_hosts: Iterable[str] | None, cors_origins: Iterable[str]):
        self.app = app
        self.hosts = None if allowed_hosts is None else frozenset(split_host(h) if h != "*" else "*"
                                                                  for h in allowed_hosts)
        self.any_ip = self.hosts is not None and bool(self.hosts & set(WILDCARD_BINDS))
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in cors_origins)

    def _host_ok(self, host: str | None) -> bool:
        if host is not None and not host_syntax_ok(host):
            return False  # e.g. "127.0.0.1:7860@evil.example", whatever names are allowed
        if self.hosts is None or "*" in self.hosts:
            return True
        name = split_host(host)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = origin = None
        preflight = False
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1").strip().lower().rstrip("/")
            elif name == b"access-control-request-method":
                preflight = True
        if not self._host_ok(host if host is not None or self.hosts is None else ""):
            shown = ("a host name or address with an optional port" if self.hosts is None else
                     ", ".join(sorted(self.hosts)) + (" or any IP address" if self.any_ip else ""))
            return await _answer(send, 400, ApiError(
                "invalid_host", f"the Host header {str(host)[:100]!r} is not a name of this server",
                field="headers.Host", allowed=f"{shown} (sdengine serve --allowed-host NAME adds one)").to_dict())
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            same_site = host is not None and origin == _origin_of(scope.get("scheme", "http"), host)
            if not same_site:
                if origin not in self.origins and "*" not in self.origins:
                    return await _answer(send, 403, ApiError(
                        "forbidden_origin", f"requests from the web origin {origin[:100]!r} are not allowed",
                        field="headers.Origin",
                        allowed="this server's own origin, or one given with sdengine serve --cors-origin ORIGIN"
                    ).to_dict())
                cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                if scope["method"] == "OPTIONS" and preflight:
                    await send({"type": "http.response.start", "status": 204, "headers": [
                        *cors, (b"access-control-allow-methods", b"GET, POST"),
                        (b"access-control-allow-headers", _CORS_HEADERS), (b"access-control-max-age", b"600")]})
                    return await send({"type": "http.response.body", "body": b""})
        if scope["method"] == "POST" and scope.get("path") not in MULTIPART_PATHS:
            problem = _post_media_problem(scope.get("headers", ()))
            if problem is not None:
                return await _answer(send, 415, problem.to_dict(), cors)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


def _post_media_problem(headers: Iterable[tuple[bytes, bytes]]) -> ApiError | None:
    """Every POST, bodyless routes (/sdapi/v1/interrupt, refresh-checkpoints ...) included: a body must be JSON
    (what an HTML form or a no-cors fetch cannot send); a POST with no Content-Type must have no body."""
    media = None
    has_body = False
    for name, value in headers:
        if name == b"content-type":
            media = value.decode("latin-1")
        elif name == b"content-length":
            has_body |= value.strip() not in (b"0", b"")
        elif name == b"transfer-encoding":
            has_body = True
    if media is None and not has_body:
        return None
    try:
        check_json_media({"content-type": media or ""})
    except ApiError as exc:
        return exc
    return None


def header_timeout_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT):
    """uvicorn's HTTP protocol class (httptools or h11) with a deadline for the request line and headers: a
    connection that has not sent a complete request head ``header_timeout`` seconds after it opened (or after
    the previous response) is closed. uvicorn has no such option; its keep-alive timeout only starts after a
    first response."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        _head_timer = None
        _head_cycle = None

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_cycle = self.cycle  # a request whose head is complete makes a new cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is self._head_cycle and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head within %g s", header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            self._arm_head_timer()  # before super(): a pipelined request it starts makes a new cycle
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 7860, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   log_level: str = "info", **options):
    """The uvicorn configuration ``sdengine serve`` runs: the header deadline, a 5 s keep-alive."""
    uvicorn = require("uvicorn", "server", "sdengine serve")
    return uvicorn.Config(app, host=host, port=port, http=header_timeout_protocol(header_timeout),
                          timeout_keep_alive=5, log_level=log_level, **options)
_IMAGE_NAME = re.compile(r"^(0|[1-9][0-9]{0,3})\.png$")


def check_json_media(headers: dict[str, str]) -> None:
    """POST bodies must be JSON (an HTML form cannot send that without a CORS preflight)."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError("unsupported_media_type", f"the body must be JSON, sent as {media or 'no type'!r}",
                       field="headers.Content-Type", allowed="Content-Type: application/json")


async def read_json_body(headers: dict[str, str], receive, max_body: int, read_timeout: float,
                         offload=None) -> tuple[Any, int]:
    """The decoded JSON body and its size, read from ASGI ``receive`` under ``max_body`` bytes within
    ``read_timeout`` seconds, nested at most MAX_JSON_DEPTH levels, with at most MAX_JSON_KEYS object keys;
    raises :class:`ApiError`. A body over HEAVY_BODY bytes is decoded by ``await offload(fn, *args)`` (a
    :meth:`api_compat.guard.HeavyWork.bound`), off the event loop."""
    data = await read_body(headers, receive, max_body, read_timeout)
    if offload is not None and len(data) > HEAVY_BODY:
        return await offload(_decode_json, data), len(data)
    return _decode_json(data), len(data)


async def read_body(headers: dict[str, str], receive, max_body: int, read_timeout: float) -> bytes:
    """The raw body from ASGI ``receive``, under ``max_body`` bytes, within ``read_timeout`` seconds; raises
    :class:`ApiError`."""
    too_large = ApiError("payload_too_large", f"the body is larger than {max_body} bytes",
                         allowed=f"at most {max_body} bytes")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        raise too_large
    chunks, size, more = [], 0, True
    try:
        async with asyncio.timeout(read_timeout):
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ApiError("bad_request", "the client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_body:
                    raise too_large
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        raise ApiError("request_timeout", f"the body did not arrive within {read_timeout:g} s",
                       allowed=f"a complete body within {read_timeout:g} s") from None
    return b"".join(chunks)


MAX_FORM_FILES = 4  # an OpenAI edit: image (or image[]) and mask
MAX_FORM_FIELDS = 64


async def read_form_body(request, max_body: int, read_timeout: float) -> tuple[dict[str, Any], dict[str, list]]:
    """A ``multipart/form-data`` body (POST /v1/images/edits) read under the same body limit and deadline as a
    JSON one: (text fields, {name: [file bytes, ...]}); raises :class:`ApiError`."""
    from starlette.requests import Request as StarletteRequest

    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope.get("headers", ())}
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise ApiError("unsupported_media_type", f"the body must be multipart/form-data, sent as {media or 'no type'!r}",
                       field="headers.Content-Type", allowed="Content-Type: multipart/form-data")
    data = await read_body(headers, request.receive, max_body, read_timeout)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=1024 * 1024)
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException, HTTPException (too many parts)
        raise ApiError("bad_request", f"the multipart body cannot be read ({getattr(exc, 'detail', exc)})",
                       allowed=f"multipart/form-data with at most {MAX_FORM_FILES} files and "
                               f"{MAX_FORM_FIELDS} fields") from None
    fields: dict[str, Any] = {}
    files: dict[str, list] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                files.setdefault(name, []).append(await value.read())
    finally:
        await form.close()
    return fields, files


def _decode_json(data: bytes) -> Any:
    """The decoded body under the shape limits (nesting depth, key count); raises :class:`ApiError`."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ApiError("bad_request", "the body is JSON nested too deeply",
                       allowed=f"at most {MAX_JSON_DEPTH} levels of nesting") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("bad_request", f"the body is not valid JSON ({exc})", allowed="a JSON object") from None
    # too deep a nesting (400), NaN/Infinity or a lone surrogate anywhere, even in an ignored field (422 naming it)
    check_body(value, "bad_request", prefix="the body is JSON ")
    error = too_many_keys(value)
    if error is not None:
        raise error
    return value


def parse_api_auth(value: str | Iterable[str] | None) -> tuple[tuple[str, str], ...]:
    """The webui's ``--api-auth user:pass[,user2:pass2]`` as (user, password) pairs; a malformed entry is a
    ValueError naming it (without its password)."""
    if not value:
        return ()
    if not isinstance(value, str) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return tuple(value)  # already parsed
    entries = value.split(",") if isinstance(value, str) else [e for v in value for e in v.split(",")]
    pairs = []
    for entry in entries:
        entry = entry.strip()
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: {user or entry[:20]!r} is not user:password (give user:password, "
                             "several separated by commas)")
        pairs.append((user, password))
    return tuple(pairs)


class _AuthMiddleware:
    """Pure ASGI: on every path but /health and the static page and docs files (api_compat.page), requires a valid credential: the API key (``Authorization: Bearer
    KEY`` or ``X-API-Key: KEY``) or, with ``--api-auth``, HTTP Basic ``user:password`` as the webui does. Either
    credential admits to every route (/scc and /sdapi alike)."""

    def __init__(self, app, api_key: str | None, basic: Iterable[tuple[str, str]] = ()):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.basic = tuple(f"{u}:{p}".encode() for u, p in basic)

    def _admitted(self, scope) -> bool:
        import base64
        import binascii

        ok = False
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key" and self.key is not None:
                ok |= hmac.compare_digest(value, self.key)
            elif name == b"authorization":
                scheme, _, token = value.partition(b" ")
                scheme, token = scheme.lower(), token.strip()
                if scheme == b"bearer" and self.key is not None:
                    ok |= hmac.compare_digest(token, self.key)
                elif scheme == b"basic" and self.basic:
                    try:
                        given = base64.b64decode(token, validate=True)
                    except (binascii.Error, ValueError):
                        continue
                    # every pair is compared (no early exit on a match)
                    ok |= any([hmac.compare_digest(given, pair) for pair in self.basic])
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or is_public(scope.get("path", "")) or self._admitted(scope):
            return await self.app(scope, receive, send)
        ways = [w for w, on in (("Authorization: Bearer KEY or X-API-Key: KEY", self.key is not None),
                                ("HTTP Basic user:password (--api-auth)", bool(self.basic))) if on]
        challenge = b'Basic realm="sdengine"' if self.basic else b"Bearer"
        error = ApiError("unauthorized", "valid credentials are required", allowed=" or ".join(ways))
        if str(scope.get("path", "")).startswith("/v1/"):  # the OpenAI face answers in OpenAI's error shape
            from api_compat.openai_images import openai_error_body

            body = json.dumps(openai_error_body(error)[1]).encode()
        else:
            body = json.dumps(error.to_dict()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})


class _ApiRoutes:
    """The high-rate routes as plain ASGI (POST /scc/sd_txt2img, /scc/sd_img2img, /scc/sd_get_result, /scc/sd_cancel): read the
    body under the size limit, call the service, answer JSON. FastAPI's routing, dependency solving and
    encoders cost about as much as the whole submit, so these skip them; everything else goes to ``app``."""

    def __init__(self, app, service: TaskService, max_body_bytes: int, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 heavy: HeavyWork | None = None, storage: StorageWatch | None = None):
        self.app = app
        self.storage = storage
        self.service = service
        self.max_body = max_body_bytes
        self.read_timeout = read_timeout
        self.heavy = heavy or HeavyWork()
        self.routes = {"/scc/sd_txt2img": self._submit, "/scc/sd_img2img": self._submit_img2img,
                       "/scc/sd_get_result": self._result, "/scc/sd_cancel": self._cancel}

    async def __call__(self, scope, receive, send):
        handler = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if handler is None:
            return await self.app(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise ApiError("method_not_allowed", f"use POST for {scope['path']}", allowed="POST")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            check_json_media(headers)
            offload = self.heavy.bound(scope)
            body, size = await self._read_json(headers, receive, offload)
            if size > HEAVY_BODY or (isinstance(body, dict) and "alwayson_scripts" in body):
                # image decoding (or an allowed URL fetch) must not stall the other requests, nor take the
                # shared pool's threads from them (api_compat.guard)
                answer = await offload(handler, body, headers, scope)
            else:
                answer = handler(body, headers, scope)
            status = 200
        except ApiError as exc:
            status, answer = exc.http_status, self.service.public_paths.value(exc.to_dict())
        except Exception as exc:  # a full disk, or a bug; still answer in JSON
            mapped = self.storage.error(exc) if self.storage is not None else None
            if mapped is not None:
                status, answer = mapped.http_status, mapped.to_dict()
            else:
                log.exception("internal error on %s", scope.get("path"))
                status, answer = 500, {"error": {"code": "internal_error", "message": type(exc).__name__,
                                                 "field": None, "allowed": None}}
        await _answer(send, status, answer)

    async def _read_json(self, headers: dict[str, str], receive, offload=None) -> tuple[Any, int]:
        return await read_json_body(headers, receive, self.max_body, self.read_timeout, offload)

    async def read_request(self, request) -> Any:
        """A FastAPI/Starlette ``request``'s JSON body under the same rules as the /scc routes (JSON content
        type, size limit, body deadline, nesting depth); raises :class:`ApiError`."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope.get("headers", ())}
        check_json_media(headers)
        return (await self._read_json(headers, request.receive, self.heavy.bound(request)))[0]

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
        if not host or not host_syntax_ok(host):
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        base = f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"
        return {**result, "images": [f"{base}/scc/images/{result['taskId']}/{i}.png" for i in range(count)]}

    def _submit(self, body, headers, scope):
        return self.service.sd_txt2img(body, headers)

    def _submit_img2img(self, body, headers, scope):
        return self.service.sd_img2img(body, headers)

    def _result(self, body, headers, scope):
        return self._with_urls(self.service.sd_get_result(self._query(body)), headers, scope)

    def _cancel(self, body, headers, scope):
        return self._with_urls(self.service.cancel(self._query(body)), headers, scope)


_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"taskId": {"type": "string"}}, "required": ["taskId"]}}}}
_ERROR = {"description": "error: {error: {code, message, field, allowed}, errors: [...]}"}


def _openapi_paths() -> dict[str, Any]:
    """OpenAPI entries of the routes served by :class:`_ApiRoutes`."""
    errors = {str(code): _ERROR for code in (400, 401, 403, 404, 408, 413, 415, 422, 429)}
    return {
        "/scc/sd_txt2img": {"post": {
            "summary": "Submit a text-to-image task", "operationId": "sd_txt2img",
            "parameters": [{"name": CONFIG_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                            "description": "selects a named engine configuration"}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Txt2ImgPayload"}}}},
            "responses": {"200": {"description": '{"taskId", "status"}'}, **errors}}},
        "/scc/sd_img2img": {"post": {
            "summary": "Submit an image-to-image (or inpainting) task", "operationId": "sd_img2img",
            "parameters": [{"name": CONFIG_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                            "description": "selects a named engine configuration"}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Img2ImgPayload"}}}},
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


def create_app(service: TaskService, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               close_service: bool = False, allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES,
               cors_origins: Iterable[str] = (), read_timeout: float = DEFAULT_READ_TIMEOUT,
               api_auth: str | Iterable | None = None, freeze_settings: bool = False):
    """The ASGI app over ``service``. ``close_service`` closes the service when the app shuts down.

    ``api_key`` and ``api_auth`` (the webui's ``user:pass[,user2:pass2]``, HTTP Basic) protect every route but
    /health; with both, either credential admits. Without either, the webui options (POST /sdapi/v1/options:
    server-wide, persistent) are written by loopback clients only. ``freeze_settings`` (the webui's flag): the
    webui options are read-only (POST /sdapi/v1/options answers 403). The webui's own routes (/sdapi/v1/..., /controlnet/...:
    :mod:`api_compat.webui`) are served beside /scc/... over the same service.

    ``allowed_hosts``: the names the ``Host`` header may carry (default: the loopback names; see
    :func:`allowed_hosts_for`; None checks nothing, e.g. behind a proxy that does). ``cors_origins``: web
    origins (``https://app.example``, or "*") allowed to call the API cross-site; any other ``Origin`` is
    refused. ``read_timeout``: seconds a request body may take."""
    require("fastapi", "server", "The HTTP server (sdengine serve)")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    heavy = HeavyWork()
    storage = StorageWatch(service.results_dir)

    @asynccontextmanager
    async def lifespan(app):
        yield
        heavy.close()
        if close_service:
            service.close()

    app = FastAPI(title="sdengine", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The sd_txt2img / sd_get_result task API (webui txt2img payload + ControlNet), and the "
                              "webui's own API (/sdapi/v1/..., /controlnet/...; docs/WEBUI_API.md). Every field, "
                              "default, range and error of the task API: docs/API.md in the sdengine repository.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(service.public_paths.value(exc.to_dict()), status_code=exc.http_status)

    async def _storage_error(request: Request, exc: Exception):  # a full or failing results disk (webui routes)
        mapped = storage.error(exc)
        if mapped is None:
            log.error("internal error on %s", request.url.path, exc_info=exc)
            body = {"error": {"code": "internal_error", "message": type(exc).__name__, "field": None,
                              "allowed": None}}
            return JSONResponse(body, status_code=500)
        return JSONResponse({**mapped.to_dict(), "detail": str(mapped)}, status_code=mapped.http_status)

    app.add_exception_handler(sqlite3.DatabaseError, _storage_error)
    app.add_exception_handler(OSError, _storage_error)

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

    @app.get("/health", summary="Liveness, queue depth, results disk (status ok, degraded, closed ...)")
    async def health():
        return storage.health(service.health())

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("paths", {}).update(_openapi_paths())
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (Txt2ImgPayload, Img2ImgPayload):
                payload = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(payload.pop("$defs", {}))
                components[model.__name__] = payload
            annotate_openapi(components)  # each field's meaning, and the pointer to docs/API.md
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    add_page_routes(app)  # /, /docs, /redoc: static files from the package (no CDN)
    asgi = _ApiRoutes(app, service, max_body_bytes, read_timeout, heavy, storage)
    from api_compat.webui import webui_router

    basic = parse_api_auth(api_auth)
    app.include_router(webui_router(service, asgi.read_request, freeze_settings=freeze_settings,
                                    authenticated=bool(api_key or basic), heavy=heavy))
    from api_compat.openai_images import openai_router

    app.include_router(openai_router(service, asgi.read_request,
                                     lambda request: read_form_body(request, max_body_bytes, read_timeout), heavy))
    if api_key or basic:
        asgi = _AuthMiddleware(asgi, api_key, basic)
    return _SiteGuard(asgi, allowed_hosts, cors_origins)
