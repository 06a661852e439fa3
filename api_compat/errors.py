"""The API's error type: a code, the field it is about, the allowed values, and the HTTP status it maps to."""

from __future__ import annotations

from typing import Any

# code -> HTTP status
HTTP_STATUS = {
    "invalid_request": 422,
    "not_supported": 422,
    "unknown_field": 422,
    "model_not_found": 422,
    "unsafe_model_path": 422,
    "unknown_config": 422,
    "bad_request": 400,
    "invalid_host": 400,
    "forbidden_origin": 403,
    "request_timeout": 408,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "not_found": 404,
    "expired": 410,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "queue_full": 429,
    "too_much_memory": 422,
    "closed": 503,
    "missing_dependency": 503,
    "backend_unavailable": 503,
}


class ApiError(Exception):
    """A request the API refuses, raised at submit (nothing is queued) or when a task is looked up.

    ``code`` is machine-readable (``invalid_request``, ``not_supported``, ``unknown_field``, ``queue_full``,
    ``not_found`` ...), ``field`` the payload path (``alwayson_scripts.controlnet.units[1].weight``),
    ``allowed`` a short description of the allowed values, ``errors`` every problem found (dicts of the same
    keys), ``http_status`` the status code the HTTP server answers with.
    """

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        allowed: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ):
        self.code = code
        self.field = field
        self.allowed = allowed
        self.message = message
        self.errors = errors or [{"code": code, "field": field, "message": message, "allowed": allowed}]
        self.http_status = HTTP_STATUS.get(code, 400)
        text = f"{field}: {message}" if field else message
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)

    def to_dict(self) -> dict[str, Any]:
        """JSON body of the HTTP error answer."""
        return {
            "error": {"code": self.code, "message": str(self), "field": self.field, "allowed": self.allowed},
            "errors": self.errors,
        }


def api_error_from(exc) -> ApiError:
    """An ``core.errors.InvalidRequest`` (field, message, allowed) as an :class:`ApiError` with the same parts."""
    message = str(exc)
    if exc.field and message.startswith(f"{exc.field}: "):
        message = message[len(exc.field) + 2:]
    if exc.allowed and message.endswith(f" (allowed: {exc.allowed})"):
        message = message[: -len(f" (allowed: {exc.allowed})")]
    return ApiError(exc.code, message, field=exc.field, allowed=exc.allowed)
