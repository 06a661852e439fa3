"""Deterministic tiny models with random weights, in the real architecture classes.

Used by the tests, the benchmarks and (until a trained demo model ships) the demo. Each kind mirrors the
structure of the real family at small widths:

- ``sd1``: CLIPTextModel (quick_gelu, EOS padding) + UNet2DConditionModel (conv proj-in) + AutoencoderKL, eps.
- ``sd2v``: OpenCLIP-style CLIPTextModel (gelu, "!" padding) + linear proj-in UNet, v-prediction.
- ``sdxl``: two text encoders (CLIPTextModel + CLIPTextModelWithProjection), text_time UNet.
- ``sdxl_refiner``: the SDXL refiner's layout: one text encoder (CLIPTextModelWithProjection, OpenCLIP-G's
  place, its hidden size = its projection size, as the real 1280/1280), a text_time UNet of 5 time ids
  (original size, crop, aesthetic score) whose context is that encoder alone; SDXL's latent space.
- ``controlnet_sd1`` / ``controlnet_sdxl``: ControlNetModel matching the sd1 / sdxl UNet.

The VAE has 4 blocks (x8), as ControlNet's conditioning embedding always downsamples by 8. The UNet has two
levels, so latent sizes must be multiples of 2 (images of multiples of 16 px).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.convert import save_single_file
from engine.models.family import Arch, tokenizers
from engine.schedule import scheduler_config


KINDS = ("sd1", "sd2v", "sdxl", "sdxl_refiner")
CONTROLNET_KINDS = ("controlnet_sd1", "controlnet_sdxl")

# Native image size of the tiny models (latent 8x8).
TINY_SIZE = 64

TEXT_SD1 = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TEXT_OPENCLIP = dict(TEXT_SD1, hidden_act="gelu", pad_token_id=0)
TEXT_SDXL_2 = dict(TEXT_OPENCLIP, hidden_size=32, projection_dim=32)

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=TINY_SIZE,
    scaling_factor=0.18215,
)

UNET_SD1 = dict(
    sample_size=TINY_SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8,
)
UNET_SD2 = dict(UNET_SD1, attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True)
UNET_SDXL = dict(
    sample_size=TINY_SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(4, 8),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)

# the refiner: context = text_encoder_2's hidden states alone; time ids: 5 (export.descriptors.time_id_count)
UNET_SDXL_REFINER = dict(
    UNET_SDXL, cross_attention_dim=TEXT_SDXL_2["hidden_size"], attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 1),
    projection_class_embeddings_input_dim=5 * 8 + TEXT_SDXL_2["projection_dim"],
)


@dataclass
class TinyModel:
    """The diffusers / transformers modules of one tiny model plus what a loader would report."""

    kind: str
    components: dict[str, Any]
    prediction_type: str = "epsilon"
    configs: dict[str, dict] = field(default_factory=dict)


def _seeded(seed: int):
    torch.manual_seed(seed)


def _init_nonzero(module: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised layers (ControlNet zero convs, UNet conv_out) small random values.

    With zeros, a ControlNet or UNet output would be identically zero and parity tests could not fail.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0 and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """LayerNorms start as identity (weight 1, bias 0): their outputs would have a zero mean per token, and the
    webui's emphasis (which restores the mean) would divide ~0 by ~0. Real checkpoints have trained norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 + 0.1 * torch.randn(m.bias.shape, generator=g))


def build_text_encoder(config: dict, with_projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(CLIPTextConfig(**config)).eval()
    _randomize_norms(model, seed)
    return model


def build_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(**VAE).eval()


def build_unet(config: dict, seed: int = 2):
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    unet = UNet2DConditionModel(**config).eval()
    _init_nonzero(unet, seed)
    return unet


def build_controlnet(kind: str, seed: int = 3):
    from diffusers import ControlNetModel

    base = {"controlnet_sd1": UNET_SD1, "controlnet_sdxl": UNET_SDXL}[kind]
    cfg = {k: v for k, v in base.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    cfg["conditioning_embedding_out_channels"] = (8, 16, 16, 32)
    _seeded(seed)
    cn = ControlNetModel(**cfg).eval()
    _init_nonzero(cn, seed)
    return cn


def build_tiny(kind: str, seed: int = 0) -> TinyModel:
    """Build the tiny model ``kind`` (one of :data:`KINDS` or :data:`CONTROLNET_KINDS`) deterministically."""
    if kind in CONTROLNET_KINDS:
        return TinyModel(kind, {"controlnet": build_controlnet(kind, seed + 3)})
    if kind == "sd1":
        return TinyModel(kind, {
            "text_encoder": build_text_encoder(TEXT_SD1, seed=seed),
            **tokenizers(Arch.SD1),
            "unet": build_unet(UNET_SD1, seed + 2),
            "vae": build_vae(seed + 1),
        }, "epsilon")
    if kind == "sd2v":
        return TinyModel(kind, {
            "text_encoder": build_text_encoder(TEXT_OPENCLIP, seed=seed),
            **tokenizers(Arch.SD2),
            "unet": build_unet(UNET_SD2, seed + 2),
            "vae": build_vae(seed + 1),
        }, "v_prediction")
    if kind == "sdxl":
        return TinyModel(kind, {
            "text_encoder": build_text_encoder(TEXT_SD1, seed=seed),
            "text_encoder_2": build_text_encoder(TEXT_SDXL_2, with_projection=True, seed=seed + 10),
            **tokenizers(Arch.SDXL),
            "unet": build_unet(UNET_SDXL, seed + 2),
            "vae": build_vae(seed + 1),
        }, "epsilon")
    if kind == "sdxl_refiner":
        return TinyModel(kind, {
            "text_encoder_2": build_text_encoder(TEXT_SDXL_2, with_projection=True, seed=seed + 20),
            **tokenizers(Arch.SDXL_REFINER),
            "unet": build_unet(UNET_SDXL_REFINER, seed + 22),
            "vae": build_vae(seed + 1),
        }, "epsilon")
    raise ValueError(f"unknown tiny model kind {kind!r} (allowed: {', '.join(KINDS + CONTROLNET_KINDS)})")


# kind -> (store sub-folder, file stem)
STORE_NAMES = {
    "sd1": ("Stable-diffusion", "tiny-sd1"),
    "sd2v": ("Stable-diffusion", "tiny-sd2v"),
    "sdxl": ("Stable-diffusion", "tiny-sdxl"),
    "sdxl_refiner": ("Stable-diffusion", "tiny-sdxl-refiner"),
    "controlnet_sd1": ("ControlNet", "tiny-controlnet-sd1"),
    "controlnet_sdxl": ("ControlNet", "tiny-controlnet-sdxl"),
}


def save_diffusers_folder(model: TinyModel, folder) -> None:
    """Write ``model`` as a diffusers folder (model_index.json + one sub-folder per component; ControlNet:
    config.json + weights), safetensors weights. Written to a temporary folder, then renamed."""
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        comps = model.components
        if "controlnet" in comps:
            comps["controlnet"].save_pretrained(tmp, safe_serialization=True)
        else:
            refiner = "text_encoder_2" in comps and "text_encoder" not in comps
            pipeline = ("StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
                        if "text_encoder_2" in comps else "StableDiffusionPipeline")
            index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
                     "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
            if refiner:  # diffusers' refiner layout: no first text encoder, aesthetic-score time ids
                index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
            for name, module in comps.items():
                if name.startswith("tokenizer"):
                    continue
                module.save_pretrained(tmp / name, safe_serialization=True)
                lib = "transformers" if name.startswith("text_encoder") else "diffusers"
                index[name] = [lib, type(module).__name__]
            (tmp / "scheduler").mkdir()
            sched = dict(scheduler_config(model.prediction_type), _class_name="EulerDiscreteScheduler")
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1, sort_keys=True))
            (tmp / "model_index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tiny_store(root, kinds=("sd1", "sd2v", "sdxl", "controlnet_sd1", "controlnet_sdxl"), seed: int = 0):
    """Write each tiny model in both formats into a webui-layout model store at ``root``.

    ``Stable-diffusion/tiny-sd1.safetensors`` + ``Stable-diffusion/tiny-sd1-diffusers/``, ...,
    ``ControlNet/tiny-controlnet-sd1.safetensors`` + ``ControlNet/tiny-controlnet-sd1-diffusers/``; the empty
    ``VAE/`` folder is created too. Deterministic for a given ``seed``. Returns ``root`` as a Path.
    """
    root = Path(root)
    for sub in ("Stable-diffusion", "VAE", "ControlNet"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if kind not in STORE_NAMES:
            raise ValueError(f"unknown tiny model kind {kind!r} (allowed: {', '.join(STORE_NAMES)})")
        sub, stem = STORE_NAMES[kind]
        model = build_tiny(kind, seed)
        save_single_file(model.components, root / sub / f"{stem}.safetensors",
                         prediction_type=model.prediction_type, native_size=TINY_SIZE)
        save_diffusers_folder(model, root / sub / f"{stem}-diffusers")
    return root
