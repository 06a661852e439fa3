"""The SD noise schedule, defined once: the diffusers scheduler config SD models ship with, its
``alphas_cumprod``, and :class:`ModelSchedule` (discrete sigmas, sigma <-> timestep) built from it.

Every other place (the model loader, the denoiser, the samplers' schedules, training) takes it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from core.errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet predicts: noise (eps) or v

# SD1/SD2/SDXL: ldm make_beta_schedule "linear" = diffusers "scaled_linear", 0.00085..0.012 over 1000 steps.
SD_SCHEDULER: Mapping[str, Any] = MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False,
))


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """:data:`SD_SCHEDULER` as a diffusers scheduler config with ``prediction_type``."""
    return dict(SD_SCHEDULER, prediction_type=prediction_type)


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """alphas_cumprod (float64) of a DDPM noise schedule config (scaled_linear or linear betas)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    else:
        raise ModelError("scheduler", f"unsupported beta_schedule {schedule!r} (allowed: scaled_linear, linear)")
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True, eq=False)
class ModelSchedule:
    """A discrete DDPM noise schedule: ``alphas_cumprod`` (T,), stored float32 like the webui's model buffer.

    ``sigmas`` ascending, ``((1 - a) / a) ** 0.5``; :meth:`sigma_to_t` / :meth:`t_to_sigma` interpolate in log
    sigma like k-diffusion's DiscreteSchedule (quantize=False). ``sdxl`` selects the Align Your Steps table.
    """

    alphas_cumprod: np.ndarray
    sdxl: bool = False
    lcm_skip: int = 0  # > 0: the webui's LCM schedule (every lcm_skip-th timestep), see :meth:`for_lcm`

    @classmethod
    def from_config(cls, config: Mapping[str, Any], sdxl: bool = False) -> "ModelSchedule":
        """The schedule of a diffusers scheduler config (see :func:`alphas_cumprod`)."""
        return cls(alphas_cumprod(config).astype(np.float32), sdxl=sdxl)

    @classmethod
    def scaled_linear(cls, sdxl: bool = False) -> "ModelSchedule":
        """SD's own schedule (:data:`SD_SCHEDULER`)."""
        return cls.from_config(SD_SCHEDULER, sdxl=sdxl)

    def for_lcm(self, original_steps: int = 50) -> "ModelSchedule":
        """webui LCMCompVisDenoiser: the model's sigmas at timesteps skip-1, 2*skip-1, ..., T-1 (skip = T // 50);
        timesteps are quantized to those and the denoiser applies LCM's boundary-condition scalings."""
        if self.lcm_skip:
            return self
        total = len(self.alphas_cumprod)
        skip = total // original_steps
        idx = [total - 1 - x * skip for x in range(original_steps)][::-1]
        return ModelSchedule(np.asarray(self.alphas_cumprod, dtype=np.float32)[idx], sdxl=self.sdxl, lcm_skip=skip)

    @cached_property
    def sigmas(self) -> np.ndarray:
        a = np.asarray(self.alphas_cumprod, dtype=np.float32)
        return np.sqrt((1 - a) / a)

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def t_max(self) -> float:
        """Model timestep of sigma_max (T - 1)."""
        return float((len(self.sigmas) - 1) * max(self.lcm_skip, 1) + max(self.lcm_skip - 1, 0))

    @property
    def t_min(self) -> float:
        """Model timestep of sigma_min (0; skip - 1 for LCM)."""
        return float(max(self.lcm_skip - 1, 0))

    def sigma_to_t(self, sigma: Any) -> Any:
        """Model timestep of ``sigma`` (float or numpy array): log-sigma interpolation clamped to [0, T-1]
        (k-diffusion DiscreteSchedule, quantize=False); for LCM the nearest of its timesteps."""
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        if self.lcm_skip:
            dists = np.abs(log_sigma[..., None] - self.log_sigmas.astype(np.float64))
            t = np.argmin(dists, axis=-1).astype(np.float64) * self.lcm_skip + (self.lcm_skip - 1)
        else:
            t = np.interp(log_sigma, self.log_sigmas.astype(np.float64),
                          np.arange(len(self.sigmas), dtype=np.float64))
        return float(t) if np.ndim(t) == 0 else t

    def t_to_sigma(self, t: Any) -> Any:
        """Sigma at fractional model timestep ``t`` (float or numpy array), log-sigma interpolation."""
        t = np.asarray(t, dtype=np.float32)
        if self.lcm_skip:
            t = np.clip((t - (self.lcm_skip - 1)) / self.lcm_skip, 0, len(self.sigmas) - 1).astype(np.float32)
        low = np.floor(t).astype(np.int64)
        high = np.ceil(t).astype(np.int64)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        out = np.exp(log_sigma).astype(np.float32)
        return float(out) if out.ndim == 0 else out

    def vp_sigma(self, t: Any) -> np.ndarray:
        """Sigma at model timestep ``t`` interpolating log(alpha) linearly in t, as DPM-Solver's/UniPC's
        NoiseScheduleVP("discrete") does (the webui's UniPC grid)."""
        log_alpha = 0.5 * np.log(np.asarray(self.alphas_cumprod, dtype=np.float32)).astype(np.float64)
        la = np.interp(np.asarray(t, dtype=np.float64), np.arange(len(log_alpha), dtype=np.float64), log_alpha)
        return np.sqrt(np.expm1(-2 * la)).astype(np.float32)
