"""What the engine checks about a request before it is queued, from the model's file headers and tokenizer
alone (no model loaded): every accepted request is one that can run (issue 12). The API's submit calls
:func:`check_request`; the rules themselves live in their rooms (engine.conditioning for prompt length,
engine.memory for the budget, the model's configs for clip_skip) and are not restated here.
"""

from __future__ import annotations

from dataclasses import replace

from engine.config import EngineConfig
from core.errors import InvalidRequest, ModelError, TooMuchMemory
from engine.conditioning import check_prompts
from engine.img2img import LATENT_UPSCALERS, hires_size
from engine.memory import (DETECTOR_BYTES, PLAN_SIZES, UpscalerCost, architecture_of, estimate_request, largest_batch,
                           largest_fitting, model_upscaler_pass, resize_pass)
from engine import ip_adapter, upscalers
from engine.adetailer import inpaint_size
from engine.adetailer.detectors import Detectors
from engine.models.family import FAMILIES, Arch
from engine.refiner import check_second_checkpoint
from engine.request import GenerationRequest

GIB = 2**30


def check_request(store, config: EngineConfig, request: GenerationRequest, budget: int | None = None, *,
                  answer: bool = False) -> None:
    """Raise what the worker would raise about ``request`` on ``config``'s engine, before it runs:
    InvalidRequest for a ``clip_skip`` beyond the model's text-encoder layers and for prompts longer than
    ``config.max_prompt_chunks`` (tokenised with the model's tokenizer); :class:`TooMuchMemory` naming
    ``width``/``height`` or ``batch_size`` and the largest that fits when the estimated peak is over ``budget``
    bytes (None: no budget). A model the store cannot resolve, or whose architecture its headers do not tell,
    is left to the model check and the engine."""
    ip_adapter.check_units(store, request, config.allow_pickle)  # from the files' headers (engine.ip_adapter)
    check_token_merging(config, request)
    try:
        entry = store.resolve(request.model) if request.model else store.default_checkpoint(config.default_model)
    except (InvalidRequest, ModelError):
        return
    found = architecture_of(entry.path)
    if found is None:
        return
    arch, native = found
    alone = arch
    arch, second = _second_checkpoints(store, entry, arch, request)
    if arch.text_layers is not None and request.clip_skip > arch.text_layers:
        # the text encoder has no such layer (it failed in the worker, an ONNX Gather out of range)
        raise InvalidRequest("clip_skip", f"{request.clip_skip} is more than the {arch.text_layers} layers of the "
                             f"text encoder of {entry.name}", f"an integer from 1 to {arch.text_layers}")
    spec = _text_spec(arch.family)
    if spec is not None:
        check_prompts(spec, request.prompt, request.negative_prompt, request.steps, config.max_prompt_chunks)
    if budget is not None:
        extra = ip_adapter.memory_bytes(store, request)
        extra = {"extra_bytes": extra, "ip_tokens": ip_adapter.attention_tokens(store, request)}
        try:
            check_memory(arch, native, entry.name, config, request, budget, answer=answer, **extra)
        except TooMuchMemory as exc:
            if not second:
                raise
            check_memory(alone, native, entry.name, config, request, budget, answer=answer,  # the size's fault
                         **extra)
            raise TooMuchMemory(second[-1], f"{exc.message}, with {', '.join(second)} held beside the model",
                                "a server with a larger memory budget, or the request without it") from None


def _second_checkpoints(store, entry, arch, request: GenerationRequest):
    """The refiner and the hires checkpoint (engine.refiner): InvalidRequest naming ``refiner.checkpoint`` /
    ``hires.checkpoint`` for a checkpoint of another latent space than the model's; their weights are held beside
    the model's (engine.pipeline keeps the request's checkpoints resident), so the returned architecture counts
    them in its weights: ``(architecture, the fields of the checkpoints added)``."""
    added = []
    asked = (("refiner.checkpoint", request.refiner.checkpoint if request.refiner else None),
             ("hires.checkpoint", request.hires.checkpoint if request.hires else None))
    for field, name in asked:
        if not name:
            continue
        try:
            other = store.resolve(name, field=field)
        except (InvalidRequest, ModelError):
            continue  # the model check names it
        if other.path == entry.path:
            continue
        found = architecture_of(other.path)
        if found is None:
            continue
        base_arch = Arch(arch.family) if arch.family else None
        check_second_checkpoint(base_arch, Arch(found[0].family) if found[0].family else None, entry.name,
                                other.name, field, len(request.controlnet_units))
        arch = replace(arch, weights_bytes=arch.weights_bytes + found[0].weights_bytes)
        added.append(field)
    return arch, added


def check_token_merging(config: EngineConfig, request: GenerationRequest) -> None:
    """ToMe (token_merging_ratio / _hr) patches the torch UNet (tomesd); a backend that runs an exported graph
    cannot merge tokens: InvalidRequest naming the field and the backend (docs/DECISIONS.md)."""
    backend = getattr(config.backend, "value", str(config.backend))
    if backend == "torch":
        return
    hr = request.token_merging_ratio_hr if request.hires is not None else 0.0
    for field, ratio in (("token_merging_ratio", request.token_merging_ratio), ("token_merging_ratio_hr", hr)):
        if ratio:
            raise InvalidRequest(field, f"token merging (ToMe) runs on the torch backend only; this server runs "
                                 f"the {backend} backend", "0 (off) on this backend")


def _text_spec(family: str | None):
    try:
        return FAMILIES[Arch(family)].text if family else None
    except (ValueError, KeyError):
        return None


def _upscaler_cost(name: str, models_dir=None, tile: int = upscalers.DEFAULT_TILE) -> UpscalerCost | None:
    """What the hires fix's upscaler of that name costs (engine.memory): None for the latent upscalers (a
    resize of the latent, nothing to speak of); the PIL upscalers :func:`resize_pass`; a model upscaler of the
    store (engine.upscalers: spandrel) one pass at its scale over tiles of ``tile`` input pixels (the request's
    ESRGAN_tile; 0: the whole image), with its file's size as the weights
    (:func:`engine.memory.model_upscaler_pass`)."""
    if name in LATENT_UPSCALERS:
        return None
    entry = upscalers.find(name, models_dir)
    if entry is None:
        return resize_pass
    model = model_upscaler_pass(entry.scale, tile=tile, model_bytes=entry.path.stat().st_size)

    def cost(in_width: int, in_height: int, out_width: int, out_height: int, batch_size: int) -> int:
        # a pass makes the model's whole scale (then resized down to the target): count that size
        return model(in_width, in_height, max(out_width, in_width * entry.scale),
                     max(out_height, in_height * entry.scale), batch_size)

    return cost


def preprocessor_bytes(units) -> int:
    """The fp32 weights of the units' model-based preprocessors (each network counted once)."""
    from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS

    files = {}
    for unit in units:
        pre = PREPROCESSORS.get(ALIASES.get(unit.module, unit.module))
        if pre is not None and pre.model_based:
            files.update({w.name: w.size_mb for w in pre.fn.weights})
    return int(sum(files.values()) * 1024 * 1024)


def preprocessor_work(units, width: int, height: int) -> tuple[int, int | None]:
    """``(bytes, unit index)``: the largest working activations of the units' model-based preprocessors at the
    request's size (annotators.ModelRunner.work_bytes on each unit's padded working image; the units run one at a
    time), and which unit needs them (None: none grows with its image)."""
    from engine.controlnet import unit_sizes
    from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS

    best, which = 0, None
    for k, unit in enumerate(units):
        pre = PREPROCESSORS.get(ALIASES.get(unit.module, unit.module))
        if pre is None or not pre.model_based or getattr(unit, "image", None) is None:
            continue
        stages = {stage: (h, w) for stage, h, w in unit_sizes(unit, width, height)}
        need = pre.fn.work_bytes(*stages["preprocessor"])
        if need > best:
            best, which = need, k
    return best, which


def check_memory(arch, native: int, model_name: str, config: EngineConfig, request: GenerationRequest,
                 budget: int, *, answer: bool = False, upscaler_cost=_upscaler_cost, extra_bytes: int = 0,
                 ip_tokens: int = 0) -> None:
    """TooMuchMemory when ``request``'s estimated peak (engine.memory.estimate_request, with the config's backend
    and VAE tiling) is over ``budget`` bytes: one batch, naming ``batch_size`` when a smaller batch fits at this
    size, else ``width`` (or ``height``) with the largest size of the same aspect ratio that fits; then the hires
    fix's second pass (naming hr_scale or hr_resize_x/y); then, with ``answer`` (the webui route sends every
    image inline as base64), all ``batch_size * n_iter`` images, naming ``n_iter``. The images of iterations are
    streamed to the task's files, so ``n_iter`` adds nothing else. ``extra_bytes``: weights the request loads
    beside the model (its IP-Adapter units' adapters and CLIP vision encoders, engine.ip_adapter.memory_bytes);
    ``ip_tokens``: the image-prompt tokens their attention takes at once (engine.ip_adapter.attention_tokens)."""
    width, height = request.width or native, request.height or native
    backend = getattr(config.backend, "value", str(config.backend))
    options = {"cfg": request.cfg_scale != 1.0, "backend": backend, "tiling": config.vae_tiling,
               "units": len(request.controlnet_units), **_detailer(request, width, height, config),
               "preprocessor_bytes": preprocessor_bytes(request.controlnet_units), "extra": extra_bytes,
               "ip_tokens": ip_tokens}
    need = estimate_request(arch, width, height, request.batch_size, **options)
    work, unit = preprocessor_work(request.controlnet_units, width, height)
    if work:  # a preprocessor whose activations grow with its working image (OneFormer's class scores)
        with_work = dict(options, preprocessor_bytes=options["preprocessor_bytes"] + work)
        need = estimate_request(arch, width, height, request.batch_size, **with_work)
        if need.total > budget:
            raise TooMuchMemory(f"controlnet_units[{unit}].processor_res",
                                f"its preprocessor {request.controlnet_units[unit].module} needs about "
                                f"{work / GIB:.1f} GiB at its working size, the request about {need.total / GIB:.1f} "
                                f"GiB on {backend} (model {model_name}), more than this server's memory budget of "
                                f"{budget / GIB:.1f} GiB", "a smaller processor_res (pixel_perfect off)")
    if need.total > budget and "detailer" in options:
        plain = {k: v for k, v in options.items() if k not in ("detailer", "detector_bytes")}
        if estimate_request(arch, width, height, request.batch_size, **plain).total <= budget:
            dw, dh = options["detailer"]
            raise TooMuchMemory("adetailer", f"ADetailer's inpaint passes at {dw}x{dh} with the request's "
                                f"{request.batch_size} images of {width}x{height} held need about "
                                f"{need.total / GIB:.1f} GiB on {backend} (model {model_name}), more than this "
                                f"server's memory budget of {budget / GIB:.1f} GiB",
                                "a smaller ad_inpaint_width x ad_inpaint_height (ad_use_inpaint_width_height), "
                                "or a smaller batch")
    if need.total > budget:
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
    hires = getattr(request, "hires", None)
    if hires is not None:
        hr = request.hires
        options.update(upscaler=upscaler_cost(hr.upscaler_name, config.models_dir, request.upscaler_tile),
                       hires_cfg=(request.cfg_scale if hr.cfg_scale is None else hr.cfg_scale) != 1.0)
        hires = _check_hires_memory(arch, model_name, request, width, height, budget, options)
    if not answer:
        return
    need = estimate_request(arch, width, height, request.batch_size, n_iter=request.n_iter, hires=hires,
                            answer=True, **options)
    if need.total <= budget:
        return
    n = 0
    while n < request.n_iter and estimate_request(arch, width, height, request.batch_size, n_iter=n + 1, hires=hires,
                                                  answer=True, **options).total <= budget:
        n += 1
    out = hires or (width, height)
    text = (f"{request.batch_size * request.n_iter} images of {out[0]}x{out[1]} sent inline as base64 (the webui "
            f"route) with the request's generation need about {need.total / GIB:.1f} GiB (model {model_name}), more "
            f"than this server's memory budget of {budget / GIB:.1f} GiB")
    allowed = (f"n_iter at most {n} at batch_size {request.batch_size}" if n
               else "send_images false, or the /scc API (its results are URLs)")
    raise TooMuchMemory("n_iter", text, allowed)


def _detailer(request: GenerationRequest, width: int, height: int, config: EngineConfig) -> dict:
    """ADetailer's passes for engine.memory.estimate_request: the largest inpaint size of the request's tabs
    (engine.adetailer.inpaint_size) and its detectors' files (a YOLO .pt: its size, as weights)."""
    ad = getattr(request, "adetailer", None)
    if ad is None or not ad.active:
        return {}
    sizes = [inpaint_size(request, tab, (width, height)) for _, tab in ad.active]
    yolo = Detectors(config.models_dir).yolo_files()
    extra = max((yolo[t.ad_model].stat().st_size * 4 for _, t in ad.active if t.ad_model in yolo), default=0)
    return {"detailer": max(sizes, key=lambda s: s[0] * s[1]), "detector_bytes": DETECTOR_BYTES + extra}


def _check_hires_memory(arch, model_name: str, request: GenerationRequest, width: int, height: int, budget: int,
                        options: dict) -> tuple[int, int]:
    """The hires fix (upscale, second pass) within the budget; else TooMuchMemory naming hr_scale (or
    hires.resize_x/y) with the largest second pass that fits. Returns the size the second pass's images have
    (the upscaled size, before the latent's cut)."""
    size = hires_size(width, height, request.hires)
    second = (size.upscale_width, size.upscale_height)
    need = estimate_request(arch, width, height, request.batch_size, hires=second, **options)
    if need.total <= budget:
        return second
    fits = None
    for side in PLAN_SIZES:
        scale = side / max(second)
        w, h = max(64, int(second[0] * scale) // 64 * 64), max(64, int(second[1] * scale) // 64 * 64)
        if estimate_request(arch, width, height, request.batch_size, hires=(w, h), **options).total > budget:
            break
        fits = (w, h)
    if fits and size.field == "hires.scale":
        allowed = f"hr_scale at most {fits[0] / width:.2f} ({fits[0]}x{fits[1]}) for {width}x{height}"
    elif fits:
        allowed = f"a second pass of at most {fits[0]}x{fits[1]}"
    else:
        allowed = "none at this batch size"
    raise TooMuchMemory(size.field, f"the hires fix's second pass at {size.width}x{size.height} with batch_size "
                        f"{request.batch_size} needs about {need.total / GIB:.1f} GiB (model {model_name}), more "
                        f"than this server's memory budget of {budget / GIB:.1f} GiB", allowed)
