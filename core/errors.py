"""Exceptions of the engine. Each names the field or file it is about."""

from __future__ import annotations


class SdEngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "engine_error"


class InvalidRequest(SdEngineError, ValueError):
    """A request field has a value the engine cannot use.

    ``field`` is the :class:`engine.request.GenerationRequest` path (``controlnet_units[1].weight``,
    ``hires.scale``, ``init.mask``), ``message`` what is wrong, ``allowed`` a short description of the allowed
    values. The API maps ``field`` back to the payload path of the face that received the request
    (``api_compat.errors.api_error_from``); the message is never parsed.
    """

    code = "invalid_request"

    def __init__(self, field: str, message: str, allowed: str | None = None):
        super().__init__(field, message, allowed)
        self.field = field
        self.message = message
        self.allowed = allowed

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text

    def at(self, field: str) -> "InvalidRequest":
        """The same error about another field (same class, message and allowed values)."""
        return type(self)(field, self.message, self.allowed)


class NotSupported(InvalidRequest):
    """A request field asks for a feature (a script, face restoration) this engine does not have: refused
    naming the field, as the leniency policy says (docs/DECISIONS.md)."""

    code = "not_supported"


class TooMuchMemory(InvalidRequest):
    """The request's estimated peak memory is over the budget (engine.memory); ``field`` names what to lower."""

    code = "too_much_memory"


class ModelError(SdEngineError):
    """A model file or folder cannot be resolved or loaded. ``path`` names it; ``field`` (when set) is the request
    field that named it, ``message`` what is wrong."""

    code = "model_error"

    def __init__(self, path: str, message: str, field: str | None = None):
        super().__init__(str(path), message, field)
        self.path = str(path)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.path}: {self.field}: {self.message}"
        return f"{self.path}: {self.message}"


class ModelNotFound(ModelError):
    code = "model_not_found"


class UnsafeModelPath(ModelError):
    code = "unsafe_model_path"


class MissingDependency(SdEngineError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    code = "missing_dependency"

    def __init__(self, module: str, extra: str, purpose: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python module '{module}', which is not installed. "
            f"Install it with: pip install 'sdengine[{extra}]'"
        )


class BackendUnavailable(SdEngineError):
    """The requested backend or execution provider cannot run on this machine."""

    code = "backend_unavailable"


class Cancelled(SdEngineError):
    """Generation was cancelled between steps."""

    code = "cancelled"
