"""Component descriptors: names match the wrappers (the contract), shapes match what diffusers computes,
profiles respect the UNet's downscale."""

from __future__ import annotations

import pytest
import torch

from core.errors import InvalidRequest
from engine.models.tiny import build_tiny
from export.descriptors import (COMPONENTS, ShapeConfig, available_components, describe, eval_dim,
                                residual_specs)
from export.wrappers import controlnet_residual_count


def modules_of(kind):
    if kind.startswith("controlnet_"):
        return dict(build_tiny(kind.split("_", 1)[1]).components, **build_tiny(kind).components)
    return build_tiny(kind).components


@pytest.fixture(scope="module", params=["sd1", "sd2v", "sdxl", "controlnet_sd1", "controlnet_sdxl"])
def model(request):
    return request.param, modules_of(request.param)


def test_descriptor_shapes_match_the_wrappers(model):
    """Running each wrapper on the descriptor's sample inputs gives exactly the described output names/shapes."""
    kind, modules = model
    for component in available_components(modules):
        desc = describe(component, modules)
        m = desc.latent_multiple
        env = desc.env(batch=2, height=2 * m, width=3 * m, tokens=154 if desc.uses_tokens else 77)
        feeds = desc.sample_inputs(2, 2 * m, 3 * m, env["T"])
        assert list(feeds) == desc.input_names
        with torch.no_grad():
            out = desc.wrapper(modules[desc.source])(*feeds.values())
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(desc.outputs), component
        assert {n: tuple(o.shape) for n, o in zip(desc.output_names, out)} == desc.output_shapes(env), component
        recovered = desc.env_from_inputs({n: tuple(v.shape) for n, v in feeds.items()})
        assert recovered == {k: env[k] for k in recovered} and ("h" in recovered) == desc.uses_latent


def test_contract_names(model):
    """Input/output names of docs/ARCHITECTURE.md."""
    kind, modules = model
    sdxl = "text_encoder_2" in modules
    unet = describe("unet", modules)
    extra = ["text_embeds", "time_ids"] if sdxl else []
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states", *extra]
    assert unet.output_names == ["model_output"]
    n = controlnet_residual_count(modules["unet"])
    control = describe("unet_control", modules)
    assert control.input_names == unet.input_names + [f"down_residual_{i}" for i in range(n)] + ["mid_residual"]
    te = describe("text_encoder", modules)
    assert te.input_names == ["input_ids", "clip_skip", "extra_embeddings"]
    assert te.output_names == ["hidden_state", "hidden_state_raw", "pooled"]
    assert [t.dtype for t in te.inputs] == ["int64", "int64", "float32"]
    assert describe("vae_decoder", modules).input_names == ["latent"]
    assert describe("vae_decoder", modules).output_names == ["image"]
    assert describe("vae_encoder", modules).input_names == ["image"]
    assert describe("vae_encoder", modules).output_names == ["latent"]
    if "controlnet" in modules:
        cn = describe("controlnet", modules)
        assert cn.input_names == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", *extra]
        assert cn.output_names == [f"down_residual_{i}" for i in range(n)] + ["mid_residual"]
        # ControlNet outputs are exactly the residual inputs of unet_control
        assert cn.outputs == tuple(control.inputs[len(unet.inputs):])


def test_dynamic_axes():
    modules = modules_of("sd1")
    assert describe("unet", modules).dynamic_axes() == {
        "sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
        "encoder_hidden_states": {0: "B", 1: "T"}, "model_output": {0: "B", 2: "h", 3: "w"},
    }
    assert describe("vae_decoder", modules).dynamic_axes()["image"] == {0: "B", 2: "8*h", 3: "8*w"}
    te = describe("text_encoder", modules).dynamic_axes()
    assert te["input_ids"] == {0: "B"} and "clip_skip" not in te and te["extra_embeddings"] == {0: "E"}


def test_profile_from_shape_config():
    """min/opt/max: batch range, image range / 8 rounded inwards to the UNet downscale (tiny: 2), 77*k tokens."""
    modules = modules_of("sdxl")
    prof = describe("unet", modules).profile(ShapeConfig(batch=(1, 2, 4), image=(250, 512, 1030),
                                                         token_chunks=(1, 2, 3)))
    assert prof["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128))
    assert prof["encoder_hidden_states"] == ((1, 77, 64), (2, 154, 64), (4, 231, 64))
    assert prof["text_embeds"] == ((1, 32), (2, 32), (4, 32))
    assert prof["time_ids"] == ((1, 6), (2, 6), (4, 6))
    te = describe("text_encoder_2", modules).profile(ShapeConfig())
    assert te["input_ids"] == ((1, 77), (2, 77), (4, 77)) and te["clip_skip"] == ((1,), (1,), (1,))
    assert te["extra_embeddings"] == ((1, 32), (8, 32), (640, 32))


def test_profile_respects_a_x8_unet():
    """A 4-level UNet (SD1.5 shape: x8 downscale): 264..1000 px -> latents 40..120 (multiples of 8)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8, attention_head_dim=2)
    desc = describe("unet", {"unet": unet})
    assert desc.latent_multiple == 8
    assert desc.latent_range(ShapeConfig(image=(264, 520, 1000))) == (40, 64, 120)
    with pytest.raises(InvalidRequest, match="multiple of 8"):
        desc.env(1, 36, 40)
    # the residual specs follow diffusers: conv_in, 1 per layer per level, a downsampler except at the last
    assert [t.shape[2] for t in residual_specs(unet.config)] == [
        "h", "h", "h/2", "h/2", "h/4", "h/4", "h/8", "h/8", "h/8"]
    assert len(residual_specs(unet.config)) == controlnet_residual_count(unet) + 1


def test_errors():
    modules = modules_of("sd1")
    with pytest.raises(InvalidRequest, match="component.*unknown"):
        describe("refiner", modules)
    with pytest.raises(InvalidRequest, match="text_encoder_2") as err:
        describe("text_encoder_2", modules)
    assert "unet" in str(err.value)  # lists what the model has
    desc = describe("unet", modules)
    with pytest.raises(InvalidRequest, match="tokens"):
        desc.env(1, 8, 8, tokens=100)
    with pytest.raises(InvalidRequest, match="batch"):
        ShapeConfig(batch=(2, 1, 4))
    assert eval_dim("8*h", {"h": 5}) == 40 and eval_dim("w/4", {"w": 12}) == 3
    with pytest.raises(ValueError):
        eval_dim("w/4", {"w": 6})
    assert set(COMPONENTS) == {"text_encoder", "text_encoder_2", "unet", "unet_control", "controlnet",
                               "vae_decoder", "vae_encoder", "unet_seamless", "unet_control_seamless",
                               "vae_decoder_seamless", "vae_encoder_seamless", "taesd_decoder", "taesd_encoder"}


def test_fp16_policy_from_configs():
    """SDXL-family VAE with force_upcast stays fp32; an fp16-fixed one (force_upcast false) and SD1's may be fp16."""
    sdxl, sd1 = modules_of("sdxl"), modules_of("sd1")
    assert not describe("vae_decoder", sdxl).fp16
    assert describe("vae_decoder", sd1).fp16 and describe("unet", sdxl).fp16
    sdxl["vae"].register_to_config(force_upcast=False)
    try:
        assert describe("vae_decoder", sdxl).fp16
    finally:
        sdxl["vae"].register_to_config(force_upcast=True)


def test_taesd_descriptors_have_the_vae_contracts():
    """taesd_decoder / taesd_encoder: the vae_decoder / vae_encoder names and shapes (engine.tiling runs either)."""
    import torch

    from engine.models import taesd_nets

    modules = {"taesd_decoder": taesd_nets.taesd_decoder(), "taesd_encoder": taesd_nets.taesd_encoder()}
    dec, enc = describe("taesd_decoder", modules), describe("taesd_encoder", modules)
    assert (dec.input_names, dec.output_names, enc.input_names, enc.output_names) == (
        ["latent"], ["image"], ["image"], ["latent"])
    assert dec.output_shapes(dec.env(1, 8, 8))["image"] == (1, 3, 64, 64)  # env: latent sizes
    assert enc.output_shapes(enc.env(1, 8, 8))["latent"] == (1, 4, 8, 8)
    with torch.no_grad():
        image = dec.wrapper(modules["taesd_decoder"])(torch.randn(1, 4, 8, 8) * 3)
    assert image.shape == (1, 3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1

