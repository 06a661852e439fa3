"""The txt2img / img2img loop, written once for every backend: orchestration of the rooms that own the rules.

validate (engine.models.family) -> plan (engine.samplers: sigmas, cut at the denoising strength for img2img,
denoiser schedule, noise; seeds; ControlNet units) -> init (engine.img2img: init image, mask; the backend's VAE
encoder) -> condition (engine.conditioning) -> noise (engine.noise) -> sample (engine.denoiser + the sampler,
with the inpainting blend) -> hires fix (engine.img2img upscalers, then a second img2img pass) -> decode (the
backend's VAE, tiled above a size: engine.tiling) -> describe (engine.infotext: webui infotexts and the info dict).
See docs/ARCHITECTURE.md for what each room may touch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine.arrays import to_device, to_host
from engine.config import EngineConfig
from engine.errors import InvalidRequest
from engine.infotext import Generation, hires_infotext, unit_infotext
from engine.noise import ImageRNG
from engine.progress import ProgressReporter
from engine.request import GenerationRequest, GenerationResult
from engine.rules import resolve_hires_sampler
from engine.tiling import decode as decode_latents
from engine.tiling import encode as encode_image

log = logging.getLogger(__name__)

# progress(engine.progress.Progress) per phase and step; a legacy progress(done, total) gets sampling steps
ProgressFn = Callable[..., None]


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class _Runtime:
    """A loaded model (with its ModelFamily) on its backend, with its prompt cache and ControlNets (kept between
    requests)."""

    model: Any  # engine.models.checkpoints.LoadedModel
    backend: Any  # engine.backends.Backend
    prompt_cache: Any
    networks: Any = None  # engine.networks.Networks of this model
    text: Any = None  # (TextModelInfo, TextualInversion) of the request being generated (LoRA/embeddings)
    controlnets: dict[str, Any] = field(default_factory=dict)


class Engine:
    """The txt2img / img2img engine: ``Engine(config).generate(request) -> GenerationResult``.

    Models, backends and encoded prompts are cached between requests; one lock serialises generation
    (one engine drives one device).
    """

    def __init__(self, config: EngineConfig | None = None, **options: Any):
        if config is None:
            config = EngineConfig(**options)
        elif options:
            raise TypeError("pass either an EngineConfig or keyword options, not both")
        self.config = config
        self._runtimes: dict[tuple, _Runtime] = {}
        self._lock = threading.RLock()
        self._store = None
        self._reporter: ProgressReporter | None = None  # the running request's (exports report to it)
        self.clock = time.monotonic  # what the ETA is measured with (tests use a fake clock)

    # ------------------------------------------------------------------------------------------ models
    @property
    def store(self):
        if self._store is None:
            from engine.models.store import ModelStore

            self._store = ModelStore.from_config(self.config)
        return self._store

    def default_model_name(self) -> str:
        """EngineConfig.default_model, else the bundled demo model, else the store's first checkpoint."""
        return self.store.default_checkpoint(self.config.default_model).name

    def runtime(self, name: str | None, vae: str = "Automatic") -> _Runtime:
        from engine.backends import create_backend
        from engine.conditioning import EmbeddingCache

        from engine.backends.base import RELEASES_WEIGHTS

        name = name or self.default_model_name()
        # a backend that runs exported graphs needs no torch weights when its cache holds every artefact: the
        # modules are built from the file headers first (meta), the weights read only if an export is needed
        meta = self.config.backend in RELEASES_WEIGHTS
        model = self.store.load_model(name, vae=vae, allow_pickle=self.config.allow_pickle, meta=meta)
        key = (str(model.path), model.sha256, str(model.vae_path))
        rt = self._runtimes.get(key)
        if rt is None:
            t0 = time.perf_counter()
            # the engine owns the loaded model: a non-torch backend frees its torch weights once exported
            backend = create_backend(self.config, model.components, model_hash=model.family.artefact_key,
                                     progress=self._export_progress, owned=True)
            if model.meta:
                from engine.backends.weights import adopt_cached

                adopt_cached(backend, model.components,
                             lambda: self.store.load_weights(model, allow_pickle=self.config.allow_pickle))
            from engine.networks import Networks

            rt = _Runtime(model, backend, EmbeddingCache(), Networks(self.store, model, self.config.allow_pickle))
            self._runtimes = {key: rt}  # one model resident at a time
            log.info("model %s [%s] ready on %s in %.2fs", model.name, model.short_hash,
                     self.config.backend.value, time.perf_counter() - t0)
        return rt

    def _controlnet(self, rt: _Runtime, name: str, field_name: str):
        """Loads the ControlNet ``name`` into the runtime's backend (component ``controlnet:<name>``)."""
        from engine.controlnet import controlnet_component

        from engine.backends import create_backend

        cn = self.store.load_controlnet(name, allow_pickle=self.config.allow_pickle)
        component = controlnet_component(name)
        if component not in rt.controlnets:
            rt.model.family.check_controlnet(cn, rt.model.name, field_name)
            # each ControlNet model has its own backend (its artefacts are keyed by its own hash)
            backend = create_backend(self.config, {"controlnet": cn.module}, model_hash=cn.short_hash,
                                     progress=self._export_progress, owned=True)
            rt.controlnets[component] = (cn, backend)
        return rt.controlnets[component][0]

    def _export_progress(self, what: str, done: int, total: int) -> None:
        """The backends' exporter callback, routed to the running request's progress (phase exporting)."""
        if self._reporter is not None:
            self._reporter.export(what, done, total)

    @staticmethod
    def _run_fn(rt: _Runtime):
        """``run(component, feeds)`` over the model's backend and its ControlNets' backends."""

        def run(component: str, feeds):
            if component in rt.controlnets:
                return rt.controlnets[component][1].run("controlnet", feeds)
            return rt.backend.run(component, feeds)

        return run

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, request: GenerationRequest, *, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """``progress(Progress)`` gets each phase (loading, exporting, encoding, sampling, decoding) and step
        (engine.progress); ``cancel`` set stops the request between steps (``Cancelled``)."""
        with self._lock:
            self._reporter = ProgressReporter(progress, cancel, request.n_iter * request.steps, clock=self.clock)
            try:
                return self._generate(request, self._reporter)
            finally:
                self._reporter = None

    def _generate(self, req: GenerationRequest, on_step: ProgressReporter) -> GenerationResult:
        """Orchestration only: each stage is a call into the room that owns its rules."""
        from engine.noise import resolve_seed
        from engine.samplers import resolve

        timer = _Timer()
        # 1. validate: the sampler names, the model, the request against the model's family and the limits
        sampler = resolve(req.sampler_name, req.scheduler)
        hr_sampler = self._hires_sampler(req) if req.hires is not None else None
        t0 = time.perf_counter()
        on_step.phase("loading", req.model or "default model")
        rt = self.runtime(req.model, req.vae)
        family = rt.model.family
        timer.add("load", t0)
        width, height = self._validate(req, family)
        hires = self._hires_size(req, family, width, height) if req.hires is not None else None
        warnings = [w for w in (family.size_warning(width, height),) if w]
        for warning in warnings:
            log.info("%s: %s", rt.model.name, warning)  # carried in info["warnings"]; the CLI prints it
        # the prompt's <lora:...> tags -> the backend's weights (engine.networks); the text without them
        t0 = time.perf_counter()
        networks = self._networks(rt, req)
        ti, ti_key = rt.networks.textual_inversion()
        text_model = family.text
        if networks.patch.text_key or ti_key:  # the prompt cache must not serve other weights' encodings
            text_model = replace(text_model, model_hash=f"{text_model.model_hash}+{networks.patch.text_key}+{ti_key}")
        rt.text = (text_model, ti)  # what _condition encodes with for this request
        timer.add("networks", t0)

        # 2. plan: sigmas (cut at the denoising strength for img2img), the denoiser's schedule, seeds, units
        init = req.init
        plan = sampler.prepare(req.steps, family, eta=req.eta, eta_noise_seed_delta=req.eta_noise_seed_delta,
                               denoising_strength=None if init is None else init.denoising_strength,
                               fix_steps=init is not None and init.fix_steps)
        hr_plan = None
        if hires is not None:  # the webui's hires pass always runs exactly its steps ("fix steps")
            hr_plan = hr_sampler.prepare(req.hires.steps or req.steps, family, eta=req.eta,
                                         eta_noise_seed_delta=req.eta_noise_seed_delta,
                                         denoising_strength=req.hires.denoising_strength, fix_steps=True)
        total = req.batch_size * req.n_iter
        seed, subseed = resolve_seed(req.seed), resolve_seed(req.subseed)
        all_seeds = [seed + i for i in range(total)]
        all_subseeds = [subseed + i for i in range(total)]
        t0 = time.perf_counter()
        units, unit_labels = self._controlnet_units(rt, req, width, height)
        hr_units = self._controlnet_units(rt, req, hires.width, hires.height)[0] if hires is not None else []
        timer.add("controlnet_preprocess", t0)
        on_step.steps = req.n_iter * (plan.steps + (hr_plan.steps if hr_plan else 0))

        # 3. init: the init image resized/masked (engine.img2img) and encoded, once for all iterations (webui)
        source = self._init_latents(rt, req, width, height, all_seeds[: req.batch_size], timer) \
            if init is not None else None

        images: list[np.ndarray] = []
        for it in range(req.n_iter):
            batch = slice(it * req.batch_size, (it + 1) * req.batch_size)
            seeds, subseeds = all_seeds[batch], all_subseeds[batch]
            # 4. condition: prompts -> per-step conditioning (cached per model)
            t0 = time.perf_counter()
            on_step.phase("encoding")
            cond = self._condition(rt, req.prompt, req.negative_prompt, req.steps, req, width, height)
            timer.add("text_encoder", t0)

            # 5. noise: webui-seeded initial latents (the init latent noised to the plan's first sigma)
            t0 = time.perf_counter()
            rng = ImageRNG((4, height // 8, width // 8), seeds, subseeds, req.subseed_strength,
                           eta_noise_seed_delta=plan.ensd)
            noise = to_device(rng.first().numpy(), self.config.device)
            if init is not None and init.initial_noise_multiplier != 1.0:
                noise = noise * init.initial_noise_multiplier
            x = plan.start(noise, None if source is None else source.latent)

            # 6. sample: the sampler over the denoiser (CFG, ControlNet, inpainting blend) on the plan's sigmas
            on_step.phase("sampling", f"batch {it + 1} of {req.n_iter}" if req.n_iter > 1 else "")
            latents = self._sample(rt, req, plan, x, rng, seeds, cond, units, req.cfg_scale, on_step,
                                   None if source is None else source.blend)
            timer.add("sampling", t0)

            # 7. hires fix: upscale (latent or image), then an img2img pass at the new size
            if hires is not None:
                latents = self._hires_pass(rt, req, hires, hr_plan, hr_units, latents, seeds, subseeds, on_step,
                                           timer)

            # 8. decode (and paste the init image's kept pixels back, for inpainting)
            t0 = time.perf_counter()
            on_step.phase("decoding")
            decoded = to_uint8(decode_latents(rt.backend.run, latents, self.config.vae_tiling))  # engine.tiling
            images.extend(decoded if source is None else [source.plan.finish(img) for img in decoded])
            timer.add("vae_decoder", t0)

        # 9. describe: webui infotexts and the info dict
        extra: dict[str, Any] = {}
        if source is not None:
            extra.update(source.plan.infotext)
        if hires is not None:
            extra.update(hires_infotext(req, hr_plan, plan))
        strength = init.denoising_strength if init is not None else \
            req.hires.denoising_strength if req.hires is not None else None
        # the backend's own label where it has one (``openvino bf16``: the precision the CPU really runs)
        backend_label = getattr(rt.backend, "label", None) or self.config.backend.value
        generation = Generation(req, rt.model, plan, width, height, all_seeds, all_subseeds, unit_labels,
                                backend_label, denoising_strength=strength, extra=extra,
                                lora_hashes=networks.lora_hashes, ti_hashes=rt.networks.ti_hashes(cond.embeddings))
        infotexts = [generation.infotext(i) for i in range(total)]
        info = generation.info(infotexts, timer.timings, device=self.config.device,
                               precision=self.config.precision.value)
        info["warnings"] = warnings
        detected = [u.detected_map for u, spec in zip(units, req.controlnet_units) if spec.save_detected_map]
        return GenerationResult(images=images, infotexts=infotexts, info=info, seeds=all_seeds,
                                subseeds=all_subseeds, timings=dict(timer.timings), detected_maps=detected)

    # ------------------------------------------------------------------------------------------ stages
    def _condition(self, rt: _Runtime, prompt: str, negative_prompt: str, steps: int, req: GenerationRequest,
                   width: int, height: int):
        from engine.conditioning import encode_request
        from engine.networks.syntax import strip_networks

        text_model, ti = rt.text or (rt.model.family.text, None)
        return encode_request(
            rt.backend, text_model, [strip_networks(prompt)] * req.batch_size, [negative_prompt] * req.batch_size,
            steps=steps, clip_skip=req.clip_skip, width=width, height=height, cache=rt.prompt_cache,
            max_chunks=self.config.max_prompt_chunks, ti=ti,
        )

    def _sample(self, rt: _Runtime, req: GenerationRequest, plan, x, rng, seeds, cond, units, cfg_scale: float,
                on_step: ProgressReporter, blend=None):
        """The sampler over the denoiser; ``blend`` (init latent, nmask) turns on the inpainting blend."""
        from engine.denoiser import Denoiser, LatentBlend

        sigmas = to_device(plan.sigmas, self.config.device)
        noise = plan.noise(x, rng, seeds)
        denoiser = Denoiser(_ModelCall(self._run_fn(rt), units, plan.steps), plan.schedule,
                            rt.model.family.prediction_type, cfg_scale, cond.at, plan.sigmas)
        if blend is not None:
            denoiser = LatentBlend(denoiser, *blend)
        on_step.check_cancel()
        latents = plan.sample(denoiser, x, sigmas=sigmas, noise=noise, callback=on_step, s_churn=req.s_churn,
                              s_tmin=req.s_tmin, s_tmax=req.s_tmax, s_noise=req.s_noise)
        return latents if blend is None else denoiser.final(latents)

    def _encode(self, rt: _Runtime, pixels: np.ndarray):
        """(B, 3, H, W) floats in [0, 1] -> (B, 4, H/8, W/8) latents through the backend's VAE encoder."""
        image = to_device(np.ascontiguousarray(pixels, dtype=np.float32), self.config.device)
        # tiled above the configured size (engine.tiling)
        return to_device(encode_image(rt.backend.run, image, self.config.vae_tiling), self.config.device)

    def _init_latents(self, rt: _Runtime, req: GenerationRequest, width: int, height: int, seeds: list[int],
                      timer: _Timer) -> "_Source":
        """img2img: the init image prepared by the webui rules (engine.img2img), encoded, resized for the
        latent-upscale mode, repeated over the batch; with a mask, the masked latent filled and the blend."""
        from engine.img2img import prepare_init, upscale_latent

        t0 = time.perf_counter()
        init_plan = prepare_init(req.init, width, height)
        timer.add("init_image", t0)
        t0 = time.perf_counter()
        latent = to_host(self._encode(rt, init_plan.pixels)).astype(np.float32)
        h, w = init_plan.latent_size
        if init_plan.resize_latent and latent.shape[2:] != (h, w):
            latent = upscale_latent(latent, h, w, "Latent")
        latent = np.repeat(latent, req.batch_size, axis=0)
        timer.add("vae_encoder", t0)
        nmask = init_plan.latent_mask()
        blend = None
        if nmask is not None:
            nmask = np.broadcast_to(nmask[None, None], latent.shape).astype(np.float32)
            mask = 1.0 - nmask
            if init_plan.inpainting_fill == 2:  # latent noise: the first batch's seeds, plain draws (webui)
                latent = latent * mask + ImageRNG((4, h, w), seeds).first().numpy() * nmask
            elif init_plan.inpainting_fill == 3:  # latent nothing
                latent = latent * mask
            blend = (to_device(latent, self.config.device), to_device(np.ascontiguousarray(nmask),
                                                                        self.config.device))
        return _Source(init_plan, to_device(latent, self.config.device), blend)

    def _hires_sampler(self, req: GenerationRequest):
        """The hires pass's sampler by the webui rules (engine.rules.hires_sampler)."""
        from engine.samplers import resolve

        return resolve_hires_sampler(req.sampler_name, req.scheduler, req.hires, resolve)

    def _hires_size(self, req: GenerationRequest, family, width: int, height: int) -> "HiresSize":
        """The second pass's size by the webui rules (engine.img2img.hires_size), checked like width/height;
        an error names hr_scale (or hr_resize_x/y) with the allowed range."""
        from engine.img2img import hires_size

        size = hires_size(width, height, req.hires)
        try:
            family.check_size(size.width, size.height, self.config.max_size)
        except InvalidRequest as exc:
            raise InvalidRequest(size.field, f"gives a second pass of {size.width}x{size.height}, which is not "
                                 f"allowed for this model", size.allowed(family.pixel_multiple,
                                                                           self.config.max_size)) from None
        return size

    def _hires_pass(self, rt: _Runtime, req: GenerationRequest, size, plan, units, latents, seeds, subseeds,
                    on_step: ProgressReporter, timer: _Timer):
        """webui sample_hr_pass: latent upscalers resize the latent; image upscalers decode (truncated to
        uint8, as the webui), resize the image and encode it; then the latent is cut to the target size and
        an img2img pass runs with fresh per-image noise at that size."""
        from engine.img2img import LATENT_UPSCALERS, upscale_image, upscale_latent

        hr = req.hires
        t0 = time.perf_counter()
        if hr.upscaler_name in LATENT_UPSCALERS:
            x0 = upscale_latent(latents, size.upscale_height // 8, size.upscale_width // 8, hr.upscaler_name)
        else:
            on_step.phase("decoding", "hires fix: the first pass, for the image upscaler")
            decoded = decode_latents(rt.backend.run, latents, self.config.vae_tiling)
            lowres = (np.clip(decoded, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
            pixels = np.stack([upscale_image(img, size.upscale_width, size.upscale_height, hr.upscaler_name)
                               for img in lowres]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            x0 = self._encode(rt, pixels)
        x0 = size.truncate(x0)
        timer.add("hires_upscale", t0)
        t0 = time.perf_counter()
        on_step.phase("encoding", "hires fix")
        cond = self._condition(rt, req.prompt if hr.prompt is None else hr.prompt,
                               req.negative_prompt if hr.negative_prompt is None else hr.negative_prompt,
                               plan.steps, req, size.width, size.height)
        timer.add("text_encoder", t0)
        t0 = time.perf_counter()
        rng = ImageRNG(tuple(x0.shape[1:]), seeds, subseeds, req.subseed_strength, eta_noise_seed_delta=plan.ensd)
        x = plan.start(to_device(rng.first().numpy(), self.config.device), x0)
        on_step.phase("sampling", "hires fix")
        out = self._sample(rt, req, plan, x, rng, seeds, cond, units,
                           req.cfg_scale if hr.cfg_scale is None else hr.cfg_scale, on_step)
        timer.add("hires_sampling", t0)
        return out

    def _validate(self, req: GenerationRequest, family) -> tuple[int, int]:
        """(width, height) of the request (the family's native size by default), checked against the family's
        pixel multiple and the engine's limits."""
        width = req.width or family.native_size
        height = req.height or family.native_size
        family.check_size(width, height, self.config.max_size)
        if not 1 <= req.batch_size <= self.config.max_batch_size:
            raise InvalidRequest("batch_size", f"{req.batch_size} is out of range", f"1..{self.config.max_batch_size}")
        if req.init is not None and req.hires is not None:
            raise InvalidRequest("hires", "the hires fix is a txt2img feature", "false for img2img")
        return width, height

    def _networks(self, rt: _Runtime, req: GenerationRequest):
        """The request's extra networks (engine.networks.PreparedNetworks), applied to the model's backend."""
        from engine.errors import BackendUnavailable

        prepared = rt.networks.prepare(req.prompt, disabled=req.disable_extra_networks, field="prompt")
        if not hasattr(rt.backend, "set_patch"):
            if prepared.patch.uses:
                raise BackendUnavailable(f"the {self.config.backend.value} backend cannot apply LoRA weights")
            return prepared
        rt.backend.set_patch(prepared.patch)
        return prepared

    def _controlnet_units(self, rt: _Runtime, req: GenerationRequest, width: int, height: int):
        """The request's ControlNet units, loaded and preprocessed, with their infotext labels."""
        from engine.controlnet import prepare_unit

        units, labels = [], []
        for k, unit in enumerate(req.controlnet_units):
            field_name = f"controlnet_units[{k}]"
            cn = self._controlnet(rt, unit.model, f"{field_name}.model")
            units.append(prepare_unit(unit, width, height, field=field_name))
            labels.append(unit_infotext(unit, f"{cn.name} [{cn.short_hash}]", units[-1].used))
        return units, labels


@dataclass(frozen=True)
class _Source:
    """img2img: the prepared init image (engine.img2img.InitPlan), its latent on the device, and the
    inpainting blend (init latent, nmask) or None."""

    plan: Any
    latent: Any
    blend: tuple | None


class _ModelCall:
    """``model(x_in, t_in, cond, step)`` for the Denoiser: UNet (and ControlNet units) through the backend."""

    def __init__(self, run, units, steps: int):
        self.run = run
        self.units = units
        self.steps = steps

    def __call__(self, x_in, t_in, cond, step: int):
        from engine.controlnet import cond_rows_mask, controlnet_residuals

        feeds = {"sample": x_in, "timestep": t_in, "encoder_hidden_states": cond.context[: x_in.shape[0]]}
        if cond.pooled is not None:
            feeds["text_embeds"] = cond.pooled[: x_in.shape[0]]
            feeds["time_ids"] = cond.time_ids[: x_in.shape[0]]
        if self.units:
            mask = cond_rows_mask(cond.positive, int(x_in.shape[0]))
            residuals = controlnet_residuals(self.run, self.units, step, self.steps, feeds, mask)
            if residuals is not None:
                return self.run("unet_control", {**feeds, **residuals})["model_output"]
        return self.run("unet", feeds)["model_output"]


def to_uint8(images) -> list[np.ndarray]:
    """(B, 3, H, W) floats in [0, 1] -> list of (H, W, 3) uint8, rounded as diffusers does (the webui truncates)."""
    arr = np.asarray(images, dtype=np.float32)
    arr = np.clip(arr, 0.0, 1.0)
    arr = (arr * 255.0 + 0.5).astype(np.uint8)
    return [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in arr]
