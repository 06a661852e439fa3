"""The txt2img loop, written once for every backend.

request -> model (store, loader, backend) -> conditioning plan -> webui-seeded noise -> sampler over the
denoiser (CFG, ControlNet) -> VAE decode -> uint8 images, infotexts and the info dict of the API spec.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import EngineConfig
from engine.errors import Cancelled, InvalidRequest
from engine.infotext import create_infotext
from engine.request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
MAX_SEED = 4294967294


def draw_seed(seed: int) -> int:
    """webui: -1 means a random seed in [0, 4294967294)."""
    if seed is None or int(seed) == -1:
        return random.randrange(MAX_SEED)
    return int(seed)


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class _Runtime:
    """A loaded model with its backend, noise schedule and prompt cache (kept between requests)."""

    model: Any  # engine.models.checkpoints.LoadedModel
    backend: Any  # engine.backends.Backend
    schedule: Any  # engine.denoiser.ModelSchedule
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
        from engine.denoiser import ModelSchedule

        name = name or self.default_model_name()
        model = self.store.load_model(name, vae=vae, allow_pickle=self.config.allow_pickle)
        key = (str(model.path), model.sha256, str(model.vae_path))
        rt = self._runtimes.get(key)
        if rt is None:
            t0 = time.perf_counter()
            # the engine owns the loaded model: a non-torch backend frees its torch weights once exported
            backend = create_backend(self.config, model.components, model_hash=self._artefact_key(model),
                                     release_weights=True)
            rt = _Runtime(model, backend, ModelSchedule(model.alphas_cumprod), EmbeddingCache())
            self._runtimes = {key: rt}  # one model resident at a time
            log.info("model %s [%s] ready on %s in %.2fs", model.name, model.short_hash,
                     self.config.backend.value, time.perf_counter() - t0)
        return rt

    @staticmethod
    def _artefact_key(model) -> str:
        vae = f"-vae{model.vae_path.stem}" if getattr(model, "vae_path", None) else ""
        return f"{model.short_hash}{vae}"

    def _controlnet(self, rt: _Runtime, name: str, field_name: str):
        """Loads the ControlNet ``name`` into the runtime's backend (component ``controlnet:<name>``)."""
        from engine.controlnet import controlnet_component

        from engine.backends import create_backend

        cn = self.store.load_controlnet(name, allow_pickle=self.config.allow_pickle)
        component = controlnet_component(name)
        if component not in rt.controlnets:
            _check_controlnet_matches(rt.model, cn, field_name)
            # each ControlNet model has its own backend (its artefacts are keyed by its own hash)
            backend = create_backend(self.config, {"controlnet": cn.module}, model_hash=cn.short_hash,
                                     release_weights=True)
            rt.controlnets[component] = (cn, backend)
        return rt.controlnets[component][0]

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
        with self._lock:
            return self._generate(request, progress, cancel)

    def _generate(self, req: GenerationRequest, progress: ProgressFn | None,
                  cancel: threading.Event | None) -> GenerationResult:
        from engine.conditioning import encode_request
        from engine.controlnet import prepare_unit
        from engine.denoiser import Denoiser
        from engine.noise import ImageRNG, make_noise_sampler
        from engine.samplers import resolve

        timer = _Timer()
        t0 = time.perf_counter()
        sampler = resolve(req.sampler_name, req.scheduler)
        rt = self.runtime(req.model, req.vae)
        model = rt.model
        timer.add("load", t0)

        width = req.width or model.native_size
        height = req.height or model.native_size
        _check_size(width, height, _pixel_multiple(model), self.config.max_size)
        if not 1 <= req.batch_size <= self.config.max_batch_size:
            raise InvalidRequest("batch_size", f"{req.batch_size} is out of range", f"1..{self.config.max_batch_size}")
        steps = req.steps
        sigmas_np = sampler.sigmas(steps, rt.schedule)

        seed = draw_seed(req.seed)
        subseed = draw_seed(req.subseed)
        total = req.batch_size * req.n_iter
        all_seeds = [seed + i for i in range(total)]
        all_subseeds = [subseed + i for i in range(total)]

        t0 = time.perf_counter()
        units, unit_labels = [], []
        for k, unit in enumerate(req.controlnet_units):
            field_name = f"alwayson_scripts.controlnet.units[{k}]"
            cn = self._controlnet(rt, unit.model, f"{field_name}.model")
            units.append(prepare_unit(unit, width, height, field=field_name))
            unit_labels.append(_unit_infotext(unit, f"{cn.name} [{cn.short_hash}]"))
        timer.add("controlnet_preprocess", t0)

        images: list[np.ndarray] = []
        infotexts: list[str] = []
        n_steps_total = req.n_iter * steps
        done = 0
        for it in range(req.n_iter):
            seeds = all_seeds[it * req.batch_size:(it + 1) * req.batch_size]
            subseeds = all_subseeds[it * req.batch_size:(it + 1) * req.batch_size]
            t0 = time.perf_counter()
            plan = encode_request(
                rt.backend, _text_info(model), [req.prompt] * req.batch_size, [req.negative_prompt] * req.batch_size,
                steps=steps, clip_skip=req.clip_skip, width=width, height=height, cache=rt.prompt_cache,
                max_chunks=self.config.max_prompt_chunks,
            )
            timer.add("text_encoder", t0)

            t0 = time.perf_counter()
            rng = ImageRNG((4, height // 8, width // 8), seeds, subseeds, req.subseed_strength,
                           eta_noise_seed_delta=req.eta_noise_seed_delta if sampler.uses_ensd else 0)
            x = self._device_array(rng.first().numpy())
            sigmas = self._device_array(sigmas_np.astype(np.float32))
            x = x * sigmas[0]
            noise = make_noise_sampler(x, rng, brownian=sampler.needs_brownian, seeds=seeds, sigmas=sigmas_np)
            model_call = _ModelCall(self._run_fn(rt), units, steps)
            denoiser = Denoiser(model_call, rt.schedule, model.prediction_type, req.cfg_scale, plan.at, sigmas_np)

            def on_step(info: dict) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(min(done, n_steps_total), n_steps_total)
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")

            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            latents = sampler.sample(denoiser, x, sigmas, noise=noise, callback=on_step, eta=req.eta,
                                     s_churn=req.s_churn, s_tmin=req.s_tmin, s_tmax=req.s_tmax,
                                     s_noise=req.s_noise)
            timer.add("sampling", t0)

            t0 = time.perf_counter()
            decoded = rt.backend.run("vae_decoder", {"latent": latents})["image"]
            batch_images = _to_uint8(_host(decoded))
            timer.add("vae_decoder", t0)
            images.extend(batch_images)
            for b in range(req.batch_size):
                index = it * req.batch_size + b
                infotexts.append(self._infotext(req, model, sampler, width, height, all_seeds, all_subseeds,
                                                index, unit_labels, _backend_label(rt.backend, self.config)))

        info = self._info(req, model, sampler, width, height, all_seeds, all_subseeds, infotexts, timer.timings)
        detected = [u.detected_map for u, spec in zip(units, req.controlnet_units) if spec.save_detected_map]
        return GenerationResult(images=images, infotexts=infotexts, info=info, seeds=all_seeds,
                                subseeds=all_subseeds, timings=dict(timer.timings), detected_maps=detected)

    def _device_array(self, arr: np.ndarray):
        """Sampling runs on numpy arrays on CPU and on torch tensors on a CUDA device."""
        if self.config.device == "cpu":
            return arr
        import torch

        return torch.from_numpy(arr).to(self.config.device)

    # ------------------------------------------------------------------------------------------ texts
    def _infotext(self, req, model, sampler, width, height, seeds, subseeds, index, unit_labels,
                  backend_label: str) -> str:
        params: dict[str, Any] = {
            "Steps": req.steps,
            **sampler.infotext,
            "CFG scale": req.cfg_scale,
            "Seed": seeds[index],
            "Size": f"{width}x{height}",
            "Model hash": model.short_hash,
            "Model": _model_label(model),
            "VAE": model.vae_path.stem if getattr(model, "vae_path", None) else None,
            "Variation seed": subseeds[index] if req.subseed_strength else None,
            "Variation seed strength": req.subseed_strength if req.subseed_strength else None,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "ENSD": req.eta_noise_seed_delta if req.eta_noise_seed_delta else None,
            "Eta": req.eta if req.eta is not None else None,
            "Backend": backend_label,
        }
        for k, label in enumerate(unit_labels):
            params[f"ControlNet {k}"] = label
        return create_infotext(req.prompt, req.negative_prompt, params)

    def _info(self, req, model, sampler, width, height, seeds, subseeds, infotexts, timings) -> dict:
        return {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(seeds),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(seeds),
            "seed": seeds[0],
            "all_seeds": list(seeds),
            "subseed": subseeds[0],
            "all_subseeds": list(subseeds),
            "subseed_strength": req.subseed_strength,
            "width": width,
            "height": height,
            "sampler_name": sampler.name,
            "scheduler": sampler.schedule_label,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "clip_skip": req.clip_skip,
            "sd_model_name": _model_label(model),
            "sd_model_hash": model.short_hash,
            "sd_vae_name": model.vae_path.name if getattr(model, "vae_path", None) else None,
            "infotexts": list(infotexts),
            "backend": self.config.backend.value,
            "device": self.config.device,
            "precision": self.config.precision.value,
            "timings": {k: round(v, 6) for k, v in timings.items()},
        }


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


def _backend_label(backend, config) -> str:
    """The infotext's Backend: the backend's own label where it has one (``openvino bf16``), else its name."""
    return getattr(backend, "label", None) or config.backend.value


def _model_label(model) -> str:
    """The webui names a checkpoint by its file name without extension."""
    name = str(model.name)
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def _text_info(model):
    from engine.conditioning import TextFamily, TextModelInfo
    from engine.models.checkpoints import Arch

    family = {Arch.SD1: TextFamily.SD1, Arch.SD2: TextFamily.SD2, Arch.SDXL: TextFamily.SDXL}[model.arch]
    return TextModelInfo(family, model.sha256 or model.short_hash)


def _unit_infotext(unit, model_label: str) -> str:
    """The sd-webui-controlnet infotext of one unit."""
    fields = {
        "Module": unit.module, "Model": model_label, "Weight": unit.weight, "Resize Mode": unit.resize_mode,
        "Processor Res": unit.processor_res, "Threshold A": unit.threshold_a, "Threshold B": unit.threshold_b,
        "Guidance Start": unit.guidance_start, "Guidance End": unit.guidance_end,
        "Pixel Perfect": unit.pixel_perfect, "Control Mode": unit.control_mode,
    }
    return ", ".join(f"{k}: {_fmt_value(v)}" for k, v in fields.items())


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_size(width: int, height: int, multiple: int, max_size: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % multiple or not 64 <= value <= max_size:
            raise InvalidRequest(name, f"{value} is not allowed for this model",
                                 f"multiples of {multiple} from 64 to {max_size}")


def _check_controlnet_matches(model, controlnet, field_name: str) -> None:
    from engine.models.checkpoints import Arch

    base = {Arch.CONTROLNET_SD1: {Arch.SD1, Arch.SD2}, Arch.CONTROLNET_SDXL: {Arch.SDXL}}.get(controlnet.arch)
    if base is not None and model.arch not in base:
        raise InvalidRequest(field_name, f"ControlNet {controlnet.name} ({controlnet.arch.value}) does not fit the "
                             f"checkpoint {model.name} ({model.arch.value})", "a ControlNet of the same family")


def _pixel_multiple(model) -> int:
    """Image sizes must be multiples of 8 x the UNet's total downscale (latent Concat in the up blocks)."""
    levels = len(model.components["unet"].config.down_block_types)
    return 8 * 2 ** (levels - 1)


def _host(arr) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    return arr.detach().float().cpu().numpy()


def _to_uint8(images) -> list[np.ndarray]:
    """(B, 3, H, W) floats in [0, 1] -> list of (H, W, 3) uint8, rounded as diffusers does (the webui truncates)."""
    arr = np.asarray(images, dtype=np.float32)
    arr = np.clip(arr, 0.0, 1.0)
    arr = (arr * 255.0 + 0.5).astype(np.uint8)
    return [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in arr]
