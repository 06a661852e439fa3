"""The txt2img / img2img loop, written once for every backend: orchestration of the rooms that own the rules.

validate (engine.models.family) -> plan (engine.samplers: sigmas, cut at the denoising strength for img2img,
denoiser schedule, noise; seeds; ControlNet units) -> init (engine.img2img: init image, mask; the backend's VAE
encoder) -> condition (engine.conditioning) -> noise (engine.noise) -> sample (engine.denoiser + the sampler,
with the inpainting blend) -> hires fix (engine.img2img upscalers, then a second img2img pass) -> decode (the
backend's VAE, tiled above a size: engine.tiling) -> describe (engine.infotext: webui infotexts and the info dict).
See docs/ARCHITECTURE.md for what each room may touch.

What belongs to one request (its progress reporter, timings, LoRA-keyed text model, passes, seeds, init image)
travels in a frozen :class:`_Context` handed to each stage; the Engine and its cached :class:`_Runtime` keep only
what outlives a request (models, backends, prompt cache, ControlNets).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine.arrays import to_device, to_host
from engine.backends import create_backend
from engine.backends import RELEASES_WEIGHTS
from engine.backends.weights import adopt_cached, export_ahead
from engine.conditioning import EmbeddingCache, TextModelInfo, TextualInversion, encode_request
from engine.config import BackendKind, EngineConfig
from engine.controlnet import HiresOption, cond_rows_mask, controlnet_component, controlnet_residuals, prepare_unit
from engine.controlnet.colorfix import COLORFIX_MODULES, ColorFix
from engine.controlnet.reference import ReferenceInjection, supports_reference
from engine.controlnet.units import REFERENCE_MODULES, extension_residuals, residual_count
from engine.calibration import calibration_feeds
from engine.denoiser import Denoiser, LatentBlend
from engine import adetailer, faces
from engine import ip_adapter
from core.errors import BackendUnavailable, InvalidRequest
from engine import sd_upscale
from engine.upscalers import Upscaling
from engine.img2img import LATENT_UPSCALERS, HiresSize, hires_size, prepare_init, upscale_image, upscale_latent
from engine.infotext import Generation, hires_infotext, model_label, unit_infotext
from engine.models.store import ModelStore
from engine.networks import Networks, PreparedNetworks
from engine.networks.syntax import strip_networks
from engine.noise import ImageRNG, resolve_seed
from engine.models.approx import latent_space
from engine.preview import ApproxModels, Previewer, PreviewSink, check_methods
from engine.progress import ProgressReporter
from engine.refiner import RefinerSwitch, check_second_checkpoint
from engine.request import GenerationRequest, GenerationResult
from engine.models.family import Arch
from engine.rules import check_layer_weights, resolve_hires_sampler
from engine.samplers import SamplingPlan, resolve
from engine.tiling import decode as decode_latents
from engine.tiling import encode as encode_image
from export.descriptors import SEAMLESS

log = logging.getLogger(__name__)

# progress(engine.progress.Progress) per phase and step; a legacy progress(done, total) gets sampling steps
ProgressFn = Callable[..., None]
# on_images(index of the first, images (H, W, 3) uint8, their infotexts): one iteration's images as decoded
ImagesFn = Callable[[int, list, list], None]

# the reporter of the request this thread (context) runs: the backends' exporter callback, bound once when a
# cached backend is made, reports to it (Engine._export_progress); unset outside Engine.generate
_REPORTER: ContextVar[ProgressReporter | None] = ContextVar("sdengine_request_reporter", default=None)


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class _Runtime:
    """A loaded model (with its ModelFamily) on its backend, with its prompt cache and ControlNets (kept between
    requests; nothing of one request is stored here)."""

    model: Any  # engine.models.checkpoints.LoadedModel
    backend: Any  # engine.backends.Backend
    prompt_cache: Any
    networks: Any = None  # engine.networks.Networks of this model
    controlnets: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Model:
    """Another checkpoint of a request (the refiner, the hires checkpoint) on its runtime, with the text model and
    embeddings its prompts are encoded with and its infotext label ("name [hash]")."""

    rt: _Runtime
    text_model: TextModelInfo
    ti: TextualInversion | None
    label: str


@dataclass(frozen=True)
class _Pass:
    """One sampling pass of a request (the first, or the hires fix's second): its plan, ControlNet units (with
    their infotext labels), size, prompts, CFG scale and the steps its prompt schedule spans (webui: the request's
    steps for the first pass, the plan's for the hires pass)."""

    plan: SamplingPlan
    units: list
    labels: list[str]
    width: int
    height: int
    prompt: str
    negative_prompt: str
    cfg_scale: float
    prompt_steps: int
    model: _Model | None = None  # the pass's checkpoint when not the request's (the hires checkpoint)
    refiner: _Model | None = None  # the checkpoint that takes over at the switch point (engine.refiner)


@dataclass(frozen=True)
class _Source:
    """img2img: the prepared init image (engine.img2img.InitPlan), its latent on the device, and the
    inpainting blend (init latent, nmask) or None."""

    plan: Any
    latent: Any
    blend: tuple | None


@dataclass(frozen=True)
class _Context:
    """One request on its runtime: what its stages share, made by Engine.generate and handed to each stage
    (never kept on the Engine or the cached _Runtime). Filled in order: validated, planned (Engine._plan), the
    init image encoded (Engine._init_latents)."""

    req: GenerationRequest
    rt: _Runtime
    reporter: ProgressReporter
    timer: _Timer
    width: int  # the first pass's size
    height: int
    hires: HiresSize | None = None  # the hires fix's sizes
    warnings: list[str] = field(default_factory=list)
    networks: PreparedNetworks | None = None  # the prompt's LoRA patch (on the backend) and infotext hashes
    text_model: TextModelInfo | None = None  # keyed by the request's LoRA and embeddings (the prompt cache's key)
    ti: TextualInversion | None = None  # the store's embeddings that fit the model
    seeds: list[int] = field(default_factory=list)  # of every image (batch_size * n_iter)
    subseeds: list[int] = field(default_factory=list)
    first: _Pass | None = None
    second: _Pass | None = None  # the hires fix's pass
    source: _Source | None = None  # img2img
    preview: Previewer | None = None  # live previews (engine.preview): the request's live_preview and a sink
    refiner: _Model | None = None  # the request's refiner checkpoint
    hr_model: _Model | None = None  # the hires fix's checkpoint (hr_checkpoint_name)
    # what the passes did (mutable): "refined" (the refiner took over in some batch), "last" (the runtime whose
    # UNet ran last: its VAE decodes, as the webui decodes with the model loaded then)
    state: dict = field(default_factory=dict)


class Engine:
    """The txt2img / img2img engine: ``Engine(config).generate(request) -> GenerationResult``.

    Models, backends and encoded prompts are cached between requests; one lock serialises generation
    (one engine drives one device). What belongs to a request lives in its _Context, not on the engine.
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
        self._torch_twin: Engine | None = None  # serves reference units for a backend of exported graphs
        self._faces: faces.FaceModels | None = None  # face restorers (restore_faces), loaded on first use
        self._approx: ApproxModels | None = None  # TAESD / Approx NN (engine.preview), loaded on first use
        self._detectors: adetailer.Detectors | None = None  # ADetailer's detectors (engine.adetailer), on first use
        self._ip: ip_adapter.IPAdapters | None = None  # IP-Adapter files and CLIP vision encoders (engine.ip_adapter)
        self.clock = time.monotonic  # what the ETA is measured with (tests use a fake clock)

    # ------------------------------------------------------------------------------------------ models
    @property
    def store(self):
        if self._store is None:
            self._store = ModelStore.from_config(self.config)
        return self._store

    def default_model_name(self) -> str:
        """EngineConfig.default_model, else the bundled demo model, else the store's first checkpoint."""
        return self.store.default_checkpoint(self.config.default_model).name

    def runtime(self, name: str | None, vae: str = "Automatic", keep: tuple = ()) -> _Runtime:
        """The loaded model ``name`` on its backend; loading one drops every other cached model but ``keep``'s (the
        runtimes the request already holds: its base model beside its refiner / hires checkpoint)."""
        name = name or self.default_model_name()
        if keep or len(self._runtimes) > 1:  # two resident: found by the key, not through the store's one-model cache
            entry = self.store.resolve(name, field="sd_model_checkpoint")
            vae_path = self.store.resolve_vae(entry, vae, self.config.allow_pickle)
            rt = self._runtimes.get((str(entry.path), self.store.hash_of(entry), str(vae_path)))
            if rt is not None:
                return rt
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
            def load_weights(*sources: str):
                """The torch weights of the modules ``sources`` (all when none), read from the checkpoint."""
                self.store.load_weights(model, allow_pickle=self.config.allow_pickle, only=sources or None)

            # released weights come back through it when an on-demand component (a seamless variant) is exported
            backend.weights_loader = load_weights
            if getattr(backend, "int8", False):  # precision int8: calibrated once, on the exact path's UNet inputs
                backend.calibration = lambda: calibration_feeds(type(self), self.config, name, vae)
            if model.meta and not adopt_cached(backend, model.components, load_weights):
                export_ahead(backend)  # a cold start: every export before any compile (engine.backends.weights)
            rt = _Runtime(model, backend, EmbeddingCache(), Networks(self.store, model, self.config.allow_pickle))
            # one model resident at a time, two with a refiner or a hires checkpoint (docs/DECISIONS.md)
            self._runtimes = {**{k: v for k, v in self._runtimes.items() if any(v is r for r in keep)}, key: rt}
            log.info("model %s [%s] ready on %s in %.2fs", model.name, model.short_hash,
                     self.config.backend.value, time.perf_counter() - t0)
        return rt

    def _controlnet(self, rt: _Runtime, name: str, field_name: str):
        """Loads the ControlNet ``name`` into the runtime's backend (component ``controlnet:<name>``)."""
        cn = self.store.load_controlnet(name, allow_pickle=self.config.allow_pickle)
        component = controlnet_component(name)
        if component not in rt.controlnets:
            rt.model.family.check_controlnet(cn, rt.model.name, field_name)
            # each ControlNet model has its own backend (its artefacts are keyed by its own hash)
            backend = create_backend(self.config, {"controlnet": cn.module}, model_hash=cn.short_hash,
                                     progress=self._export_progress, owned=True)
            rt.controlnets[component] = (cn, backend)
        return rt.controlnets[component][0]

    @staticmethod
    def _export_progress(what: str, done: int, total: int) -> None:
        """The backends' exporter callback, routed to the progress of the request running in this thread
        (phase exporting); an export outside a request (a direct ``runtime(...).backend.run``) reports nowhere."""
        reporter = _REPORTER.get()
        if reporter is not None:
            reporter.export(what, done, total)

    @staticmethod
    def _run_fn(rt: _Runtime, seamless: bool = False):
        """``run(component, feeds)`` over the model's backend and its ControlNets' backends; ``seamless`` (the
        request's ``tiling``): the UNet components run as their circular-padding variants (export.descriptors)."""

        def run(component: str, feeds):
            if component in rt.controlnets:
                return rt.controlnets[component][1].run("controlnet", feeds)
            if seamless:  # an IP-Adapter variant's base too (export.ip_adapter: "{base}+ip:...")
                base, mark, rest = component.partition("+ip:")
                component = SEAMLESS.get(base, base) + mark + rest
            return rt.backend.run(component, feeds)

        return run

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, request: GenerationRequest, *, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None, on_images: ImagesFn | None = None,
                 preview: PreviewSink | None = None) -> GenerationResult:
        """``progress(Progress)`` gets each phase (loading, exporting, encoding, sampling, decoding) and step
        (engine.progress); ``cancel`` set stops the request between steps and between the tiles of a tiled VAE
        pass (``Cancelled``). ``on_images(first_index, images, infotexts)``, when given, receives each iteration's
        images as soon as they are decoded and the result's ``images`` stay empty (its ``infotexts`` are all
        there): the images of an ``n_iter`` request are never all held at once (engine.memory counts one batch).
        ``preview(step, image)`` gets the request's live previews (``request.live_preview``; engine.preview), from
        another thread."""
        if request.adetailer is not None:  # ADetailer: the request, then its tabs' inpaint passes on each image
            return adetailer.run(self, request, self.detectors, progress=progress, cancel=cancel,
                                 on_images=on_images, preview=preview)
        if request.sd_upscale is not None:  # the "SD upscale" script: img2img passes over tiles of the upscale
            return sd_upscale.run(self, request, self._upscaling(request), progress=progress, cancel=cancel)
        with self._lock:
            reporter = ProgressReporter(progress, cancel, request.n_iter * request.steps, clock=self.clock)
            reporter.preview_sink = preview
            token = _REPORTER.set(reporter)
            try:
                return self._generate(request, reporter, on_images)
            finally:
                _REPORTER.reset(token)
                if reporter.previewer is not None:
                    reporter.previewer.close(wait=10.0)  # the decode in flight, if any

    @property
    def detectors(self) -> adetailer.Detectors:
        """ADetailer's detectors of the model store's folder (engine.adetailer.detectors), made on first use."""
        if self._detectors is None or self._detectors.models_dir != self.store.root:
            self._detectors = adetailer.Detectors(self.store.root, self.config.allow_pickle, self.config.device)
        return self._detectors

    @property
    def approx(self) -> ApproxModels:
        """The models/VAE-approx networks (TAESD backends, Approx NN), loaded on first use."""
        if self._approx is None:
            self._approx = ApproxModels(self.config, self.store.root, progress=self._export_progress)
        return self._approx

    def _vae_run(self, ctx: _Context, which: str, rt: _Runtime | None = None):
        """``run(component, feeds)`` of the VAE stage ``which`` ("encode" / "decode"): the model's VAE (``rt``'s:
        the refiner's or the hires checkpoint's where it sampled), or TAESD (TAESDXL for SDXL) where the request's
        vae_{which}_method says so (webui sd_vae_{which}_method)."""
        if getattr(ctx.req, f"vae_{which}_method") == "TAESD":
            return self.approx.run(latent_space(ctx.rt.model.family.arch), f"vae_{which}_method")
        return (rt or ctx.rt).backend.run

    @staticmethod
    def _seamless(ctx: _Context, which: str) -> bool:
        """Whether the VAE stage ``which`` runs its circular-padding variant: ``tiling`` with the model's VAE
        (TAESD stays plain, as the webui patches only the model's own convolutions)."""
        return ctx.req.tiling and getattr(ctx.req, f"vae_{which}_method") != "TAESD"

    def _previewer(self, req: GenerationRequest, rt: _Runtime, sink: PreviewSink | None) -> Previewer | None:
        """The request's live previews (engine.preview), or None without settings or a sink."""
        if req.live_preview is None or sink is None:
            return None
        decode = self.approx.preview_decoder(req.live_preview.method, latent_space(rt.model.family.arch),
                                             rt.backend.run, self.config.vae_tiling, self.config.device)
        return Previewer(req.live_preview, decode, sink)

    def _generate(self, req: GenerationRequest, reporter: ProgressReporter,
                  on_images: ImagesFn | None = None) -> GenerationResult:
        """Orchestration only: each stage is a call into the room that owns its rules, with the request's
        _Context."""
        reference = [k for k, u in enumerate(req.controlnet_units) if u.module in REFERENCE_MODULES]
        if reference and self.config.backend is not BackendKind.TORCH:
            return self._on_torch(req, reporter, reference, on_images)
        timer = _Timer()
        # 1. validate: the sampler names, the model, the request against the model's family and the limits
        sampler = resolve(req.sampler_name, req.scheduler)
        check_methods(req.vae_encode_method, req.vae_decode_method, req.live_preview)
        hr_sampler = self._hires_sampler(req) if req.hires is not None else None
        t0 = time.perf_counter()
        reporter.phase("loading", req.model or "default model")
        rt = self.runtime(req.model, req.vae)
        family = rt.model.family
        timer.add("load", t0)
        width, height = self._validate(req, family)
        hires = self._hires_size(req, family, width, height) if req.hires is not None else None
        warnings = [w for w in (family.size_warning(width, height),) if w]
        for warning in warnings:
            log.info("%s: %s", rt.model.name, warning)  # carried in info["warnings"]; the CLI prints it
        # the prompt's <lora:...> tags -> the backend's weights (engine.networks); the text model keyed by them
        t0 = time.perf_counter()
        networks, text_model, ti = self._networks(rt, req)
        timer.add("networks", t0)
        t0 = time.perf_counter()
        refiner, hr_model = self._second_models(req, rt, width, height, hires)
        timer.add("load", t0)
        reporter.previewer = self._previewer(req, rt, reporter.preview_sink)
        ctx = _Context(req, rt, reporter, timer, width, height, hires, warnings, networks, text_model, ti,
                       preview=reporter.previewer, refiner=refiner, hr_model=hr_model)

        # 2. plan: sigmas (cut at the denoising strength for img2img), the denoiser's schedule, seeds, units
        ctx = self._plan(ctx, sampler, hr_sampler)

        # 3. init: the init image resized/masked (engine.img2img) and encoded, once for all iterations (webui)
        if req.init is not None:
            ctx = replace(ctx, source=self._init_latents(ctx))

        # 4.-8. each batch: condition, noise, sample, hires fix, decode; handed on at once with on_images
        images: list[np.ndarray] = []
        for it in range(req.n_iter):
            batch, cond = self._batch(ctx, it)
            if on_images is None:
                images.extend(batch)
                continue
            first = it * req.batch_size
            generation = self._generation(ctx, cond)
            on_images(first, batch, [generation.infotext(first + i) for i in range(len(batch))])
            del batch

        # 9. describe: webui infotexts and the info dict
        return self._describe(ctx, images, cond)

    def _on_torch(self, req: GenerationRequest, reporter: ProgressReporter, reference: list[int],
                  on_images: ImagesFn | None = None):
        """A request with reference units (attention hooks, engine.controlnet.reference) on a backend that runs
        exported graphs: served by a torch engine of the same configuration (made on first use, its model kept
        as this engine keeps its own), said in the log, the infotext ("Backend: torch") and info["warnings"]."""
        if self._torch_twin is None:
            self._torch_twin = Engine(replace(self.config, backend=BackendKind.TORCH))
            self._torch_twin.clock = self.clock
        fields = ", ".join(f"controlnet_units[{k}] ({req.controlnet_units[k].module})" for k in reference)
        note = (f"{fields}: served on the torch backend (the {self.config.backend.value} backend runs exported "
                "graphs, whose attention cannot be hooked)")
        log.info("%s", note)
        result = self._torch_twin._generate(req, reporter, on_images)
        result.info["warnings"] = [*result.info.get("warnings", []), note]
        return result

    # ------------------------------------------------------------------------------------------ stages
    def _plan(self, ctx: _Context, sampler, hr_sampler) -> _Context:
        """The passes (engine.samplers: sigmas cut at the denoising strength for img2img, the denoiser's
        schedule; the ControlNet units at each pass's size) and the seeds of every image."""
        req, family, init, hires = ctx.req, ctx.rt.model.family, ctx.req.init, ctx.hires
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
        t0 = time.perf_counter()
        if req.controlnet_units:  # a model-based preprocessor loads and runs its network here
            ctx.reporter.phase("preprocessing", ", ".join(u.module for u in req.controlnet_units))
        # with the hires fix the refiner acts in the second pass only (webui hires_fix_refiner_pass "second pass")
        first = _Pass(plan, *self._controlnet_units(ctx.rt, req, ctx.width, ctx.height), ctx.width, ctx.height,
                      req.prompt, req.negative_prompt, req.cfg_scale, req.steps,
                      refiner=ctx.refiner if hires is None else None)
        second = None
        if hires is not None:
            hr = req.hires
            second = _Pass(hr_plan, *self._controlnet_units(ctx.rt, req, hires.width, hires.height), hires.width,
                           hires.height, req.prompt if hr.prompt is None else hr.prompt,
                           req.negative_prompt if hr.negative_prompt is None else hr.negative_prompt,
                           req.cfg_scale if hr.cfg_scale is None else hr.cfg_scale, hr_plan.steps,
                           model=ctx.hr_model, refiner=ctx.refiner)
        ctx.timer.add("controlnet_preprocess", t0)
        ctx.reporter.steps = req.n_iter * (plan.steps + (hr_plan.steps if hr_plan else 0))
        return replace(ctx, first=first, second=second, seeds=[seed + i for i in range(total)],
                       subseeds=[subseed + i for i in range(total)])

    def _batch(self, ctx: _Context, it: int) -> tuple[list[np.ndarray], Any]:
        """Iteration ``it`` of the request (one batch of ``batch_size`` images): its images, and its first
        pass's conditioning (engine.conditioning.Conditioning)."""
        req, rt, first, source = ctx.req, ctx.rt, ctx.first, ctx.source
        batch = slice(it * req.batch_size, (it + 1) * req.batch_size)
        seeds, subseeds = ctx.seeds[batch], ctx.subseeds[batch]
        # 4. condition: prompts -> per-step conditioning (cached per model)
        t0 = time.perf_counter()
        ctx.reporter.phase("encoding")
        cond = self._condition(ctx, first)
        ctx.timer.add("text_encoder", t0)

        # 5. noise: webui-seeded initial latents (the init latent noised to the plan's first sigma)
        t0 = time.perf_counter()
        rng = ImageRNG(ctx.rt.model.family.latent_shape(ctx.width, ctx.height), seeds, subseeds,
                       req.subseed_strength, eta_noise_seed_delta=first.plan.ensd)
        noise = to_device(rng.first().numpy(), self.config.device)
        if req.init is not None and req.init.initial_noise_multiplier != 1.0:
            noise = noise * req.init.initial_noise_multiplier
        x = first.plan.start(noise, None if source is None else source.latent)

        # 6. sample: the sampler over the denoiser (CFG, ControlNet, inpainting blend) on the plan's sigmas
        ctx.reporter.phase("sampling", f"batch {it + 1} of {req.n_iter}" if req.n_iter > 1 else "")
        latents = self._sample(ctx, first, x, rng, cond, None if source is None else source.blend)
        ctx.timer.add("sampling", t0)

        # 7. hires fix: upscale (latent or image), then an img2img pass at the new size
        if ctx.second is not None:
            latents = self._hires_pass(ctx, latents, seeds, subseeds)

        # 8. decode (and paste the init image's kept pixels back, for inpainting)
        t0 = time.perf_counter()
        ctx.reporter.phase("decoding")
        last = ctx.state.pop("last", ctx.rt)  # the webui decodes with the model that sampled last (refiner, hires)
        decoded = to_uint8(decode_latents(self._vae_run(ctx, "decode", last), latents, self.config.vae_tiling,
                                          ctx.reporter.check_cancel, seamless=self._seamless(ctx, "decode")))
        if req.face_restoration is not None:  # webui: after decoding, before the inpainting overlay
            ctx.reporter.phase("decoding", "face restoration")
            decoded = [self._restore_faces(req, img) for img in decoded]
        images = decoded if source is None else [source.plan.finish(img) for img in decoded]
        ctx.timer.add("vae_decoder", t0)
        return images, cond

    def _restore_faces(self, req: GenerationRequest, image: np.ndarray) -> np.ndarray:
        """One decoded image's faces restored (engine.faces) by the request's restorer."""
        if self._faces is None or self._faces.models_dir != self.store.root:
            self._faces = faces.FaceModels(self.store.root, self.config.device)
        fr = req.face_restoration
        return faces.restore(image, fr.model, 1.0, fr.codeformer_weight, models=self._faces)

    def _generation(self, ctx: _Context, cond) -> Generation:
        """The request described as the webui does (engine.infotext): the infotext of each image."""
        req, rt, init = ctx.req, ctx.rt, ctx.req.init
        extra: dict[str, Any] = {}
        if ctx.source is not None:
            extra.update(ctx.source.plan.infotext)
        if ctx.second is not None:
            extra.update(hires_infotext(req, ctx.second.plan, ctx.first.plan))
            if ctx.hr_model is not None:
                extra["Hires checkpoint"] = ctx.hr_model.label
        if ctx.state.get("refined"):  # the webui writes them when the switch happens
            extra.update({"Refiner": ctx.refiner.label, "Refiner switch at": req.refiner.switch_at})
        strength = init.denoising_strength if init is not None else \
            req.hires.denoising_strength if req.hires is not None else None
        # the backend's own label where it has one (``openvino bf16``: the precision the CPU really runs)
        backend_label = getattr(rt.backend, "label", None) or self.config.backend.value
        restorer = None if req.face_restoration is None else faces.check(self.store.root, req.face_restoration.model)
        return Generation(req, rt.model, ctx.first.plan, ctx.width, ctx.height, ctx.seeds, ctx.subseeds,
                          ctx.first.labels, backend_label, denoising_strength=strength, extra=extra,
                          face_restoration=restorer,
                          lora_hashes=ctx.networks.lora_hashes, ti_hashes=rt.networks.ti_hashes(cond.embeddings))

    def _describe(self, ctx: _Context, images: list[np.ndarray], cond) -> GenerationResult:
        """webui infotexts and the info dict (engine.infotext), the result."""
        req = ctx.req
        generation = self._generation(ctx, cond)
        infotexts = [generation.infotext(i) for i in range(len(ctx.seeds))]
        info = generation.info(infotexts, ctx.timer.timings, device=self.config.device,
                               precision=self.config.precision.value)
        info["warnings"] = ctx.warnings
        # the extension's detected maps: per unit, the hires pass's map then the first pass's
        detected = []
        for k, spec in enumerate(req.controlnet_units):
            if spec.save_detected_map:
                if ctx.second is not None:
                    detected.append(ctx.second.units[k].detected_map)
                detected.append(ctx.first.units[k].detected_map)
        return GenerationResult(images=images, infotexts=infotexts, info=info, seeds=ctx.seeds,
                                subseeds=ctx.subseeds, timings=dict(ctx.timer.timings), detected_maps=detected)

    def _condition(self, ctx: _Context, p: _Pass, model: _Model | None = None):
        """The pass's prompts -> per-step conditioning with the request's text model and embeddings, or those of
        ``model`` (the pass's own checkpoint, the refiner)."""
        n = ctx.req.batch_size
        model = model or p.model
        rt, text_model, ti = (ctx.rt, ctx.text_model, ctx.ti) if model is None else (model.rt, model.text_model,
                                                                                      model.ti)
        return encode_request(
            rt.backend, text_model, [strip_networks(p.prompt)] * n, [p.negative_prompt] * n,
            steps=p.prompt_steps, clip_skip=ctx.req.clip_skip, width=p.width, height=p.height,
            cache=rt.prompt_cache, max_chunks=self.config.max_prompt_chunks, ti=ti,
        )

    def _sample(self, ctx: _Context, p: _Pass, x, rng: ImageRNG, cond, blend=None):
        """The pass's sampler over the denoiser; ``blend`` (init latent, nmask) turns on the inpainting blend."""
        req, plan = ctx.req, p.plan
        sigmas = to_device(plan.sigmas, self.config.device)
        noise = plan.noise(x, rng, rng.seeds)
        # with the hires fix, a unit acts in the passes its hr_option names (sd-webui-controlnet)
        units = [u for u, spec in zip(p.units, req.controlnet_units)
                 if ctx.second is None or HiresOption.parse(spec.hr_option).acts_in(p is ctx.second)]
        reference = None
        if any(u.reference for u in units):
            family = ctx.rt.model.family
            reference = ReferenceInjection(ctx.rt.backend, units, plan.steps, family.schedule.alphas_cumprod,
                                           lambda pixels: self._encode(ctx.rt, pixels, req.tiling),
                                           seed=rng.seeds[0],
                                           sdxl=family.arch is Arch.SDXL, hires=p is ctx.second)
        rt = ctx.rt if p.model is None else p.model.rt
        ratio = req.token_merging_ratio_hr if p is ctx.second else req.token_merging_ratio
        set_tome = getattr(rt.backend, "set_token_merging", None)  # ToMe: torch only (others: refused)
        if set_tome is not None:
            set_tome(ratio)
        elif ratio:
            raise BackendUnavailable(f"the {self.config.backend.value} backend cannot merge tokens (ToMe)")
        ip = [u for u in units if getattr(u, "ip", False)]  # IP-Adapter units (engine.ip_adapter)
        units = [u for u in units if not getattr(u, "ip", False)]
        fix = None
        if any(u.module in COLORFIX_MODULES for u in units):  # tile_colorfix(+sharp): engine.controlnet.colorfix
            fix = ColorFix(units, rt.model.family.schedule.alphas_cumprod,
                           lambda pixels: self._encode(rt, pixels, seamless=req.tiling), hires=p is ctx.second)
        call = _ModelCall(self._run_fn(rt, req.tiling), units, plan.steps, reference,
                          ip_adapter.IPInjection(ip, plan.steps) if ip else None, fix)
        denoiser = Denoiser(call, plan.schedule, rt.model.family.prediction_type, p.cfg_scale, cond.at, plan.sigmas,
                            s_min_uncond=req.s_min_uncond, s_min_uncond_all=req.s_min_uncond_all)
        ctx.state["last"] = rt
        if p.refiner is not None:  # the refiner takes over at the switch point, in this same run (engine.refiner)
            denoiser = self._refiner_switch(ctx, p, denoiser, rt)
        callback = ctx.reporter
        if ctx.preview is not None:  # live previews: the denoiser's last x0 at the interval (engine.preview)
            model_denoiser = denoiser

            def callback(info=None):
                ctx.reporter(info)
                ctx.preview.offer(ctx.reporter.step, model_denoiser.last)

        if blend is not None:
            denoiser = LatentBlend(denoiser, *blend)
        ctx.reporter.check_cancel()
        latents = plan.sample(denoiser, x, sigmas=sigmas, noise=noise, callback=callback, s_churn=req.s_churn,
                              s_tmin=req.s_tmin, s_tmax=req.s_tmax, s_noise=req.s_noise)
        return latents if blend is None else denoiser.final(latents)

    def _refiner_switch(self, ctx: _Context, p: _Pass, base: Denoiser, rt: _Runtime) -> RefinerSwitch:
        """The pass's denoiser until the webui's switch rule holds (engine.refiner), then the refiner's: the
        prompts encoded by the refiner's text encoder at the switch (progress: "encoding", then "sampling" with
        the detail "refiner"), its UNet without the pass's ControlNet units (the extension hooks the base model's
        UNet only), the same CFG scale, sigmas and sampler state."""
        refiner = p.refiner

        def make_refiner():
            cond = self._condition(ctx, p, refiner)
            ctx.reporter.phase("sampling", "refiner")
            ctx.state.update(refined=True, last=refiner.rt)
            return Denoiser(_ModelCall(self._run_fn(refiner.rt, ctx.req.tiling), [], p.plan.steps), p.plan.schedule,
                            refiner.rt.model.family.prediction_type, p.cfg_scale, cond.at, p.plan.sigmas)

        def on_switch():
            log.info("refiner %s takes over (switch at %s)", refiner.label, ctx.req.refiner.switch_at)
            ctx.reporter.phase("encoding", "refiner")

        return RefinerSwitch(base, make_refiner, rt.model.family.schedule.sigmas, ctx.req.refiner.switch_at,
                             on_switch)

    def _second_models(self, req: GenerationRequest, rt: _Runtime, width: int, height: int, hires):
        """The request's refiner and hires checkpoint (``(refiner, hr_model)``, None each when not asked or the
        same checkpoint as the request's), loaded beside the request's model and checked: a checkpoint of the same
        latent space, the sizes it samples at allowed by its UNet. The refiner's prompts keep their embeddings;
        its <lora:...> tags are not applied to it (docs/DECISIONS.md)."""
        out = []
        keep = [rt]
        asked = (("refiner.checkpoint", req.refiner.checkpoint if req.refiner else None),
                 ("hires.checkpoint", req.hires.checkpoint if req.hires else None))
        for field_name, name in asked:
            if not name:
                out.append(None)
                continue
            self.store.resolve(name, field=field_name)  # not found: an error naming the field
            other = self.runtime(name, req.vae, keep=tuple(keep))
            if other is rt:  # the webui skips a refiner / hires checkpoint that is the loaded model
                out.append(None)
                continue
            keep.append(other)
            check_second_checkpoint(rt.model.family.arch, other.model.family.arch, rt.model.name, other.model.name,
                                    field_name, len(req.controlnet_units))
            sizes = [(hires.width, hires.height)] if hires is not None else [(width, height)]
            for w, h in sizes:
                try:
                    other.model.family.check_size(w, h, self.config.max_size)
                except InvalidRequest as exc:
                    raise InvalidRequest(field_name, f"{other.model.name} cannot sample {w}x{h}: {exc.message}",
                                         exc.allowed) from None
            _, text_model, ti = self._networks(other, replace(req, disable_extra_networks=True))
            out.append(_Model(other, text_model, ti, f"{model_label(other.model)} [{other.model.short_hash}]"))
        # what the request does not use is not kept (engine.memory counts the request's models)
        self._runtimes = {k: v for k, v in self._runtimes.items() if any(v is r for r in keep)}
        return out[0], out[1]

    def _encode(self, rt: _Runtime, pixels: np.ndarray, check: Callable[[], None] | None = None,
                seamless: bool = False, run=None):
        """(B, 3, H, W) floats in [0, 1] -> (B, 4, H/8, W/8) latents through the backend's VAE encoder (or ``run``:
        TAESD by the request's vae_encode_method, Engine._vae_run); ``check()`` before each tile: cancellation;
        ``seamless``: its circular-padding variant."""
        image = to_device(np.ascontiguousarray(pixels, dtype=np.float32), self.config.device)
        # tiled above the configured size (engine.tiling)
        return to_device(encode_image(run or rt.backend.run, image, self.config.vae_tiling, check, seamless),
                         self.config.device)

    def _upscale(self, ctx: _Context, image: np.ndarray, width: int, height: int, upscaler: str) -> np.ndarray:
        """One image through the hires fix's image upscaler (PIL or model), the request's cancellation checked
        first."""
        ctx.reporter.check_cancel()
        return upscale_image(image, width, height, upscaler, self._upscaling(ctx.req))

    def _upscaling(self, request: GenerationRequest) -> Upscaling:
        """How the request's model upscalers run (the hires fix's, the SD upscale script's): this engine's store
        and device, the request's tiles (the webui's ESRGAN_tile options, as the extras run them)."""
        return Upscaling(models_dir=self.config.models_dir, device=self.config.device, tile=request.upscaler_tile,
                         overlap=request.upscaler_tile_overlap)

    def _init_latents(self, ctx: _Context) -> _Source:
        """img2img: the init image prepared by the webui rules (engine.img2img), encoded, resized for the
        latent-upscale mode, repeated over the batch; with a mask, the masked latent filled and the blend."""
        req = ctx.req
        t0 = time.perf_counter()
        init_plan = prepare_init(req.init, ctx.width, ctx.height, scale=ctx.rt.model.family.vae_scale_factor)
        ctx.timer.add("init_image", t0)
        t0 = time.perf_counter()
        latent = to_host(self._encode(ctx.rt, init_plan.pixels, ctx.reporter.check_cancel,
                                      self._seamless(ctx, "encode"), self._vae_run(ctx, "encode")))
        latent = latent.astype(np.float32)
        h, w = init_plan.latent_size
        if init_plan.resize_latent and latent.shape[2:] != (h, w):
            latent = upscale_latent(latent, h, w, "Latent")
        latent = np.repeat(latent, req.batch_size, axis=0)
        ctx.timer.add("vae_encoder", t0)
        nmask = init_plan.latent_mask()
        blend = None
        if nmask is not None:
            nmask = np.broadcast_to(nmask[None, None], latent.shape).astype(np.float32)
            mask = 1.0 - nmask
            if init_plan.inpainting_fill == 2:  # latent noise: the first batch's seeds, plain draws (webui)
                noise = ImageRNG((ctx.rt.model.family.latent_channels, h, w), ctx.seeds[: req.batch_size]).first()
                latent = latent * mask + noise.numpy() * nmask
            elif init_plan.inpainting_fill == 3:  # latent nothing
                latent = latent * mask
            blend = (to_device(latent, self.config.device), to_device(np.ascontiguousarray(nmask),
                                                                        self.config.device))
        return _Source(init_plan, to_device(latent, self.config.device), blend)

    def _hires_sampler(self, req: GenerationRequest):
        """The hires pass's sampler by the webui rules (engine.rules.hires_sampler)."""
        return resolve_hires_sampler(req.sampler_name, req.scheduler, req.hires, resolve)

    def _hires_size(self, req: GenerationRequest, family, width: int, height: int) -> HiresSize:
        """The second pass's size by the webui rules (engine.img2img.hires_size), checked like width/height;
        an error names hr_scale (or hr_resize_x/y) with the allowed range."""
        size = hires_size(width, height, req.hires, scale=family.vae_scale_factor)
        try:
            family.check_size(size.width, size.height, self.config.max_size)
        except InvalidRequest as exc:
            raise InvalidRequest(size.field, f"gives a second pass of {size.width}x{size.height}, which is not "
                                 f"allowed for this model", size.allowed(family.pixel_multiple,
                                                                           self.config.max_size)) from None
        return size

    def _hires_pass(self, ctx: _Context, latents, seeds: list[int], subseeds: list[int]):
        """webui sample_hr_pass: latent upscalers resize the latent; image upscalers decode (truncated to
        uint8, as the webui), resize the image and encode it; then the latent is cut to the target size and
        an img2img pass runs with fresh per-image noise at that size."""
        hr, size, p = ctx.req.hires, ctx.hires, ctx.second
        t0 = time.perf_counter()
        if hr.upscaler_name in LATENT_UPSCALERS:
            x0 = upscale_latent(latents, *size.upscale_latent, hr.upscaler_name)
        else:
            ctx.reporter.phase("decoding", "hires fix: the first pass, for the image upscaler")
            decoded = decode_latents(self._vae_run(ctx, "decode"), latents, self.config.vae_tiling,
                                     ctx.reporter.check_cancel, seamless=self._seamless(ctx, "decode"))
            lowres = (np.clip(decoded, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
            del decoded
            pixels = np.stack([self._upscale(ctx, img, size.upscale_width, size.upscale_height, hr.upscaler_name)
                               for img in lowres]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            hr_rt = ctx.rt if p.model is None else p.model.rt  # the hires checkpoint's VAE (webui)
            x0 = self._encode(hr_rt, pixels, ctx.reporter.check_cancel, self._seamless(ctx, "encode"),
                              self._vae_run(ctx, "encode", hr_rt))
        x0 = size.truncate(x0)
        ctx.timer.add("hires_upscale", t0)
        if p.plan.steps == 0:  # denoising strength 0: the webui's 0-step pass returns the upscaled latent
            return to_device(x0, self.config.device)
        t0 = time.perf_counter()
        ctx.reporter.phase("encoding", "hires fix")
        cond = self._condition(ctx, p)
        ctx.timer.add("text_encoder", t0)
        t0 = time.perf_counter()
        rng = ImageRNG(tuple(x0.shape[1:]), seeds, subseeds, ctx.req.subseed_strength,
                       eta_noise_seed_delta=p.plan.ensd)
        x = p.plan.start(to_device(rng.first().numpy(), self.config.device), x0)
        ctx.reporter.phase("sampling", "hires fix")
        out = self._sample(ctx, p, x, rng, cond)
        ctx.timer.add("hires_sampling", t0)
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
        if req.face_restoration is not None:  # before any work: no model installed is an error naming the folder
            faces.check(self.store.root, req.face_restoration.model)
        return width, height

    def _networks(self, rt: _Runtime, req: GenerationRequest):
        """The request's extra networks (engine.networks.PreparedNetworks), applied to the model's backend, and
        the text model and textual-inversion embeddings its prompts are encoded with: ``(prepared, text_model,
        ti)``; the text model's key names the LoRA and embeddings, so the prompt cache never serves other
        weights' encodings."""
        prepared = rt.networks.prepare(req.prompt, disabled=req.disable_extra_networks, field="prompt")
        if not hasattr(rt.backend, "set_patch"):
            if prepared.patch.uses:
                raise BackendUnavailable(f"the {self.config.backend.value} backend cannot apply LoRA weights")
        else:
            rt.backend.set_patch(prepared.patch)
        ti, ti_key = rt.networks.textual_inversion()
        text_model = rt.model.family.text
        if prepared.patch.text_key or ti_key:
            text_model = replace(text_model, model_hash=f"{text_model.model_hash}+{prepared.patch.text_key}+{ti_key}")
        return prepared, text_model, ti

    def _controlnet_units(self, rt: _Runtime, req: GenerationRequest, width: int, height: int):
        """The request's ControlNet units at ``width x height``, loaded and preprocessed, with their infotext
        labels: ``(units, labels)``."""
        units, labels = [], []
        for k, unit in enumerate(req.controlnet_units):
            field_name = f"controlnet_units[{k}]"
            if ip_adapter.is_ip_module(unit.module):  # an image as the prompt (engine.ip_adapter)
                units.append(self._ip_unit(rt, unit, field_name))
                labels.append(unit_infotext(unit, units[-1].label, units[-1].used))
                continue
            if unit.module in REFERENCE_MODULES:  # model-free: attention injection (engine.controlnet.reference)
                if not supports_reference(rt.backend):
                    raise BackendUnavailable(f"the {self.config.backend.value} backend cannot hook attention "
                                             f"({field_name}.module {unit.module!r})")
                units.append(prepare_unit(unit, width, height, field=field_name, models_dir=self.config.models_dir))
                labels.append(unit_infotext(unit, "None", units[-1].used))
                continue
            cn = self._controlnet(rt, unit.model, f"{field_name}.model")
            weights = None
            if unit.advanced_weighting is not None:
                weights = check_layer_weights(unit.advanced_weighting, residual_count(cn.module),
                                              f"{field_name}.advanced_weighting",
                                              layout=extension_residuals(cn.arch is Arch.CONTROLNET_SDXL))
                log.info("%s: advanced weighting %s (replaces the weight and the control mode's scales)",
                         field_name, list(weights))
            units.append(prepare_unit(unit, width, height, field=field_name, advanced_weighting=weights,
                                      models_dir=self.config.models_dir))
            labels.append(unit_infotext(unit, f"{cn.name} [{cn.short_hash}]", units[-1].used))
        return units, labels

    def _ip_unit(self, rt: _Runtime, unit, field_name: str):
        """An IP-Adapter unit prepared (its reference images encoded, phase "encoding"; cancellable between
        images), its adapter attached to the model's backend for the UNet variant (export.ip_adapter)."""
        if self._ip is None or self._ip.store is not self.store:
            self._ip = ip_adapter.IPAdapters(self.store, self.config.allow_pickle)
        reporter = _REPORTER.get()
        if reporter is not None:
            reporter.phase("encoding", f"{field_name}: IP-Adapter reference image")
        prepared, adapter = self._ip.prepare(unit, field_name, None if reporter is None else reporter.check_cancel)
        self._ip.attach(rt.backend, adapter, rt.backend._components["unet"], rt.model.name, f"{field_name}.model")
        return prepared


class _ModelCall:
    """``model(x_in, t_in, cond, step)`` for the Denoiser: UNet (and ControlNet units) through the backend."""

    def __init__(self, run, units, steps: int, reference: ReferenceInjection | None = None,
                 ip: ip_adapter.IPInjection | None = None, colorfix: ColorFix | None = None):
        self.run = run
        self.units = units
        self.steps = steps
        self.reference = reference  # the pass's reference units (attention injection), if any
        self.ip = ip  # the pass's IP-Adapter units: the UNet's IP-Adapter variant while one acts
        self.colorfix = colorfix  # the pass's tile_colorfix units: their fix of every output

    def _unet(self, base: str, feeds, mask, step: int):
        """The UNet component ``base`` (or its IP-Adapter variant while an IP-Adapter unit acts) on ``feeds``."""
        if self.ip is not None:
            hit = self.ip.feeds(base, step, mask, int(feeds["sample"].shape[0]), feeds["sample"])
            if hit is not None:
                return self.run(hit[0], {**feeds, **hit[1]})["model_output"]
        return self.run(base, feeds)["model_output"]

    def __call__(self, x_in, t_in, cond, step: int):
        feeds = {"sample": x_in, "timestep": t_in, "encoder_hidden_states": cond.context[: x_in.shape[0]]}
        if cond.pooled is not None:
            feeds["text_embeds"] = cond.pooled[: x_in.shape[0]]
            feeds["time_ids"] = cond.time_ids[: x_in.shape[0]]
        if not self.units and self.ip is None:
            return self.run("unet", feeds)["model_output"]
        mask = cond_rows_mask(cond.positive, int(x_in.shape[0]))
        if not self.units:
            return self._unet("unet", feeds, mask, step)
        residuals = controlnet_residuals(self.run, self.units, step, self.steps, feeds, mask)
        injected = self.reference.inject(self.run, feeds, step, mask) if self.reference else contextlib.nullcontext()
        with injected:
            if residuals is not None:
                out = self._unet("unet_control", {**feeds, **residuals}, mask, step)
            else:
                out = self._unet("unet", feeds, mask, step)
        return out if self.colorfix is None else self.colorfix.apply(x_in, t_in, out, mask)


def to_uint8(images) -> list[np.ndarray]:
    """(B, 3, H, W) floats in [0, 1] -> list of (H, W, 3) uint8, rounded as diffusers does (the webui truncates).
    One image at a time: the float temporaries are one image's, not the batch's (engine.memory)."""
    arr = np.asarray(images, dtype=np.float32)
    return [np.ascontiguousarray(((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)).transpose(1, 2, 0))
            for img in arr]
