"""The sd_txt2img / sd_get_result contract: schema, translation, TaskService over the task backends
(:mod:`api_compat.tasks`), HTTP (with the webui's own API, :mod:`api_compat.webui`), CLI.

``from api_compat import TaskService, ApiError``. Submodules are imported on first use (nothing at import
time); the HTTP server needs the ``server`` extra. ``LocalService`` is TaskService's old name (deprecated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api_compat.errors import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from api_compat.engine_api import EngineLike
    from api_compat.service import TaskService

__all__ = ["ApiError", "EngineLike", "TaskService"]


def __getattr__(name: str):
    if name in ("TaskService", "LocalService"):
        import api_compat.service

        return getattr(api_compat.service, name)  # LocalService: warns (DeprecationWarning)
    if name == "EngineLike":
        from api_compat.engine_api import EngineLike

        return EngineLike
    raise AttributeError(name)
