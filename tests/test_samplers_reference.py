"""Reference implementations the sampler tests compare against, and the shared toy denoiser / noise.

- k-diffusion's own ``sampling.py`` and ``external.py`` (installed package, loaded without its __init__, which
  imports torchvision and wandb);
- transcriptions of the webui v1.10 functions that are not in k-diffusion (modules/sd_samplers_extra.py
  restart_sampler, modules/sd_samplers_lcm.py sample_lcm, modules/sd_samplers_timesteps_impl.py ddim/plms),
  kept as close to the webui source as possible (torch, VP space, eps model).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.references import load_kdiffusion


KD = load_kdiffusion()
K = KD.sampling
SHAPE = (2, 4, 8, 8)


def toy_denoise(x, sigma):
    """Deterministic, nonlinear in x and sigma; numpy or torch; sigma a float or a (B,) tensor/array."""
    if isinstance(x, np.ndarray):
        s = np.asarray(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) if np.ndim(sigma) else sigma
        return (x * (1 / (1 + s**2)) + np.tanh(x) * 0.1 * s / (1 + s)).astype(x.dtype)
    s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma
    return x * (1 / (1 + s**2)) + torch.tanh(x) * 0.1 * s / (1 + s)


class Noise:
    """Fixed unit Gaussians served in call order (numpy or torch), recording the (sigma, sigma_next) asked for."""

    def __init__(self, seed=0, n=300, numpy=False, shape=SHAPE):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g) for _ in range(n)]
        self.numpy = numpy
        self.k = 0
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((None if sigma is None else float(sigma), None if sigma_next is None else float(sigma_next)))
        self.k += 1
        draw = self.draws[self.k - 1].clone()
        return draw.numpy() if self.numpy else draw


def recorder():
    seen = []

    def callback(d):
        seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()
                     if k in ("x", "i", "sigma", "sigma_hat", "denoised")})

    return seen, callback


# ---- webui v1.10 transcriptions (torch) ---------------------------------------------------------------------

def webui_restart(model, x, sigmas, noise, callback=None, s_noise=1.0):
    """modules/sd_samplers_extra.restart_sampler (restart_list=None), randn_like -> noise()."""
    s_in = x.new_ones([x.shape[0]])
    step_id = 0

    def heun_step(x, old_sigma, new_sigma):
        nonlocal step_id
        denoised = model(x, old_sigma * s_in)
        d = K.to_d(x, old_sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": step_id, "sigma": new_sigma, "sigma_hat": old_sigma, "denoised": denoised})
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = K.to_d(x_2, new_sigma, model(x_2, new_sigma * s_in))
            x = x + (d + d_2) / 2 * dt
        step_id += 1
        return x

    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = K.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = K.get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noise(old_sigma, last_sigma) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x


def webui_lcm(model, x, sigmas, noise, callback=None):
    """modules/sd_samplers_lcm.sample_lcm."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


def webui_ddim(eps_model, alphas_cumprod, x, timesteps, noise=None, eta=0.0):
    """modules/sd_samplers_timesteps_impl.ddim: VP x, eps_model(x, t) -> eps, timesteps ascending."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.cpu().numpy()) / (1 - alphas.cpu())
                           * (1 - alphas.cpu() / alphas_prev.cpu().numpy()))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_in[:, None, None, None]
        a_prev = alphas_prev[index].item() * s_in[:, None, None, None]
        sigma_t = sigmas[index].item() * s_in[:, None, None, None]
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_in[:, None, None, None]
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt + (sigma_t * noise(None, None) if eta else 0)
    return x


def webui_plms(eps_model, alphas_cumprod, x, timesteps):
    """modules/sd_samplers_timesteps_impl.plms."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    old_eps = []

    def get_x_prev_and_pred_x0(e_t, index):
        a_t = alphas[index].item()
        a_prev = alphas_prev[index].item()
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * e_t) / a_t**0.5
        return a_prev**0.5 * pred_x0 + (1.0 - a_prev) ** 0.5 * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = eps_model(x, ts)
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = eps_model(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, _ = get_x_prev_and_pred_x0(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


def test_reference_loads():
    """The k-diffusion reference is the installed package's code (not ours)."""
    assert K.__file__.endswith("k_diffusion/sampling.py")
    assert KD.external.__file__.endswith("k_diffusion/external.py")
    sig = K.get_sigmas_karras(4, 0.1, 10.0)
    assert sig.shape == (5,) and float(sig[-1]) == 0.0
