"""seg_ofade20k / seg_ofcoco: OneFormer (Swin-L) semantic segmentation as sd-webui-controlnet runs it
(annotator/oneformer: ``OneformerDetector`` and ``semantic_run``; scripts/preprocessor/legacy/processor.py
``oneformer_ade20k`` / ``oneformer_coco``), on transformers' own implementation of the network
(``OneFormerForUniversalSegmentation``: the Swin backbone, the multi-scale deformable-attention pixel decoder,
the task-conditioned transformer decoder), loaded from the extension's original files
(``oneformer/250_16_swin_l_oneformer_ade20k_160k.pth``, ``oneformer/150_16_swin_l_oneformer_coco_100ep.pth``)
through our own key mapping (:func:`to_transformers`; docs/DECISIONS.md, "Model-based ControlNet
preprocessors").

The network, as the extension's configs build it (configs/{ade20k,coco}/oneformer_swin_large_IN21k_384_*.yaml):
Swin-L (embedding width 192, depths 2/2/18/2, heads 6/12/24/48, window 12), a 6-layer deformable pixel decoder of
width 256 (1024-wide feed-forward, group norm), 250 (ADE20K) or 150 (COCO) object queries through 9 decoder layers
and a 2-layer task/query transformer, 150 (ADE20K) or 133 (COCO panoptic) classes plus "no object". Inference
runs without the text encoder (the extension builds the model with ``IS_TRAIN = False``); its tensors,
which checkpoints saved during training may carry, are skipped as the extension's non-strict loading skips them.
Widths, depths, query and class counts are read from the file.

The network is built on the meta device and the file's tensors assigned; what the file does not hold is made
after: Swin's relative position index buffers (transformers computes them rather than loads them), and two parts
the original does not have and inference does not use (the Swin model's final layer norm, the training loss).
transformers' Swin backbone keeps the window and shift of every stage however small its feature map (it calls its
layers with ``always_partition``), padding the map to whole windows, as the original does.

The call, as the extension's: the input resized and padded by ``resize_image_with_pad`` (short side to
``processor_res``, padded to multiples of 64); detectron2's ``ResizeShortestEdge`` (short side 640 for ADE20K,
800 for COCO, the long side at most 2560 / 1333; PIL bilinear on uint8); normalised with the configs' mean and std
(RGB, 0..255 scale); padded with zeros to multiples of 32; the task prompt "The task is semantic" as 77 CLIP BPE
token ids (fed to the task MLP as numbers, as the original does); the mask logits upsampled (bilinear) to the
padded size, the padding cropped, resized (bilinear) to the input's size; semantic inference (softmax over the
classes without "no object" times the masks' sigmoid, summed over the queries, 32 queries' masks at a time);
the argmax class of each pixel; drawn as the extension's ``Visualizer.draw_sem_seg`` draws it (:func:`draw`): on
white, each class in its dataset colour from the largest area down, as filled polygons with a white edge (a region
with holes as a flat mask), rasterised by matplotlib's Agg; the padding cropped off.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ModelError
from core.lazy import require

# the task prompt "The task is semantic" as the original's CLIP BPE tokenizer encodes it (lower-cased: start,
# "the", "task", "is", "seman", "tic", end), padded with 0 to the task sequence length (INPUT.TASK_SEQ_LEN 77)
TASK_TOKENS = (49406, 518, 10549, 533, 29119, 1550, 49407)
TASK_SEQ_LEN = 77
PIXEL_MEAN = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN / PIXEL_STD of both configs (RGB, 0..255)
PIXEL_STD = (58.395, 57.120, 57.375)
SIZE_DIVISIBILITY = 32  # MODEL.ONE_FORMER.SIZE_DIVISIBILITY: the normalised image is zero-padded to it
QUERY_CHUNK = 32  # queries whose image-sized masks are made at once (semantic_scores)


@dataclass(frozen=True)
class Dataset:
    """What a dataset's config and metadata give the call: the test-time resize (INPUT.MIN_SIZE_TEST /
    MAX_SIZE_TEST) and the class colours (the panoptic metadata's ``stuff_colors``, RGB)."""

    name: str
    min_size: int
    max_size: int
    colors: tuple[int, ...]

    @property
    def classes(self) -> int:
        return len(self.colors) // 3

    def color(self, label: int) -> tuple[int, int, int]:
        return tuple(self.colors[3 * label:3 * label + 3])


_ADE20K_COLORS = (
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140, 204, 5, 255,
    230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82,
    143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255,
    255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224,
    255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7,
    255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255,
    140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255, 255, 71, 0,
    0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255, 0, 255, 112,
    0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0, 0, 82, 255, 0, 255, 41,
    0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255, 255, 0, 245, 255, 0, 102,
    255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255, 255, 0, 204, 0, 255, 194, 0, 255, 82,
    0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255, 0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0,
    143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0, 8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31,
    0, 184, 255, 0, 214, 255, 255, 0, 112, 92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255,
    153, 0, 255, 71, 255, 0, 255, 0, 163, 255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235,
    245, 0, 255, 255, 0, 122, 255, 245, 0, 10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0,
    0, 153, 255, 0, 41, 255, 0, 255, 204, 41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255,
    0, 255, 184, 0, 92, 255, 184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
)
_COCO_COLORS = (
    220, 20, 60, 119, 11, 32, 0, 0, 142, 0, 0, 230, 106, 0, 228, 0, 60, 100, 0, 80, 100, 0, 0, 70, 0, 0, 192,
    250, 170, 30, 100, 170, 30, 220, 220, 0, 175, 116, 175, 250, 0, 30, 165, 42, 42, 255, 77, 255, 0, 226, 252,
    182, 182, 255, 0, 82, 0, 120, 166, 157, 110, 76, 0, 174, 57, 255, 199, 100, 0, 72, 0, 118, 255, 179, 240,
    0, 125, 92, 209, 0, 151, 188, 208, 182, 0, 220, 176, 255, 99, 164, 92, 0, 73, 133, 129, 255, 78, 180, 255,
    0, 228, 0, 174, 255, 243, 45, 89, 255, 134, 134, 103, 145, 148, 174, 255, 208, 186, 197, 226, 255, 171, 134, 1,
    109, 63, 54, 207, 138, 255, 151, 0, 95, 9, 80, 61, 84, 105, 51, 74, 65, 105, 166, 196, 102, 208, 195, 210,
    255, 109, 65, 0, 143, 149, 179, 0, 194, 209, 99, 106, 5, 121, 0, 227, 255, 205, 147, 186, 208, 153, 69, 1,
    3, 95, 161, 163, 255, 0, 119, 0, 170, 0, 182, 199, 0, 165, 120, 183, 130, 88, 95, 32, 0, 130, 114, 135,
    110, 129, 133, 166, 74, 118, 219, 142, 185, 79, 210, 114, 178, 90, 62, 65, 70, 15, 127, 167, 115, 59, 105, 106,
    142, 108, 45, 196, 172, 0, 95, 54, 80, 128, 76, 255, 201, 57, 1, 246, 0, 122, 191, 162, 208, 255, 255, 128,
    147, 211, 203, 150, 100, 100, 168, 171, 172, 146, 112, 198, 210, 170, 100, 92, 136, 89, 218, 88, 184,
    241, 129, 0, 217, 17, 255, 124, 74, 181, 70, 70, 70, 255, 228, 255, 154, 208, 0, 193, 0, 92, 76, 91, 113,
    255, 180, 195, 106, 154, 176, 230, 150, 140, 60, 143, 255, 128, 64, 128, 92, 82, 55, 254, 212, 124, 73, 77, 174,
    255, 160, 98, 255, 255, 255, 104, 84, 109, 169, 164, 131, 225, 199, 255, 137, 54, 74, 135, 158, 223, 7, 246, 231,
    107, 255, 200, 58, 41, 149, 183, 121, 142, 255, 73, 97, 107, 142, 35, 190, 153, 153, 146, 139, 141, 70, 130, 180,
    134, 199, 156, 209, 226, 140, 96, 36, 108, 96, 96, 96, 64, 170, 64, 152, 251, 152, 208, 229, 228, 206, 186, 171,
    152, 161, 64, 116, 112, 0, 0, 114, 143, 102, 102, 156, 250, 141, 255,
)

# ADE20K: configs/ade20k/oneformer_swin_large_IN21k_384_bs16_160k.yaml (640 / 2560); COCO: the Swin-L COCO config
# sets neither, so detectron2's defaults (800 / 1333) apply
DATASETS = {
    "ade20k": Dataset("ade20k", 640, 2560, _ADE20K_COLORS),
    "coco": Dataset("coco", 800, 1333, _COCO_COLORS),
}

# --------------------------------------------------------------------------------------------- the mapping

# tensors of training-only parts that checkpoints saved in training carry and the extension's inference model
# (IS_TRAIN = False) does not have: the text encoder and its projector, the prompt context, the loss's buffers
TRAINING_ONLY = re.compile(r"(text_encoder|text_projector|prompt_ctx|criterion)\.")
# buffers transformers computes itself rather than loads (Swin's relative position index, non-persistent there)
IGNORED = re.compile(r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")

_BB, _PD, _TD = "backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
_SWIN, _DEC = "model.pixel_level_module.encoder.", "model.pixel_level_module.decoder."
_TM = "model.transformer_module."
_WB = r"(weight|bias)"

# original key (regex) -> transformers key, formatted with the match's groups ({n}: group 1 plus 1)
_BLOCK, _LAYER = _BB + r"layers\.(\d+)\.blocks\.(\d+)\.", _SWIN + "swin.encoder.layers.{1}.blocks.{2}."
_RULES: tuple[tuple[str, str], ...] = (
    # Swin backbone
    (_BB + r"patch_embed\.proj\." + _WB, _SWIN + "swin.embeddings.patch_embeddings.projection.{1}"),
    (_BB + r"patch_embed\.norm\." + _WB, _SWIN + "swin.embeddings.norm.{1}"),
    (_BLOCK + r"norm1\." + _WB, _LAYER + "layernorm_before.{3}"),
    (_BLOCK + r"norm2\." + _WB, _LAYER + "layernorm_after.{3}"),
    (_BLOCK + r"attn\.relative_position_bias_table",
     _LAYER + "attention.relative_position_bias.relative_position_bias_table"),
    (_BLOCK + r"attn\.proj\." + _WB, _LAYER + "attention.o_proj.{3}"),
    (_BLOCK + r"mlp\.(fc1|fc2)\." + _WB, _LAYER + "mlp.{3}.{4}"),
    (_BB + r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     _SWIN + "swin.encoder.layers.{1}.downsample.{2}"),
    (_BB + r"norm(\d)\." + _WB, _SWIN + "hidden_states_norms.stage{n}.{2}"),
    # the multi-scale deformable-attention pixel decoder
    (_PD + r"(adapter_1|layer_1)\.weight", _DEC + "{1}.0.weight"),
    (_PD + r"(adapter_1|layer_1)\.norm\." + _WB, _DEC + "{1}.1.{2}"),
    (_PD + r"input_proj\.(\d+)\.([01])\." + _WB, _DEC + "input_projections.{1}.{2}.{3}"),
    (_PD + r"transformer\.level_embed", _DEC + "level_embed"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.linear1\." + _WB, _DEC + "encoder.layers.{1}.fc1.{2}"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.linear2\." + _WB, _DEC + "encoder.layers.{1}.fc2.{2}"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.norm1\." + _WB, _DEC + "encoder.layers.{1}.self_attn_layer_norm.{2}"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.norm2\." + _WB, _DEC + "encoder.layers.{1}.final_layer_norm.{2}"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.self_attn\."
           r"(attention_weights|output_proj|sampling_offsets|value_proj)\." + _WB,
     _DEC + "encoder.layers.{1}.self_attn.{2}.{3}"),
    (_PD + r"mask_features\." + _WB, _DEC + "mask_projection.{1}"),
    # the transformer decoder
    (_TD + r"query_embed\.weight", _TM + "queries_embedder.weight"),
    (_TD + r"level_embed\.weight", _TM + "level_embed.weight"),
    (_TD + r"decoder_norm\." + _WB, _TM + "decoder.decoder_norm.{1}"),
    (_TD + r"class_input_proj\." + _WB, _TM + "decoder.query_input_projection.{1}"),
    (_TD + r"class_embed\." + _WB, _TM + "decoder.class_embed.{1}"),
    (_TD + r"mask_embed\.layers\.(\d+)\." + _WB, _TM + "decoder.mask_embed.layers.{1}.0.{2}"),
    (_TD + r"class_transformer\.decoder\.norm\." + _WB, _TM + "decoder.query_transformer.decoder.norm.{1}"),
    (_TD + r"class_transformer\.decoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2|norm3)\." + _WB,
     _TM + "decoder.query_transformer.decoder.layers.{1}.{2}.{3}"),
    (_TD + r"class_transformer\.decoder\.layers\.(\d+)\.(self_attn|multihead_attn)\."
           r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     _TM + "decoder.query_transformer.decoder.layers.{1}.{2}.{3}"),
    (_TD + r"transformer_cross_attention_layers\.(\d+)\.norm\." + _WB, _TM + "decoder.layers.{1}.cross_attn.norm.{2}"),
    (_TD + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\."
           r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     _TM + "decoder.layers.{1}.cross_attn.multihead_attn.{2}"),
    (_TD + r"transformer_self_attention_layers\.(\d+)\.norm\." + _WB, _TM + "decoder.layers.{1}.self_attn.norm.{2}"),
    (_TD + r"transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\." + _WB,
     _TM + "decoder.layers.{1}.self_attn.self_attn.out_proj.{2}"),
    (_TD + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\." + _WB, _TM + "decoder.layers.{1}.ffn.{2}.{3}"),
    # the task MLP
    (r"task_mlp\.layers\.(\d+)\." + _WB, "model.task_encoder.task_mlp.layers.{1}.0.{2}"),
)
_COMPILED = tuple((re.compile(pattern), target) for pattern, target in _RULES)
# fused q/k/v projections split into three (rows: query, key, value, as torch's MultiheadAttention and the
# original's Swin split them): the Swin blocks' qkv and the decoder's self-attention in_proj
_SWIN_QKV = re.compile(_BB.replace(".", r"\.") + r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\." + _WB)
_SELF_QKV = re.compile(_TD.replace(".", r"\.") + r"transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_"
                       + _WB)
QKV = ("q_proj", "k_proj", "v_proj")


def _target(key: str) -> str | None:
    for pattern, target in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            groups = m.groups()
            n = int(groups[0]) + 1 if groups and groups[0].isdigit() else None
            return target.format(None, *groups, n=n)
    return None


def _split(value, key: str):
    if value.shape[0] % 3:
        raise ValueError(f"{key} has {value.shape[0]} rows, not a fused query/key/value")
    width = value.shape[0] // 3
    return [value[i * width:(i + 1) * width] for i in range(3)]


def to_transformers(state: dict) -> dict:
    """An original OneFormer (Swin backbone) state dict with transformers' OneFormerForUniversalSegmentation
    keys: every inference tensor renamed, the fused q/k/v projections split; training-only tensors
    (:data:`TRAINING_ONLY`) and the stored Swin position index (:data:`IGNORED`) left out. Raises ValueError
    naming the keys this mapping does not know."""
    out, unknown = {}, []
    for key, value in state.items():
        if TRAINING_ONLY.match(key) or IGNORED.fullmatch(key):
            continue
        m = _SWIN_QKV.fullmatch(key)
        if m:
            base = _SWIN + f"swin.encoder.layers.{m[1]}.blocks.{m[2]}.attention."
            for part, tensor in zip(QKV, _split(value, key)):
                out[f"{base}{part}.{m[3]}"] = tensor
            continue
        m = _SELF_QKV.fullmatch(key)
        if m:
            base = _TM + f"decoder.layers.{m[1]}.self_attn.self_attn."
            for part, tensor in zip(QKV, _split(value, key)):
                out[f"{base}{part}.{m[2]}"] = tensor
            continue
        target = _target(key)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    if unknown:
        raise ValueError(f"not a OneFormer (Swin) state dict: unexpected keys {', '.join(unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''}")
    return out


def _count(state: dict, pattern: str) -> int:
    found = {int(m[1]) for k in state for m in [re.match(pattern, k)] if m}
    return 1 + max(found) if found else 0


def architecture(state: dict) -> dict:
    """Widths, depths and counts of an original file's network, read from its tensors' shapes."""
    try:
        embed = int(state[_BB + "patch_embed.proj.weight"].shape[0])
        stages = _count(state, r"backbone\.layers\.(\d+)\.")
        depths = [_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)]
        heads = [int(state[f"{_BB}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                 for i in range(stages)]
        table = int(state[_BB + "layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        hidden = int(state[_TD + "query_embed.weight"].shape[1])
        arch = {
            "embed": embed, "depths": depths, "heads": heads, "window": (int(round(table ** 0.5)) + 1) // 2,
            "mlp_ratio": int(state[_BB + "layers.0.blocks.0.mlp.fc1.weight"].shape[0]) // embed,
            "queries": int(state[_TD + "query_embed.weight"].shape[0]),
            "classes": int(state[_TD + "class_embed.weight"].shape[0]) - 1,
            "hidden": hidden,
            "conv_dim": int(state[_PD + "mask_features.weight"].shape[1]),
            "mask_dim": int(state[_PD + "mask_features.weight"].shape[0]),
            "encoder_layers": _count(state, r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
            "encoder_feedforward": int(state[_PD + "transformer.encoder.layers.0.linear1.weight"].shape[0]),
            "decoder_layers": 1 + _count(state, r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\."),
            "feedforward": int(state[_TD + "transformer_ffn_layers.0.linear1.weight"].shape[0]),
            "query_layers": _count(state, r"sem_seg_head\.predictor\.class_transformer\.decoder\.layers\.(\d+)\."),
            "task_seq_len": int(state["task_mlp.layers.0.weight"].shape[1]),
        }
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"not a OneFormer (Swin) state dict (missing or odd key: {exc})") from None
    if stages == 0 or 0 in depths:
        raise ValueError("not a OneFormer (Swin) state dict (no backbone blocks)")
    return arch


def config(embed: int = 192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window: int = 12, mlp_ratio: int = 4,
           queries: int = 250, classes: int = 150, hidden: int = 256, conv_dim: int = 256, mask_dim: int = 256,
           encoder_layers: int = 6, encoder_feedforward: int = 1024, decoder_layers: int = 10,
           feedforward: int = 2048, query_layers: int = 2, task_seq_len: int = TASK_SEQ_LEN):
    """transformers' OneFormerConfig of the extension's network (defaults: the ADE20K Swin-L file; the COCO file
    has 150 queries and 133 classes)."""
    from transformers import OneFormerConfig, SwinConfig

    backbone = SwinConfig(
        image_size=384, patch_size=4, num_channels=3, embed_dim=embed, depths=list(depths), num_heads=list(heads),
        window_size=window, mlp_ratio=float(mlp_ratio), qkv_bias=True, hidden_act="gelu",
        use_absolute_embeddings=False, layer_norm_eps=1e-5, drop_path_rate=0.0,
        out_features=[f"stage{i + 1}" for i in range(len(depths))])
    return OneFormerConfig(
        backbone_config=backbone, num_queries=queries, num_labels=classes, hidden_dim=hidden, conv_dim=conv_dim,
        mask_dim=mask_dim, norm="GN", encoder_layers=encoder_layers, encoder_feedforward_dim=encoder_feedforward,
        decoder_layers=decoder_layers, dim_feedforward=feedforward, num_attention_heads=8, dropout=0.1,
        pre_norm=False, enforce_input_proj=False, query_dec_layers=query_layers, use_task_norm=True,
        task_seq_len=task_seq_len, common_stride=4, strides=[4, 8, 16, 32], is_training=False,
        layer_norm_eps=1e-5, use_auxiliary_loss=False, output_auxiliary_logits=False)


# ------------------------------------------------------------------------------------------------ the model


# parameters and buffers of transformers' model that the original network does not have and inference does not
# use: the Swin model's final layer norm (the backbone returns the per-stage norms) and the training loss's
_UNUSED = re.compile(r"model\.pixel_level_module\.encoder\.swin\.layernorm\.(weight|bias)|criterion\..*")


def build(state: dict):
    """transformers' OneFormerForUniversalSegmentation with an original file's weights (fp32, eval, no grad)."""
    import torch
    from transformers import OneFormerForUniversalSegmentation
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    arch = architecture(state)
    mapped = {k: v.float().contiguous() for k, v in to_transformers(state).items()}
    with torch.device("meta"):
        model = OneFormerForUniversalSegmentation(config(**arch))
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(mapped) if not _UNUSED.fullmatch(k))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ValueError("not a OneFormer (Swin) state dict: " + "; ".join(
            f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected)) if keys))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(model.get_parameter_or_buffer(key).shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)}, the network has "
                             f"{tuple(model.get_parameter_or_buffer(key).shape)}")
    model.load_state_dict(mapped, strict=False, assign=True)
    # what the file does not hold: unused parameters given values, the position index buffers computed
    model.model.pixel_level_module.encoder.swin.layernorm.to_empty(device="cpu")
    model.criterion.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, SwinRelativePositionBias):
            module.relative_position_index = module._create_relative_position_index().view(-1)
    with torch.no_grad():
        for tensor in (*model.model.pixel_level_module.encoder.swin.layernorm.parameters(),
                       *model.criterion.parameters(), *model.criterion.buffers()):
            tensor.zero_()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded: {', '.join(left[:4])}")
    return model.eval().requires_grad_(False)


def load(path: Path, state: dict):
    """The network of the file ``path`` from its tensors ``state`` (read by engine.controlnet.annotators'
    read_weights: safetensors, or a pickle read with weights_only; the detectron2 checkpoint's ``model`` entry;
    passed in, so this module does not import annotators, which imports it)."""
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        return build(state)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(path, f"not a OneFormer (Swin) file: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------- the call


def test_size(height: int, width: int, dataset: Dataset) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape: the short side to ``min_size``, the long side at most
    ``max_size``, each rounded half up."""
    size = float(dataset.min_size)
    scale = size / min(height, width)
    h, w = (size, scale * width) if height < width else (scale * height, size)
    if max(h, w) > dataset.max_size:
        scale = dataset.max_size / max(h, w)
        h, w = h * scale, w * scale
    return int(h + 0.5), int(w + 0.5)


def prepare(image: np.ndarray, dataset: Dataset):
    """The network's input: ``(pixel_values (1, 3, H, W) float32 padded to multiples of 32, (h, w) before the
    padding)`` from an RGB uint8 image, as the extension's predictor makes it."""
    import torch
    from PIL import Image

    h, w = test_size(*image.shape[:2], dataset)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1).copy())
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    ph, pw = -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    padded = x.new_zeros((1, 3, ph, pw))
    padded[0, :, :h, :w] = x
    return padded, (h, w)


def task_inputs(length: int = TASK_SEQ_LEN):
    import torch

    tokens = torch.zeros((1, length), dtype=torch.float32)
    tokens[0, :len(TASK_TOKENS)] = torch.tensor(TASK_TOKENS, dtype=torch.float32)
    return tokens


def semantic_scores(model, image: np.ndarray, dataset: Dataset):
    """The per-class scores ``(classes, h, w)`` of an RGB uint8 image at its own size: the original's
    sem_seg_postprocess (masks upsampled to the padded input, cropped, resized to the image) before its
    semantic_inference (softmax over the classes without "no object", times the masks' sigmoid, summed over the
    queries)."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[:2]
    pixels, (h, w) = prepare(image, dataset)
    with torch.inference_mode():
        out = model(pixel_values=pixels, task_inputs=task_inputs(model.config.task_seq_len))
        classes = F.softmax(out.class_queries_logits[0], dim=-1)[..., :-1]
        scores = classes.new_zeros((classes.shape[1], height * width))
        # a few queries at a time (each query's mask is resized on its own): the image-sized masks of all 250
        # queries at once would be the call's largest tensor; the sum accumulates in place (no second score array)
        for start in range(0, classes.shape[0], QUERY_CHUNK):
            logits = out.masks_queries_logits[:, start:start + QUERY_CHUNK]
            masks = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, :, :h, :w], size=(height, width), mode="bilinear", align_corners=False)
            chunk = classes[start:start + QUERY_CHUNK]
            scores.addmm_(chunk.T, masks[0].sigmoid_().reshape(chunk.shape[0], -1))
        return scores.reshape(-1, height, width)


def pixel_bytes(classes: int = 150) -> int:
    """Bytes per pixel of the padded image at the call's peak (:func:`semantic_scores`): the class scores (float32
    each), one chunk of masks at the padded input's size and at the image's, the labels (int64) and the drawing's
    RGBA float32 layer and canvas (:func:`draw`). The memory check at submit counts it (engine.admission)."""
    return 4 * (classes + 2 * QUERY_CHUNK) + 8 + 16 + 4


def labels(model, image: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The class of each pixel (int64 ``(h, w)``)."""
    return semantic_scores(model, image, dataset).argmax(dim=0).cpu().numpy()


_draw_lock = threading.Lock()  # matplotlib's style context is process-wide


def draw(labels_map: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The extension's colour map of a label map (its ``Visualizer(img, is_img=False).draw_sem_seg(labels,
    alpha=1, is_text=False)``): a white canvas of the map's size; each class present, from the largest area
    down, drawn in its colour: a region without holes as filled polygons (OpenCV's contours, +0.5 px) with a
    white edge of ``max(font_size // 15, 1)`` points, a region with holes as a flat RGBA image; rasterised by
    matplotlib's Agg at its default style. RGB uint8."""
    require("matplotlib", "controlnet", "the OneFormer segmentation map (drawn as the extension draws it)")
    cv2 = require("cv2", "controlnet", "the OneFormer segmentation map")
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon

    height, width = labels_map.shape
    values, areas = np.unique(labels_map, return_counts=True)
    order = values[np.argsort(-areas).tolist()]
    font_size = max(np.sqrt(height * width) // 90, 10 // 1.0)
    line_width = max(font_size // 15 * 1.0, 1)
    with _draw_lock, matplotlib.style.context("default"):
        fig = Figure(frameon=False)
        dpi = fig.get_dpi()
        fig.set_size_inches((width + 1e-2) / dpi, (height + 1e-2) / dpi)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes([0.0, 0.0, 1.0, 1.0])
        ax.axis("off")
        ax.imshow(np.full((height, width, 3), 255, np.uint8), extent=(0, width, height, 0), interpolation="nearest")
        for label in order:
            if label >= dataset.classes:
                continue
            color = tuple(c / 255 for c in dataset.color(int(label)))
            mask = np.ascontiguousarray((labels_map == label).astype(np.uint8))
            contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[-2:]
            if hierarchy is None:
                continue
            if (hierarchy.reshape(-1, 4)[:, 3] >= 0).sum() > 0:  # holes: the mask as an image
                rgba = np.zeros((height, width, 4), np.float32)
                rgba[:, :, :3] = color
                rgba[:, :, 3] = (mask == 1).astype(np.float32)
                ax.imshow(rgba, extent=(0, width, height, 0))
                continue
            for contour in contours:
                flat = contour.flatten()
                if len(flat) < 6:
                    continue
                ax.add_patch(Polygon((flat + 0.5).reshape(-1, 2), fill=True, facecolor=color + (1.0,),
                                     edgecolor=(1.0, 1.0, 1.0, 1), linewidth=line_width))
        buffer, (w, h) = canvas.print_to_buffer()
    return np.frombuffer(buffer, np.uint8).reshape(h, w, 4)[:, :, :3].copy()


def detect(model, image: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The segmentation map (RGB uint8) of an RGB uint8 image at its own size."""
    return draw(labels(model, image, dataset), dataset)
