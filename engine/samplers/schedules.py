"""Sigma schedules, as in the webui v1.10 (modules/sd_schedulers.py) and k-diffusion (sampling.get_sigmas_*).

Every schedule is ``fn(n, sigma_min, sigma_max, model=None, **options) -> sigmas``: ``n + 1`` float32 sigmas,
descending, ending in 0 (KL Optimal ends in ``sigma_min``, as the webui's does). ``model`` is the model's
:class:`engine.denoiser.ModelSchedule` (its discrete sigmas and sigma <-> timestep mapping); schedules built on
the model's timesteps need it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

ScheduleFn = Callable[..., np.ndarray]

# Align Your Steps sigmas of NVIDIA's how-to page (10 steps), as the webui ships them.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def _with_zero(sigmas: Any) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0).astype(np.float32)


def _need_model(model: Any, name: str) -> Any:
    if model is None:
        raise ValueError(f"the {name} schedule needs the model's ModelSchedule (model=...)")
    return model


def uniform(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Model timesteps linspace(T-1, 0, n), interpolated in log sigma (k-diffusion DiscreteSchedule.get_sigmas)."""
    model = _need_model(model, "Uniform")
    t = np.linspace(model.t_max, model.t_min, n, dtype=np.float32)
    return _with_zero(model.t_to_sigma(t))


def karras(n: int, sigma_min: float, sigma_max: float, model: Any = None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5 (k-diffusion get_sigmas_karras)."""
    ramp = np.linspace(0, 1, n, dtype=np.float32).astype(np.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion get_sigmas_exponential)."""
    return _with_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, model: Any = None, rho: float = 1.0) -> np.ndarray:
    """Polynomial in log sigma (k-diffusion get_sigmas_polyexponential)."""
    ramp = np.linspace(1, 0, n) ** rho
    return _with_zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Timesteps linspace(t(sigma_max), t(sigma_min), n + 1)[:-1] (webui sgm_uniform)."""
    model = _need_model(model, "SGM Uniform")
    t = np.linspace(model.sigma_to_t(sigma_max), model.sigma_to_t(sigma_min), n + 1, dtype=np.float32)[:-1]
    return _with_zero(model.t_to_sigma(t))


def normal(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Timesteps linspace(t(sigma_max), t(sigma_min), n) (webui normal_scheduler)."""
    model = _need_model(model, "Normal")
    t = np.linspace(model.sigma_to_t(sigma_max), model.sigma_to_t(sigma_min), n, dtype=np.float32)
    return _with_zero(model.t_to_sigma(t))


def simple(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Every (T/n)-th model sigma from the top (webui simple_scheduler)."""
    sigmas = _need_model(model, "Simple").sigmas
    step = len(sigmas) / n
    return _with_zero([sigmas[-(1 + int(i * step))] for i in range(n)])


def ddim(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Model sigmas at timesteps 1, 1 + T//n, ... reversed (webui ddim_scheduler; DDIM's timesteps)."""
    sigmas = _need_model(model, "DDIM").sigmas
    step = max(len(sigmas) // n, 1)
    return _with_zero(sigmas[1::step][::-1])


def beta(n: int, sigma_min: float, sigma_max: float, model: Any = None, alpha: float = 0.6,
         beta_: float = 0.6) -> np.ndarray:
    """Beta-distribution quantiles, Lee et al. (2024) "Beta Sampling is All You Need" (webui beta_scheduler)."""
    quantiles = [betaincinv(alpha, beta_, q) for q in 1 - np.linspace(0, 1, n)]
    return _with_zero([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def kl_optimal(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """Sabour et al. (2024) "Align Your Steps" KL-optimal schedule; like the webui, it ends in sigma_min."""
    i = np.arange(n + 1, dtype=np.float64) / n
    a_min, a_max = np.float32(np.arctan(np.float32(sigma_min))), np.float32(np.arctan(np.float32(sigma_max)))
    return np.tan(i * a_min + (1.0 - i) * a_max).astype(np.float32)


def align_your_steps(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """NVIDIA's Align Your Steps sigmas, log-linearly resampled to n steps (webui)."""
    ays = AYS_SDXL if getattr(model, "sdxl", False) else AYS_SD1
    if n == len(ays):
        return _with_zero(ays)
    ys = np.log(np.asarray(ays[::-1]))
    return _with_zero(np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ays)), ys))[::-1])


def betaincinv(a: float, b: float, y: float) -> float:
    """Inverse of the regularized incomplete beta function I_x(a, b) (bisection; 1e-15 absolute)."""
    if y <= 0:
        return 0.0
    if y >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(a, b, mid) < y:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(ln_front) * f / a


def unipc_grid(n: int, sigma_min: float, sigma_max: float, model: Any = None) -> np.ndarray:
    """The webui UniPC's grid: timesteps linspace(T-1, 0, n + 1) (time_uniform), sigmas from log-alpha
    interpolation, then 0 (n + 2 values: UniPC ends at timestep 0, see engine.samplers.timesteps)."""
    model = _need_model(model, "UniPC")
    return _with_zero(model.vp_sigma(np.linspace(len(model.alphas_cumprod) - 1, 0, n + 1)))
