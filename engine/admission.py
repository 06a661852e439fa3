"""What the engine checks about a request before it is queued, from the model's file headers and tokenizer
alone (no model loaded): every accepted request is one that can run (issue 12). The API's submit calls
:func:`check_request`; the rules themselves live in their rooms (engine.conditioning for prompt length,
engine.memory for the budget, the model's configs for clip_skip) and are not restated here.
"""

from __future__ import annotations

from engine.config import EngineConfig
from core.errors import InvalidRequest, ModelError, TooMuchMemory
from engine.conditioning import check_prompts
from engine.img2img import hires_size
from engine.memory import architecture_of, estimate, largest_batch, largest_fitting
from engine.models.family import FAMILIES, Arch
from engine.request import GenerationRequest

GIB = 2**30


def check_request(store, config: EngineConfig, request: GenerationRequest, budget: int | None = None) -> None:
    """Raise what the worker would raise about ``request`` on ``config``'s engine, before it runs:
    InvalidRequest for a ``clip_skip`` beyond the model's text-encoder layers and for prompts longer than
    ``config.max_prompt_chunks`` (tokenised with the model's tokenizer); :class:`TooMuchMemory` naming
    ``width``/``height`` or ``batch_size`` and the largest that fits when the estimated peak is over ``budget``
    bytes (None: no budget). A model the store cannot resolve, or whose architecture its headers do not tell,
    is left to the model check and the engine."""
    try:
        entry = store.resolve(request.model) if request.model else store.default_checkpoint(config.default_model)
    except (InvalidRequest, ModelError):
        return
    found = architecture_of(entry.path)
    if found is None:
        return
    arch, native = found
    if arch.text_layers is not None and request.clip_skip > arch.text_layers:
        # the text encoder has no such layer (it failed in the worker, an ONNX Gather out of range)
        raise InvalidRequest("clip_skip", f"{request.clip_skip} is more than the {arch.text_layers} layers of the "
                             f"text encoder of {entry.name}", f"an integer from 1 to {arch.text_layers}")
    spec = _text_spec(arch.family)
    if spec is not None:
        check_prompts(spec, request.prompt, request.negative_prompt, request.steps, config.max_prompt_chunks)
    if budget is not None:
        check_memory(arch, native, entry.name, config, request, budget)


def _text_spec(family: str | None):
    try:
        return FAMILIES[Arch(family)].text if family else None
    except (ValueError, KeyError):
        return None


def check_memory(arch, native: int, model_name: str, config: EngineConfig, request: GenerationRequest,
                 budget: int) -> None:
    """TooMuchMemory when ``request``'s estimated peak (engine.memory, with the config's backend and VAE tiling)
    is over ``budget`` bytes, naming ``batch_size`` when a smaller batch fits at this size, else ``width`` (or
    ``height``) with the largest size of the same aspect ratio that fits."""
    width, height = request.width or native, request.height or native
    backend = getattr(config.backend, "value", str(config.backend))
    options = {"cfg": request.cfg_scale != 1.0, "backend": backend, "tiling": config.vae_tiling}
    need = estimate(arch, width, height, request.batch_size, **options)
    if need.total <= budget:
        if getattr(request, "hires", None) is not None:
            _check_hires_memory(arch, model_name, request, width, height, budget, options)
        return
    text = (f"{width}x{height} with batch_size {request.batch_size} needs about {need.total / GIB:.1f} GiB on "
            f"{backend} (model {model_name}), more than this server's memory budget of {budget / GIB:.1f} GiB")
    batch = largest_batch(arch, width, height, budget, limit=request.batch_size, **options)
    if request.batch_size > 1 and batch >= 1:
        raise TooMuchMemory("batch_size", text, f"batch_size at most {batch} at {width}x{height}")
    size = largest_fitting(arch, width, height, request.batch_size, budget, **options)
    allowed = (f"width x height at most {size[0]}x{size[1]} at batch_size {request.batch_size}" if size
               else "none at this batch size: the model alone does not fit the budget")
    field = "width" if request.width is not None or request.height is None else "height"
    raise TooMuchMemory(field, text, allowed)


def _check_hires_memory(arch, model_name: str, request: GenerationRequest, width: int, height: int, budget: int,
                        options: dict) -> None:
    """The hires fix's second pass, at its own size, within the budget; else TooMuchMemory naming hr_scale
    (or hires.resize_x/y) with the largest that fits."""
    size = hires_size(width, height, request.hires)
    need = estimate(arch, size.width, size.height, request.batch_size, **options)
    if need.total <= budget:
        return
    fits = largest_fitting(arch, size.width, size.height, request.batch_size, budget, **options)
    if fits and size.field == "hires.scale":
        allowed = f"hr_scale at most {fits[0] / width:.2f} ({fits[0]}x{fits[1]}) for {width}x{height}"
    elif fits:
        allowed = f"a second pass of at most {fits[0]}x{fits[1]}"
    else:
        allowed = "none at this batch size"
    raise TooMuchMemory(size.field, f"the hires fix's second pass at {size.width}x{size.height} with batch_size "
                        f"{request.batch_size} needs about {need.total / GIB:.1f} GiB (model {model_name}), more "
                        f"than this server's memory budget of {budget / GIB:.1f} GiB", allowed)
