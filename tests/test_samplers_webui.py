"""Samplers that are not in k-diffusion: Restart and LCM against transcriptions of the webui v1.10 functions;
DDIM, PLMS and UniPC against the webui's VP-space formulas and diffusers' DDIMScheduler, PNDMScheduler
(skip_prk_steps) and UniPCMultistepScheduler where their timesteps coincide. fp32, max abs diff <= 1e-5
(TOL) unless a test says otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.denoiser import ModelSchedule
from engine.samplers import SAMPLERS, SCHEDULES, resolve
from tests.test_samplers_reference import (K, SHAPE, Noise, recorder, toy_denoise, webui_ddim, webui_lcm,
                                           webui_plms, webui_restart)

TOL = 1e-5
MODEL = ModelSchedule.scaled_linear()


def sigmas_for(schedule, steps, model=MODEL):
    return torch.from_numpy(SCHEDULES[schedule](steps, model.sigma_min, model.sigma_max, model=model))


def start_noise(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps,schedule", [(8, "Karras"), (24, "Karras"), (24, "Exponential"), (40, "Uniform")])
def test_restart_matches_webui(steps, schedule):
    """From 20 steps the webui rebuilds a shorter Karras schedule and restarts (twice from 36 steps)."""
    sigmas = sigmas_for(schedule, steps)
    x = start_noise() * sigmas[0]
    seen_ours, cb_ours = recorder()
    seen_ref, cb_ref = recorder()
    ours = SAMPLERS["Restart"](toy_denoise, x.clone(), sigmas, noise=Noise(), callback=cb_ours)
    ref = webui_restart(toy_denoise, x.clone(), sigmas, Noise(), callback=cb_ref)
    assert (ours - ref).abs().max().item() <= TOL
    assert [d["i"] for d in seen_ours] == [d["i"] for d in seen_ref]
    assert [d["sigma"] for d in seen_ours] == pytest.approx([float(d["sigma"]) for d in seen_ref], rel=1e-5)
    if steps >= 20:
        assert len(seen_ours) > steps - 1  # restarts add steps


@pytest.mark.parametrize("schedule", ["Uniform", "Karras"])
def test_lcm_matches_webui(schedule):
    model = MODEL.for_lcm()
    sigmas = sigmas_for(schedule, 6, model)
    x = start_noise() * sigmas[0]
    seen_ours, cb_ours = recorder()
    seen_ref, cb_ref = recorder()
    ours = SAMPLERS["LCM"](toy_denoise, x.clone(), sigmas, noise=Noise(), callback=cb_ours)
    ref = webui_lcm(toy_denoise, x.clone(), sigmas, Noise(), callback=cb_ref)
    assert (ours - ref).abs().max().item() <= TOL
    assert [d["i"] for d in seen_ours] == [d["i"] for d in seen_ref]


def lcm_webui_denoiser():
    """webui LCMCompVisDenoiser's schedule, transcribed: k-diffusion DiscreteSchedule over 50 sigmas."""
    from tests.test_samplers_reference import KD

    ac = torch.from_numpy(MODEL.alphas_cumprod)
    valid = torch.zeros(50)
    for x in range(50):
        valid[49 - x] = ac[999 - x * 20]
    inner = KD.external.DiscreteEpsDDPMDenoiser(None, valid, quantize=None)

    def sigma_to_t(sigma):
        dists = sigma.log() - inner.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * 20 + 19

    return inner, sigma_to_t


def test_lcm_schedule_matches_webui():
    """LCMCompVisDenoiser.get_sigmas(n) = t_to_sigma(linspace(t(sigma_max), t(sigma_min), n)) over its 50
    sigmas; sigma_to_t quantizes to timesteps 19, 39, ..., 999."""
    inner, sigma_to_t = lcm_webui_denoiser()
    ref = K.append_zero(inner.t_to_sigma(torch.linspace(49, 0, 6)))
    assert sigmas_for("Uniform", 6, MODEL.for_lcm()).numpy() == pytest.approx(ref.numpy(), rel=1e-6)
    model = MODEL.for_lcm()
    probe = torch.tensor([model.sigma_max, model.sigma_min, 1.0, 0.3, 7.0])
    assert model.sigma_to_t(probe.double().numpy()).tolist() == sigma_to_t(probe).tolist()


# ---- DDIM / PLMS / UniPC ----------------------------------------------------------------------------------

def eps_model_vp(model: ModelSchedule):
    """The toy denoiser as an eps model on VP latents at integer timesteps (what the webui's UNet call sees)."""
    def eps(x_vp, t):
        t = int(t.reshape(-1)[0].item()) if torch.is_tensor(t) else int(t)
        sigma = float(model.sigmas[t])
        x_ve = x_vp * (1 + sigma**2) ** 0.5
        return (x_ve - toy_denoise(x_ve, sigma)) / sigma
    return eps


def webui_timesteps(steps):
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


@pytest.mark.parametrize("steps", [10, 20, 30])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_webui(steps, eta):
    r = resolve("DDIM")
    sigmas = torch.from_numpy(r.sigmas(steps, MODEL))
    noise = start_noise()
    ours = r.sample(toy_denoise, noise * sigmas[0], sigmas, noise=Noise(seed=7), eta=eta)
    ref = webui_ddim(eps_model_vp(MODEL), torch.from_numpy(MODEL.alphas_cumprod), noise.clone(),
                     webui_timesteps(steps), noise=Noise(seed=7), eta=eta)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("steps", [10, 20])
def test_plms_matches_webui(steps):
    r = resolve("PLMS")
    sigmas = torch.from_numpy(r.sigmas(steps, MODEL))
    noise = start_noise()
    ours = r.sample(toy_denoise, noise * sigmas[0], sigmas)
    ref = webui_plms(eps_model_vp(MODEL), torch.from_numpy(MODEL.alphas_cumprod), noise.clone(),
                     webui_timesteps(steps))
    assert (ours - ref).abs().max().item() <= TOL


def diffusers_model_schedule(scheduler) -> ModelSchedule:
    """Our ModelSchedule on diffusers' own (fp32-cumprod) alphas_cumprod, so only the samplers differ."""
    return ModelSchedule(scheduler.alphas_cumprod.numpy().astype(np.float32))


SCHED_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(eta):
    """diffusers DDIMScheduler(steps_offset=1, set_alpha_to_one=False): timesteps 1, 101, ... 901 like the
    webui's; the webui stops at timestep 1 (one step before diffusers' last), which is what we compare."""
    from diffusers import DDIMScheduler

    steps = 10
    sched = DDIMScheduler(**SCHED_KW, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    sched.set_timesteps(steps)
    model = diffusers_model_schedule(sched)
    eps = eps_model_vp(model)
    noise_ref, noise_ours = Noise(seed=9), Noise(seed=9)
    x = start_noise()
    for t in sched.timesteps[:-1]:
        x = sched.step(eps(x, t), t, x, eta=eta, variance_noise=noise_ref(0, 0) if eta else None).prev_sample
    r = resolve("DDIM")
    sigmas = torch.from_numpy(r.sigmas(steps, model))
    assert [round(model.sigma_to_t(float(s))) for s in sigmas[:-1]] == sched.timesteps.tolist()
    ours = r.sample(toy_denoise, start_noise() * sigmas[0], sigmas, noise=noise_ours, eta=eta)
    assert (ours - x).abs().max().item() <= TOL


def test_plms_matches_diffusers_pndm():
    """diffusers PNDMScheduler(skip_prk_steps=True) is the webui's PLMS (improved-Euler start, then Adams-
    Bashforth on eps); compared at timestep 1, where the webui stops."""
    from diffusers import PNDMScheduler

    steps = 10
    sched = PNDMScheduler(**SCHED_KW, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    model = diffusers_model_schedule(sched)
    eps = eps_model_vp(model)
    x = start_noise()
    for t in sched.timesteps[:-1]:
        x = sched.step(eps(x, t), t, x).prev_sample
    r = resolve("PLMS")
    sigmas = torch.from_numpy(r.sigmas(steps, model))
    ours = r.sample(toy_denoise, start_noise() * sigmas[0], sigmas)
    assert (ours - x).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers(variant, order):
    """UniPCMultistepScheduler(predict_x0, lower_order_final with < 15 steps, final sigma = sigma_min) on its
    own timesteps 999, 899, ..., 100 -> timestep 0; ours gets the same sigmas and returns the VP latent."""
    from diffusers import UniPCMultistepScheduler

    steps = 10
    sched = UniPCMultistepScheduler(**SCHED_KW, solver_order=order, solver_type=variant, predict_x0=True,
                                    lower_order_final=True, final_sigmas_type="sigma_min")
    sched.set_timesteps(steps)
    model = diffusers_model_schedule(sched)
    eps = eps_model_vp(model)
    x = start_noise()
    for t in sched.timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
    sigmas = torch.cat([sched.sigmas.float(), torch.zeros(1)])
    ours = SAMPLERS["UniPC"](toy_denoise, start_noise() * sigmas[0], sigmas, order=order, variant=variant)
    assert (ours - x).abs().max().item() <= TOL


def test_unipc_grid_is_webui_time_uniform():
    """webui UniPC: t = linspace(1, 1/1000, steps + 1), model time (t - 1/1000) * 1000, log(alpha) linear in t."""
    sig = resolve("UniPC").sigmas(20, MODEL)
    assert len(sig) == 22 and sig[-1] == 0
    log_alpha = 0.5 * np.log(MODEL.alphas_cumprod.astype(np.float64))
    t_cont = np.linspace(1.0, 1e-3, 21)
    la = np.interp(t_cont, np.linspace(0, 1, 1001)[1:], log_alpha)
    assert sig[:-1] == pytest.approx(np.sqrt(np.exp(-2 * la) - 1), rel=1e-5)


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Uniform"])
def test_ddim_is_euler_on_any_schedule(schedule):
    """DDIM with eta 0 is exactly Euler in sigma (x0 + sigma_prev * eps): on any schedule it equals
    k-diffusion's sample_euler started from the webui's VP noise, up to the final VP conversion (1e-5)."""
    sigmas = sigmas_for(schedule, 12)
    x = start_noise() * sigmas[0]
    ours = SAMPLERS["DDIM"](toy_denoise, x.clone(), sigmas)
    ref = K.sample_euler(toy_denoise, x.clone() * ((1 + sigmas[0] ** 2) ** 0.5 / sigmas[0]), sigmas[:-1],
                         disable=True)
    assert (ours - ref / (1 + float(sigmas[-2]) ** 2) ** 0.5).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["PLMS", "UniPC"])
@pytest.mark.parametrize("schedule", ["Karras", "Exponential"])
def test_timestep_samplers_on_other_schedules(name, schedule):
    """Over any schedule, PLMS/UniPC integrate the same ODE as k-diffusion's Heun: with 80 steps they agree
    to 2e-2 (a consistency check on schedules the webui does not give them, not webui parity)."""
    sigmas = sigmas_for(schedule, 80)
    x = start_noise() * sigmas[0]
    ours = SAMPLERS[name](toy_denoise, x.clone(), sigmas)
    ours_ve = ours * (1 + float(sigmas[-2]) ** 2) ** 0.5  # back from the VP latent at the last sigma
    ref = K.sample_heun(toy_denoise, x.clone() * ((1 + sigmas[0] ** 2) ** 0.5 / sigmas[0]), sigmas[:-1],
                        disable=True)
    assert (ours_ve - ref).abs().max().item() <= 2e-2
