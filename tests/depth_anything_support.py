"""Depth Anything files for tests: random weights in the original files' layout (``pretrained.*`` DINOv2 ViT and
``depth_head.*`` DPT keys, one fused ``attn.qkv`` per block), at ViT-S/14 size (12 blocks of width 384, neck
48/96/192/384, fusion 64: the original code's ``vits`` configuration) so that tests stay cheap; the engine reads
the architecture from the file. The full-size (ViT-L) key layout is checked against the original networks' own
key list in tests/test_controlnet_depth_anything.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

VITS = {"hidden": 384, "blocks": 12, "neck": (48, 96, 192, 384), "fusion": 64}
FILES = {"v1": ("depth_anything", "depth_anything_vitl14.pth"),
         "v2": ("depth_anything_v2", "depth_anything_v2_vitl.safetensors")}


def original_shapes(hidden: int = 384, blocks: int = 12, neck=(48, 96, 192, 384), fusion: int = 64
                    ) -> dict[str, tuple[int, ...]]:
    """The original layout's keys and shapes of a Depth Anything network of these sizes."""
    mlp, n = 4 * hidden, 37 * 37 + 1
    shapes = {"pretrained.cls_token": (1, 1, hidden), "pretrained.pos_embed": (1, n, hidden),
              "pretrained.mask_token": (1, hidden), "pretrained.patch_embed.proj.weight": (hidden, 3, 14, 14),
              "pretrained.patch_embed.proj.bias": (hidden,)}
    for i in range(blocks):
        b = f"pretrained.blocks.{i}."
        shapes.update({b + "norm1.weight": (hidden,), b + "norm1.bias": (hidden,),
                       b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                       b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                       b + "ls1.gamma": (hidden,), b + "norm2.weight": (hidden,), b + "norm2.bias": (hidden,),
                       b + "mlp.fc1.weight": (mlp, hidden), b + "mlp.fc1.bias": (mlp,),
                       b + "mlp.fc2.weight": (hidden, mlp), b + "mlp.fc2.bias": (hidden,), b + "ls2.gamma": (hidden,)})
    shapes.update({"pretrained.norm.weight": (hidden,), "pretrained.norm.bias": (hidden,)})
    h = "depth_head."
    for i, c in enumerate(neck):
        shapes.update({f"{h}projects.{i}.weight": (c, hidden, 1, 1), f"{h}projects.{i}.bias": (c,)})
    for i, k in ((0, 4), (1, 2), (3, 3)):
        shapes.update({f"{h}resize_layers.{i}.weight": (neck[i], neck[i], k, k),
                       f"{h}resize_layers.{i}.bias": (neck[i],)})
    for i, c in enumerate(neck):
        shapes[f"{h}scratch.layer{i + 1}_rn.weight"] = (fusion, c, 3, 3)
    for r in range(1, 5):
        s = f"{h}scratch.refinenet{r}."
        shapes.update({s + "out_conv.weight": (fusion, fusion, 1, 1), s + "out_conv.bias": (fusion,)})
        for unit in (1, 2):
            for conv in (1, 2):
                shapes.update({f"{s}resConfUnit{unit}.conv{conv}.weight": (fusion, fusion, 3, 3),
                               f"{s}resConfUnit{unit}.conv{conv}.bias": (fusion,)})
    shapes.update({f"{h}scratch.output_conv1.weight": (fusion // 2, fusion, 3, 3),
                   f"{h}scratch.output_conv1.bias": (fusion // 2,),
                   f"{h}scratch.output_conv2.0.weight": (32, fusion // 2, 3, 3),
                   f"{h}scratch.output_conv2.0.bias": (32,),
                   f"{h}scratch.output_conv2.2.weight": (1, 32, 1, 1), f"{h}scratch.output_conv2.2.bias": (1,)})
    return shapes


def randomize_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for an original-layout state dict: norm weights and layer scales around 1 with a
    spread (not identities), nonzero biases, weights scaled by their fan-in so activations stay moderate."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        r = torch.randn(shape, generator=gen)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or name.endswith(".gamma"):
            state[name] = 1.0 + 0.3 * r
        elif len(shape) <= 1:
            state[name] = 0.1 * r
        elif name.startswith(("pretrained.pos_embed", "pretrained.cls_token", "pretrained.mask_token")):
            state[name] = 0.5 * r
        else:
            state[name] = r * (1.5 / (r[0].numel() ** 0.5))
    return state


def write_file(folder: Path, version: str, seed: int, half: bool = True) -> Path:
    """A ViT-S Depth Anything file of random weights saved as the original of ``version`` is (v1: a torch pickle
    of the state dict; v2: safetensors), under its real name in ``folder`` (fp16 when ``half``: the engine loads it
    into fp32)."""
    state = randomize_state(original_shapes(**VITS), seed)
    if half:
        state = {k: v.half() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[version][1]
    if version == "v1":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
