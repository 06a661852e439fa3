"""Random weights of the real MiDaS DPT-Hybrid in its original file layout (``midas/dpt_hybrid-midas-501f0c75.pt``,
the state dict of controlnet_aux's / the extension's ``DPTDepthModel(backbone='vitb_rn50_384', non_negative=True)``),
made without the reference network (timm cannot run here): the key names and shapes are
``golden/dpt_hybrid_midas_keys.json``, written from that network's ``state_dict()`` in a venv where timm and
controlnet_aux import (controlnet_aux 0.0.10, timm 1.0.31; the file's ``source``). 368 keys, 123,146,985 values.

The values: seeded normal draws scaled by 1/sqrt(fan-in); norm affines 1 + 0.1 N and biases 0.1 N (away from
identity); the depth head's last 1x1 convolution with non-negative weights and bias 0.1, so that MiDaS's final
ReLU keeps a varying depth of a few units to a few tens (its Sobel gradients then weigh against the normal map's
z = 2 pi). Stored as fp16 (half the bytes; the engine and the reference load them into fp32 networks alike)."""

from __future__ import annotations

import json
from pathlib import Path

KEYS_FILE = Path(__file__).parent / "golden" / "dpt_hybrid_midas_keys.json"
FILE_NAME = "dpt_hybrid-midas-501f0c75.pt"


def original_layout() -> dict[str, tuple[int, ...]]:
    """The original file's key names and shapes, in the file's order."""
    return {k: tuple(v) for k, v in json.loads(KEYS_FILE.read_text())["keys"].items()}


def random_state(seed: int = 0, dtype=None) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in original_layout().items():
        if len(shape) == 1 and ("norm" in name or name.endswith("bias")):
            base = 1.0 if name.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for n in shape[1:] if len(shape) > 1 else shape:
                fan_in *= n
            value = torch.randn(shape, generator=gen) / max(1.0, fan_in ** 0.5)
        state[name] = value
    state["scratch.output_conv.4.weight"].abs_()
    state["scratch.output_conv.4.bias"].fill_(0.1)
    return {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}


def write_random_file(folder: Path, seed: int = 0) -> Path:
    """``folder/midas/dpt_hybrid-midas-501f0c75.pt`` (the extension's downloads layout), fp16."""
    import torch

    path = Path(folder) / "midas" / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state(seed, torch.float16), path)
    return path
