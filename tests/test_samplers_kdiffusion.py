"""Parity of engine.samplers with k-diffusion's own functions (k_diffusion/sampling.py, loaded alone).

Same deterministic toy denoiser, same noise, fp32: final latent max abs diff <= 1e-5 and identical callback
sequences (i, sigma, sigma_hat, x, denoised).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.denoiser import ModelSchedule
from engine.samplers import SAMPLERS, SCHEDULES, SPECS

TOL = 1e-5


def load_kdiffusion_sampling() -> types.ModuleType:
    """k_diffusion/sampling.py without its package __init__ (which imports torchvision/wandb)."""
    if "_kdiff_ref.sampling" in sys.modules:
        return sys.modules["_kdiff_ref.sampling"]
    root = Path(importlib.util.find_spec("k_diffusion").origin).parent
    pkg = types.ModuleType("_kdiff_ref")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("_kdiff_ref.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["_kdiff_ref"] = pkg
    sys.modules["_kdiff_ref.utils"] = utils
    spec = importlib.util.spec_from_file_location("_kdiff_ref.sampling", root / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_kdiff_ref.sampling"] = module
    spec.loader.exec_module(module)
    return module


K = load_kdiffusion_sampling()
MODEL = ModelSchedule.scaled_linear()
SHAPE = (2, 4, 8, 8)


def toy_denoise(x, sigma):
    """Deterministic, nonlinear in x and sigma; works for numpy and torch, scalar or (B,) sigma."""
    if isinstance(x, np.ndarray):
        s = np.asarray(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if np.ndim(sigma) else sigma
        return (x * (1 / (1 + s**2)) + np.tanh(x) * 0.1 * s / (1 + s)).astype(x.dtype)
    s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma
    return x * (1 / (1 + s**2)) + torch.tanh(x) * 0.1 * s / (1 + s)


class Noise:
    """A fixed sequence of unit Gaussians served in call order, recording the (sigma, sigma_next) asked for."""

    def __init__(self, seed=0, n=200):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(SHAPE, generator=g) for _ in range(n)]
        self.k = 0
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        self.k += 1
        return self.draws[self.k - 1].clone()


def record():
    seen = []

    def cb(d):
        seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()
                     if k in ("x", "i", "sigma", "sigma_hat", "denoised")})

    return seen, cb


KD_CALLS = {
    "Euler": lambda m, x, s, **kw: K.sample_euler(m, x, s, disable=True, **kw),
    "Euler a": lambda m, x, s, **kw: K.sample_euler_ancestral(m, x, s, disable=True, **kw),
    "Heun": lambda m, x, s, **kw: K.sample_heun(m, x, s, disable=True, **kw),
    "DPM2": lambda m, x, s, **kw: K.sample_dpm_2(m, x, s, disable=True, **kw),
    "DPM2 a": lambda m, x, s, **kw: K.sample_dpm_2_ancestral(m, x, s, disable=True, **kw),
    "LMS": lambda m, x, s, **kw: K.sample_lms(m, x, s, disable=True, **kw),
    "DPM++ 2S a": lambda m, x, s, **kw: K.sample_dpmpp_2s_ancestral(m, x, s, disable=True, **kw),
    "DPM++ SDE": lambda m, x, s, **kw: K.sample_dpmpp_sde(m, x, s, disable=True, **kw),
    "DPM++ 2M": lambda m, x, s, **kw: K.sample_dpmpp_2m(m, x, s, disable=True, **kw),
    "DPM++ 2M SDE": lambda m, x, s, **kw: K.sample_dpmpp_2m_sde(m, x, s, disable=True, **kw),
    "DPM++ 2M SDE Heun": lambda m, x, s, **kw: K.sample_dpmpp_2m_sde(m, x, s, disable=True, solver_type="heun",
                                                                    **kw),
    "DPM++ 3M SDE": lambda m, x, s, **kw: K.sample_dpmpp_3m_sde(m, x, s, disable=True, **kw),
}


def run_pair(name, schedule, steps=8, **options):
    sigmas = torch.from_numpy(SCHEDULES[schedule](steps, MODEL.sigma_min, MODEL.sigma_max, model=MODEL))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    takes_noise = "noise_sampler" in KD_CALLS[name].__code__.co_names or name not in ("Euler", "Heun", "DPM2",
                                                                                    "LMS", "DPM++ 2M")
    n_ours, n_ref = Noise(), Noise()
    seen_ours, cb_ours = record()
    seen_ref, cb_ref = record()
    spec = SPECS[name]
    ours = SAMPLERS[name](toy_denoise, x.clone(), sigmas, noise=n_ours, callback=cb_ours,
                          **{**spec.options, **options})
    kw = dict(options)
    if takes_noise:
        kw["noise_sampler"] = n_ref
    ref = KD_CALLS[name](toy_denoise, x.clone(), sigmas, callback=cb_ref, **kw)
    return ours, ref, seen_ours, seen_ref, n_ours, n_ref


@pytest.mark.parametrize("name", sorted(KD_CALLS))
@pytest.mark.parametrize("schedule", ["Karras", "Uniform", "Exponential"])
def test_matches_kdiffusion(name, schedule):
    ours, ref, seen_ours, seen_ref, n_ours, n_ref = run_pair(name, schedule)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{name}/{schedule}: max |ours - k-diffusion| = {diff:.3g} > {TOL}"
    assert len(seen_ours) == len(seen_ref)
    for a, b in zip(seen_ours, seen_ref):
        assert a["i"] == b["i"]
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-6)
        assert float(a["sigma_hat"]) == pytest.approx(float(b["sigma_hat"]), rel=1e-6)
        assert (a["x"] - b["x"]).abs().max().item() <= TOL
        assert (a["denoised"] - b["denoised"]).abs().max().item() <= TOL
    assert n_ours.k == n_ref.k or name in ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ SDE")
