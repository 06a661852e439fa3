"""Exceptions of the engine. Each names the field or file it is about."""

from __future__ import annotations


class SdEngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "engine_error"


class InvalidRequest(SdEngineError, ValueError):
    """A request field has a value the engine cannot use.

    ``field`` is the payload path (``alwayson_scripts.controlnet.units[1].weight``), ``allowed`` a short
    description of the allowed values.
    """

    code = "invalid_request"

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class TooMuchMemory(InvalidRequest):
    """The request's estimated peak memory is over the budget (engine.memory); ``field`` names what to lower."""

    code = "too_much_memory"


class ModelError(SdEngineError):
    """A model file or folder cannot be resolved or loaded. ``path`` names it."""

    code = "model_error"

    def __init__(self, path: str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


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
