"""The browser page at ``/`` and the offline API docs at ``/docs`` and ``/redoc`` (the ``server`` extra).

The page is three static files in ``api_compat/static/page/`` (HTML, plain JS, CSS: no build step, nothing
from a CDN). It is a client like any other: it calls the webui routes (/sdapi/v1/..., /controlnet/...) with the
API key the user types (kept in the browser's localStorage, sent as ``X-API-Key``). The files themselves hold
no data, so they, like /health, are served without credentials (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIXES`).

Swagger UI and ReDoc load their JavaScript and CSS from the ``fastapi-offline`` package (MIT; it ships the
swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js that FastAPI would fetch from a CDN); the two
HTML pages are written here so that both send the page's stored API key when they fetch /openapi.json.
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the local import

import json
from pathlib import Path

from core.lazy import require

PAGE_DIR = Path(__file__).resolve().parent / "static" / "page"
PAGE_PREFIX = "/page/"
DOCS_ASSETS_PREFIX = "/docs-assets/"
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico", "/docs", "/redoc"})
PUBLIC_PREFIXES = (PAGE_PREFIX, DOCS_ASSETS_PREFIX)
KEY_STORAGE = "sdengine.apiKey"  # the localStorage entry the page writes and the docs pages read

_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# the page runs only its own files; images may be data: (results, previews) and blob: (uploads)
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def is_public(path: str) -> bool:
    """Whether ``path`` is served without credentials (the page, the docs pages and their static files: one
    file name after the prefix, nothing that could resolve elsewhere)."""
    if path in PUBLIC_PATHS:
        return True
    prefix = next((p for p in PUBLIC_PREFIXES if path.startswith(p)), None)
    name = path[len(prefix):] if prefix else ""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def docs_assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js (the fastapi-offline package)."""
    offline = require("fastapi_offline", "server", "The offline API docs (/docs, /redoc)")
    return Path(offline.__file__).resolve().parent / "static"


def _files(folder: Path) -> dict[str, Path]:
    """The servable files of ``folder`` by name (a fixed list: a request cannot name anything else)."""
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in _MEDIA}


def _swagger_html(openapi_url: str) -> str:
    key = json.dumps(KEY_STORAGE)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sdengine - Swagger UI</title>
<link rel="stylesheet" href="{DOCS_ASSETS_PREFIX}swagger-ui.css">
<link rel="icon" href="{DOCS_ASSETS_PREFIX}favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="{DOCS_ASSETS_PREFIX}swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({{url: {json.dumps(openapi_url)}, dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  requestInterceptor: function (req) {{  /* the API key the page at / stored */
    var k = window.localStorage.getItem({key}); if (k) req.headers["X-API-Key"] = k; return req; }}}});
</script></body></html>"""


def _redoc_html(openapi_url: str) -> str:
    key = json.dumps(KEY_STORAGE)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sdengine - ReDoc</title>
<link rel="icon" href="{DOCS_ASSETS_PREFIX}favicon.png"></head>
<body><div id="redoc"></div>
<script src="{DOCS_ASSETS_PREFIX}redoc.standalone.js"></script>
<script>
var k = window.localStorage.getItem({key});
fetch({json.dumps(openapi_url)}, {{headers: k ? {{"X-API-Key": k}} : {{}}}})
  .then(function (r) {{ if (!r.ok) throw new Error("GET /openapi.json: HTTP " + r.status +
      (r.status === 401 ? " (this server needs an API key: enter it on the page at /)" : "")); return r.json(); }})
  .then(function (spec) {{ Redoc.init(spec, {{}}, document.getElementById("redoc")); }})
  .catch(function (e) {{ document.getElementById("redoc").textContent = String(e.message || e); }});
</script></body></html>"""


def add_page_routes(app) -> None:
    """Registers ``/``, ``/page/{name}``, ``/docs``, ``/redoc`` and ``/docs-assets/{name}`` on the FastAPI
    ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    from fastapi.responses import FileResponse, HTMLResponse, Response

    from api_compat.errors import ApiError

    page_files = _files(PAGE_DIR)
    asset_files = _files(docs_assets_dir())
    openapi_url = app.openapi_url or "/openapi.json"

    def static(files: dict[str, Path], name: str, csp: str | None = None):
        path = files.get(name)
        if path is None:
            raise ApiError("not_found", "no such file", field="path", allowed=", ".join(sorted(files)))
        headers = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}
        if csp:
            headers["content-security-policy"] = csp
        return FileResponse(path, media_type=_MEDIA[path.suffix], headers=headers)

    @app.get("/", include_in_schema=False)
    async def page_index():
        return static(page_files, "index.html", PAGE_CSP)

    @app.get(PAGE_PREFIX + "{name}", include_in_schema=False)
    async def page_file(name: str):
        return static(page_files, name, PAGE_CSP)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get(DOCS_ASSETS_PREFIX + "{name}", include_in_schema=False)
    async def docs_asset(name: str):
        return static(asset_files, name)

    @app.get("/docs", include_in_schema=False)
    async def swagger():
        return HTMLResponse(_swagger_html(openapi_url))

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return HTMLResponse(_redoc_html(openapi_url))
