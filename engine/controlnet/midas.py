"""MiDaS DPT-Hybrid (sd-webui-controlnet's ``depth`` / ``normal_map`` modules, labels depth_midas / normal_midas)
run with transformers' own DPT implementation (``DPTForDepthEstimation``, hybrid: a BiT-ResNet50 stem and three
stages, a ViT-B/16 at 384, readout "project") on the extension's file ``midas/dpt_hybrid-midas-501f0c75.pt``.

The extension (annotator/midas) and controlnet_aux build that network with timm, which imports torchvision; the
engine cannot install torchvision beside its CPU torch (docs/DECISIONS.md "Model-based ControlNet
preprocessors"). transformers, a core dependency, has the same network. The file's keys (MiDaS's layout:
``pretrained.model.*`` the timm ViT-hybrid, ``pretrained.act_postprocess*`` the readout/reassemble layers,
``scratch.*`` the neck and head) are renamed to transformers' layout by :func:`map_state_dict`, our own table
(the map transformers' conversion script for DPT-Hybrid follows, written out here); the fused ``qkv`` of each
block is split into query, key and value; the ImageNet classifier (``pretrained.model.head``) is dropped. Every
key of the file must be used and every weight of the network filled, with equal shapes, or the file is refused.

The forward pass is transformers' modules in MiDaS's order (:class:`MidasDepth`): transformers'
``DPTModel.forward`` accepts only the 384x384 training size and its neck reshapes the tokens to a square grid,
where MiDaS (``forward_flex``) runs any size whose sides are multiples of 32 with the position table resized to
the grid, as the extension feeds it (the padded image, not MiDaS's own 384 resize).

:func:`apply_midas` is the extension's post-processing (annotator/midas ``apply_midas``): the raw depth
normalised to 0..255; the normal map from the depth's Sobel gradients, ``z = a`` (``2 pi``), gradients zeroed
where the normalised depth is under the background threshold, channels in the order x, y, z (controlnet_aux
reverses them; the extension does not).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.errors import ModelError

FILE_KEYS = 368  # keys of the original file (controlnet_aux / MiDaS DPTDepthModel('vitb_rn50_384').state_dict())
HIDDEN = 768
LAYERS = 12
PATCH = 16
TAPS = (8, 11)  # the ViT blocks whose outputs feed the neck (MiDaS's hooks [0, 1, 8, 11]: two BiT stages, two blocks)


def dpt_hybrid_config():
    """transformers' DPTConfig of MiDaS's DPT-Hybrid: ViT-B/16 (768 wide, 12 layers, 12 heads, MLP 3072, LayerNorm
    eps 1e-6 as timm's ViT), 384 px position table, BiT backbone (transformers' default for ``is_hybrid``: ResNet50
    stem with "same" padding, stages of 3, 4, 9 bottlenecks, weight-standardised convolutions, GroupNorm 32),
    readout "project", reassemble factors 1, 1, 1, 0.5 over neck widths 256, 512, 768, 768, fusion width 256, no
    batch norm in the fusion blocks, the depth head with its final ReLU (MiDaS's ``non_negative=True``)."""
    from transformers import DPTConfig

    return DPTConfig(is_hybrid=True, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-6, image_size=384,
                     patch_size=PATCH, qkv_bias=True, backbone_out_indices=[2, 5, *TAPS], readout_type="project",
                     reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768],
                     fusion_hidden_size=256, use_batch_norm_in_fusion_residual=False, add_projection=False,
                     head_in_index=-1, backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1])


# --------------------------------------------------------------------------------------------- the mapping
_DROPPED = ("pretrained.model.head.weight", "pretrained.model.head.bias")  # timm's ImageNet classifier
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_FIXED = {
    "pretrained.model.cls_token": "dpt.embeddings.cls_token",
    "pretrained.model.pos_embed": "dpt.embeddings.position_embeddings",
    "pretrained.model.patch_embed.proj.weight": "dpt.embeddings.projection.weight",
    "pretrained.model.patch_embed.proj.bias": "dpt.embeddings.projection.bias",
    "pretrained.model.norm.weight": "dpt.layernorm.weight",
    "pretrained.model.norm.bias": "dpt.layernorm.bias",
}
# MiDaS's act_postprocess{3,4} (the hybrid's 1 and 2 are identities): [0] readout projection, [3] 1x1 projection,
# [4] (the fourth only) the stride-2 3x3 downsampling
_POST = {"0.project.0": "readout_projects.{i}.0", "3": "layers.{i}.projection", "4": "layers.{i}.resize"}
_FUSION = {"out_conv": "projection", "resConfUnit1.conv1": "residual_layer1.convolution1",
           "resConfUnit1.conv2": "residual_layer1.convolution2", "resConfUnit2.conv1": "residual_layer2.convolution1",
           "resConfUnit2.conv2": "residual_layer2.convolution2"}


def map_key(key: str) -> str | None:
    """The transformers name of an original key (None: dropped; ``qkv`` keys give the query name, split by
    :func:`map_state_dict`); KeyError for a key the original layout does not have."""
    if key in _DROPPED:
        return None
    if key in _FIXED:
        return _FIXED[key]
    m = re.fullmatch(r"pretrained\.model\.patch_embed\.backbone\.(.+)", key)
    if m:
        rest = m.group(1)
        stem = re.fullmatch(r"stem\.(conv|norm)\.(weight|bias)", rest)
        if stem:
            return f"dpt.embeddings.backbone.bit.embedder.{'convolution' if stem.group(1) == 'conv' else 'norm'}." \
                   f"{stem.group(2)}"
        block = re.fullmatch(r"stages\.(\d)\.blocks\.(\d+)\.((?:conv[123]|norm[123]|downsample\.conv|"
                             r"downsample\.norm)\.(?:weight|bias))", rest)
        if block:
            return f"dpt.embeddings.backbone.bit.encoder.stages.{block.group(1)}.layers.{block.group(2)}." \
                   f"{block.group(3)}"
        raise KeyError(key)
    m = re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        i, part, kind = m.groups()
        if part == "attn.qkv":
            return f"dpt.encoder.layer.{i}.attention.attention.query.{kind}"
        return f"dpt.encoder.layer.{i}.{_BLOCK[part]}.{kind}"
    m = re.fullmatch(r"pretrained\.act_postprocess([34])\.(0\.project\.0|3|4)\.(weight|bias)", key)
    if m:
        n, part, kind = m.groups()
        return "neck.reassemble_stage." + _POST[part].format(i=int(n) - 1) + f".{kind}"
    m = re.fullmatch(r"scratch\.layer([1-4])_rn\.weight", key)
    if m:
        return f"neck.convs.{int(m.group(1)) - 1}.weight"
    m = re.fullmatch(r"scratch\.refinenet([1-4])\.(.+)\.(weight|bias)", key)
    if m:
        n, part, kind = m.groups()
        # MiDaS fuses refinenet4 (the deepest) first; transformers' fusion layers are in that order
        return f"neck.fusion_stage.layers.{4 - int(n)}.{_FUSION[part]}.{kind}"
    m = re.fullmatch(r"scratch\.output_conv\.([024])\.(weight|bias)", key)
    if m:
        return f"head.head.{m.group(1)}.{m.group(2)}"
    raise KeyError(key)


def map_state_dict(state: dict, path: Path | str = "dpt_hybrid-midas-501f0c75.pt") -> dict:
    """The original file's tensors under transformers' names, as fp32 (the engine runs annotators in fp32); the
    fused ``qkv`` split in query, key, value (rows 0-767, 768-1535, 1536-2303, timm's order). ModelError naming
    the file for a key that is not MiDaS DPT-Hybrid's."""
    import torch

    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(path, f"not a MiDaS DPT-Hybrid file: {key!r} is not a tensor")
        try:
            name = map_key(key)
        except KeyError:
            raise ModelError(path, f"not a MiDaS DPT-Hybrid file: unexpected key {key!r}") from None
        if name is None:
            continue
        value = value.float() if value.is_floating_point() else value
        if ".attention.attention.query." in name:
            if value.shape[0] != 3 * HIDDEN:
                raise ModelError(path, f"not a MiDaS DPT-Hybrid file: {key!r} has shape {tuple(value.shape)}")
            for j, part in enumerate(("query", "key", "value")):
                out[name.replace(".query.", f".{part}.")] = value[j * HIDDEN:(j + 1) * HIDDEN].clone()
        else:
            out[name] = value
    return out


def original_state(state: dict) -> dict:
    """The model's state dict inside a file: MiDaS's ``BaseModel.load`` takes ``state['model']`` when the file
    also holds an optimizer."""
    return state["model"] if isinstance(state, dict) and "optimizer" in state and "model" in state else state


# --------------------------------------------------------------------------------------------- the network


def _module():
    import torch

    class MidasDepth(torch.nn.Module):
        """transformers' DPTForDepthEstimation (hybrid) run as MiDaS runs DPT-Hybrid on any size whose sides are
        multiples of 32: BiT stem and stages (stages 1 and 2 kept), the 1x1 projection to tokens, the class token,
        the position table resized (bilinear) to the token grid, the 12 ViT blocks (outputs of blocks 8 and 11),
        the reassemble stage on the (h/16, w/16) grid, the neck's convolutions and fusion, the head;
        ``(1, 3, H, W)`` in [-1, 1] -> ``(1, H, W)`` depth (relative inverse depth, non-negative)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            dpt = self.model.dpt
            h, w = x.shape[-2:]
            embedded = dpt.embeddings(x, interpolate_pos_encoding=True)
            hidden = embedded.last_hidden_states
            features = list(embedded.intermediate_activations)
            for i, layer in enumerate(dpt.encoder.layer):
                hidden = layer(hidden)
                if i in TAPS:
                    features.append(hidden)
            fused = self.model.neck(features, h // PATCH, w // PATCH)
            return self.model.head(fused)

    return MidasDepth


def build(state: dict | None = None, path: Path | str = "dpt_hybrid-midas-501f0c75.pt"):
    """The network (eval, fp32, on the CPU) with ``state`` (an original file's tensors) loaded strictly; without
    ``state``, transformers' own initialisation (tests)."""
    import torch
    from transformers import DPTForDepthEstimation

    config = dpt_hybrid_config()
    if state is None:
        return _module()(DPTForDepthEstimation(config)).eval().requires_grad_(False)
    mapped = map_state_dict(original_state(state), path)
    with torch.device("meta"):  # no initialisation of 122M weights that the file replaces
        model = DPTForDepthEstimation(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    wrong = [k for k, v in mapped.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or wrong or len(mapped) != len(expected):
        what = (f"missing {missing[:3]}" if missing else
                f"shape of {wrong[0]} {tuple(mapped[wrong[0]].shape)} != {expected[wrong[0]]}" if wrong else
                "unexpected keys")
        raise ModelError(path, f"not a MiDaS DPT-Hybrid file: {what}")
    model.load_state_dict(mapped, strict=True, assign=True)
    return _module()(model).eval().requires_grad_(False)


def depth(net, image: np.ndarray):
    """The raw depth of an RGB uint8 image (sides multiples of 32) as the extension computes it: the image as
    float, ``/ 127.5 - 1``, NCHW, the network; ``(H, W)`` float32 tensor."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1.0
    with torch.inference_mode():
        return net(x.permute(2, 0, 1)[None])[0]


def apply_midas(raw, a: float = np.pi * 2.0, bg_th: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The extension's ``apply_midas`` after its network: ``(depth_image, normal_image)``, uint8. The depth minus
    its minimum, divided by its maximum, x255 (truncated); the normal map (x, y, z) = (Sobel_x, Sobel_y, a) of the
    raw depth (3x3, float32), x and y zeroed where the normalised depth < ``bg_th``, normalised, x127.5 + 127.5."""
    import cv2
    import torch

    raw = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(raw)
    depth_pt = raw.clone().float()
    depth_pt -= torch.min(depth_pt)
    depth_pt /= torch.max(depth_pt)
    depth_pt = depth_pt.cpu().numpy()
    depth_image = (depth_pt * 255.0).clip(0, 255).astype(np.uint8)
    depth_np = raw.float().cpu().numpy()
    x = cv2.Sobel(depth_np, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth_np, cv2.CV_32F, 0, 1, ksize=3)
    z = np.ones_like(x) * a
    x[depth_pt < bg_th] = 0
    y[depth_pt < bg_th] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    normal_image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    return depth_image, normal_image
