"""Query-chunked attention for the ONNX export: the exported graph computes each attention layer in ``chunks``
slices of its query rows (boundaries computed from the traced sequence length, so any latent size runs), so a
graph without a fused attention kernel (ONNX Runtime and OpenVINO on CPU) holds 1/chunks of the T x T score
matrices at a time instead of all of them (issue 12: 1024^2 on the demo model took 20.9 GB).

Each chunk is ``torch.nn.functional.scaled_dot_product_attention`` over the chunk's queries and all keys: the
same function, chunk by chunk, as diffusers' ``AttnProcessor2_0``, whose structure this processor keeps.
"""

from __future__ import annotations

from contextlib import contextmanager

DEFAULT_CHUNKS = 16


class ChunkedAttnProcessor:
    """A diffusers attention processor: ``AttnProcessor2_0`` with the attention computed in ``chunks`` query
    slices."""

    def __init__(self, chunks: int = DEFAULT_CHUNKS):
        self.chunks = int(chunks)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        import torch
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        rows = query.shape[2]  # traced: the slice bounds follow the input's size in the exported graph
        parts = []
        for i in range(self.chunks):
            start, end = i * rows // self.chunks, (i + 1) * rows // self.chunks
            mask = attention_mask
            if mask is not None and mask.shape[2] != 1:
                mask = mask[:, :, start:end]
            parts.append(F.scaled_dot_product_attention(query[:, :, start:end], key, value, attn_mask=mask,
                                                        dropout_p=0.0, is_causal=False))
        hidden_states = torch.cat(parts, dim=2)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_kind(chunks: int) -> str:
    """The attention kind an export with ``chunks`` computes (engine.memory's names): "full" or "chunked:K"."""
    return f"chunked:{chunks}" if chunks and chunks > 1 else "full"


@contextmanager
def chunked_attention(module, chunks: int):
    """Within the block, every diffusers attention layer of ``module`` (UNet, VAE, ControlNet) computes in
    ``chunks`` query slices; its own processors are put back afterwards. Modules without diffusers attention
    (the text encoders) and ``chunks`` <= 1 are left as they are."""
    if not chunks or chunks <= 1 or not hasattr(module, "set_attn_processor"):
        yield module
        return
    saved = dict(module.attn_processors)
    module.set_attn_processor(ChunkedAttnProcessor(chunks))
    try:
        yield module
    finally:
        module.set_attn_processor(saved)
