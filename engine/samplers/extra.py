"""The webui's own k-diffusion-style samplers: Restart (modules/sd_samplers_extra.py) and LCM
(modules/sd_samplers_lcm.py)."""

from __future__ import annotations

import numpy as np

from engine.arrays import floats
from engine.samplers.kdiffusion import need_noise
from engine.samplers.schedules import karras


def restart(denoise, x, sigmas, *, noise=None, callback=None, s_noise=1.0, restart_list=None):
    """Restart sampling, Xu et al. (2023) "Restart Sampling for Improving Generative Processes".

    ``restart_list`` maps a sigma to ``[restart_steps, restart_times, max_sigma]``; by default (>= 20 steps) the
    webui rebuilds a shorter Karras schedule and restarts once (twice from 36 steps) from sigma 0.1 up to 2.
    """
    s = np.asarray(floats(sigmas), dtype=np.float32)
    steps = len(s) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            s = karras(steps - restart_steps * restart_times, float(s[-2]), float(s[0]))
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_at = {int(np.argmin(np.abs(s - key))): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(s) - 1):
        step_list.append((float(s[i]), float(s[i + 1])))
        if i + 1 in restart_at:
            restart_steps, restart_times, restart_max = restart_at[i + 1]
            min_idx, max_idx = i + 1, int(np.argmin(np.abs(s - restart_max)))
            if max_idx < min_idx:
                sigma_restart = floats(karras(restart_steps, float(s[min_idx]), float(s[max_idx]))[:-1])
                step_list.extend(list(zip(sigma_restart[:-1], sigma_restart[1:])) * restart_times)
    last_sigma = None
    for step_id, (old_sigma, new_sigma) in enumerate(step_list):
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + need_noise(noise, "Restart")(old_sigma, last_sigma) * (
                s_noise * (old_sigma**2 - last_sigma**2) ** 0.5)
        denoised = denoise(x, old_sigma)
        d = (x - denoised) / old_sigma
        if callback is not None:
            callback({"x": x, "i": step_id, "sigma": new_sigma, "sigma_hat": old_sigma, "denoised": denoised})
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, new_sigma)) / new_sigma
            x = x + (d + d_2) * (dt / 2)
        last_sigma = new_sigma
    return x


def lcm(denoise, x, sigmas, *, noise=None, callback=None):
    """Latent Consistency Model sampling, Luo et al. (2023): denoise, then re-noise to the next sigma."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s[i], "sigma_hat": s[i], "denoised": denoised})
        x = denoised
        if s[i + 1] > 0:
            x = x + need_noise(noise, "LCM")(s[i], s[i + 1]) * s[i + 1]
    return x
