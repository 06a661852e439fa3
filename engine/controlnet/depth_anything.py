"""Depth Anything (``depth_anything``) and Depth Anything V2 (``depth_anything_v2``) as sd-webui-controlnet runs
them (annotator/depth_anything.py, annotator/depth_anything_v2.py; scripts/preprocessor/legacy/processor.py),
on transformers' own implementation of the network (``DepthAnythingForDepthEstimation``: a DINOv2 ViT backbone,
a DPT neck and head), loaded from the extension's original files through our key mapping
(:func:`to_transformers`; docs/DECISIONS.md "Depth Anything").

The network. Both versions are the same modules with the same keys and shapes (ViT-L/14 for the extension's
files: 24 blocks of width 1024, 16 heads; DPT neck 256/512/1024/1024, fusion width 256; a relative-depth head
whose last activation is a ReLU). They differ in which blocks feed the neck: v1 takes the last four
(``get_intermediate_layers(x, 4)``: blocks 20-23), v2 the blocks ``[4, 11, 17, 23]`` of ViT-L (``[2, 5, 8, 11]``
of ViT-S/B); each through the backbone's final layer norm, without the class token. transformers counts the
embeddings as hidden state 0, so its ``out_indices`` are those + 1. The backbone's width, depth and the neck's
sizes are read from the file (a ViT-S or ViT-B file of the same code loads too).

One step differs between the two implementations and is put back to the original's: DINOv2's position
embeddings, interpolated (bicubic) to the input's patch grid when it is not the 37x37 they were trained at. The
original passes ``scale_factor = (grid + 0.1) / 37`` to the interpolation (its "small number to avoid floating
point error"); transformers passes the output size, which maps the sample positions differently. The model's
embeddings use the original's (:func:`_original_pos_interpolation`).

The call, as the extension's: the input resized and padded by ``resize_image_with_pad`` (short side to
``processor_res``, padded to multiples of 64); that RGB array converted with OpenCV's BGR->RGB code (the extension
does, though it is RGB already: the network sees the channels swapped) and divided by 255 (float64); resized with
INTER_CUBIC so that its short side is at least 518, both sides the nearest multiples of 14 of the kept aspect
(``Resize(518, 518, keep_aspect_ratio=True, ensure_multiple_of=14, resize_method="lower_bound")``); normalised
with ImageNet's mean and std; the predicted depth resized back to the padded size (bilinear, not
align_corners), min-max normalised to 0..255 and truncated to uint8 (``colored=False``: one gray channel); the
padding cropped off.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np

from core.errors import ModelError
from core.lazy import require

NET_SIZE = 518  # the short side of the network's input (lower bound), a multiple of PATCH
PATCH = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # DINOv2's interpolation offset (interpolate_offset)

# v2's blocks feeding the neck, by backbone width (depth_anything_v2/dpt.py intermediate_layer_idx)
V2_BLOCKS = {384: (2, 5, 8, 11), 768: (2, 5, 8, 11), 1024: (4, 11, 17, 23), 1536: (9, 19, 29, 39)}
VERSIONS = ("v1", "v2")
QKV = ("q_proj", "k_proj", "v_proj")  # the fused projection's row blocks, in order (transformers 5's names)


# --------------------------------------------------------------------------------------------- the mapping


def _architecture(state: dict) -> dict:
    """Widths and depths of an original file's network, read from its tensors' shapes."""
    try:
        hidden = int(state["pretrained.cls_token"].shape[-1])
        blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("pretrained.blocks."))
        neck = [int(state[f"depth_head.projects.{i}.weight"].shape[0]) for i in range(4)]
        fusion = int(state["depth_head.scratch.layer1_rn.weight"].shape[0])
        mlp = int(state["pretrained.blocks.0.mlp.fc1.weight"].shape[0])
        positions = int(state["pretrained.pos_embed"].shape[1]) - 1
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"not a Depth Anything state dict (missing or odd key: {exc})") from None
    return {"hidden": hidden, "blocks": blocks, "neck": neck, "fusion": fusion, "mlp": mlp,
            "image_size": int(round(math.sqrt(positions))) * PATCH}


def out_blocks(version: str, hidden: int, blocks: int) -> tuple[int, ...]:
    """The (0-based) backbone blocks whose outputs feed the neck."""
    if version == "v1":
        return tuple(range(blocks - 4, blocks))
    if hidden not in V2_BLOCKS:
        raise ValueError(f"no Depth Anything V2 encoder has width {hidden}")
    return V2_BLOCKS[hidden]


def config(version: str, hidden: int = 1024, blocks: int = 24, neck=(256, 512, 1024, 1024), fusion: int = 256,
           mlp: int | None = None, image_size: int = NET_SIZE):
    """transformers' DepthAnythingConfig of a Depth Anything network (defaults: the extension's ViT-L)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=hidden // 64,
        mlp_ratio=(mlp or 4 * hidden) // hidden, image_size=image_size, patch_size=PATCH,
        layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False,
        out_indices=[i + 1 for i in out_blocks(version, hidden, blocks)], apply_layernorm=True,
        reshape_hidden_states=False)
    return DepthAnythingConfig(
        backbone_config=backbone, patch_size=PATCH, reassemble_hidden_size=hidden,
        reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=list(neck), fusion_hidden_size=fusion,
        head_in_index=-1, head_hidden_size=32, depth_estimation_type="relative", max_depth=1)


# the original DPT head's fusion blocks, refinenet1..4, are transformers' fusion layers 3..0 (the fusion runs from
# the deepest feature up)
_REFINENET = {1: 3, 2: 2, 3: 1, 4: 0}


def _renames(blocks: int) -> dict[str, str]:
    names = {
        "pretrained.cls_token": "backbone.embeddings.cls_token",
        "pretrained.mask_token": "backbone.embeddings.mask_token",
        "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
        "pretrained.patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
        "pretrained.patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
        "pretrained.norm.weight": "backbone.layernorm.weight",
        "pretrained.norm.bias": "backbone.layernorm.bias",
        "depth_head.scratch.output_conv1.weight": "head.conv1.weight",
        "depth_head.scratch.output_conv1.bias": "head.conv1.bias",
        "depth_head.scratch.output_conv2.0.weight": "head.conv2.weight",
        "depth_head.scratch.output_conv2.0.bias": "head.conv2.bias",
        "depth_head.scratch.output_conv2.2.weight": "head.conv3.weight",
        "depth_head.scratch.output_conv2.2.bias": "head.conv3.bias",
    }
    for i in range(blocks):
        ours, theirs = f"pretrained.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                     ("attn.proj", "attention.o_proj")):
            for p in ("weight", "bias"):
                names[f"{ours}{a}.{p}"] = f"{theirs}{b}.{p}"
        names[f"{ours}ls1.gamma"] = f"{theirs}layer_scale1.lambda1"
        names[f"{ours}ls2.gamma"] = f"{theirs}layer_scale2.lambda1"
    for i in range(4):
        for p in ("weight", "bias"):
            names[f"depth_head.projects.{i}.{p}"] = f"neck.reassemble_stage.layers.{i}.projection.{p}"
            if i != 2:  # the third reassemble layer keeps its size (an identity, no weights)
                names[f"depth_head.resize_layers.{i}.{p}"] = f"neck.reassemble_stage.layers.{i}.resize.{p}"
        names[f"depth_head.scratch.layer{i + 1}_rn.weight"] = f"neck.convs.{i}.weight"
    for i, j in _REFINENET.items():
        ours, theirs = f"depth_head.scratch.refinenet{i}.", f"neck.fusion_stage.layers.{j}."
        for p in ("weight", "bias"):
            names[f"{ours}out_conv.{p}"] = f"{theirs}projection.{p}"
            for unit in (1, 2):
                for conv in (1, 2):
                    names[f"{ours}resConfUnit{unit}.conv{conv}.{p}"] = \
                        f"{theirs}residual_layer{unit}.convolution{conv}.{p}"
    return names


def to_transformers(state: dict) -> dict:
    """An original Depth Anything (v1 or v2) state dict with transformers' DepthAnythingForDepthEstimation keys.
    Each block's fused ``attn.qkv`` (rows: query, key, value, as the original splits it) becomes three
    projections; every other tensor is renamed. Raises ValueError naming the keys when the file has keys this
    mapping does not know, or lacks some."""
    arch = _architecture(state)
    hidden, blocks = arch["hidden"], arch["blocks"]
    names = _renames(blocks)
    out, unknown = {}, []
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
            continue
        parts = key.split(".")
        if key.startswith("pretrained.blocks.") and parts[3:5] == ["attn", "qkv"] and len(parts) == 6:
            if value.shape[0] != 3 * hidden:
                raise ValueError(f"{key} has {value.shape[0]} rows; a fused q/k/v of width {hidden} has {3 * hidden}")
            base = f"backbone.encoder.layer.{parts[2]}.attention."
            for n, part in enumerate(QKV):
                out[f"{base}{part}.{parts[5]}"] = value[n * hidden:(n + 1) * hidden]
            continue
        unknown.append(key)
    missing = [k for k in names if k not in state]
    missing += [f"pretrained.blocks.{i}.attn.qkv.{p}" for i in range(blocks) for p in ("weight", "bias")
                if f"pretrained.blocks.{i}.attn.qkv.{p}" not in state]
    if unknown or missing:
        raise ValueError("not a Depth Anything state dict: " + "; ".join(
            f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("unexpected keys", unknown), ("missing keys", missing)) if keys))
    return out


# ------------------------------------------------------------------------------------------------ the model


def _original_pos_interpolation(self, embeddings, height: int, width: int):
    """DINOv2's own position-embedding interpolation (its ``interpolate_pos_encoding``, as the original code and
    the extension run it), bound to transformers' Dinov2Embeddings in place of its own: bicubic with
    ``scale_factor = (grid + 0.1) / sqrt(N)``, in float32, no antialiasing; unchanged at the trained grid of a
    square input."""
    import torch
    import torch.nn.functional as F

    positions = self.position_embeddings
    n = positions.shape[1] - 1
    if embeddings.shape[1] - 1 == n and height == width:
        return positions
    dim = embeddings.shape[-1]
    side = math.sqrt(n)
    rows, cols = height // PATCH + POS_OFFSET, width // PATCH + POS_OFFSET
    grid = positions[:, 1:].float().reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic", antialias=False)
    if grid.shape[-2:] != (int(rows), int(cols)):
        raise RuntimeError(f"position grid {tuple(grid.shape[-2:])}, expected {(int(rows), int(cols))}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((positions[:, :1].float(), grid), dim=1).to(positions.dtype)


def build(version: str, state: dict):
    """transformers' DepthAnythingForDepthEstimation with an original file's weights (fp32, eval, no grad), the
    original's position interpolation."""
    import torch
    from transformers import DepthAnythingForDepthEstimation

    arch = _architecture(state)
    cfg = config(version, arch["hidden"], arch["blocks"], arch["neck"], arch["fusion"], arch["mlp"],
                 arch["image_size"])
    mapped = {k: v.float().contiguous() for k, v in to_transformers(state).items()}
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(cfg)
    model.load_state_dict(mapped, strict=True, assign=True)
    embeddings = model.backbone.embeddings
    embeddings.interpolate_pos_encoding = types.MethodType(_original_pos_interpolation, embeddings)
    return model.eval().requires_grad_(False)


def load(version: str, path: Path, state: dict):
    """The network of the file ``path`` from its tensors ``state`` (read by engine.controlnet.annotators'
    read_weights: safetensors, or a pickle read with weights_only; passed in, so this module does not import
    annotators, which imports it)."""
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        return build(version, state)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(path, f"not a Depth Anything{' V2' if version == 'v2' else ''} file: "
                               f"{str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------- the call


def _multiple(x: float, minimum: int) -> int:
    """The nearest multiple of PATCH (numpy's round: halves to even), at least ``minimum`` (then rounded up)."""
    y = int(np.round(x / PATCH) * PATCH)
    return int(np.ceil(x / PATCH) * PATCH) if y < minimum else y


def net_size(height: int, width: int) -> tuple[int, int]:
    """The network's input size ``(h, w)`` for an image of this size: the scale that brings the short side to
    518 applied to both (lower bound, aspect kept), each the nearest multiple of 14, at least 518."""
    scale = max(NET_SIZE / height, NET_SIZE / width)
    return _multiple(scale * height, NET_SIZE), _multiple(scale * width, NET_SIZE)


def prepare(image: np.ndarray):
    """The network's input ``(1, 3, h, w)`` float32 tensor from an RGB uint8 image, as the extension makes it."""
    import torch

    cv2 = require("cv2", "controlnet", "Depth Anything")
    x = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0
    h, w = net_size(*x.shape[:2])
    x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    x = (x - MEAN) / STD
    x = np.ascontiguousarray(np.transpose(x, (2, 0, 1))).astype(np.float32)
    return torch.from_numpy(x).unsqueeze(0)


def raw_depth(model, image: np.ndarray):
    """The predicted (relative, inverse) depth of an RGB uint8 image at the image's size, float32 ``(h, w)``
    tensor: the network's output resized back bilinearly (not align_corners)."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    with torch.inference_mode():
        depth = model(pixel_values=prepare(image)).predicted_depth
        return F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]


def to_levels(depth) -> np.ndarray:
    """The extension's map of a raw depth: min-max normalised to 0..255, truncated to uint8. A constant depth
    (where the extension divides 0 by 0) gives a black map."""
    span = depth.max() - depth.min()
    if not float(span) > 0:
        return np.zeros(tuple(depth.shape), np.uint8)
    return ((depth - depth.min()) / span * 255.0).cpu().numpy().astype(np.uint8)


def detect(model, image: np.ndarray) -> np.ndarray:
    """The depth map (uint8, one channel) of an RGB uint8 image at its own size."""
    return to_levels(raw_depth(model, image))
