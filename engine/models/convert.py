"""diffusers -> webui (original LDM) single-file conversion: the writer side of the checkpoint formats.

The key maps follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py``, written here as rules over the UNet config (``layers_per_block``
and which blocks have attentions) so that any size converts, not only the published families. The loader
(:mod:`engine.models.checkpoints`) reads these files back with diffusers' own ldm -> diffusers functions, so
a round trip checks both directions against each other.

Layouts written:

- UNet ``model.diffusion_model.``; VAE ``first_stage_model.`` (attention q/k/v/proj_out as 1x1 convs);
- SD1 CLIP ``cond_stage_model.transformer.text_model.``;
- SD2 OpenCLIP ``cond_stage_model.model.`` (fused ``in_proj``); diffusers' SD2 text encoder lacks OpenCLIP's
  last layer, so one extra identity layer (zero output projections) and an identity ``text_projection`` are
  written, which the loader drops again as diffusers does for the real SD2;
- SDXL ``conditioner.embedders.0.transformer.text_model.`` + ``conditioner.embedders.1.model.`` (with
  ``text_projection`` transposed);
- SDXL refiner ``conditioner.embedders.0.model.`` (its one text encoder, OpenCLIP-G, as SDXL's second);
- ControlNet ``control_model.``.

The diffusers configs of every component go into the safetensors metadata (key :data:`METADATA_KEY`), so
non-standard sizes load without a bundled config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from core.atomic import atomic_path
from core.errors import ModelError
from core.safetensors_header import sort_metadata
from engine.models.family import Arch

if TYPE_CHECKING:
    import torch

METADATA_KEY = "sdengine.configs"
METADATA_ARCH_KEY = "sdengine.arch"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # the refiner's only embedder

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    head, _, tail = rest.partition(".")
    for new, old in pairs:
        if head == new:
            return old + ("." + tail if tail else "")
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_to_ldm(key: str, config: Mapping, controlnet: bool = False) -> str:
    """One diffusers UNet / ControlNet parameter name -> the LDM name (without prefix)."""
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        raise ModelError("unet", "per-block layers_per_block is not supported by the single-file writer")
    stride = lpb + 1
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * stride + j
        return f"input_blocks.{idx}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], _RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if not controlnet:
        if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = b * stride + j
            return f"output_blocks.{idx}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            has_attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * stride + lpb}.{2 if has_attn else 1}.conv.{m[2]}"
    else:
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            return f"zero_convs.{m[1]}.0.{m[2]}"
        if m := re.match(r"controlnet_mid_block\.(.*)", key):
            return f"middle_block_out.0.{m[1]}"
        if m := re.match(r"controlnet_cond_embedding\.conv_in\.(.*)", key):
            return f"input_hint_block.0.{m[1]}"
        if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
            return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        if m := re.match(r"controlnet_cond_embedding\.conv_out\.(.*)", key):
            n_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
            return f"input_hint_block.{2 * (n_blocks + 1)}.{m[1]}"
    raise ModelError("unet", f"no LDM name for the diffusers parameter {key!r}")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping, controlnet: bool = False) -> dict:
    return {unet_key_to_ldm(k, config, controlnet): v for k, v in state_dict.items()}


def vae_key_to_ldm(key: str, config: Mapping) -> str:
    n_up = len(config["up_block_types"])
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTN)}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
        return key
    raise ModelError("vae", f"no LDM name for the diffusers parameter {key!r}")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict:
    out = {}
    for k, v in state_dict.items():
        new = vae_key_to_ldm(k, config)
        if ".mid.attn_1." in new and new.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM attention uses 1x1 convs, diffusers linears
        out[new] = v
    return out


def _hf_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Text-model keys without the ``text_model.`` prefix (flat in transformers 5's CLIPTextModel)."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        out[k.removeprefix("text_model.")] = v
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """HF CLIPTextModel -> the webui's ``...transformer.text_model.*`` layout (without the prefix)."""
    return {f"text_model.{k}": v for k, v in _hf_clip_keys(state_dict).items() if k != "text_projection.weight"}


def openclip_to_ldm(state_dict: Mapping[str, torch.Tensor], num_layers: int, extra_layer: bool) -> dict:
    """HF CLIP text weights -> OpenCLIP names (without the ``...model.`` prefix).

    ``extra_layer`` appends an identity residual block and an identity ``text_projection`` (SD2: diffusers
    dropped OpenCLIP's last layer and its projection; the loader drops them again).
    """
    import torch

    sd = _hf_clip_keys(state_dict)
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    if extra_layer:
        last = f"transformer.resblocks.{num_layers - 1}."
        dst = f"transformer.resblocks.{num_layers}."
        for name in [k[len(last):] for k in list(out) if k.startswith(last)]:
            ref = out[last + name]
            value = torch.ones_like(ref) if name.startswith(("ln_1.weight", "ln_2.weight")) else torch.zeros_like(ref)
            out[dst + name] = value
        width = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return out


def module_config(module: Any) -> dict:
    """A JSON-able config of a diffusers or transformers module (private keys dropped)."""
    cfg = module.config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    drop = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "output_hidden_states"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()
            if not k.startswith("_") and k not in drop}


def ldm_state_dict(components: Mapping[str, Any], arch, configs: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """The webui single-file state dict of ``components`` for ``arch`` (an :class:`Arch`)."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, sd: Mapping[str, torch.Tensor]):
        for k, v in sd.items():
            out[prefix + k] = v.detach().contiguous()

    if arch is Arch.VAE:  # a standalone VAE file: bare LDM keys, like the webui's VAE/ files
        put("", vae_to_ldm(components["vae"].state_dict(), configs["vae"]))
        return out
    if arch.is_controlnet:
        cn = components["controlnet"]
        put(CONTROLNET_PREFIX, unet_to_ldm(cn.state_dict(), configs["controlnet"], controlnet=True))
        return out
    put(UNET_PREFIX, unet_to_ldm(components["unet"].state_dict(), configs["unet"]))
    put(VAE_PREFIX, vae_to_ldm(components["vae"].state_dict(), configs["vae"]))
    if arch is Arch.SDXL_REFINER:
        n2 = configs["text_encoder_2"]["num_hidden_layers"]
        put(SDXL_REFINER_OPENCLIP_PREFIX, openclip_to_ldm(components["text_encoder_2"].state_dict(), n2,
                                                          extra_layer=False))
        return out
    te = components["text_encoder"]
    n_layers = configs["text_encoder"]["num_hidden_layers"]
    if arch is Arch.SD1:
        put(SD1_CLIP_PREFIX, clip_to_ldm(te.state_dict()))
    elif arch is Arch.SD2:
        put(SD2_OPENCLIP_PREFIX, openclip_to_ldm(te.state_dict(), n_layers, extra_layer=True))
    elif arch is Arch.SDXL:
        put(SDXL_CLIP_PREFIX, clip_to_ldm(te.state_dict()))
        n2 = configs["text_encoder_2"]["num_hidden_layers"]
        put(SDXL_OPENCLIP_PREFIX, openclip_to_ldm(components["text_encoder_2"].state_dict(), n2, extra_layer=False))
    else:  # pragma: no cover - Arch is closed
        raise ModelError(str(arch), "no single-file layout for this architecture")
    return out


def infer_arch(components: Mapping[str, Any]):
    """The :class:`Arch` of a set of diffusers components (ControlNet, SDXL, SD2 OpenCLIP, SD1)."""
    if "controlnet" in components:
        xl = components["controlnet"].config.get("addition_embed_type") == "text_time"
        return Arch.CONTROLNET_SDXL if xl else Arch.CONTROLNET_SD1
    if "text_encoder_2" in components:
        return Arch.SDXL if "text_encoder" in components else Arch.SDXL_REFINER
    if "text_encoder" not in components and "vae" in components:
        return Arch.VAE
    return Arch.SD2 if components["text_encoder"].config.hidden_act == "gelu" else Arch.SD1


def save_single_file(components: Mapping[str, Any], path: str | os.PathLike, configs: Mapping[str, dict] | None = None,
                     prediction_type: str = "epsilon", arch=None, native_size: int | None = None,
                     extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write diffusers ``components`` as one webui ``.safetensors`` file, atomically.

    ``configs`` maps component name -> diffusers config (default: read from the modules); they are stored in
    the metadata under :data:`METADATA_KEY` with ``prediction_type`` and ``native_size``. ``extra_metadata``:
    more string metadata (the model card's vocabulary and settings, engine.models.card).
    """
    from safetensors.torch import save_file

    path = Path(path)
    arch = arch or infer_arch(components)
    names = ("controlnet",) if arch.is_controlnet else ("vae",) if arch is Arch.VAE else tuple(
        n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in components)
    configs = {n: dict((configs or {}).get(n) or module_config(components[n])) for n in names}
    tensors = ldm_state_dict(components, arch, configs)
    meta = dict(configs)
    if not arch.is_controlnet and arch is not Arch.VAE:
        meta["prediction_type"] = prediction_type
        if native_size:
            meta["native_size"] = int(native_size)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True), METADATA_ARCH_KEY: arch.value,
                **(extra_metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata(tmp)
    return path
