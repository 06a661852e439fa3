"""The AUTOMATIC1111 webui's own HTTP API (``/sdapi/v1/...``) and the sd-webui-controlnet extension's routes
(``/controlnet/...``), so that clients written for the webui work unchanged (docs/WEBUI_API.md lists the routes).

They are a second face of the same :class:`~api_compat.service.TaskService` as ``/scc/...``. api_compat
translates; it does not compute: the webui payload becomes a ``/scc`` payload (:func:`webui_to_scc`: webui
defaults, nulls, the extension's unit spellings, the options as ``override_settings``), the rest is the
service's -- ``/controlnet/detect`` included, which runs its preprocessors as a task on the backend's worker.

- :mod:`~api_compat.webui.adapter`: webui payload -> /scc payload, /scc answer -> webui shapes (no state);
- :mod:`~api_compat.webui.options`: the options state (persisted) and the tasks the synchronous calls wait for;
- :mod:`~api_compat.webui.listings`: models, VAEs, LoRAs, embeddings, samplers, schedulers, upscalers ...;
- :mod:`~api_compat.webui.routes`: :class:`WebuiRoutes`, one method per ``/sdapi/v1`` route (FastAPI);
- :mod:`~api_compat.webui.controlnet`: :class:`ControlNetRoutes`, the ``/controlnet`` routes;
- :mod:`~api_compat.webui.adetailer`: :class:`ADetailerRoutes`, the ``/adetailer/v1`` routes.

The routes need the ``server`` extra (FastAPI); they are imported by :func:`webui_router` only.
"""

from __future__ import annotations

from api_compat.webui.adapter import (WEBUI_TXT2IMG_ECHO, png_info, webui_echo, webui_info, webui_parameters,
                                     webui_to_scc)
from api_compat.webui.options import WebuiState


def webui_router(service, read_json, freeze_settings: bool = False, authenticated: bool = True, heavy=None):
    """The FastAPI router of the webui and ControlNet routes over ``service``. ``read_json(request)`` reads a
    POST body with the server's rules (JSON content type, size limit, body deadline, nesting depth) -- the
    same reader as the /scc routes. ``freeze_settings``: POST /sdapi/v1/options is refused (403);
    ``authenticated``: every caller is authenticated (the server requires credentials), else only loopback
    clients may set options. ``heavy``: the :class:`api_compat.guard.HeavyWork` that submits run on (their
    validation decodes images), off the shared pool."""
    from api_compat.webui.adetailer import ADetailerRoutes
    from api_compat.webui.controlnet import ControlNetRoutes
    from api_compat.webui.routes import WebuiRoutes

    state = WebuiState(service, frozen=freeze_settings, authenticated=authenticated)
    router = WebuiRoutes(service, read_json, state, heavy).router()
    router = ControlNetRoutes(service, read_json, state, heavy).router(router)
    return ADetailerRoutes(service, read_json, state, heavy).router(router)


__all__ = ["webui_router", "webui_to_scc", "webui_echo", "webui_info", "webui_parameters", "png_info", "WebuiState",
           "WEBUI_TXT2IMG_ECHO"]
