"""Where api_compat meets the engine: the engine protocol and factory, and the model-store check at submit.

Sampler and preprocessor names are checked by the engine's own registries (``engine.samplers.resolve``,
``engine.controlnet.preprocessors.get_preprocessor``, called from :mod:`api_compat.translate`); model names
by the engine's :class:`engine.models.store.ModelStore`, so a payload the API accepts is one the engine
can run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from engine.config import EngineConfig
from core.errors import InvalidRequest, ModelError
from engine.request import GenerationRequest, GenerationResult

from api_compat.errors import ApiError, api_error_from, payload_path

# progress(engine.progress.Progress) per phase and step; the old progress(done, total) of sampling steps is
# accepted from engines that call it so (the service handles both)
ProgressFn = Callable[..., None]


@runtime_checkable
class EngineLike(Protocol):
    """What the task workers drive: ``engine.pipeline.Engine``, or anything with the same ``generate``.

    ``generate`` raises ``core.errors.Cancelled`` when ``cancel`` is set, ``InvalidRequest``/``ModelError``
    for bad input; any other exception is an internal error of that task. A request with ``live_preview`` set is
    also handed ``preview=`` (``preview(step, image)``: engine.preview) when ``generate`` takes that parameter; an
    engine without it simply makes no previews.
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
def check_models(store, models: Iterable[tuple], origins: Mapping[str, str] | None = None,
                 allow_pickle: bool = False) -> None:
    """Resolve each ``(Kind, name, request path)`` in ``store`` (an ``engine.models.store.ModelStore``); the first
    name it cannot resolve raises :class:`ApiError` (``model_not_found`` or ``unsafe_model_path``, with the
    payload path (``origins``: api_compat.translate.field_origins) and the names the store holds). A file the
    engine would refuse to read raises ``model_error`` naming the file and why: a pickle (``.ckpt``, ``.pt`` ...)
    of any kind without ``allow_pickle`` (the configuration's opt-in), a LoRA of a kind or format the engine
    does not apply, from its header (LyCORIS kinds, foreign formats: engine.networks.files.lora_problem)."""
    from engine.models.checkpoints import pickle_refusal
    from engine.models.family import Kind
    from engine.networks.files import SUPPORTED_FORMATS, lora_problem

    for kind, name, field in models:
        try:
            entry = store.resolve(name, kind, field=field)
        except InvalidRequest as exc:
            raise api_error_from(exc, origins) from None
        except ModelError as exc:
            raise ApiError(exc.code, f"{name!r}: {exc.message}", field=payload_path(field, origins),
                           allowed=f"a {kind.value} name from the model store") from None
        # a file the engine refuses by its suffix or header: refused now, not when it runs
        if kind is Kind.LORA and (why := lora_problem(entry.path, allow_pickle)):
            raise ApiError(ModelError.code, f"<lora:{name}>: {entry.path.name}: {why}",
                           field=payload_path(field, origins), allowed=SUPPORTED_FORMATS)
        if why := pickle_refusal(entry.path, allow_pickle):
            raise ApiError(ModelError.code, f"{name!r}: {entry.path.name}: {why}", field=payload_path(field, origins),
                           allowed=f"a .safetensors {kind.value}, or a server with the pickle opt-in")


# --------------------------------------------------------------------------------------------- admission
def check_memory(store, config: EngineConfig, request: GenerationRequest, budget: int | None,
                 origins: Mapping[str, str] | None = None, *, answer: bool = False) -> None:
    """The engine's submit-time check (``engine.admission.check_request``: clip_skip, prompt length, the memory
    budget; ``answer``: the images are sent inline, as the webui route does) as :class:`ApiError`
    (``invalid_request`` / ``too_much_memory``, with the field and the allowed values). Nothing is checked
    without a store."""
    if store is None:
        return
    from engine.admission import check_request

    try:
        check_request(store, config, request, budget, answer=answer)
    except InvalidRequest as exc:
        raise api_error_from(exc, origins) from None
