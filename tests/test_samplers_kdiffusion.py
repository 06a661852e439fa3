"""Parity of engine.samplers with k-diffusion's own sampler functions (k_diffusion/sampling.py, loaded alone).

Same deterministic toy denoiser, same noise, fp32: final latent max abs diff <= 1e-5 (TOL) and the same callback
sequence (i, sigma, sigma_hat within rel 1e-5; x and denoised within TOL * max(1, max |value|)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.denoiser import ModelSchedule
from engine.samplers import SAMPLERS, SCHEDULES, SPECS, resolve
from tests.test_samplers_reference import SHAPE, K, Noise, recorder, toy_denoise

TOL = 1e-5
MODEL = ModelSchedule.scaled_linear()


def _kd(fn, **fixed):
    return lambda m, x, s, **kw: fn(m, x, s, disable=True, **fixed, **kw)


def _kd_range(fn):
    """DPM fast/adaptive take (sigma_min, sigma_max[, n]) in k-diffusion; webui passes min/max and n = steps."""
    def call(m, x, s, **kw):
        lo, hi = s[s > 0].min().item(), s.max().item()
        if fn is K.sample_dpm_fast:
            return fn(m, x, lo, hi, len(s) - 1, disable=True, **kw)
        return fn(m, x, lo, hi, disable=True, **kw)
    return call


KD_CALLS = {
    "Euler": (_kd(K.sample_euler), False),
    "Euler a": (_kd(K.sample_euler_ancestral), True),
    "Heun": (_kd(K.sample_heun), False),
    "DPM2": (_kd(K.sample_dpm_2), False),
    "DPM2 a": (_kd(K.sample_dpm_2_ancestral), True),
    "LMS": (_kd(K.sample_lms), False),
    "DPM++ 2S a": (_kd(K.sample_dpmpp_2s_ancestral), True),
    "DPM++ SDE": (_kd(K.sample_dpmpp_sde), True),
    "DPM++ 2M": (_kd(K.sample_dpmpp_2m), False),
    "DPM++ 2M SDE": (_kd(K.sample_dpmpp_2m_sde), True),
    "DPM++ 2M SDE Heun": (_kd(K.sample_dpmpp_2m_sde, solver_type="heun"), True),
    "DPM++ 3M SDE": (_kd(K.sample_dpmpp_3m_sde), True),
    "DPM fast": (_kd_range(K.sample_dpm_fast), True),
    "DPM adaptive": (_kd_range(K.sample_dpm_adaptive), True),
}


def sigmas_for(schedule, steps):
    return torch.from_numpy(SCHEDULES[schedule](steps, MODEL.sigma_min, MODEL.sigma_max, model=MODEL))


def run_pair(name, schedule, steps=8, denoise=toy_denoise, shape=SHAPE, **options):
    # SAMPLERS[name] is the sampler as the engine runs it, the webui's default eta bound (1.0 for DPM fast /
    # adaptive, whose k-diffusion default is 0): the reference gets the same eta.
    if SPECS[name].default_eta is not None and "eta" not in options:
        options["eta"] = SPECS[name].default_eta
    sigmas = sigmas_for(schedule, steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    fn, takes_noise = KD_CALLS[name]
    n_ours, n_ref = Noise(shape=shape), Noise(shape=shape)
    seen_ours, cb_ours = recorder()
    seen_ref, cb_ref = recorder()
    ours = SAMPLERS[name](denoise, x.clone(), sigmas, noise=n_ours, callback=cb_ours,
                          **{**SPECS[name].options, **options})
    ref = fn(denoise, x.clone(), sigmas, callback=cb_ref, **({"noise_sampler": n_ref} if takes_noise else {}),
             **options)
    return ours, ref, seen_ours, seen_ref, n_ours, n_ref


def assert_same_run(name, ours, ref, seen_ours, seen_ref, tol=TOL, relative=False):
    diff = (ours - ref).abs().max().item()
    limit = tol * max(1.0, ref.abs().max().item()) if relative else tol
    assert diff <= limit, f"{name}: max |ours - k-diffusion| = {diff:.3g} > {limit:.3g}"
    assert len(seen_ours) == len(seen_ref), f"{name}: {len(seen_ours)} callbacks, k-diffusion {len(seen_ref)}"
    for a, b in zip(seen_ours, seen_ref):
        assert a["i"] == b["i"]
        # DPM adaptive's step sizes come from an error estimate (x_low - x_high, a difference of nearly equal
        # values) that fp32 rounding shifts: its intermediate sigmas agree to 1e-3 relative, x to 1e-4.
        rel = 1e-3 if name.startswith("DPM adaptive") else 1e-5
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=rel)
        assert float(a["sigma_hat"]) == pytest.approx(float(b["sigma_hat"]), rel=rel)
        for key in ("x", "denoised"):  # intermediate x reaches |x| ~ 20: fp32 tolerance relative to its scale
            scale = max(1.0, b[key].abs().max().item())
            limit = (1e-4 if name.startswith("DPM adaptive") else tol) * scale
            assert (a[key] - b[key]).abs().max().item() <= limit, f"{name}: callback {a['i']} {key}"


@pytest.mark.parametrize("schedule", ["Karras", "Uniform", "Exponential"])
@pytest.mark.parametrize("name", sorted(KD_CALLS))
def test_matches_kdiffusion(name, schedule):
    ours, ref, seen_ours, seen_ref, n_ours, n_ref = run_pair(name, schedule)
    # DPM fast at the webui's eta 1: its ancestral step is computed in Python floats here and in fp32
    # tensors in k-diffusion; the tolerance is 1e-5 relative to the output's scale.
    assert_same_run(f"{name}/{schedule}", ours, ref, seen_ours, seen_ref, relative=name == "DPM fast")
    # Noise is asked for at the same (sigma, sigma_next) as k-diffusion's noise_sampler (which is also called
    # where its result is multiplied by 0; we skip those draws, so ours is a prefix of the same sequence).
    assert len(n_ours.calls) <= len(n_ref.calls)
    for a, b in zip(n_ours.calls, n_ref.calls):
        assert a == pytest.approx(b, rel=1e-3 if name == "DPM adaptive" else 1e-5)


@pytest.mark.parametrize("name,options", [
    ("Euler a", {"eta": 0.5, "s_noise": 0.9}),
    ("DPM2 a", {"eta": 0.7}),
    ("DPM++ 2S a", {"eta": 0.3, "s_noise": 1.1}),
    ("DPM++ SDE", {"eta": 0.5, "r": 0.4}),
    ("DPM++ 2M SDE", {"eta": 0.6}),
    ("DPM++ 3M SDE", {"eta": 0.0}),
    ("DPM fast", {"eta": 0.5}),
    ("DPM adaptive", {"eta": 0.0, "order": 2}),
    ("LMS", {"order": 3}),
])
def test_options_match_kdiffusion(name, options):
    ours, ref, seen_ours, seen_ref, _, _ = run_pair(name, "Karras", **options)
    assert_same_run(f"{name} {options}", ours, ref, seen_ours, seen_ref)


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_matches_kdiffusion(name):
    """s_churn/s_tmin/s_tmax/s_noise: k-diffusion draws torch.randn_like every step; we draw from noise()."""
    options = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.003}
    sigmas = sigmas_for("Karras", 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    n_ours = Noise()
    ref_draws = iter(Noise().draws)
    fn, _ = KD_CALLS[name]
    ours = SAMPLERS[name](toy_denoise, x.clone(), sigmas, noise=n_ours, **options)
    original = K.torch.randn_like
    K.torch.randn_like = lambda t: next(ref_draws).clone()
    try:
        ref = fn(toy_denoise, x.clone(), sigmas, **options)
    finally:
        K.torch.randn_like = original
    assert (ours - ref).abs().max().item() <= TOL
    assert n_ours.k == 8  # one draw per step, like k-diffusion's randn_like


def test_brownian_noise_matches_kdiffusion():
    """engine.noise.make_noise_sampler(brownian=True) == k-diffusion BrownianTreeNoiseSampler(seed=list)."""
    from engine.noise import make_noise_sampler

    sigmas = sigmas_for("Karras", 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    ours = make_noise_sampler(x, brownian=True, seeds=[11, 12], sigmas=sigmas)
    ref = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[11, 12])
    for a, b in zip(sigmas[:-2], sigmas[1:-1]):
        assert (ours(float(a), float(b)) - ref(a, b)).abs().max().item() <= 1e-6
    out_ours = SAMPLERS["DPM++ 2M SDE"](toy_denoise, x.clone(), sigmas,
                                        noise=make_noise_sampler(x, brownian=True, seeds=[11, 12], sigmas=sigmas))
    out_ref = K.sample_dpmpp_2m_sde(toy_denoise, x.clone(), sigmas, disable=True,
                                    noise_sampler=K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(),
                                                                             sigmas.max(), seed=[11, 12]))
    assert (out_ours - out_ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(SPECS))
def test_numpy_matches_torch(name):
    """The same function body on numpy arrays and torch tensors: max abs diff <= 1e-5."""
    sigmas = sigmas_for("DDIM" if name in ("DDIM", "PLMS") else "Karras", 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    options = dict(SPECS[name].options)
    if "eta" in options or SPECS[name].default_eta is not None:
        options["eta"] = 0.5
    out_t = SAMPLERS[name](toy_denoise, x.clone(), sigmas, noise=Noise(), **options)
    out_n = SAMPLERS[name](toy_denoise, x.numpy().copy(), sigmas.numpy(), noise=Noise(numpy=True), **options)
    assert isinstance(out_n, np.ndarray) and out_n.dtype == np.float32
    assert torch.is_tensor(out_t) and out_t.dtype == torch.float32
    assert np.abs(out_n - out_t.numpy()).max() <= TOL


@pytest.fixture(scope="module")
def tiny_unet_denoiser():
    """Our Denoiser around engine.models.tiny's random SD1 UNet, with CFG over two prompts."""
    from engine.conditioning import StepConditioning
    from engine.denoiser import Denoiser
    from engine.models.tiny import build_tiny

    torch.manual_seed(0)
    tiny = build_tiny("sd1")
    unet = tiny.components["unet"].eval()
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(5)
    context = torch.randn(3, 77, dim, generator=g)
    cond = StepConditioning(context=context, positive=(((0, 1.0),), ((1, 1.0),)), negative=(2, 2))

    def model(x_in, t_in, c, step):
        # The random tiny UNet's eps is ~250 in size; normalised per row so that x0 stays O(1).
        with torch.no_grad():
            raw = unet(x_in, t_in, encoder_hidden_states=c.context).sample
        return raw / raw.flatten(1).std(1)[:, None, None, None]

    def make(sigmas):
        return Denoiser(model, MODEL, "epsilon", 3.0, lambda step: cond, sigmas)

    return make, unet.config.sample_size


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ SDE", "Heun"])
def test_tiny_unet_matches_kdiffusion(name, tiny_unet_denoiser):
    """Same samplers with a real (tiny, random) UNet behind our Denoiser: ours vs k-diffusion's functions.

    A random UNet is no denoiser: x0 grows to ~1e4 over the steps, so the tolerance is 1e-5 relative to the
    largest value (fp32 rounding of the UNet, amplified by the steps)."""
    make, size = tiny_unet_denoiser
    sigmas = sigmas_for("Karras", 4)
    ours, ref, seen_ours, seen_ref, _, _ = run_pair(name, "Karras", steps=4, denoise=make(sigmas),
                                                    shape=(2, 4, 8, 8))
    assert_same_run(name, ours, ref, seen_ours, seen_ref, relative=True)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE"])
def test_webui_chain_end_to_end(name, tiny_unet_denoiser):
    """resolve + ImageRNG + Denoiser + sampler, as the pipeline chains them, against the webui's chain built
    from references: torch.manual_seed noise per image, k-diffusion's DiscreteEpsDDPMDenoiser (CompVis) on
    the tiny UNet with the webui's CFG combine, k-diffusion's sampler, per-step noise from the same per-image
    generators (webui TorchHijack -> ImageRNG.next) or BrownianTreeNoiseSampler(seed=seeds) for SDE samplers.
    Tolerance 1e-5 relative to the largest value (the random UNet grows x0, see above)."""
    from engine.noise import ImageRNG
    from tests.test_samplers_reference import KD

    make, _ = tiny_unet_denoiser
    seeds, shape = [100, 101], (4, 8, 8)
    r = resolve(name)
    sigmas = r.sigmas(4, MODEL)
    rng = ImageRNG(shape, seeds)
    x = rng.first() * float(sigmas[0])
    denoise = make(sigmas)
    ours = r.sample(denoise, x, sigmas, noise=r.noise_sampler(x, rng, seeds, sigmas), eta=None)

    # the webui's chain
    sig_t = torch.from_numpy(sigmas)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_ref = torch.stack([torch.randn(shape, generator=g) for g in gens]) * sig_t[0]
    inner_model = denoise.model
    cond = denoise.conditioning(0)  # rows: image 0, image 1, the negative prompt shared by both
    from engine.conditioning import StepConditioning

    rows4 = StepConditioning(context=cond.context[[0, 1, 2, 2]], positive=cond.positive, negative=(2, 3))

    class CompVis(KD.external.DiscreteEpsDDPMDenoiser):
        def get_eps(self, x_in, t):
            return inner_model(x_in, t, rows4, 0)

    wrapper = CompVis(None, torch.from_numpy(MODEL.alphas_cumprod), quantize=False)

    def cfg_denoiser(x, sigma):  # webui CFGDenoiser: cond rows then uncond rows, combine_denoised
        x_out = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]))
        uncond = x_out[2:]
        return torch.stack([uncond[b] + (x_out[b] - uncond[b]) * 3.0 for b in range(2)])

    if r.needs_brownian:
        noise_ref = K.BrownianTreeNoiseSampler(x_ref, sig_t[sig_t > 0].min(), sig_t.max(), seed=seeds)
    else:
        noise_ref = lambda a, b: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
    fn, _ = KD_CALLS[name]
    ref = fn(cfg_denoiser, x_ref, sig_t, noise_sampler=noise_ref)
    assert (ours - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ SDE", "UniPC", "DPM adaptive"])
def test_cuda_matches_cpu(name):
    """The same function bodies on CUDA tensors: max abs diff to CPU <= 1e-4 (different fp32 kernels)."""
    sigmas = sigmas_for("Karras", 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    cpu = SAMPLERS[name](toy_denoise, x.clone(), sigmas, noise=Noise(), **SPECS[name].options)
    noise = Noise()
    gpu = SAMPLERS[name](toy_denoise, x.cuda(), sigmas.cuda(), noise=lambda a, b: noise(a, b).cuda(),
                         **SPECS[name].options)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-4
