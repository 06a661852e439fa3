"""k-diffusion's samplers (Katherine Crowson, k_diffusion/sampling.py) as pure functions over numpy or torch.

Each is ``fn(denoise, x, sigmas, *, noise=None, callback=None, **options) -> x`` where ``denoise(x, sigma)``
returns x0 for a float ``sigma`` and ``noise(sigma, sigma_next)`` returns unit Gaussian noise shaped like x.
Coefficients are computed in float64 Python scalars; only x-sized arithmetic touches arrays.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from engine.arrays import floats

Denoise = Callable[[Any, float], Any]
NoiseFn = Callable[[float, float], Any]
Callback = Callable[[dict], None]


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def need_noise(noise: NoiseFn | None, sampler: str) -> NoiseFn:
    if noise is None:
        raise ValueError(f"sampler {sampler!r} with these options adds noise: pass noise=noise(sigma, sigma_next)")
    return noise


def _report(callback: Callback | None, x: Any, i: int, sigma: float, sigma_hat: float, denoised: Any) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, s, i, noise, s_churn, s_tmin, s_tmax, s_noise, name):
    """Karras et al. (2022) Algorithm 2 churn: raises sigma to sigma_hat by adding noise."""
    gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.0
    sigma_hat = s[i] * (gamma + 1)
    if s_churn > 0:  # like k-diffusion, a draw every step once churn is on
        eps = need_noise(noise, name)(s[i], sigma_hat) * s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - s[i] ** 2) ** 0.5
    return x, sigma_hat


def euler(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
          s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Euler steps."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, noise, s_churn, s_tmin, s_tmax, s_noise, "Euler")
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, x, i, s[i], sigma_hat, denoised)
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def euler_ancestral(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (k-diffusion)."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, s[i], s[i], denoised)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise, "Euler a")(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def heun(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
         s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Heun steps."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, noise, s_churn, s_tmin, s_tmax, s_noise, "Heun")
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, x, i, s[i], sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) * (dt / 2)
    return x


def dpm_2(denoise, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
          s_noise=1.0):
    """DPM-Solver-2 steps (Lu et al. 2022) in Karras et al.'s Algorithm 2 frame (k-diffusion sample_dpm_2)."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, noise, s_churn, s_tmin, s_tmax, s_noise, "DPM2")
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, x, i, s[i], sigma_hat, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(s[i + 1])))
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (s[i + 1] - sigma_hat)
    return x


def dpm_2_ancestral(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion sample_dpm_2_ancestral)."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, s[i], s[i], denoised)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = math.exp(0.5 * (math.log(s[i]) + math.log(sigma_down)))
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - s[i])
            if sigma_up > 0:
                x = x + need_noise(noise, "DPM2 a")(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def lms_coefficients(sigmas: list[float], order: int) -> list[list[float]]:
    """Per step i, the weights of d_i, d_i-1, ...: integrals over [s_i, s_i+1] of the Lagrange basis polynomials
    (k-diffusion linear_multistep_coeff; exact here with 4-point Gauss-Legendre, k-diffusion uses scipy quad)."""
    nodes, weights = (v.tolist() for v in np.polynomial.legendre.leggauss(4))  # exact up to degree 7
    out = []
    for i in range(len(sigmas) - 1):
        cur = min(i + 1, order)
        a, b = sigmas[i], sigmas[i + 1]
        taus = [(b - a) / 2 * n + (a + b) / 2 for n in nodes]
        row = []
        for j in range(cur):
            total = 0.0
            for tau, w in zip(taus, weights):
                prod = 1.0
                for k in range(cur):
                    if k != j:
                        prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                total += w * prod
            row.append(total * (b - a) / 2)
        out.append(row)
    return out


def lms(denoise, x, sigmas, *, noise=None, callback=None, order=4):
    """Linear multistep over sigma (k-diffusion sample_lms)."""
    s = floats(sigmas)
    coefficients = lms_coefficients(s, order)
    ds = []
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        ds.append((x - denoised) / s[i])
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, s[i], s[i], denoised)
        for coeff, d in zip(coefficients[i], reversed(ds)):
            x = x + d * coeff
    return x


def dpmpp_2s_ancestral(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps, Lu et al. (2022b)."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, s[i], s[i], denoised)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            t, t_next = -math.log(s[i]), -math.log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + 0.5 * h))
            x_2 = x * (sigma_s / s[i]) - denoised * math.expm1(-0.5 * h)
            denoised_2 = denoise(x_2, sigma_s)
            x = x * (sigma_down / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + need_noise(noise, "DPM++ 2S a")(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def dpmpp_sde(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), Lu et al. (2022b), k-diffusion sample_dpmpp_sde."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        _report(callback, x, i, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
            continue
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        h = t_next - t
        sigma_s = math.exp(-(t + h * r))
        fac = 1 / (2 * r)
        sd, su = ancestral_step(s[i], sigma_s, eta)
        x_2 = x * (sd / s[i]) - denoised * math.expm1(t + math.log(sd))
        if su > 0:
            x_2 = x_2 + need_noise(noise, "DPM++ SDE")(s[i], sigma_s) * (s_noise * su)
        denoised_2 = denoise(x_2, sigma_s)
        sd, su = ancestral_step(s[i], s[i + 1], eta)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (sd / s[i]) - denoised_d * math.expm1(t + math.log(sd))
        if su > 0:
            x = x + need_noise(noise, "DPM++ SDE")(s[i], s[i + 1]) * (s_noise * su)
    return x


def dpmpp_2m(denoise, x, sigmas, *, noise=None, callback=None):
    """DPM-Solver++(2M), Lu et al. (2022b)."""
    s = floats(sigmas)
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        _report(callback, x, i, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is not None:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            else:
                denoised_d = denoised
            x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
        old_denoised = denoised
    return x


def dpmpp_2m_sde(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE, Lu et al. (2022b); solver_type 'midpoint' or 'heun'."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    s = floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        _report(callback, x, i, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * phi
            if old_denoised is not None:
                r = h_last / h
                coef = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
                x = x + (denoised - old_denoised) * (coef / r)
            if eta:
                scale = s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + need_noise(noise, "DPM++ 2M SDE")(s[i], s[i + 1]) * scale
            h_last = h
        old_denoised = denoised
    return x


def dpmpp_3m_sde(denoise, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE, Lu et al. (2022b), k-diffusion sample_dpmpp_3m_sde."""
    s = floats(sigmas)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        _report(callback, x, i, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) + denoised * (-math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) * (1 / r0)
                d1_1 = (denoised_1 - denoised_2) * (1 / r1)
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) * (1 / (r0 + r1))
                x = x + d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
            elif h_1 is not None:
                x = x + (denoised - denoised_1) * (phi_2 / (h_1 / h))
            if eta:
                scale = s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + need_noise(noise, "DPM++ 3M SDE")(s[i], s[i + 1]) * scale
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x
