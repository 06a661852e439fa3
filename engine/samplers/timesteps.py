"""The webui's timestep samplers DDIM, PLMS and UniPC (modules/sd_samplers_timesteps_impl.py), over sigmas.

The webui runs these in VP space (x_vp = x / sqrt(1 + sigma^2)) on the model's eps. Written in the k-diffusion
(VE) variables they become functions of sigma alone, so they take the same ``denoise(x, sigma) -> x0`` as
every other sampler; eps = (x - x0) / sigma. Two webui conventions are kept so that images match:

- the start: the webui's x is unit noise in VP space, i.e. ``noise * sqrt(1 + sigma_0^2)`` in VE, not
  ``noise * sigma_0``; the samplers rescale the ``noise * sigmas[0]`` they are given;
- the end: they stop at the last positive sigma (DDIM at timestep 1, UniPC at 0) and return that latent in VP
  space (``x / sqrt(1 + sigma^2)``), which the webui decodes as it is. A final 0 in ``sigmas`` marks this.
"""

from __future__ import annotations

import math

import numpy as np

from engine.arrays import floats
from engine.samplers.kdiffusion import need_noise


def _start(x, s):
    return x * (math.sqrt(1 + s[0] ** 2) / s[0])


def _end(x, sigma):
    return x * (1 / math.sqrt(1 + sigma**2))


def _report(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def ddim(denoise, x, sigmas, *, noise=None, callback=None, eta=0.0):
    """Denoising Diffusion Implicit Models, Song et al. (2020); eta > 0 adds DDPM-like noise."""
    s = floats(sigmas)
    x = _start(x, s)
    for i in range(len(s) - 1):
        sigma, sigma_prev = s[i], s[i + 1]
        if sigma_prev == 0:
            return _end(x, sigma)
        denoised = denoise(x, sigma)
        _report(callback, x, i, sigma, denoised)
        eps = (x - denoised) * (1 / sigma)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_prev**2)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # DDIM's sigma_t, VP
        x = denoised + eps * math.sqrt(max(sigma_prev**2 - std**2 / a_prev, 0.0))
        if std > 0:
            x = x + need_noise(noise, "DDIM")(sigma, sigma_prev) * (std / math.sqrt(a_prev))
    return x


def plms(denoise, x, sigmas, *, noise=None, callback=None):
    """Pseudo linear multistep, Liu et al. (2022) "Pseudo Numerical Methods for Diffusion Models on Manifolds"."""
    s = floats(sigmas)
    x = _start(x, s)
    old_eps = []
    for i in range(len(s) - 1):
        sigma, sigma_prev = s[i], s[i + 1]
        if sigma_prev == 0:
            return _end(x, sigma)
        e_t = (x - denoise(x, sigma)) * (1 / sigma)
        if not old_eps:  # pseudo improved Euler
            x_2 = x + e_t * (sigma_prev - sigma)
            e_next = (x_2 - denoise(x_2, sigma_prev)) * (1 / sigma_prev)
            e_prime = (e_t + e_next) * 0.5
        elif len(old_eps) == 1:
            e_prime = (e_t * 3 - old_eps[-1]) * (1 / 2)
        elif len(old_eps) == 2:
            e_prime = (e_t * 23 - old_eps[-1] * 16 + old_eps[-2] * 5) * (1 / 12)
        else:
            e_prime = (e_t * 55 - old_eps[-1] * 59 + old_eps[-2] * 37 - old_eps[-3] * 9) * (1 / 24)
        _report(callback, x, i, sigma, x - e_prime * sigma)
        x = x + e_prime * (sigma_prev - sigma)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


def unipc(denoise, x, sigmas, *, noise=None, callback=None, order=3, variant="bh1", lower_order_final=True):
    """UniPC multistep predictor-corrector, Zhao et al. (2023), data prediction, the webui's defaults."""
    if variant not in ("bh1", "bh2"):
        raise ValueError("variant must be 'bh1' or 'bh2'")
    s = floats(sigmas)
    if s[-1] == 0:
        s, final = s[:-1], True
    else:
        final = False
    x = _start(x, s)
    steps = len(s) - 1
    order = max(1, min(order, steps))
    lam = [-math.log(v) for v in s]
    model_prev = [denoise(x, s[0])]
    idx_prev = [0]
    for step in range(1, steps + 1):
        _report(callback, x, step - 1, s[step - 1], model_prev[-1])
        if step < order:
            step_order = step
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        use_corrector = step < steps
        x, model_t = _unipc_update(denoise, x, model_prev, idx_prev, step, step_order, lam, s, variant,
                                   use_corrector)
        if step < steps:
            if model_t is None:
                model_t = denoise(x, s[step])
            model_prev.append(model_t)
            idx_prev.append(step)
            if len(model_prev) > order:
                model_prev.pop(0)
                idx_prev.pop(0)
    return _end(x, s[-1]) if final else x


def _unipc_update(denoise, x, model_prev, idx_prev, t, order, lam, s, variant, use_corrector):
    """One UniPC bh step: predictor UniP, then corrector UniC with the model at the predicted point. Both are
    linear combinations of x and the model outputs, computed as one weighted sum each."""
    m0 = model_prev[-1]
    h = lam[t] - lam[idx_prev[-1]]
    rks = [(lam[idx_prev[-(i + 1)]] - lam[idx_prev[-1]]) / h for i in range(1, order)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks + [1.0]])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat, b = np.asarray(rows, dtype=np.float64), np.asarray(b, dtype=np.float64)
    older = [model_prev[-(i + 1)] for i in range(1, order)]  # D1_k = (older_k - m0) / r_k
    a_x = s[t] / s[idx_prev[-1]]
    if rks:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1]).tolist()
        c_older = [-b_h * rho / rk for rho, rk in zip(rhos_p, rks)]
        x_t = _lincomb([a_x, -h_phi_1 - sum(c_older)] + c_older, [x, m0] + older)
    else:
        x_t = _lincomb([a_x, -h_phi_1], [x, m0])
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else np.linalg.solve(r_mat, b).tolist()
    model_t = denoise(x_t, s[t])
    c_older = [-b_h * rho / rk for rho, rk in zip(rhos_c[:-1], rks)]
    c_t = -b_h * rhos_c[-1]
    return _lincomb([a_x, -h_phi_1 - sum(c_older) - c_t, c_t] + c_older, [x, m0, model_t] + older), model_t


def _lincomb(weights, arrays):
    out = arrays[0] * float(weights[0])
    for w, a in zip(weights[1:], arrays[1:]):
        out = out + a * float(w)
    return out
