"""OneFormer files for tests: random weights in the original (detectron2) layout of the extension's Swin OneFormer
(``backbone.*`` Swin keys with one fused ``attn.qkv`` per block and the stored ``relative_position_index``,
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, ``task_mlp.*``), saved as detectron2 saves a
checkpoint (``{"model": state}``), at a reduced size (Swin embedding width 32, depths 1/1/2/2, window 4; decoder
width 64, 2 decoder layers; 6 queries, the real class counts; the pixel decoder's feed-forward width 1024, which the
original code fixes) so that tests stay cheap; the engine reads the
architecture from the file. The full-size key layout is checked against the original network's own key list
(tests/golden/oneformer_swin_l_keys.json.gz, listed from the extension's vendored model built with its configs).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

SMALL = {"embed": 32, "depths": (1, 1, 2, 2), "heads": (1, 2, 4, 8), "window": 4, "queries": 6, "hidden": 64,
         "conv_dim": 64, "mask_dim": 64, "encoder_layers": 1, "encoder_feedforward": 1024, "decoder_layers": 3,
         "feedforward": 128, "query_layers": 1}
FULL = {"embed": 192, "depths": (2, 2, 18, 2), "heads": (6, 12, 24, 48), "window": 12, "hidden": 256,
        "conv_dim": 256, "mask_dim": 256, "encoder_layers": 6, "encoder_feedforward": 1024, "decoder_layers": 10,
        "feedforward": 2048, "query_layers": 2}
FILES = {"ade20k": ("oneformer", "250_16_swin_l_oneformer_ade20k_160k.pth", 250, 150),
         "coco": ("oneformer", "150_16_swin_l_oneformer_coco_100ep.pth", 150, 133)}


def original_shapes(embed, depths, heads, window, queries, classes, hidden, conv_dim, mask_dim, encoder_layers,
                    encoder_feedforward, decoder_layers, feedforward, query_layers, task_seq_len=77
                    ) -> dict[str, tuple[int, ...]]:
    """The original layout's keys and shapes of a OneFormer (Swin) network of these sizes."""
    shapes = {"backbone.patch_embed.proj.weight": (embed, 3, 4, 4), "backbone.patch_embed.proj.bias": (embed,),
              "backbone.patch_embed.norm.weight": (embed,), "backbone.patch_embed.norm.bias": (embed,)}
    dims = [embed * 2 ** i for i in range(len(depths))]
    for i, (depth, h, dim) in enumerate(zip(depths, heads, dims)):
        for j in range(depth):
            b = f"backbone.layers.{i}.blocks.{j}."
            shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                           b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                           b + "attn.relative_position_index": (window * window, window * window),
                           b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                           b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                           b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                           b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
        if i < len(depths) - 1:
            d = f"backbone.layers.{i}.downsample."
            shapes.update({d + "reduction.weight": (2 * dim, 4 * dim), d + "norm.weight": (4 * dim,),
                           d + "norm.bias": (4 * dim,)})
    for i, dim in enumerate(dims):
        shapes.update({f"backbone.norm{i}.weight": (dim,), f"backbone.norm{i}.bias": (dim,)})
    p = "sem_seg_head.pixel_decoder."
    for k, dim in enumerate(reversed(dims[1:])):
        shapes.update({f"{p}input_proj.{k}.0.weight": (conv_dim, dim, 1, 1), f"{p}input_proj.{k}.0.bias": (conv_dim,),
                       f"{p}input_proj.{k}.1.weight": (conv_dim,), f"{p}input_proj.{k}.1.bias": (conv_dim,)})
    shapes[f"{p}transformer.level_embed"] = (3, conv_dim)
    for i in range(encoder_layers):
        e = f"{p}transformer.encoder.layers.{i}."
        shapes.update({e + "self_attn.sampling_offsets.weight": (8 * 3 * 4 * 2, conv_dim),
                       e + "self_attn.sampling_offsets.bias": (8 * 3 * 4 * 2,),
                       e + "self_attn.attention_weights.weight": (8 * 3 * 4, conv_dim),
                       e + "self_attn.attention_weights.bias": (8 * 3 * 4,),
                       e + "self_attn.value_proj.weight": (conv_dim, conv_dim),
                       e + "self_attn.value_proj.bias": (conv_dim,),
                       e + "self_attn.output_proj.weight": (conv_dim, conv_dim),
                       e + "self_attn.output_proj.bias": (conv_dim,),
                       e + "norm1.weight": (conv_dim,), e + "norm1.bias": (conv_dim,),
                       e + "linear1.weight": (encoder_feedforward, conv_dim),
                       e + "linear1.bias": (encoder_feedforward,),
                       e + "linear2.weight": (conv_dim, encoder_feedforward), e + "linear2.bias": (conv_dim,),
                       e + "norm2.weight": (conv_dim,), e + "norm2.bias": (conv_dim,)})
    shapes.update({f"{p}mask_features.weight": (mask_dim, conv_dim, 1, 1), f"{p}mask_features.bias": (mask_dim,),
                   f"{p}adapter_1.weight": (conv_dim, dims[0], 1, 1), f"{p}adapter_1.norm.weight": (conv_dim,),
                   f"{p}adapter_1.norm.bias": (conv_dim,), f"{p}layer_1.weight": (conv_dim, conv_dim, 3, 3),
                   f"{p}layer_1.norm.weight": (conv_dim,), f"{p}layer_1.norm.bias": (conv_dim,)})
    t = "sem_seg_head.predictor."

    def attention(prefix):
        return {prefix + "in_proj_weight": (3 * hidden, hidden), prefix + "in_proj_bias": (3 * hidden,),
                prefix + "out_proj.weight": (hidden, hidden), prefix + "out_proj.bias": (hidden,)}

    for i in range(query_layers):
        q = f"{t}class_transformer.decoder.layers.{i}."
        shapes.update({**attention(q + "self_attn."), **attention(q + "multihead_attn."),
                       q + "linear1.weight": (feedforward, hidden), q + "linear1.bias": (feedforward,),
                       q + "linear2.weight": (hidden, feedforward), q + "linear2.bias": (hidden,),
                       **{f"{q}norm{n}.{w}": (hidden,) for n in (1, 2, 3) for w in ("weight", "bias")}})
    shapes.update({f"{t}class_transformer.decoder.norm.weight": (hidden,),
                   f"{t}class_transformer.decoder.norm.bias": (hidden,)})
    for i in range(decoder_layers - 1):
        shapes.update({**attention(f"{t}transformer_self_attention_layers.{i}.self_attn."),
                       f"{t}transformer_self_attention_layers.{i}.norm.weight": (hidden,),
                       f"{t}transformer_self_attention_layers.{i}.norm.bias": (hidden,),
                       **attention(f"{t}transformer_cross_attention_layers.{i}.multihead_attn."),
                       f"{t}transformer_cross_attention_layers.{i}.norm.weight": (hidden,),
                       f"{t}transformer_cross_attention_layers.{i}.norm.bias": (hidden,),
                       f"{t}transformer_ffn_layers.{i}.linear1.weight": (feedforward, hidden),
                       f"{t}transformer_ffn_layers.{i}.linear1.bias": (feedforward,),
                       f"{t}transformer_ffn_layers.{i}.linear2.weight": (hidden, feedforward),
                       f"{t}transformer_ffn_layers.{i}.linear2.bias": (hidden,),
                       f"{t}transformer_ffn_layers.{i}.norm.weight": (hidden,),
                       f"{t}transformer_ffn_layers.{i}.norm.bias": (hidden,)})
    shapes.update({f"{t}decoder_norm.weight": (hidden,), f"{t}decoder_norm.bias": (hidden,),
                   f"{t}query_embed.weight": (queries, hidden), f"{t}level_embed.weight": (3, hidden),
                   f"{t}class_input_proj.weight": (hidden, conv_dim, 1, 1), f"{t}class_input_proj.bias": (hidden,),
                   f"{t}class_embed.weight": (classes + 1, hidden), f"{t}class_embed.bias": (classes + 1,),
                   f"{t}mask_embed.layers.0.weight": (hidden, hidden), f"{t}mask_embed.layers.0.bias": (hidden,),
                   f"{t}mask_embed.layers.1.weight": (hidden, hidden), f"{t}mask_embed.layers.1.bias": (hidden,),
                   f"{t}mask_embed.layers.2.weight": (mask_dim, hidden), f"{t}mask_embed.layers.2.bias": (mask_dim,),
                   "task_mlp.layers.0.weight": (hidden, task_seq_len), "task_mlp.layers.0.bias": (hidden,),
                   "task_mlp.layers.1.weight": (hidden, hidden), "task_mlp.layers.1.bias": (hidden,)})
    return shapes


def position_index(window: int) -> torch.Tensor:
    """Swin's relative position index of a window (as the original stores it)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def randomize_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights: norm weights around 1 with a spread, nonzero biases, weights scaled by their fan-in;
    the class embedding and the mask embedding's last layer larger, so that the per-pixel classes vary over an
    image; the stored position index as the original computes it."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            state[name] = position_index(int(round(shape[0] ** 0.5)))
            continue
        r = torch.randn(shape, generator=gen)
        if ".norm" in name and name.endswith(".weight") and len(shape) == 1:
            state[name] = 1.0 + 0.3 * r
        elif len(shape) <= 1:
            state[name] = 0.1 * r
        elif name.endswith(("level_embed", "query_embed.weight", "relative_position_bias_table")):
            state[name] = 0.5 * r
        else:
            scale = 1.5 / (r[0].numel() ** 0.5)
            if ".class_embed." in name:
                scale *= 8
            state[name] = r * scale
    return state


def write_file(folder: Path, dataset: str, seed: int, sizes: dict | None = None, training: bool = False) -> Path:
    """A reduced OneFormer file of random weights saved as the original of ``dataset`` is (detectron2's
    ``{"model": state}`` pickle), under its real name in ``folder``; ``training``: with the tensors of the
    training-only text encoder too, as checkpoints saved in training carry them."""
    sub, name, _, classes = FILES[dataset]
    state = randomize_state(original_shapes(**{**SMALL, "classes": classes, **(sizes or {})}), seed)
    if training:
        gen = torch.Generator().manual_seed(seed + 1)
        state.update({"text_encoder.token_embedding.weight": torch.randn((100, 16), generator=gen),
                      "text_projector.layers.0.weight": torch.randn((64, 16), generator=gen),
                      "prompt_ctx.weight": torch.randn((16, 16), generator=gen)})
    # a module state dict as torch makes it: with the modules' versions (detectron2's checkpointer saves
    # model.state_dict(); without OneFormerHead's version 2 the original loader renames the pixel decoder's keys, a
    # conversion of MaskFormer's old checkpoints)
    state = OrderedDict(state)
    state._metadata = OrderedDict({"": {"version": 1}, "sem_seg_head": {"version": 2}})
    path = folder / sub / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path
