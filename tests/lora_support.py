"""LoRA files written by the tests, in each format, for the tiny models (random factors, seeded)."""

from __future__ import annotations

from pathlib import Path

import torch

# modules a LoRA touches: attention projections, feed-forward, transformer proj in/out (1x1 conv in SD1),
# resnet convs (3x3: LoCon), text-encoder attention and MLP
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "resnets.0.conv1", "resnets.0.conv2")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def targets(module, names) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith(t) for t in names)]


def factors(module: torch.nn.Module, rank: int, gen: torch.Generator, strength: float):
    """(down, up) for one Linear/Conv2d: conv factors are 4-d (LoCon), linear 2-d."""
    w = module.weight
    out, inp = w.shape[0], w[0].numel()
    if w.dim() == 4:
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) / inp ** 0.5
        up = torch.randn(out, rank, 1, 1, generator=gen) * strength / rank ** 0.5
    else:
        down = torch.randn(rank, inp, generator=gen) / inp ** 0.5
        up = torch.randn(out, rank, generator=gen) * strength / rank ** 0.5
    return down, up


def _te_key(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"


def kohya_lora(components, *, seed: int = 0, rank: int = 4, alpha: float = 2.0, strength: float = 0.5,
               unet: bool = True, text: bool = True, ldm_names: bool = False) -> dict:
    """A kohya/webui LoRA state dict (``lora_unet_``, ``lora_te_`` / ``lora_te1_``/``lora_te2_``, alpha)."""
    from engine.models.convert import unet_key_to_ldm

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    sdxl = "text_encoder_2" in components
    parts = []
    if unet:
        parts.append(("unet", "lora_unet_", UNET_TARGETS))
    if text:
        parts.append(("text_encoder", "lora_te1_" if sdxl else "lora_te_", TEXT_TARGETS))
        if sdxl:
            parts.append(("text_encoder_2", "lora_te2_", TEXT_TARGETS))
    for source, prefix, names in parts:
        module = components[source]
        for name, sub in targets(module, names):
            key = name
            if source == "unet" and ldm_names:
                key = unet_key_to_ldm(f"{name}.weight", dict(module.config))[: -len(".weight")]
            elif source != "unet":
                key = _te_key(name)
            key = prefix + key.replace(".", "_")
            down, up = factors(sub, rank, gen, strength)
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def peft_lora(components, *, seed: int = 1, rank: int = 4, strength: float = 0.5, text: bool = True) -> dict:
    """A diffusers/PEFT LoRA state dict (``unet.<module>.lora_A.weight`` / ``lora_B.weight``; scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    parts = [("unet", UNET_TARGETS)] + ([("text_encoder", TEXT_TARGETS)] if text else [])
    for source, names in parts:
        for name, sub in targets(components[source], names):
            down, up = factors(sub, rank, gen, strength)
            key = name if source == "unet" else _te_key(name)
            sd[f"{source}.{key}.lora_A.weight"] = down
            sd[f"{source}.{key}.lora_B.weight"] = up
    return sd


def save(sd: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
