"""The txt2img loop, written once for every backend: orchestration of the rooms that own the rules.

validate (engine.models.family) -> plan (engine.samplers: sigmas, denoiser schedule, noise; seeds; ControlNet
units) -> condition (engine.conditioning) -> noise (engine.noise) -> sample (engine.denoiser + the sampler) ->
decode (the backend's VAE, tiled above a size: engine.tiling) -> describe (engine.infotext: webui infotexts and the info dict).
See docs/ARCHITECTURE.md for what each room may touch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.arrays import to_device
from engine.config import EngineConfig
from engine.errors import InvalidRequest
from engine.infotext import Generation, unit_infotext
from engine.progress import ProgressReporter
from engine.request import GenerationRequest, GenerationResult
from engine.tiling import decode as decode_latents

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
    controlnets: dict[str, Any] = field(default_factory=dict)


class Engine:
    """The txt2img engine: ``Engine(config).generate(request) -> GenerationResult``.

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

        name = name or self.default_model_name()
        model = self.store.load_model(name, vae=vae, allow_pickle=self.config.allow_pickle)
        key = (str(model.path), model.sha256, str(model.vae_path))
        rt = self._runtimes.get(key)
        if rt is None:
            t0 = time.perf_counter()
            backend = create_backend(self.config, model.components, model_hash=model.family.artefact_key,
                                     progress=self._export_progress)
            rt = _Runtime(model, backend, EmbeddingCache())
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
                                     progress=self._export_progress)
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
        from engine.conditioning import encode_request
        from engine.denoiser import Denoiser
        from engine.noise import ImageRNG, resolve_seed
        from engine.samplers import resolve

        timer = _Timer()
        # 1. validate: the sampler name, the model, the request against the model's family and the limits
        sampler = resolve(req.sampler_name, req.scheduler)
        t0 = time.perf_counter()
        on_step.phase("loading", req.model or "default model")
        rt = self.runtime(req.model, req.vae)
        family = rt.model.family
        timer.add("load", t0)
        width, height = self._validate(req, family)
        warnings = [w for w in (family.size_warning(width, height),) if w]
        for warning in warnings:
            log.info("%s: %s", rt.model.name, warning)  # carried in info["warnings"]; the CLI prints it

        # 2. plan: sigmas, the denoiser's schedule, seeds, ControlNet units
        plan = sampler.prepare(req.steps, family, eta=req.eta, eta_noise_seed_delta=req.eta_noise_seed_delta)
        total = req.batch_size * req.n_iter
        seed, subseed = resolve_seed(req.seed), resolve_seed(req.subseed)
        all_seeds = [seed + i for i in range(total)]
        all_subseeds = [subseed + i for i in range(total)]
        t0 = time.perf_counter()
        units, unit_labels = self._controlnet_units(rt, req, width, height)
        timer.add("controlnet_preprocess", t0)
        on_step.steps = req.n_iter * plan.steps

        images: list[np.ndarray] = []
        for it in range(req.n_iter):
            batch = slice(it * req.batch_size, (it + 1) * req.batch_size)
            seeds, subseeds = all_seeds[batch], all_subseeds[batch]
            # 3. condition: prompts -> per-step conditioning (cached per model)
            t0 = time.perf_counter()
            on_step.phase("encoding")
            cond = encode_request(
                rt.backend, family.text, [req.prompt] * req.batch_size, [req.negative_prompt] * req.batch_size,
                steps=plan.steps, clip_skip=req.clip_skip, width=width, height=height, cache=rt.prompt_cache,
                max_chunks=self.config.max_prompt_chunks,
            )
            timer.add("text_encoder", t0)

            # 4. noise: webui-seeded initial latents and the sampler's noise
            t0 = time.perf_counter()
            rng = ImageRNG((4, height // 8, width // 8), seeds, subseeds, req.subseed_strength,
                           eta_noise_seed_delta=plan.ensd)
            sigmas = to_device(plan.sigmas, self.config.device)
            x = to_device(rng.first().numpy(), self.config.device) * sigmas[0]
            noise = plan.noise(x, rng, seeds)

            # 5. sample: the sampler over the denoiser (CFG, ControlNet) on the plan's schedule
            denoiser = Denoiser(_ModelCall(self._run_fn(rt), units, plan.steps), plan.schedule,
                                family.prediction_type, req.cfg_scale, cond.at, plan.sigmas)
            on_step.phase("sampling", f"batch {it + 1} of {req.n_iter}" if req.n_iter > 1 else "")
            latents = plan.sample(denoiser, x, sigmas=sigmas, noise=noise, callback=on_step, s_churn=req.s_churn,
                                  s_tmin=req.s_tmin, s_tmax=req.s_tmax, s_noise=req.s_noise)
            timer.add("sampling", t0)

            # 6. decode (tiled above the configured size: engine.tiling)
            t0 = time.perf_counter()
            on_step.phase("decoding")
            images.extend(to_uint8(decode_latents(rt.backend.run, latents, self.config.vae_tiling)))
            timer.add("vae_decoder", t0)

        # 7. describe: webui infotexts and the info dict
        generation = Generation(req, rt.model, plan, width, height, all_seeds, all_subseeds, unit_labels,
                                self.config.backend.value)
        infotexts = [generation.infotext(i) for i in range(total)]
        info = generation.info(infotexts, timer.timings, device=self.config.device,
                               precision=self.config.precision.value)
        info["warnings"] = warnings
        detected = [u.detected_map for u, spec in zip(units, req.controlnet_units) if spec.save_detected_map]
        return GenerationResult(images=images, infotexts=infotexts, info=info, seeds=all_seeds,
                                subseeds=all_subseeds, timings=dict(timer.timings), detected_maps=detected)

    def _validate(self, req: GenerationRequest, family) -> tuple[int, int]:
        """(width, height) of the request (the family's native size by default), checked against the family's
        pixel multiple and the engine's limits."""
        width = req.width or family.native_size
        height = req.height or family.native_size
        family.check_size(width, height, self.config.max_size)
        if not 1 <= req.batch_size <= self.config.max_batch_size:
            raise InvalidRequest("batch_size", f"{req.batch_size} is out of range", f"1..{self.config.max_batch_size}")
        return width, height

    def _controlnet_units(self, rt: _Runtime, req: GenerationRequest, width: int, height: int):
        """The request's ControlNet units, loaded and preprocessed, with their infotext labels."""
        from engine.controlnet import prepare_unit

        units, labels = [], []
        for k, unit in enumerate(req.controlnet_units):
            field_name = f"alwayson_scripts.controlnet.units[{k}]"
            cn = self._controlnet(rt, unit.model, f"{field_name}.model")
            units.append(prepare_unit(unit, width, height, field=field_name))
            labels.append(unit_infotext(unit, f"{cn.name} [{cn.short_hash}]", units[-1].used))
        return units, labels


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
