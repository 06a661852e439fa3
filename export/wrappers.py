"""torch modules with the exact inputs and outputs of each exported component.

These wrappers ARE the component contract: the torch backend runs them, the ONNX exporter traces them, so
every backend computes the same function of the same named inputs. Names (see docs/ARCHITECTURE.md):

text_encoder / text_encoder_2
    in  input_ids int64 (B, 77); clip_skip int64 (1,) -- webui clip skip N >= 1;
        extra_embeddings (E, D) -- rows after the token-embedding table: an id V + i (V = vocab size)
        looks up row i (textual-inversion vectors; E >= 1, feed one zero row when there are none)
    out hidden_state (B, 77, D) = final_layer_norm(hidden_states[-N]);
        hidden_state_raw (B, 77, D) = hidden_states[-N] without the norm (SDXL passes N=2: the
        penultimate layer, as the webui and diffusers do); pooled (B, P): pooler_output, or text_embeds for a projection model
unet
    in  sample (B, 4, h, w); timestep float32 (B,); encoder_hidden_states (B, 77k, D);
        SDXL also text_embeds (B, P), time_ids (B, 6)
    out model_output (B, 4, h, w)  -- raw eps or v, no scaling
unet_control   (same as unet, plus ControlNet residual inputs)
    in  ... + down_residual_0 .. down_residual_{n-1}, mid_residual
controlnet
    in  sample, timestep, encoder_hidden_states, controlnet_cond (B, 3, H, W) in [0, 1]; SDXL text_embeds, time_ids
    out down_residual_0 .. down_residual_{n-1}, mid_residual  (unscaled; weights are applied by the denoiser)
vae_decoder
    in  latent (B, 4, h, w) in sampler space (the graph divides by the scaling factor)
    out image (B, 3, H, W) in [0, 1]
vae_encoder
    in  image (B, 3, H, W) in [0, 1]
    out latent (B, 4, h, w) = posterior mean * scaling factor (sampler space)
unet_seamless, unet_control_seamless, vae_decoder_seamless, vae_encoder_seamless
    the same inputs and outputs, every padded Conv2d of the module padding circularly (:class:`CircularPadding`)
taesd_decoder / taesd_encoder  (TAESD, TAESDXL: the same inputs and outputs as vae_decoder / vae_encoder)
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.with_projection = hasattr(text_encoder, "text_projection")
        # transformers 5 flattened CLIPTextModel (no .text_model); the projection model keeps it
        self.final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor, extra_embeddings: torch.Tensor):
        table = self.text_encoder.get_input_embeddings()
        vocab = table.weight.shape[0]

        def lookup(ids):  # the token embedding, extended by the extra rows (after the lookup: no table copy)
            is_extra = (ids >= vocab).unsqueeze(-1)
            base = torch.nn.functional.embedding(ids.clamp(max=vocab - 1), table.weight)
            extra = torch.nn.functional.embedding((ids - vocab).clamp(min=0), extra_embeddings.to(base.dtype))
            return torch.where(is_extra, extra, base)

        table.forward = lookup
        try:
            out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        finally:
            del table.forward
        stacked = torch.stack(out.hidden_states, dim=0)  # (L+1, B, 77, D)
        index = (stacked.shape[0] - clip_skip.to(torch.int64)).reshape(1)
        raw = stacked.index_select(0, index).squeeze(0)
        hidden = self.final_layer_norm(raw)
        pooled = out.text_embeds if self.with_projection else out.pooler_output
        return hidden, raw, pooled


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module, with_residuals: bool = False):
        super().__init__()
        self.unet = unet
        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        self.with_residuals = with_residuals

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        extra = list(extra)
        added = None
        if self.is_sdxl:
            added = {"text_embeds": extra.pop(0), "time_ids": extra.pop(0)}
        down = mid = None
        if self.with_residuals:
            mid = extra.pop()
            down = tuple(extra)
        return self.unet(
            sample, timestep, encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class ControlNetWrapper(nn.Module):
    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.is_sdxl = getattr(controlnet.config, "addition_embed_type", None) == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *extra):
        added = {"text_embeds": extra[0], "time_ids": extra[1]} if self.is_sdxl else None
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond,
            conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False,
        )
        return (*down, mid)


class VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


class VaeEncoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image):
        posterior = self.vae.encode(image * 2 - 1, return_dict=False)[0]
        return posterior.mean * self.scaling_factor


class CircularPadding(nn.Module):
    """``inner`` with every ``nn.Conv2d`` of it padding circularly (``padding_mode="circular"``) while it runs: the
    webui's seamless tiling (``sd_hijack.apply_circular`` sets the mode on every Conv2d of the UNet and the VAE).
    The modes are restored after each call, so the plain component sharing the module is unchanged; a convolution
    without padding is left alone (circular padding by 0 is the same function)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        convs = [m for m in self.inner.modules() if isinstance(m, nn.Conv2d) and any(m.padding)
                 and m.padding_mode == "zeros"]
        for conv in convs:
            conv.padding_mode = "circular"
        try:
            return self.inner(*args)
        finally:
            for conv in convs:
                conv.padding_mode = "zeros"


def controlnet_residual_count(model: nn.Module) -> int:
    """Number of down-block residuals a UNet takes / a ControlNet gives (12 for SD1.x/2.x, 9 for SDXL)."""
    cfg = model.config
    return 1 + len(cfg.down_block_types) * (cfg.layers_per_block + 1) - 1


class TaesdDecoderWrapper(nn.Module):
    """``taesd_decoder``: ``latent`` (sampler space) -> ``image`` in [0, 1] (TAESD's decoder, clamped as the webui)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent):
        return self.decoder(latent).clamp(0, 1)


class TaesdEncoderWrapper(nn.Module):
    """``taesd_encoder``: ``image`` in [0, 1] -> ``latent`` (sampler space; TAESD's encoder as it is)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image):
        return self.encoder(image)
