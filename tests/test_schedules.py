"""Schedules: golden sigmas at steps=20 for SD's alphas_cumprod (scaled_linear 0.00085..0.012, 1000 steps),
and the webui's sampler/schedule name resolution.

The numbers below were produced by the reference formulas, not by engine code: k-diffusion's
get_sigmas_karras / _exponential / _polyexponential and DiscreteEpsDDPMDenoiser.get_sigmas (Uniform), and
transcriptions of the webui v1.10 modules/sd_schedulers.py functions (sgm_uniform, normal_scheduler,
simple_scheduler, ddim_scheduler, beta_scheduler with scipy.stats.beta.ppf(alpha=beta=0.6), kl_optimal,
get_align_your_steps_sigmas) over k-diffusion's DiscreteSchedule, in torch fp32. Tolerance: rel 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.denoiser import ModelSchedule
from core.errors import InvalidRequest
from engine.samplers import SAMPLERS, SCHEDULE_NAMES, SCHEDULES, SPECS, resolve

GOLDEN = {
    "Uniform": [
        14.61464, 10.7468, 8.081519, 6.204935, 4.855653, 3.865378, 3.123761, 2.557166,
        2.115658, 1.764822, 1.480581, 1.245813, 1.048142, 0.8784282, 0.7297187, 0.5964336,
        0.4735848, 0.3555454, 0.2321642, 0.02916754, 0,
    ],
    "Karras": [
        14.61464, 11.72537, 9.340208, 7.383627, 5.789421, 4.499844, 3.464755, 2.640847,
        1.990921, 1.483217, 1.090791, 0.7909495, 0.5647246, 0.3963923, 0.2730398, 0.1841694,
        0.1213425, 0.07786081, 0.0484819, 0.02916754, 0,
    ],
    "Exponential": [
        14.61464, 10.53632, 7.596079, 5.476335, 3.948123, 2.84637, 2.052068, 1.479423,
        1.066579, 0.7689422, 0.5543631, 0.3996639, 0.2881347, 0.2077285, 0.1497603, 0.1079686,
        0.07783913, 0.05611752, 0.04045751, 0.02916754, 0,
    ],
    "Polyexponential": [
        14.61464, 10.53632, 7.596079, 5.476335, 3.948122, 2.84637, 2.052068, 1.479423,
        1.066579, 0.7689422, 0.5543631, 0.3996639, 0.2881347, 0.2077285, 0.1497603, 0.1079686,
        0.07783913, 0.05611752, 0.04045751, 0.02916754, 0,
    ],
    "SGM Uniform": [
        14.61464, 10.90732, 8.307173, 6.44769, 5.092408, 4.086081, 3.325069, 2.739083,
        2.279731, 1.91321, 1.61558, 1.369643, 1.162865, 0.9859553, 0.8318837, 0.6951496,
        0.5711889, 0.4557357, 0.3437048, 0.2254523, 0,
    ],
    "Normal": [
        14.61464, 10.7468, 8.081519, 6.204935, 4.855653, 3.865378, 3.123761, 2.557166,
        2.115658, 1.764822, 1.480581, 1.245813, 1.048142, 0.8784282, 0.7297187, 0.5964336,
        0.4735848, 0.3555454, 0.2321642, 0.02916754, 0,
    ],
    "Simple": [
        14.61464, 10.90423, 8.302804, 6.442955, 5.087763, 4.081729, 3.321083, 2.735469,
        2.276463, 1.910251, 1.612886, 1.367173, 1.160578, 0.9838173, 0.8298596, 0.6932049,
        0.5692849, 0.4538186, 0.3416739, 0.2230031, 0,
    ],
    "DDIM": [
        11.02833, 8.390685, 6.506398, 5.134431, 4.116696, 3.347764, 2.756196, 2.292854,
        1.923443, 1.623692, 1.376179, 1.168216, 0.9904089, 0.8356528, 0.6983981, 0.5740503,
        0.4583327, 0.3461868, 0.2281467, 0.04131448, 0,
    ],
    "Beta": [
        14.61464, 14.41524, 13.98632, 13.39274, 12.66744, 11.8355, 10.91862, 9.936796,
        8.909075, 7.853992, 6.789817, 5.734735, 4.707014, 3.725187, 2.808307, 1.976369,
        1.251072, 0.6574879, 0.2285668, 0.02916753, 0,
    ],
    "KL Optimal": [
        14.61463, 6.995652, 4.565038, 3.359448, 2.632888, 2.142741, 1.786446, 1.513154,
        1.294768, 1.114476, 0.9615884, 0.8289618, 0.7116271, 0.6060018, 0.5094197, 0.4198365,
        0.3356377, 0.2555093, 0.1783468, 0.1031892, 0.02916753,
    ],
    "Align Your Steps": [
        14.615, 9.521713, 6.30118, 4.800019, 3.717901, 3.078137, 2.548905, 2.111525,
        1.770252, 1.511015, 1.266044, 1.041299, 0.8514091, 0.6934124, 0.5440925, 0.4201679,
        0.2657648, 0.1599201, 0.06935114, 0.029, 0,
    ],
    "Align Your Steps SDXL": [
        14.615, 9.397145, 6.145939, 4.685299, 3.559794, 2.668496, 2.020018, 1.564421,
        1.222587, 0.9684966, 0.7676932, 0.6089037, 0.4924279, 0.4034213, 0.3178381, 0.2462526,
        0.1722286, 0.1174133, 0.0593311, 0.029, 0,
    ],
}

MODEL = ModelSchedule.scaled_linear()


def test_every_webui_schedule_is_registered():
    assert SCHEDULE_NAMES == ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                              "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")


@pytest.mark.parametrize("name", [n for n in GOLDEN if n != "Align Your Steps SDXL"])
def test_golden_sigmas(name):
    sigmas = SCHEDULES[name](20, MODEL.sigma_min, MODEL.sigma_max, model=MODEL)
    assert sigmas.dtype == np.float32 and sigmas.shape == (21,)
    assert sigmas.tolist() == pytest.approx(GOLDEN[name], rel=1e-5, abs=1e-7)


def test_golden_align_your_steps_sdxl():
    sdxl = ModelSchedule.scaled_linear(sdxl=True)
    sigmas = SCHEDULES["Align Your Steps"](20, sdxl.sigma_min, sdxl.sigma_max, model=sdxl)
    assert sigmas.tolist() == pytest.approx(GOLDEN["Align Your Steps SDXL"], rel=1e-5)


def test_model_sigmas_and_timesteps():
    """CompVisDenoiser: sigmas ((1-a)/a)^0.5; sigma_to_t interpolates log sigma; t_to_sigma inverts it."""
    assert MODEL.sigma_min == pytest.approx(0.02916754, rel=1e-6)
    assert MODEL.sigma_max == pytest.approx(14.61464, rel=1e-6)
    assert MODEL.sigma_to_t(MODEL.sigma_max) == pytest.approx(999)
    t = np.array([0.0, 0.5, 17.25, 500.0, 998.9])
    assert MODEL.sigma_to_t(MODEL.t_to_sigma(t)) == pytest.approx(t, abs=1e-3)
    mid = MODEL.t_to_sigma(0.5)
    assert mid == pytest.approx((float(MODEL.sigmas[0]) * float(MODEL.sigmas[1])) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_schedules_end_in_zero(steps):
    for name, fn in SCHEDULES.items():
        sigmas = fn(steps, MODEL.sigma_min, MODEL.sigma_max, model=MODEL)
        # the webui's DDIM schedule takes every (1000 // steps)-th timestep from 1: sometimes one more
        expected = len(range(1, 1000, 1000 // steps)) + 1 if name == "DDIM" else steps + 1
        assert len(sigmas) == expected, name
        assert np.all(np.diff(sigmas) <= 0), name
        if name == "KL Optimal":  # the webui's KL Optimal ends at sigma_min, not 0
            assert sigmas[-1] == pytest.approx(MODEL.sigma_min, rel=1e-5)
        else:
            assert sigmas[-1] == 0, name


# ---- resolve ------------------------------------------------------------------------------------------------

WEBUI_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                  "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
                  "DDIM", "PLMS", "UniPC", "LCM"]


def test_every_webui_sampler_is_registered():
    assert sorted(SPECS) == sorted(WEBUI_SAMPLERS)
    assert SAMPLERS["k_euler_a"] is SAMPLERS["Euler a"] is SAMPLERS["k_euler_ancestral"]
    assert SAMPLERS["k_dpmpp_2m"] is SAMPLERS["DPM++ 2M"]
    assert SAMPLERS["k_dpm_2_a"] is SAMPLERS["DPM2 a"]


@pytest.mark.parametrize("request_name,scheduler,name,schedule,label", [
    ("DPM++ 2M Karras", "Automatic", "DPM++ 2M", "Karras", "Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M", "Karras", "Karras"),
    ("DPM++ 2M", "Exponential", "DPM++ 2M", "Exponential", "Exponential"),
    ("DPM++ 2M Karras", "Uniform", "DPM++ 2M", "Karras", "Karras"),  # the name's schedule wins (webui)
    ("Euler a Automatic", "Karras", "Euler a", "Uniform", "Automatic"),
    ("Euler a", "Automatic", "Euler a", "Uniform", "Automatic"),
    ("k_euler_a", None, "Euler a", "Uniform", "Automatic"),
    ("Euler", "karras", "Euler", "Karras", "Karras"),  # webui internal schedule names
    ("DPM++ SDE Karras", "Automatic", "DPM++ SDE", "Karras", "Karras"),
    ("DPM++ 2M SDE Exponential", "Automatic", "DPM++ 2M SDE", "Exponential", "Exponential"),
    ("DPM++ 2M SDE Heun", "Automatic", "DPM++ 2M SDE Heun", "Exponential", "Exponential"),
    ("DPM++ 3M SDE", "Automatic", "DPM++ 3M SDE", "Exponential", "Exponential"),
    ("Euler SGM Uniform", "Automatic", "Euler", "SGM Uniform", "SGM Uniform"),
    ("Euler", "SGMUniform", "Euler", "SGM Uniform", "SGM Uniform"),
    ("DDIM", "Karras", "DDIM", "DDIM", "Karras"),  # timestep samplers ignore the scheduler, like the webui
    ("UniPC", "Automatic", "UniPC", "UniPC", "Automatic"),
    ("Restart", "Automatic", "Restart", "Karras", "Karras"),
])
def test_resolve(request_name, scheduler, name, schedule, label):
    r = resolve(request_name, scheduler)
    assert (r.name, r.schedule_name, r.schedule_label) == (name, schedule, label)
    assert r.infotext == {"Sampler": name, "Schedule type": label}


def test_resolved_flags():
    assert resolve("DPM++ SDE").needs_brownian and resolve("DPM++ 3M SDE").needs_brownian
    assert not resolve("Euler a").needs_brownian
    assert resolve("Heun").second_order and resolve("DPM2 a").second_order and not resolve("Euler").second_order
    assert resolve("Euler a").default_eta == 1.0 and resolve("DDIM").default_eta == 0.0
    assert resolve("Euler").default_eta is None
    assert resolve("Euler a").uses_ensd and not resolve("DPM++ 2M").uses_ensd


def test_extra_infotext_like_webui():
    assert resolve("Euler a").extra_infotext() == {}
    assert resolve("Euler a").extra_infotext(eta=0.5, eta_noise_seed_delta=31337) == {"Eta": 0.5, "ENSD": 31337}
    assert resolve("Euler a").extra_infotext(eta=0.0, eta_noise_seed_delta=31337) == {"Eta": 0.0}
    assert resolve("DDIM").extra_infotext(eta=0.3) == {"Eta DDIM": 0.3}
    assert resolve("Euler").extra_infotext(eta=0.3, eta_noise_seed_delta=5) == {}
    assert resolve("DPM++ 2M SDE").extra_infotext(eta=1.0) == {}


def test_discard_penultimate_sigma():
    """DPM2, DPM2 a, DPM++ 3M SDE: steps + 1 sigmas computed, the one before the final 0 dropped (webui)."""
    full = SCHEDULES["Karras"](21, MODEL.sigma_min, MODEL.sigma_max, model=MODEL)
    sig = resolve("DPM2").sigmas(20, MODEL)
    assert sig.tolist() == pytest.approx(np.concatenate([full[:-2], full[-1:]]).tolist(), rel=1e-6)
    assert len(sig) == 21
    assert resolve("DPM++ 2M").sigmas(20, MODEL).tolist() == pytest.approx(GOLDEN["Karras"], rel=1e-5)


def test_noise_sampler_choice_and_s_tmax_zero():
    import torch

    from engine.noise import BrownianNoise, ImageRNG

    x = torch.zeros(1, 4, 4, 4)
    sig = resolve("DPM++ SDE").sigmas(4, MODEL)
    rng = ImageRNG((4, 4, 4), [9])
    rng.first()
    brownian = resolve("DPM++ SDE").noise_sampler(x, rng, [9], sig)
    assert torch.equal(brownian(float(sig[0]), float(sig[1])), BrownianNoise((4, 4, 4), [9], float(sig[-2]),
                                                                             float(sig[0]))(sig[0], sig[1]))
    plain = resolve("Euler a").noise_sampler(x, rng, [9], sig)
    g = torch.Generator().manual_seed(9)
    torch.randn(4, 4, 4, generator=g)
    assert torch.equal(plain(1.0, 0.5)[0], torch.randn(4, 4, 4, generator=g))
    # webui: s_tmax 0 means infinity, so churn applies at every sigma >= s_tmin
    seen = []
    resolve("Euler").sample(lambda x, s: x * 0, x + 1, sig, noise=lambda a, b: seen.append((a, b)) or x,
                            s_churn=1.0, s_tmax=0)
    assert len(seen) == 4 and all(b > a for a, b in seen)


def test_sample_filters_options_and_applies_default_eta():
    """Options a sampler does not take are dropped (the webui passes eta/s_churn only where accepted)."""
    x = np.ones((1, 4, 2, 2), np.float32)
    sig = resolve("Euler").sigmas(3, MODEL)
    seen = []
    out = resolve("Euler").sample(lambda x, s: x * 0.5, x * sig[0], sig, eta=0.3, s_noise=None)
    assert out.shape == x.shape
    r = resolve("Euler a")
    r.sample(lambda x, s: x * 0.5, x * sig[0], sig, noise=lambda a, b: seen.append((a, b)) or x * 0)
    assert len(seen) == 2  # default eta 1: noise on every step but the last


def test_unknown_sampler_is_invalid_request():
    with pytest.raises(InvalidRequest) as e:
        resolve("Euler b")
    assert e.value.field == "sampler_name"
    assert "DPM++ 2M" in e.value.allowed and "UniPC" in e.value.allowed


def test_unknown_schedule_is_invalid_request():
    with pytest.raises(InvalidRequest) as e:
        resolve("Euler", "Linear")
    assert e.value.field == "scheduler"
    assert "Karras" in e.value.allowed and "Align Your Steps" in e.value.allowed


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_is_invalid_request(steps):
    with pytest.raises(InvalidRequest) as e:
        resolve("Euler").sigmas(steps, MODEL)
    assert e.value.field == "steps"
