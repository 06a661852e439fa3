"""engine.denoiser.Denoiser against k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser (external.py)
and the webui's CFGDenoiser.combine_denoised, written out below. fp32, max abs diff <= 1e-5 unless stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.conditioning import StepConditioning
from engine.denoiser import Denoiser, ModelSchedule
from core.errors import InvalidRequest
from tests.test_samplers_reference import KD

MODEL = ModelSchedule.scaled_linear()
AC = torch.from_numpy(MODEL.alphas_cumprod)
SIGMAS = np.array([14.6, 9.0, 4.0, 1.5, 0.3, 0.0], np.float32)
G = torch.Generator().manual_seed(0)
X = torch.randn(2, 4, 6, 6, generator=G) * 4


class Unet:
    """A deterministic fake UNet: output depends on x_in, t_in and each row's context; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, t_in, cond, step):
        self.calls.append((x_in.shape[0], t_in, step))
        ctx = cond.context
        lib = np if isinstance(x_in, np.ndarray) else torch
        bias = ctx.mean(axis=(1, 2)) if lib is np else ctx.mean(dim=(1, 2))
        t = t_in.reshape(-1, 1, 1, 1)
        return lib.tanh(x_in) * 0.5 + bias.reshape(-1, 1, 1, 1) + t / 1000.0


def conditioning():
    """Image 0: two AND-parts (weights 1.0 and 0.5); image 1: one part; negatives in rows 3, 4."""
    ctx = torch.randn(5, 77, 8, generator=torch.Generator().manual_seed(1))
    return StepConditioning(context=ctx, positive=(((0, 1.0), (1, 0.5)), ((2, 1.0),)), negative=(3, 4))


def reference(prediction_type, x, sigma, cond, cfg):
    """k-diffusion wrapper on every row (x repeated per row), then webui combine_denoised."""
    unet = Unet()
    rows = [0, 0, 1, 0, 1]
    cls = KD.external.DiscreteEpsDDPMDenoiser if prediction_type == "epsilon" else KD.external.DiscreteVDDPMDenoiser

    class Wrapped(cls):
        def get_eps(self, x_in, t, **kw):
            return unet(x_in, t, cond, 0)

        get_v = get_eps

    wrapper = Wrapped(None, AC, quantize=False)
    x_out = wrapper(x[rows], torch.full((5,), float(sigma)))
    uncond = x_out[-2:]
    den = uncond.clone()
    for i, conds in enumerate(cond.positive):
        for row, weight in conds:
            den[i] += (x_out[row] - uncond[i]) * (weight * cfg)
    return den, unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma", [14.6, 2.7, 0.3])
def test_matches_kdiffusion_wrappers_and_webui_cfg(prediction_type, sigma):
    cond = conditioning()
    unet = Unet()
    d = Denoiser(unet, MODEL, prediction_type, 7.5, lambda step: cond, SIGMAS)
    ours = d(X, sigma)
    ref, ref_unet = reference(prediction_type, X, torch.tensor(sigma), cond, 7.5)
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert len(unet.calls) == 1 and unet.calls[0][0] == 5  # CFG in ONE batched model call
    assert unet.calls[0][1] == pytest.approx(ref_unet.calls[0][1], abs=1e-3)  # same timesteps


def test_cfg_scale_one_skips_negative_rows():
    cond = conditioning()
    unet = Unet()
    d = Denoiser(unet, MODEL, "epsilon", 1.0, lambda step: cond, SIGMAS)
    ours = d(X, 4.0)
    assert unet.calls[0][0] == 3  # only the positive rows were run
    # x0_b = sum w * x0[row] with weights normalised to 1 (conditioning.py)
    positive = StepConditioning(context=cond.context[:3], positive=cond.positive, negative=cond.negative)
    eps = Unet()(X[[0, 0, 1]] / (4.0**2 + 1) ** 0.5, torch.full((3,), MODEL.sigma_to_t(4.0)), positive, 0)
    x0 = X[[0, 0, 1]] - 4.0 * eps
    expected = torch.stack([(x0[0] * 1.0 + x0[1] * 0.5) / 1.5, x0[2]])
    assert (ours - expected).abs().max().item() <= 1e-5 * 20


def test_step_index_from_sigma():
    """Largest i with sigmas[i] >= sigma: intermediate (2nd-order) sigmas belong to the step they are in."""
    steps = []
    d = Denoiser(Unet(), MODEL, "epsilon", 5.0, lambda step: steps.append(step) or conditioning(), SIGMAS)
    for sigma in (14.6, 12.0, 9.0, 8.99, 1.5, 0.3, 0.1):
        d(X, sigma)
    assert steps == [0, 0, 1, 1, 3, 4, 4]


def test_per_image_sigma_and_numpy_agree():
    cond = conditioning()
    d = Denoiser(Unet(), MODEL, "epsilon", 6.0, lambda step: cond, SIGMAS)
    batched = d(X, torch.tensor([4.0, 4.0]))
    assert (batched - d(X, 4.0)).abs().max().item() == 0
    cond_np = StepConditioning(context=cond.context.numpy(), positive=cond.positive, negative=cond.negative)
    d_np = Denoiser(Unet(), MODEL, "epsilon", 6.0, lambda step: cond_np, SIGMAS)
    out_np = d_np(X.numpy(), np.float32(4.0))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    assert np.abs(out_np - batched.numpy()).max() <= 1e-5 * 20
    mixed = d(X, torch.tensor([4.0, 1.5]))
    assert (mixed[0] - d(X, 4.0)[0]).abs().max().item() <= 1e-5 * 20
    assert (mixed[1] - d(X, 1.5)[1]).abs().max().item() <= 1e-5 * 20


def test_lcm_boundary_scalings_match_webui():
    """webui LCMCompVisDenoiser.forward: eps scalings, timestep quantised to 19 + 20k, then
    c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25) applied to (x0, x)."""
    lcm = MODEL.for_lcm()
    cond = StepConditioning(context=torch.zeros(2, 77, 8), positive=(((0, 1.0),),), negative=(1,))
    d = Denoiser(Unet(), lcm, "epsilon", 1.0, lambda step: cond, SIGMAS)
    x = X[:1]
    sigma = 2.0
    ours = d(x, sigma)
    log_sigmas = torch.from_numpy(lcm.log_sigmas)
    t = float((torch.log(torch.tensor(sigma)) - log_sigmas).abs().argmin() * 20 + 19)
    eps = Unet()(x / (sigma**2 + 1) ** 0.5, torch.tensor([t]), cond, 0)
    x0 = x - sigma * eps
    ts = t * 10
    expected = ts / (ts**2 + 0.25) ** 0.5 * x0 + 0.25 / (ts**2 + 0.25) * x
    assert (ours - expected).abs().max().item() <= 1e-5


def test_bad_prediction_type():
    with pytest.raises(InvalidRequest) as e:
        Denoiser(Unet(), MODEL, "sample", 5.0, lambda s: conditioning(), SIGMAS)
    assert e.value.field == "prediction_type"


def webui_ngms(calls, s_min_uncond, s_min_uncond_all, prediction_type, cond, cfg):
    """The webui's CFGDenoiser.forward (v1.9, sd_samplers_cfg_denoiser.py) for a run of denoiser calls, written
    out: ``skip_uncond`` when ``(self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] <
    s_min_uncond`` (``self.step``: the call count from 0); then only the positive rows run, each image's first
    positive row stands in for the uncond (``fake_uncond``), and combine_denoised runs at cond_scale 1.0."""
    out, rows_run = [], []
    cls = KD.external.DiscreteEpsDDPMDenoiser if prediction_type == "epsilon" else KD.external.DiscreteVDDPMDenoiser
    for step, (x, sigma) in enumerate(calls):
        unet = Unet()
        skip_uncond = bool((step % 2 or s_min_uncond_all) and s_min_uncond > 0 and sigma < s_min_uncond)
        run = StepConditioning(context=cond.context[:3], positive=cond.positive, negative=()) if skip_uncond \
            else cond  # cond_in = tensor (the positives) when skipping

        class Wrapped(cls):
            def get_eps(self, x_in, t, **kw):
                return unet(x_in, t, run, 0)

            get_v = get_eps

        rows = [0, 0, 1] if skip_uncond else [0, 0, 1, 0, 1]
        x_out = Wrapped(None, AC, quantize=False)(x[rows], torch.full((len(rows),), float(sigma)))
        rows_run.append(len(rows))
        if skip_uncond:
            denoised_image_indexes = [conds[0][0] for conds in cond.positive]
            x_out = torch.cat([x_out, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])])
        scale = 1.0 if skip_uncond else cfg
        uncond = x_out[-2:]
        den = uncond.clone()
        for i, conds in enumerate(cond.positive):
            for row, weight in conds:
                den[i] += (x_out[row] - uncond[i]) * (weight * scale)
        out.append(den)
    return out, rows_run


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("s_min_uncond,every", [(0.0, False), (5.0, False), (5.0, True), (20.0, False)])
def test_ngms_skips_the_negative_rows_as_the_webui(prediction_type, s_min_uncond, every):
    """s_min_uncond (NGMS): the same rows and the same x0 as the webui's rule on a Heun-like run of calls
    (intermediate sigmas count as calls); max abs diff <= 1e-5 relative."""
    cond = conditioning()
    sigmas = [14.6, 11.0, 9.0, 6.0, 4.0, 2.5, 1.5, 0.8, 0.3, 0.2]
    calls = [(X * (1 + 0.1 * k), s) for k, s in enumerate(sigmas)]
    unet = Unet()
    d = Denoiser(unet, MODEL, prediction_type, 7.5, lambda step: cond, SIGMAS, s_min_uncond=s_min_uncond,
                 s_min_uncond_all=every)
    ours = [d(x, s) for x, s in calls]
    ref, rows = webui_ngms(calls, s_min_uncond, every, prediction_type, cond, 7.5)
    assert [c[0] for c in unet.calls] == rows
    assert d.skipped == rows.count(3)
    if s_min_uncond == 5.0:
        assert rows.count(3) == (6 if every else 3)  # sigma < 5: six calls, the odd-numbered ones are 5, 7, 9
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert d.last[3] is (rows[-1] == 5)  # previews: the negative rows ran in the last call


def test_ngms_needs_cfg():
    """cfg_scale <= 1 runs no negative rows: nothing to skip, NGMS counts nothing."""
    d = Denoiser(Unet(), MODEL, "epsilon", 1.0, lambda step: conditioning(), SIGMAS, s_min_uncond=15.0,
                 s_min_uncond_all=True)
    d(X, 0.5)
    assert d.skipped == 0
