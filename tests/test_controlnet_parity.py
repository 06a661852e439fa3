"""ControlNet residuals end to end on the tiny SD1 model, against diffusers.

Our path: export.wrappers.ControlNetWrapper (unscaled residuals) -> engine.controlnet.units.controlnet_residuals
(scales, cond mask, several units) -> export.wrappers.UNetWrapper(with_residuals=True).
Reference: diffusers ``ControlNetModel(..., conditioning_scale=w)`` / ``MultiControlNetModel`` feeding
``UNet2DConditionModel(down_block_additional_residuals=..., mid_block_additional_residual=...)``.
Tolerance: relL2 <= 1e-5 (float32, same modules, same operations up to summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.controlnet.units import ControlMode, PreparedUnit, controlnet_component, controlnet_residuals
from engine.models.tiny import UNET_SD1, build_controlnet, build_tiny, build_unet
from export.wrappers import ControlNetWrapper, UNetWrapper, controlnet_residual_count

TOL = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = build_unet(UNET_SD1, seed=2)  # the UNet of build_tiny("sd1"), without its text encoder and VAE
    cn_a = build_tiny("controlnet_sd1").components["controlnet"]
    cn_b = build_controlnet("controlnet_sd1", seed=11)
    return unet, {"a": cn_a, "b": cn_b}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([637.0, 637.0])
    ehs = torch.randn(2, 77, 32, generator=g)
    img_a = torch.rand(1, 3, 64, 64, generator=g)
    img_b = torch.rand(1, 3, 64, 64, generator=g)
    return sample, timestep, ehs, img_a, img_b


class TorchBackend:
    """The torch backend's contract, restricted to the components this test needs."""

    def __init__(self, unet, controlnets):
        self.modules = {"unet_control": UNetWrapper(unet, with_residuals=True)}
        for name, cn in controlnets.items():
            self.modules[controlnet_component(name)] = ControlNetWrapper(cn)
        self.n_res = controlnet_residual_count(unet) + 1

    @torch.no_grad()
    def run(self, component, feeds):
        if component == "unet_control":
            res = [feeds[f"down_residual_{i}"] for i in range(self.n_res - 1)] + [feeds["mid_residual"]]
            out = self.modules[component](feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"], *res)
            return {"model_output": out}
        outs = self.modules[component](feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                                       feeds["controlnet_cond"])
        return {**{f"down_residual_{i}": o for i, o in enumerate(outs[:-1])}, "mid_residual": outs[-1]}


def ours(backend, units, feeds, cond_mask=None):
    res = controlnet_residuals(backend.run, units, 0, 20, feeds, cond_mask)
    assert res is not None
    return backend.run("unet_control", {**feeds, **res})["model_output"], res


def test_residual_count_of_tiny_sd1(models):
    unet, _ = models
    assert controlnet_residual_count(unet) == 4  # tiny: 4 down residuals + mid (SD1.5: 12 + mid)


@pytest.mark.parametrize("weight", [1.0, 0.65])
def test_balanced_unit_matches_diffusers(models, inputs, weight):
    unet, cns = models
    sample, t, ehs, img_a, _ = inputs
    backend = TorchBackend(unet, cns)
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
    unit = PreparedUnit("a", img_a.numpy(), weight=weight)
    got, res = ours(backend, [unit], feeds, cond_mask=np.array([1.0, 0.0]))
    with torch.no_grad():
        down, mid = cns["a"](sample, t, ehs, img_a.expand(2, -1, -1, -1), conditioning_scale=weight, return_dict=False)
        ref = unet(sample, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   return_dict=False)[0]
        plain = unet(sample, t, ehs, return_dict=False)[0]
    assert rel_l2(res["mid_residual"], mid) <= TOL
    assert rel_l2(got, ref) <= TOL, f"relL2 {rel_l2(got, ref):.2e} vs diffusers ControlNet (tol {TOL})"
    assert rel_l2(plain, ref) > 1e-3  # the control has an effect the test could miss


def test_two_balanced_units_match_diffusers_multicontrolnet(models, inputs):
    from diffusers import MultiControlNetModel

    unet, cns = models
    sample, t, ehs, img_a, img_b = inputs
    backend = TorchBackend(unet, cns)
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
    units = [PreparedUnit("a", img_a.numpy(), weight=0.8), PreparedUnit("b", img_b.numpy(), weight=1.3)]
    got, _ = ours(backend, units, feeds)
    multi = MultiControlNetModel([cns["a"], cns["b"]])
    with torch.no_grad():
        down, mid = multi(sample, t, ehs, [img_a.expand(2, -1, -1, -1), img_b.expand(2, -1, -1, -1)],
                          conditioning_scale=[0.8, 1.3], return_dict=False)
        ref = unet(sample, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   return_dict=False)[0]
    assert rel_l2(got, ref) <= TOL, f"relL2 {rel_l2(got, ref):.2e} vs diffusers MultiControlNetModel (tol {TOL})"


@pytest.mark.parametrize("mode", [ControlMode.PROMPT, ControlMode.CONTROL])
def test_soft_modes_against_diffusers_residuals(models, inputs, mode):
    """Soft injection: diffusers' unscaled ControlNet residuals times 0.825**(12-i) (truncated to 5 for the tiny
    model), uncond row zeroed in "ControlNet is more important" (the extension's cfg_injection)."""
    unet, cns = models
    sample, t, ehs, img_a, _ = inputs
    backend = TorchBackend(unet, cns)
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
    mask = np.array([1.0, 0.0])  # row 0 = prompt, row 1 = negative prompt
    got, _ = ours(backend, [PreparedUnit("a", img_a.numpy(), weight=1.5, control_mode=mode)], feeds, mask)
    with torch.no_grad():
        down, mid = cns["a"](sample, t, ehs, img_a.expand(2, -1, -1, -1), return_dict=False)
        scales = [1.5 * 0.825 ** (12 - i) for i in range(5)]
        res = [r * s for r, s in zip([*down, mid], scales)]
        if mode is ControlMode.CONTROL:
            res = [r * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1) for r in res]
        ref = unet(sample, t, ehs, down_block_additional_residuals=tuple(res[:-1]),
                   mid_block_additional_residual=res[-1], return_dict=False)[0]
        plain = unet(sample, t, ehs, return_dict=False)[0]
    assert rel_l2(got, ref) <= TOL, f"relL2 {rel_l2(got, ref):.2e} (tol {TOL})"
    if mode is ControlMode.CONTROL:
        assert rel_l2(got[1], plain[1]) <= TOL  # the negative-prompt row is the plain UNet
        assert rel_l2(got[0], plain[0]) > 1e-4


def test_sdxl_cond_only_unit_matches_diffusers(models):
    """SDXL feeds (text_embeds, time_ids) reach the ControlNet; the cond-only unit runs on the cond rows only.
    Reference: diffusers ControlNetModel / UNet2DConditionModel (SDXL text_time) with the uncond rows zeroed."""
    from engine.models.tiny import UNET_SDXL

    unet = build_unet(UNET_SDXL, seed=5)
    cn = build_controlnet("controlnet_sdxl", seed=6)
    g = torch.Generator().manual_seed(2)
    sample, t = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 411.0)
    ehs, pooled = torch.randn(4, 77, 64, generator=g), torch.randn(4, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(4, 1)
    img = torch.rand(1, 3, 64, 64, generator=g)
    n_res = controlnet_residual_count(unet) + 1
    mods = {"unet_control": UNetWrapper(unet, with_residuals=True), controlnet_component("x"): ControlNetWrapper(cn)}

    @torch.no_grad()
    def run(component, feeds):
        base = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
        if component == "unet_control":
            res = [feeds[f"down_residual_{i}"] for i in range(n_res - 1)] + [feeds["mid_residual"]]
            return {"model_output": mods[component](*base, feeds["text_embeds"], feeds["time_ids"], *res)}
        outs = mods[component](*base, feeds["controlnet_cond"], feeds["text_embeds"], feeds["time_ids"])
        return {**{f"down_residual_{i}": o for i, o in enumerate(outs[:-1])}, "mid_residual": outs[-1]}

    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, "text_embeds": pooled, "time_ids": time_ids}
    mask = np.array([1.0, 1.0, 0.0, 0.0])
    unit = PreparedUnit("x", img.numpy(), weight=0.9, control_mode=ControlMode.CONTROL)
    res = controlnet_residuals(run, [unit], 3, 10, feeds, mask)
    got = run("unet_control", {**feeds, **res})["model_output"]
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        down, mid = cn(sample, t, ehs, img.expand(4, -1, -1, -1), added_cond_kwargs=added, return_dict=False)
        scales = [0.9 * 0.825 ** (12 - i) for i in range(n_res)]
        keep = torch.tensor(mask, dtype=torch.float32).view(4, 1, 1, 1)
        ref_res = [r * s * keep for r, s in zip([*down, mid], scales)]
        ref = unet(sample, t, ehs, added_cond_kwargs=added, down_block_additional_residuals=tuple(ref_res[:-1]),
                   mid_block_additional_residual=ref_res[-1], return_dict=False)[0]
    assert len(res) == n_res
    assert rel_l2(got, ref) <= TOL, f"relL2 {rel_l2(got, ref):.2e} vs diffusers (tol {TOL})"
