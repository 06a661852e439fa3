"""DPM-Solver fast (fixed step) and adaptive, Lu et al. (2022) arXiv:2206.00927, as in k-diffusion's DPMSolver.

Both take the usual ``(denoise, x, sigmas)``; like the webui they use only ``sigmas``' smallest positive and
largest value (and, for DPM fast, ``len(sigmas) - 1`` model evaluations). Time is t = -log(sigma).
"""

from __future__ import annotations

import math

import numpy as np

from engine.arrays import floats, maximum, rms
from engine.samplers.kdiffusion import ancestral_step, need_noise


class _Solver:
    def __init__(self, denoise):
        self.denoise = denoise

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = math.exp(-t)
            cache[key] = (x - self.denoise(x, sigma)) * (1 / sigma)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.eps(cache, "eps", x, t) * (math.exp(-t_next) * math.expm1(h))

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sn = math.exp(-t_next)
        return x - eps * (sn * math.expm1(h)) - (eps_r1 - eps) * (sn / (2 * r1) * math.expm1(h))

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = x - eps * (math.exp(-s2) * math.expm1(r2 * h)) \
            - (eps_r1 - eps) * (math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sn = math.exp(-t_next)
        return x - eps * (sn * math.expm1(h)) - (eps_r2 - eps) * (sn / r2 * (math.expm1(h) / h - 1))


def _range(sigmas):
    s = floats(sigmas)
    positive = [v for v in s if v > 0]
    if not positive:
        raise ValueError("DPM fast/adaptive need a positive sigma")
    return min(positive), max(s), len(s) - 1


def dpm_fast(denoise, x, sigmas, *, noise=None, callback=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-Fast: fixed steps of orders 3, ..., 3, 2/1 for len(sigmas) - 1 model evaluations."""
    sigma_min, sigma_max, nfe = _range(sigmas)
    solver = _Solver(denoise)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = math.floor(nfe / 3) + 1
    ts = [t_start + (t_end - t_start) * k / m for k in range(m)] + [t_end]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_next_ = min(t_end, -math.log(sd))
            su = max(math.exp(-2 * t_next) - math.exp(-2 * t_next_), 0.0) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        eps = solver.eps(cache, "eps", x, t)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": math.exp(-t), "sigma_hat": math.exp(-t),
                      "denoised": x - eps * math.exp(-t)})
        step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
        x = step(x, t, t_next_, cache)
        if su:
            x = x + need_noise(noise, "DPM fast")(math.exp(-t), math.exp(-t_next)) * (su * s_noise)
    return x


def dpm_adaptive(denoise, x, sigmas, *, noise=None, callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12/23 with PID step size control; the number of model calls depends on the error."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    sigma_min, sigma_max, _ = _range(sigmas)
    solver = _Solver(denoise)
    # Times are rounded to float32 like k-diffusion's tensors, so that the adaptive steps land where the
    # webui's do (an error-controlled step sequence amplifies rounding differences).
    t_start, t_end = _f32(-math.log(sigma_max)), _f32(-math.log(sigma_min))
    pid = _PID(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, steps = t_start, x, 0
    while s < t_end - 1e-5:
        cache = {}
        t = min(t_end, _f32(s + pid.h))
        if eta:
            sd, _ = ancestral_step(math.exp(-s), math.exp(-t), eta)
            t_ = min(t_end, _f32(-math.log(sd)))
            su = max(math.exp(-2 * t) - math.exp(-2 * t_), 0.0) ** 0.5
        else:
            t_, su = t, 0.0
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - eps * math.exp(-s)
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = maximum(maximum(abs(x_low), abs(x_prev)) * rtol, x_low * 0 + atol)
        if pid.propose_step(rms((x_low - x_high) / delta)):
            x_prev = x_low
            x = x_high
            if su:
                x = x + need_noise(noise, "DPM adaptive")(math.exp(-s), math.exp(-t)) * (su * s_noise)
            s = t
        steps += 1
        if callback is not None:
            callback({"x": x, "i": steps - 1, "sigma": math.exp(-s), "sigma_hat": math.exp(-s),
                      "denoised": denoised})
    return x


def _f32(v: float) -> float:
    return float(np.float32(v))


class _PID:
    """k-diffusion PIDStepSizeController."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept
