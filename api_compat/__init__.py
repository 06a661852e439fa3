"""The sd_txt2img / sd_get_result contract: schema, translation, task store, LocalService, HTTP, CLI.

``from api_compat import LocalService, ApiError``. Submodules are imported on first use (nothing at import
time); the HTTP server needs the ``server`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api_compat.errors import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from api_compat.engine_api import EngineLike
    from api_compat.service import LocalService

__all__ = ["ApiError", "EngineLike", "LocalService"]


def __getattr__(name: str):
    if name == "LocalService":
        from api_compat.service import LocalService

        return LocalService
    if name == "EngineLike":
        from api_compat.engine_api import EngineLike

        return EngineLike
    raise AttributeError(name)
