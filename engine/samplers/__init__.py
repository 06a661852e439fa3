"""Samplers and sigma schedules under their webui (v1.10) names.

``SAMPLERS`` maps every webui sampler name and alias to a pure function
``fn(denoise, x, sigmas, *, noise=None, callback=None, **options) -> x`` (numpy or torch, no RNG inside);
``SCHEDULES`` maps every webui schedule label to ``fn(n, sigma_min, sigma_max, model=None) -> n + 1 sigmas``.
:func:`resolve` turns a request's ``sampler_name`` + ``scheduler`` into a :class:`ResolvedSampler` the pipeline
uses directly, applying each sampler's default schedule and "discard penultimate sigma" like the webui.

How the pipeline (engine.pipeline) uses it::

    plan = resolve(request.sampler_name, request.scheduler).prepare(request.steps, family, eta=request.eta,
                                                                    eta_noise_seed_delta=request.eta_noise_seed_delta)
    rng = ImageRNG((4, h, w), seeds, subseeds, subseed_strength, eta_noise_seed_delta=plan.ensd)
    x = plan.start(to_device(rng.first().numpy(), device), init_latent)  # noise * sigmas[0] (+ img2img's latent)
    denoise = Denoiser(model_fn, plan.schedule, prediction_type, cfg_scale, conditioning.at, plan.sigmas)
    x = plan.sample(denoise, x, noise=plan.noise(x, rng, seeds), callback=progress, s_churn=..., ...)
    # x is the latent to decode (timestep samplers return the webui's VP latent, see samplers/timesteps.py)
    plan.infotext  # {"Sampler": ..., "Schedule type": ..., "Eta": ... (webui rule), "ENSD": ... (webui rule)}

Progress: one callback per sampler step; the number of model calls is not always ``len(sigmas) - 1``
(second-order samplers, Restart, DPM adaptive; DDIM/PLMS stop one timestep early like the webui).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from core.errors import InvalidRequest
from engine.noise import make_noise_sampler
from engine.rules import parse_choice
from engine.samplers import dpm_solver, extra, kdiffusion, schedules, timesteps

log = logging.getLogger(__name__)

SamplerFn = Callable[..., Any]


@dataclass(frozen=True)
class SamplerSpec:
    """One webui sampler: its function, aliases and webui options (sd_samplers_kdiffusion.samplers_k_diffusion)."""

    name: str
    fn: SamplerFn
    aliases: tuple[str, ...] = ()
    schedule: str | None = None  # the webui's default schedule option; None: the model's sigmas (Uniform)
    discard_penultimate: bool = False
    second_order: bool = False
    brownian: bool = False  # webui feeds a Brownian-tree noise sampler seeded with the batch's seeds
    uses_ensd: bool = False
    fixed_schedule: bool = False  # DDIM, PLMS, UniPC, DPM fast/adaptive ignore the scheduler, as in the webui
    default_eta: float | None = None
    lcm: bool = False  # runs on the model's LCM schedule (ModelSchedule.for_lcm), as the webui's LCM sampler
    timestep: bool = False  # a webui timestep sampler (VP space start and end, see samplers/timesteps.py)
    options: Mapping[str, Any] = field(default_factory=dict)

    def run(self, denoise: Callable, x: Any, sigmas: Any, *, noise: Callable | None = None,
            callback: Callable | None = None, **options: Any) -> Any:
        """The sampler as the webui runs it under this name: the spec's bound options (DPM++ 2M SDE Heun's
        solver), the sampler's default eta; options the function does not take (eta for Euler, ...) are
        ignored, as the webui does; None values mean the default; s_tmax 0 means infinity (webui)."""
        params = inspect.signature(self.fn).parameters
        kwargs = dict(self.options)
        kwargs.update({k: v for k, v in options.items() if k in params and v is not None})
        if kwargs.get("s_tmax") == 0:
            kwargs["s_tmax"] = float("inf")
        if "eta" in params and "eta" not in kwargs and self.default_eta is not None:
            kwargs["eta"] = self.default_eta
        return self.fn(denoise, x, sigmas, noise=noise, callback=callback, **kwargs)


def _specs() -> tuple[SamplerSpec, ...]:
    k = kdiffusion
    return (
        SamplerSpec("DPM++ 2M", k.dpmpp_2m, ("k_dpmpp_2m",), "Karras"),
        SamplerSpec("DPM++ SDE", k.dpmpp_sde, ("k_dpmpp_sde",), "Karras", second_order=True, brownian=True,
                    default_eta=1.0),
        SamplerSpec("DPM++ 2M SDE", k.dpmpp_2m_sde, ("k_dpmpp_2m_sde",), "Exponential", brownian=True,
                    default_eta=1.0),
        SamplerSpec("DPM++ 2M SDE Heun", k.dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",), "Exponential", brownian=True,
                    default_eta=1.0, options=MappingProxyType({"solver_type": "heun"})),
        SamplerSpec("DPM++ 2S a", k.dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), "Karras", second_order=True,
                    uses_ensd=True, default_eta=1.0),
        SamplerSpec("DPM++ 3M SDE", k.dpmpp_3m_sde, ("k_dpmpp_3m_sde",), "Exponential", discard_penultimate=True,
                    brownian=True, default_eta=1.0),
        SamplerSpec("Euler a", k.euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_ensd=True,
                    default_eta=1.0),
        SamplerSpec("Euler", k.euler, ("k_euler",)),
        SamplerSpec("LMS", k.lms, ("k_lms",)),
        SamplerSpec("Heun", k.heun, ("k_heun",), second_order=True),
        SamplerSpec("DPM2", k.dpm_2, ("k_dpm_2",), "Karras", discard_penultimate=True, second_order=True),
        SamplerSpec("DPM2 a", k.dpm_2_ancestral, ("k_dpm_2_a",), "Karras", discard_penultimate=True,
                    second_order=True, uses_ensd=True, default_eta=1.0),
        # The webui gives DPM fast/adaptive the model's sigma range and n = steps, whatever the schedule.
        SamplerSpec("DPM fast", dpm_solver.dpm_fast, ("k_dpm_fast",), uses_ensd=True, fixed_schedule=True,
                    default_eta=1.0),
        SamplerSpec("DPM adaptive", dpm_solver.dpm_adaptive, ("k_dpm_ad",), uses_ensd=True, fixed_schedule=True,
                    default_eta=1.0),
        SamplerSpec("Restart", extra.restart, ("restart",), "Karras", second_order=True),
        SamplerSpec("DDIM", timesteps.ddim, ("ddim",), "DDIM", fixed_schedule=True, default_eta=0.0, timestep=True),
        SamplerSpec("PLMS", timesteps.plms, ("plms",), "DDIM", fixed_schedule=True, timestep=True),
        SamplerSpec("UniPC", timesteps.unipc, ("unipc",), "UniPC", fixed_schedule=True, timestep=True),
        SamplerSpec("LCM", extra.lcm, ("k_lcm",), lcm=True),
    )


SPECS: Mapping[str, SamplerSpec] = MappingProxyType({spec.name: spec for spec in _specs()})
_BY_NAME: Mapping[str, SamplerSpec] = MappingProxyType(
    {n: spec for spec in SPECS.values() for n in (spec.name, *spec.aliases)})

# name -> the function the engine runs for that name (options bound: SPECS[name].run)
_RUN = {spec.name: spec.run for spec in SPECS.values()}
SAMPLERS: Mapping[str, SamplerFn] = MappingProxyType({n: _RUN[spec.name] for n, spec in _BY_NAME.items()})

SCHEDULES: Mapping[str, Callable[..., np.ndarray]] = MappingProxyType({
    "Uniform": schedules.uniform,
    "Karras": schedules.karras,
    "Exponential": schedules.exponential,
    "Polyexponential": schedules.polyexponential,
    "SGM Uniform": schedules.sgm_uniform,
    "KL Optimal": schedules.kl_optimal,
    "Align Your Steps": schedules.align_your_steps,
    "Simple": schedules.simple,
    "Normal": schedules.normal,
    "DDIM": schedules.ddim,
    "Beta": schedules.beta,
})
# The webui also accepts its internal schedule names ("karras", "sgm_uniform", ...) and "SGMUniform".
_SCHEDULE_ALIASES = {**{label.lower().replace(" ", "_"): label for label in SCHEDULES}, "SGMUniform": "SGM Uniform"}
SCHEDULE_NAMES = ("Automatic", *SCHEDULES)
_INTERNAL_SCHEDULES = {**SCHEDULES, "UniPC": schedules.unipc_grid}  # a sampler's own grid, not selectable


@dataclass(frozen=True)
class ResolvedSampler:
    """A sampler with its schedule, ready for the pipeline.

    ``schedule_name`` is the schedule actually used; ``schedule_label`` the infotext's "Schedule type" as the webui
    writes it: the sampler's default schedule for "Automatic" where it has one, else the request's scheduler.
    """

    spec: SamplerSpec
    schedule_name: str
    schedule_label: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def default_eta(self) -> float | None:
        return self.spec.default_eta

    @property
    def needs_brownian(self) -> bool:
        return self.spec.brownian

    @property
    def second_order(self) -> bool:
        return self.spec.second_order

    @property
    def uses_ensd(self) -> bool:
        return self.spec.uses_ensd

    @property
    def infotext(self) -> dict[str, str]:
        """Infotext fields: {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}."""
        return {"Sampler": self.spec.name, "Schedule type": self.schedule_label}

    def extra_infotext(self, eta: float | None = None, eta_noise_seed_delta: int = 0) -> dict[str, Any]:
        """The webui's extra generation params of the sampler: "Eta" ("Eta DDIM" for DDIM) when eta is not the
        sampler's default, "ENSD" when the delta is set and the sampler uses it (uses_ensd and eta != 0)."""
        out: dict[str, Any] = {}
        default = self.spec.default_eta
        takes_eta = "eta" in inspect.signature(self.spec.fn).parameters
        if takes_eta and eta is not None and default is not None and eta != default:
            out["Eta DDIM" if self.spec.fixed_schedule and self.spec.name == "DDIM" else "Eta"] = eta
        effective = default if eta is None else eta
        if eta_noise_seed_delta and self.spec.uses_ensd and effective != 0:
            out["ENSD"] = eta_noise_seed_delta
        return out

    def model_schedule(self, model_schedule: Any) -> Any:
        """The ModelSchedule to build the Denoiser with: the model's, or its LCM variant for LCM."""
        return model_schedule.for_lcm() if self.spec.lcm else model_schedule

    def sigmas(self, steps: int, model_schedule: Any, **schedule_options: Any) -> np.ndarray:
        """Float32 sigmas for ``steps`` steps with the model's ModelSchedule (webui KDiffusionSampler.get_sigmas).

        ``steps + 1`` values ending in 0, except for the timestep samplers, which follow the webui's timesteps
        (DDIM/PLMS: range(1, 1000, 1000 // steps), UniPC: steps + 1 timesteps, then 0).
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InvalidRequest("steps", f"must be an integer >= 1, got {steps!r}", ">= 1")
        model_schedule = self.model_schedule(model_schedule)
        n = steps + 1 if self.spec.discard_penultimate else steps
        fn = _INTERNAL_SCHEDULES[self.schedule_name]
        sigmas = fn(n, model_schedule.sigma_min, model_schedule.sigma_max, model=model_schedule,
                    **schedule_options)
        if self.spec.discard_penultimate:
            sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def noise_sampler(self, like: Any, rng: Any, seeds: Any, sigmas: Any) -> Callable:
        """The webui's noise for this sampler: a Brownian tree seeded with the batch's seeds for the SDE samplers,
        otherwise the next draws of the per-image generators (engine.noise.ImageRNG)."""
        if self.spec.brownian:
            return make_noise_sampler(like, brownian=True, seeds=seeds, sigmas=sigmas)
        return make_noise_sampler(like, rng)

    def sample(self, denoise: Callable, x: Any, sigmas: Any, *, noise: Callable | None = None,
               callback: Callable | None = None, **options: Any) -> Any:
        """Runs the sampler (:meth:`SamplerSpec.run`, the same function as ``SAMPLERS[name]``)."""
        return self.spec.run(denoise, x, sigmas, noise=noise, callback=callback, **options)

    def check_init(self) -> None:
        """InvalidRequest naming ``sampler_name`` when this sampler cannot start from an init image (img2img, the
        hires pass): the webui's timestep samplers (checked at submit and again by :meth:`prepare`)."""
        if self.spec.timestep:
            raise InvalidRequest("sampler_name", f"{self.spec.name} is a timestep sampler, which this engine does "
                                 "not run from an init image (img2img, hires fix)",
                                 ", ".join(n for n, s in SPECS.items() if not s.timestep))

    def prepare(self, steps: int, family: Any, *, eta: float | None = None, eta_noise_seed_delta: int = 0,
                denoising_strength: float | None = None, fix_steps: bool = False,
                field: str = "denoising_strength") -> "SamplingPlan":
        """Everything the sampling loop needs for ``steps`` steps on a model family (anything with a
        ``schedule``: engine.models.family.ModelFamily): sigmas, the denoiser's schedule (the LCM variant for
        LCM; the family's SDXL flag for Align Your Steps), the noise seed delta the sampler uses, the noise
        sampler, the infotext fields (webui rules).

        With ``denoising_strength`` (img2img, the hires pass) the plan starts part-way, as the webui's
        ``sample_img2img`` (sd_samplers_common.setup_img2img_steps): without ``fix_steps`` the schedule has
        ``steps`` steps and the last ``int(min(strength, 0.999) * steps) + 1`` of them run; with ``fix_steps``
        (the webui's img2img_fix_steps, and always in the hires pass) the schedule has
        ``int(steps / min(strength, 0.999))`` steps and exactly ``steps`` run (none at strength 0: the plan has 0
        steps and sigmas ``[0]``, and the caller runs no sampler). ``full_sigmas`` keeps the whole
        schedule (the Brownian tree spans it, as the webui's). ``field`` names the strength in errors.
        """
        schedule = self.model_schedule(family.schedule)
        infotext = {**self.infotext, **self.extra_infotext(eta, eta_noise_seed_delta)}
        ensd = eta_noise_seed_delta if self.spec.uses_ensd else 0
        if denoising_strength is None:
            sigmas = self.sigmas(steps, schedule).astype(np.float32)
            return SamplingPlan(self, steps, sigmas, schedule, eta, ensd, MappingProxyType(infotext))
        self.check_init()
        strength = float(denoising_strength)
        if not 0.0 <= strength <= 1.0:
            raise InvalidRequest(field, f"{strength:g} is out of range", "a number from 0 to 1")
        if fix_steps and strength == 0.0:
            # the webui's setup_img2img_steps: a schedule of 0 steps, sigmas [0]: the init latent comes back as
            # it went in (the webui's hires fix with denoising strength 0 upscales and decodes)
            none = np.zeros(1, np.float32)
            return SamplingPlan(self, 0, none, schedule, eta, ensd, MappingProxyType(infotext), none)
        if fix_steps:
            total, t_enc = int(steps / min(strength, 0.999)), steps - 1
        else:
            total, t_enc = steps, int(min(strength, 0.999) * steps)
        full = self.sigmas(total, schedule).astype(np.float32)
        sigmas = full[total - t_enc - 1:]
        return SamplingPlan(self, t_enc + 1, sigmas, schedule, eta, ensd, MappingProxyType(infotext), full)


@dataclass(frozen=True)
class SamplingPlan:
    """A resolved sampler prepared for one request (see :meth:`ResolvedSampler.prepare`)."""

    sampler: ResolvedSampler
    steps: int
    sigmas: np.ndarray  # float32, ending in 0
    schedule: Any  # the ModelSchedule the Denoiser runs on
    eta: float | None
    ensd: int  # eta_noise_seed_delta the ImageRNG applies (0 for samplers that do not use it, as the webui)
    infotext: Mapping[str, Any]
    full_sigmas: np.ndarray | None = None  # img2img: the whole schedule ``sigmas`` is the tail of

    def noise(self, like: Any, rng: Any, seeds: Any) -> Callable:
        return self.sampler.noise_sampler(like, rng, seeds, self.sigmas if self.full_sigmas is None
                                          else self.full_sigmas)

    def start(self, noise: Any, init: Any = None) -> Any:
        """The sampler's first x: ``noise * sigmas[0]`` (txt2img), or the init latent noised to the first sigma
        (img2img: ``init + noise * sigmas[0]``, the webui's ``xi``)."""
        x = noise * float(self.sigmas[0])
        return x if init is None else init + x

    def sample(self, denoise: Callable, x: Any, *, noise: Callable | None = None, callback: Callable | None = None,
               sigmas: Any = None, **options: Any) -> Any:
        """Runs the sampler over ``sigmas`` (default: the plan's, as numpy) with the request's eta."""
        return self.sampler.sample(denoise, x, self.sigmas if sigmas is None else sigmas, noise=noise,
                                   callback=callback, eta=self.eta, **options)


def _valid_samplers() -> str:
    return ", ".join(SPECS)


def _sampler(name: str) -> SamplerSpec | None:
    """A sampler by its name or an alias, in any case (the webui's samplers_map is lower-cased)."""
    key = name.strip().lower()
    return next((spec for n, spec in _BY_NAME.items() if n.lower() == key), None)


def resolve(sampler_name: str, scheduler: str | None = "Automatic") -> ResolvedSampler:
    """webui name (or alias, any case, or "<name> <schedule>" like "DPM++ 2M Karras") + scheduler (its label,
    "Karras", or its name, "karras", as /sdapi/v1/schedulers lists them; any case) -> ResolvedSampler.

    Like the webui (modules/sd_samplers.get_sampler_and_scheduler), a schedule label trailing the sampler name
    is split off and wins over ``scheduler``. Unknown names raise InvalidRequest naming the field (the webui
    falls back to its default sampler; the API contract makes it an error).
    """
    scheduler = SCHEDULE_NAMES[parse_choice(str(scheduler or "Automatic"), SCHEDULE_NAMES, "scheduler",
                                            what="schedule", aliases=_SCHEDULE_ALIASES,
                                            allowed=", ".join(SCHEDULE_NAMES))]
    spec = _sampler(sampler_name) if isinstance(sampler_name, str) else None
    if spec is None and isinstance(sampler_name, str):
        suffixes = {**{label: label for label in SCHEDULE_NAMES}, "SGMUniform": "SGM Uniform"}
        for suffix in sorted(suffixes, key=len, reverse=True):
            base = sampler_name[: -len(suffix) - 1]
            if sampler_name.lower().endswith(" " + suffix.lower()) and _sampler(base) is not None:
                spec, scheduler = _sampler(base), suffixes[suffix]  # the name's schedule wins, as in the webui
                break
    if spec is None:
        raise InvalidRequest("sampler_name", f"unknown sampler {str(sampler_name)[:100]!r}", _valid_samplers())
    if spec.fixed_schedule:
        if scheduler != "Automatic":
            log.info("sampler %s ignores scheduler %s, as the webui does", spec.name, scheduler)
        return ResolvedSampler(spec, spec.schedule or "Uniform", scheduler)
    if scheduler == "Automatic":
        return ResolvedSampler(spec, spec.schedule or "Uniform", spec.schedule or "Automatic")
    return ResolvedSampler(spec, scheduler, scheduler)


__all__ = ["SAMPLERS", "SCHEDULES", "SCHEDULE_NAMES", "SPECS", "ResolvedSampler", "SamplerSpec", "SamplingPlan",
           "resolve"]
