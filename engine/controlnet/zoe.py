"""depth_zoe: ZoeDepth (ZoeD_M12_N, the extension's ``zoedepth/ZoeD_M12_N.pt``) run with transformers' own
ZoeDepth implementation (``ZoeDepthForDepthEstimation``: BEiT-L/16 384 backbone, DPT neck, the metric bins head),
loaded from the original file through our own key mapping (:func:`to_transformers`), with the extension's pre-
and post-processing (sd-webui-controlnet annotator/zoe, the same code as controlnet_aux 0.0.10's ``zoe``):

- the input (the padded image ``resize_image_with_pad`` made) as floats in [0, 1];
- ``ZoeDepth.infer``: reflect-padded by ``int(sqrt(h / 2) * 3)`` rows and ``int(sqrt(w / 2) * 3)`` columns, run,
  the prediction resized back (bicubic) to the padded size and the pad cropped; the same on the horizontally
  flipped image, flipped back, and the two averaged;
- inside each run (MidasCore's ``PrepForMidas``): resized (bilinear, align_corners) to the "minimal" size of
  384x512 that keeps the aspect ratio, in multiples of 32 (:func:`network_size`), normalised to [-1, 1];
- the metric depth normalised between its 2nd and 85th percentiles, inverted (near is white), to uint8.

controlnet_aux's network is built with timm (MiDaS' BEiT, whose import needs torchvision): not installable beside
the engine's CPU torch; transformers is a core dependency (docs/DECISIONS.md "Model-based ControlNet
preprocessors").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidRequest, ModelError

NET_HEIGHT, NET_WIDTH, MULTIPLE = 384, 512, 32  # ZoeD_N's config: img_size [384, 512], ensure_multiple_of 32
PAD_FACTOR = 3  # DepthModel._infer_with_pad_aug's fh, fw
PERCENTILES = (2, 85)  # the annotator's normalisation

_BEIT = "core.core.pretrained.model."
_SCRATCH = "core.core.scratch."

# original key (regex) -> transformers key, formatted with the match's groups; the act_postprocess stages, the
# scratch layers and the refinenets are numbered from 1, and transformers' fusion layers run the other way
# (refinenet4 is fusion layer 0): ``{n}`` is group 1 minus 1, ``{r}`` is 4 minus group 1
_RULES: tuple[tuple[str, str], ...] = (
    (_BEIT + r"cls_token", "backbone.beit.embeddings.cls_token"),
    (_BEIT + r"patch_embed\.proj\.(weight|bias)", "backbone.beit.embeddings.patch_embeddings.projection.{1}"),
    (_BEIT + r"blocks\.(\d+)\.gamma_1", "backbone.beit.layers.{1}.lambda_1"),
    (_BEIT + r"blocks\.(\d+)\.gamma_2", "backbone.beit.layers.{1}.lambda_2"),
    (_BEIT + r"blocks\.(\d+)\.norm1\.(weight|bias)", "backbone.beit.layers.{1}.layernorm_before.{2}"),
    (_BEIT + r"blocks\.(\d+)\.norm2\.(weight|bias)", "backbone.beit.layers.{1}.layernorm_after.{2}"),
    (_BEIT + r"blocks\.(\d+)\.attn\.q_bias", "backbone.beit.layers.{1}.attention.q_proj.bias"),
    (_BEIT + r"blocks\.(\d+)\.attn\.v_bias", "backbone.beit.layers.{1}.attention.v_proj.bias"),
    (_BEIT + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", "backbone.beit.layers.{1}.attention.o_proj.{2}"),
    (_BEIT + r"blocks\.(\d+)\.attn\.relative_position_bias_table",
     "backbone.beit.layers.{1}.relative_position_bias.relative_position_bias_table"),
    (_BEIT + r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "backbone.beit.layers.{1}.mlp.{2}.{3}"),
    (r"core\.core\.pretrained\.act_postprocess([1-4])\.0\.project\.0\.(weight|bias)",
     "neck.reassemble_stage.readout_projects.{n}.0.{2}"),
    (r"core\.core\.pretrained\.act_postprocess([1-4])\.3\.(weight|bias)",
     "neck.reassemble_stage.layers.{n}.projection.{2}"),
    (r"core\.core\.pretrained\.act_postprocess([1-4])\.4\.(weight|bias)",
     "neck.reassemble_stage.layers.{n}.resize.{2}"),
    (_SCRATCH + r"layer([1-4])_rn\.weight", "neck.convs.{n}.weight"),
    (_SCRATCH + r"refinenet([1-4])\.out_conv\.(weight|bias)", "neck.fusion_stage.layers.{r}.projection.{2}"),
    (_SCRATCH + r"refinenet([1-4])\.resConfUnit([12])\.conv([12])\.(weight|bias)",
     "neck.fusion_stage.layers.{r}.residual_layer{2}.convolution{3}.{4}"),
    (_SCRATCH + r"output_conv\.0\.(weight|bias)", "relative_head.conv1.{1}"),
    (_SCRATCH + r"output_conv\.2\.(weight|bias)", "relative_head.conv2.{1}"),
    (_SCRATCH + r"output_conv\.4\.(weight|bias)", "relative_head.conv3.{1}"),
    (r"conv2\.(weight|bias)", "metric_head.conv2.{1}"),
    (r"(seed_bin_regressor|seed_projector)\._net\.0\.(weight|bias)", "metric_head.{1}.conv1.{2}"),
    (r"(seed_bin_regressor|seed_projector)\._net\.2\.(weight|bias)", "metric_head.{1}.conv2.{2}"),
    (r"(projectors|attractors)\.(\d+)\._net\.0\.(weight|bias)", "metric_head.{1}.{2}.conv1.{3}"),
    (r"(projectors|attractors)\.(\d+)\._net\.2\.(weight|bias)", "metric_head.{1}.{2}.conv2.{3}"),
    (r"conditional_log_binomial\.mlp\.([02])\.(weight|bias)", "metric_head.conditional_log_binomial.mlp.{1}.{2}"),
)
_QKV = re.compile(re.escape(_BEIT) + r"blocks\.(\d+)\.attn\.qkv\.weight")
# in the file, not in the network: buffers transformers computes itself (the relative position index of the
# 24x24 window, the log-binomial's class indices and K - 1), and timm's ImageNet classifier (fc_norm, head) that
# MiDaS' BEiT never runs
IGNORED = re.compile(
    re.escape(_BEIT) + r"(blocks\.\d+\.attn\.relative_position_index|fc_norm\.(weight|bias)|head\.(weight|bias))"
    r"|conditional_log_binomial\.log_binomial_transform\.(k_idx|K_minus_1)")
_COMPILED = tuple((re.compile(pattern), target) for pattern, target in _RULES)


def _fill(target: str, m: re.Match) -> str:
    groups = {str(i): g for i, g in enumerate(m.groups(), 1)}
    if "{n}" in target or "{r}" in target:
        groups |= {"n": str(int(m.group(1)) - 1), "r": str(4 - int(m.group(1)))}
    return re.sub(r"\{(\w+)\}", lambda t: groups[t.group(1)], target)


def transformers_key(key: str) -> str | None:
    """The transformers key of one original key (None: ignored, or the fused qkv weight, which gives three)."""
    if IGNORED.fullmatch(key) or _QKV.fullmatch(key):
        return None
    for pattern, target in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            return _fill(target, m)
    raise KeyError(key)


def to_transformers(state: dict) -> dict:
    """The original ZoeDepth state dict (controlnet_aux / ZoeDepth's ``model`` entry) in transformers' layout:
    keys renamed, each BEiT block's fused ``qkv`` weight split into q/k/v (BEiT has no key bias), the ignored
    entries (:data:`IGNORED`) dropped. An unknown key is a KeyError."""
    out = {}
    for key, value in state.items():
        m = _QKV.fullmatch(key)
        if m:
            q, k, v = value.chunk(3, dim=0)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[f"backbone.beit.layers.{m.group(1)}.attention.{name}_proj.weight"] = part
            continue
        target = transformers_key(key)
        if target is not None:
            out[target] = value
    return out


# ------------------------------------------------------------------------------------------- the network


def config_from_state(state: dict):
    """transformers' ZoeDepthConfig for an original ZoeD_N state dict, read from its shapes: ZoeD_M12_N is BEiT-L/16
    at 384 (24 layers, 1024 wide, 16 heads, MLP 4096; features from layers 6, 12, 18, 24), neck widths 256 / 512 /
    1024 / 1024 fused at 256, 32 relative features, one metric head of 64 softplus bins in 1e-3..10 with
    16 / 8 / 4 / 1 attractors (the "inv" attractor, mean; alpha 300 and gamma 2 as the layers' code uses them),
    log-binomial temperatures 0.0212..50 (controlnet_aux's config_zoedepth.json). The sizes are read, not assumed,
    so that a smaller network of the same family loads too (the tests' reduced file)."""
    from transformers import BeitConfig, ZoeDepthConfig

    def shape(key):
        if key not in state:
            raise KeyError(key)
        return tuple(state[key].shape)

    blocks = sorted({int(m.group(1)) for k in state for m in [re.match(re.escape(_BEIT) + r"blocks\.(\d+)\.", k)] if m})
    depth = len(blocks)
    if depth == 0 or blocks != list(range(depth)) or depth % 4:
        raise KeyError(f"{_BEIT}blocks.N (a multiple of 4 blocks, numbered from 0)")
    hidden = shape(_BEIT + "cls_token")[-1]
    patch = shape(_BEIT + "patch_embed.proj.weight")[-1]
    rows, heads = shape(_BEIT + "blocks.0.attn.relative_position_bias_table")
    window = (math.isqrt(rows - 3) + 1) // 2  # rows = (2 * window - 1) ** 2 + 3
    hooks = [depth // 4 * i for i in (1, 2, 3, 4)]  # MiDaS' BEiT-L hooks 5, 11, 17, 23 (0-based) = stages 6 .. 24
    backbone = BeitConfig(
        image_size=window * patch, patch_size=patch, num_hidden_layers=depth, hidden_size=hidden,
        intermediate_size=shape(_BEIT + "blocks.0.mlp.fc1.weight")[0], num_attention_heads=heads,
        use_relative_position_bias=True, use_absolute_position_embeddings=False, use_mask_token=False,
        layer_norm_eps=1e-6,  # timm's BEiT (transformers' default is 1e-12)
        hidden_act="gelu", reshape_hidden_states=False, out_features=[f"stage{h}" for h in hooks])
    n_bins = shape("seed_bin_regressor._net.2.weight")[0]
    return ZoeDepthConfig(
        backbone_config=backbone, readout_type="project", reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[shape(f"core.core.pretrained.act_postprocess{i}.3.weight")[0] for i in (1, 2, 3, 4)],
        fusion_hidden_size=shape(_SCRATCH + "layer1_rn.weight")[0], num_relative_features=shape(
            _SCRATCH + "output_conv.2.weight")[0], bottleneck_features=shape("conv2.weight")[0],
        num_attractors=[shape(f"attractors.{i}._net.2.weight")[0] for i in range(4)],
        bin_embedding_dim=shape("seed_projector._net.2.weight")[0], attractor_alpha=1000, attractor_gamma=2,
        attractor_kind="mean", min_temp=0.0212, max_temp=50.0, bin_centers_type="softplus",
        bin_configurations=[{"n_bins": n_bins, "min_depth": 1e-3, "max_depth": 10.0}])


def build(config, device=None):
    """transformers' ZoeDepthForDepthEstimation for ``config`` (on ``device``, e.g. "meta" for shapes only); SDPA
    attention (the relative position bias is its float mask)."""
    import torch
    from transformers import ZoeDepthForDepthEstimation

    config.backbone_config._attn_implementation = "sdpa"
    with torch.device(device or "cpu"):
        return ZoeDepthForDepthEstimation(config)


def load(path, read_weights) -> "ZoeDepth":
    """ZoeDepth from an original file (``{'model': state}`` as ZoeDepth saves it, or the bare state dict; read by
    ``read_weights``: safetensors or a weights-only pickle), in fp32 eval mode on the CPU."""
    state = read_weights(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        config = config_from_state(state)
        mapped = to_transformers(state)
    except (KeyError, ValueError) as exc:
        raise ModelError(path, f"not a ZoeDepth (ZoeD_N) file: no or unexpected key {exc}") from None
    net = build(config, "meta")
    try:
        net.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(path, f"not a ZoeDepth (ZoeD_N) file: {str(exc).splitlines()[0]}") from None
    import torch

    for name, buffer in list(net.named_buffers()):  # the non-persistent buffers, still on the meta device
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            module = net.get_submodule(owner)
            value = {"k_idx": torch.arange(module.k).view(1, -1, 1, 1),
                     "k_minus_1": torch.tensor([module.k - 1]).view(1, -1, 1, 1)}[attr]
            module.register_buffer(attr, value, persistent=False)
    net = net.float().eval().requires_grad_(False)
    return ZoeDepth(net)


# ----------------------------------------------------------------------------------------- inference


def _multiple(x: float) -> int:
    """Resize.constrain_to_multiple_of (no bounds): the nearest multiple of 32 (numpy's round: half to even)."""
    return int((np.round(x / MULTIPLE) * MULTIPLE).astype(int))


def network_size(height: int, width: int) -> tuple[int, int]:
    """The size MidasCore's PrepForMidas resizes an image to: the scale of 384/h or 512/w nearer to 1 (the
    "minimal" method, keep_aspect_ratio), both sides rounded to multiples of 32."""
    scale_h, scale_w = NET_HEIGHT / height, NET_WIDTH / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h
    return _multiple(scale_h * height), _multiple(scale_w * width)


def pad_sizes(height: int, width: int) -> tuple[int, int]:
    """The reflect padding of DepthModel._infer_with_pad_aug (rows, columns on each side)."""
    return int(np.sqrt(height / 2) * PAD_FACTOR), int(np.sqrt(width / 2) * PAD_FACTOR)


def check_work(work: tuple[int, int], field: str, module: str = "depth_zoe") -> None:
    """Refuse (InvalidRequest naming ``field``) a padded image (h, w) that ZoeDepth's resize would make 0 pixels
    on a side (reflect padding, then the "minimal" resize: an aspect ratio far from 4:3, e.g. 1:64 at
    processor_res 64); it fails in the extension too."""
    pad_h, pad_w = pad_sizes(*work)
    h, w = network_size(work[0] + 2 * pad_h, work[1] + 2 * pad_w)
    if h < MULTIPLE or w < MULTIPLE:
        raise InvalidRequest(field, f"makes a {work[1]}x{work[0]} working image for {module}, which ZoeDepth resizes "
                                    f"to {w}x{h} (its resize keeps the aspect ratio and rounds a side to 0: it fails "
                                    "in the extension too)",
                             "an image whose aspect ratio is nearer 4:3 (ZoeDepth resizes to about 384x512)")


@dataclass
class ZoeDepth:
    """The loaded network and the annotator's call: ``self(image) -> uint8 depth map`` of the same size."""

    net: object

    def metric_depth(self, x):
        """One run (``DepthModel._infer``): ``x`` (1, 3, h, w) in [0, 1] -> (1, 1, h', w') metric depth at the
        network's size (:func:`network_size`)."""
        import torch.nn.functional as F

        h, w = network_size(*x.shape[-2:])
        if h < MULTIPLE or w < MULTIPLE:  # refused at submit (check_work); this is the engine's own guard
            raise ValueError(f"ZoeDepth resizes a {x.shape[-1]}x{x.shape[-2]} image to {w}x{h}")
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
        x = (x - 0.5) / 0.5
        return self.net(pixel_values=x).predicted_depth.unsqueeze(1)

    def infer_padded(self, x):
        """DepthModel._infer_with_pad_aug: reflect pad, run, bicubic back to the padded size, crop."""
        import torch.nn.functional as F

        pad_h, pad_w = pad_sizes(*x.shape[-2:])
        padding = [pad_w, pad_w] + ([pad_h, pad_h] if pad_h > 0 else [])
        padded = F.pad(x, padding, mode="reflect")
        out = self.metric_depth(padded)
        if out.shape[-2:] != padded.shape[-2:]:
            out = F.interpolate(out, size=tuple(padded.shape[-2:]), mode="bicubic", align_corners=False)
        if pad_h > 0:
            out = out[:, :, pad_h:-pad_h, :]
        if pad_w > 0:
            out = out[:, :, :, pad_w:-pad_w]
        return out

    def infer(self, x):
        """DepthModel.infer (pad and flip augmentation): the mean of the image's and its mirror's depth."""
        import torch

        out = self.infer_padded(x)
        flipped = self.infer_padded(torch.flip(x, dims=[3]))
        return (out + torch.flip(flipped, dims=[3])) / 2

    def depth(self, image: np.ndarray) -> np.ndarray:
        """The metric depth (float32, h x w) of an RGB uint8 image, as the annotator computes it."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image)).float() / 255.0
            x = x.permute(2, 0, 1).unsqueeze(0)
            return self.infer(x)[0, 0].cpu().numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return depth_to_map(self.depth(image))


def depth_to_map(depth: np.ndarray) -> np.ndarray:
    """The annotator's map: depth between its 2nd (white) and 85th (black) percentiles, inverted, uint8."""
    depth = np.array(depth, dtype=np.float32)
    vmin = np.percentile(depth, PERCENTILES[0])
    vmax = np.percentile(depth, PERCENTILES[1])
    depth -= vmin
    depth /= vmax - vmin
    depth = 1.0 - depth
    return (depth * 255.0).clip(0, 255).astype(np.uint8)
