"""The API's error type: a code, the field it is about, the allowed values, and the HTTP status it maps to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import InvalidRequest, ModelError

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
    "forbidden": 403,
    "request_timeout": 408,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "not_found": 404,
    "expired": 410,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "queue_full": 429,
    "too_much_memory": 422,
    "timed_out": 504,  # a task stopped by the server's --max-task-seconds (the webui routes answer it so)
    "closed": 503,
    "missing_dependency": 503,
    "backend_unavailable": 503,
    "storage_unavailable": 503,
    "storage_full": 507,
    # codes of a failed task, as the synchronous webui routes answer them (sd_get_result: 200, status failed)
    "model_error": 422,  # the request's model (or VAE, ControlNet ...) cannot be loaded: name another
    "worker_lost": 503,  # its runs died max_attempts times
    "interrupted": 503,  # left by a version that kept no payload to run it again
    "internal_error": 500,
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


def payload_path(field: str | None, origins: Mapping[str, str] | None) -> str | None:
    """The payload path a request path (``controlnet_units[1].model``, ``hires.scale``) came from, by the
    field-origin map of the face that received the request (``api_compat.translate.field_origins``: request path
    -> payload path; the webui's options face maps the probe's paths to its options). The longest entry that is
    the path or a parent of it wins (``controlnet_units[0]`` maps ``controlnet_units[0].weight``); a path with no
    entry is the same in the payload. The one place an engine error's field is put into a face's terms."""
    if not field or not origins:
        return field
    if field in origins:
        return origins[field]
    for end in range(len(field) - 1, 0, -1):
        if field[end] in ".[" and field[:end] in origins:
            return origins[field[:end]] + field[end:]
    return field


def api_error_from(exc, origins: Mapping[str, str] | None = None) -> ApiError:
    """An ``core.errors.InvalidRequest`` (field, message, allowed) as an :class:`ApiError` with the same parts,
    its field put into the payload's terms (:func:`payload_path`)."""
    return ApiError(exc.code, exc.message, field=payload_path(exc.field, origins), allowed=exc.allowed)


def in_payload_terms(exc: BaseException, origins: Mapping[str, str] | None) -> BaseException:
    """An engine error about a request field (InvalidRequest, ModelError) as the same error about the payload's
    field (what a failed task reports); any other exception as it is."""
    field = getattr(exc, "field", None)
    mapped = payload_path(field, origins)
    if mapped == field:
        return exc
    if isinstance(exc, InvalidRequest):
        return exc.at(mapped)
    if isinstance(exc, ModelError):
        return type(exc)(exc.path, exc.message, mapped)
    return exc
