"""Where api_compat meets the engine: the engine protocol and factory, and the model-store check at submit.

Sampler and preprocessor names are checked by the engine's own registries (``engine.samplers.resolve``,
``engine.controlnet.preprocessors.get_preprocessor``, called from :mod:`api_compat.translate`); model names
by the engine's :class:`engine.models.store.ModelStore`, so a payload the API accepts is one the engine
can run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.errors import InvalidRequest, ModelError
from engine.request import GenerationRequest, GenerationResult

from api_compat.errors import ApiError, api_error_from

ProgressFn = Callable[[int, int], None]


@runtime_checkable
class EngineLike(Protocol):
    """What the task workers drive: ``engine.pipeline.Engine``, or anything with the same ``generate``.

    ``generate`` raises ``engine.errors.Cancelled`` when ``cancel`` is set, ``InvalidRequest``/``ModelError``
    for bad input; any other exception is an internal error of that task.
    """

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...


EngineFactory = Callable[[EngineConfig], EngineLike]


def default_engine_factory(config: EngineConfig) -> EngineLike:
    """The real engine: ``engine.pipeline.Engine(config)`` (imported when the first task runs)."""
    from engine.pipeline import Engine

    return Engine(config)


# ---------------------------------------------------------------------------------------------- model store
def check_models(store, models: Iterable[tuple]) -> None:
    """Resolve each ``(Kind, name, field path)`` in ``store`` (an ``engine.models.store.ModelStore``); the first
    name it cannot resolve raises :class:`ApiError` (``model_not_found`` or ``unsafe_model_path``, with the
    field path and the names the store holds)."""
    for kind, name, field in models:
        try:
            store.resolve(name, kind, field=field)
        except InvalidRequest as exc:
            raise api_error_from(exc) from None
        except ModelError as exc:
            message = str(exc).removeprefix(f"{exc.path}: ").removeprefix(f"{field}: ")
            raise ApiError(exc.code, f"{name!r}: {message}", field=field,
                           allowed=f"a {kind.value} name from the model store") from None



# --------------------------------------------------------------------------------------------- memory budget
def check_memory(store, config: EngineConfig, request: GenerationRequest, budget: int | None) -> None:
    """Refuse a ``clip_skip`` beyond the model's text-encoder layers; refuse (ApiError ``too_much_memory``, naming width/height or batch_size and the largest that fits) a
    request whose estimated peak memory (``engine.memory``) is over ``budget`` bytes. Nothing is checked
    without a budget, a store, or when the model's architecture cannot be read from its headers."""
    if store is None:
        return
    from engine.memory import architecture_of, estimate, largest_batch, largest_fitting

    try:
        entry = store.resolve(request.model) if request.model else store.default_checkpoint(config.default_model)
    except (InvalidRequest, ModelError):
        return  # check_models (or the engine) reports it
    found = architecture_of(entry.path)
    if found is None:
        return
    arch, native = found
    if arch.text_layers is not None and request.clip_skip > arch.text_layers:
        # the text encoder has no such layer (it failed in the worker, an ONNX Gather out of range)
        raise ApiError("invalid_request", f"{request.clip_skip} is more than the {arch.text_layers} layers of the "
                       f"text encoder of {entry.name}", field="clip_skip",
                       allowed=f"an integer from 1 to {arch.text_layers} (also for "
                               "override_settings.CLIP_stop_at_last_layers)")
    if budget is None:
        return
    width, height = request.width or native, request.height or native
    backend = getattr(config.backend, "value", str(config.backend))
    options = {"cfg": request.cfg_scale != 1.0, "backend": backend, "tiling": config.vae_tiling}
    need = estimate(arch, width, height, request.batch_size, **options)
    if need.total <= budget:
        return
    gib = 2**30
    text = (f"{width}x{height} with batch_size {request.batch_size} needs about {need.total / gib:.1f} GiB on "
            f"{backend} (model {entry.name}), more than this server's memory budget of {budget / gib:.1f} GiB")
    batch = largest_batch(arch, width, height, budget, limit=request.batch_size, **options)
    if request.batch_size > 1 and batch >= 1:
        raise ApiError("too_much_memory", text, field="batch_size",
                       allowed=f"batch_size at most {batch} at {width}x{height}")
    size = largest_fitting(arch, width, height, request.batch_size, budget, **options)
    allowed = (f"width x height at most {size[0]}x{size[1]} at batch_size {request.batch_size}" if size
               else "none at this batch size: the model alone does not fit the budget")
    field = "width" if request.width is not None or request.height is None else "height"
    raise ApiError("too_much_memory", text, field=field, allowed=allowed)
