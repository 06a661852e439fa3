"""The torch modules of the webui's ``models/VAE-approx/`` networks (imported only where torch runs).

- TAESD / TAESDXL (github.com/madebyollin/taesd, MIT): the official architecture, a bare ``nn.Sequential`` whose
  keys are those of the official files (``0.weight``, ``1.conv.0.weight``, ...). The encoder takes an image in
  [0, 1] and gives sampler-space latents (SD latents times the VAE scaling factor); the decoder takes
  sampler-space latents and gives an image in about [0, 1]. These are exactly the contracts of the engine's
  ``vae_encoder`` / ``vae_decoder`` components, so the ``taesd_*`` components (export.wrappers) only clamp.
- "Approx NN" (the webui's ``VAEApprox``, modules/sd_vae_approx.py): eight convolutions over the latent upscaled
  x2; latent (sampler space) -> an image in about [-1, 1] at a quarter of the full size.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int = 4) -> nn.Sequential:
    """image [0, 1] (B, 3, H, W) -> sampler-space latent (B, 4, H/8, W/8)."""
    b = _Block
    return nn.Sequential(
        _conv(3, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, latent_channels),
    )


def taesd_decoder(latent_channels: int = 4) -> nn.Sequential:
    """sampler-space latent (B, 4, h, w) -> image in about [0, 1] (B, 3, 8h, 8w)."""
    b = _Block
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        b(64, 64), b(64, 64), b(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        b(64, 64), b(64, 64), b(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        b(64, 64), b(64, 64), b(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        b(64, 64), _conv(64, 3),
    )


class ApproxNN(nn.Module):
    """The webui's ``VAEApprox``: latent -> image in about [-1, 1] at twice the latent's size."""

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        sizes = [(latent_channels, 8, 7), (8, 16, 5), (16, 32, 3), (32, 64, 3), (64, 32, 3), (32, 16, 3),
                 (16, 8, 3), (8, 3, 3)]
        for i, (n_in, n_out, k) in enumerate(sizes, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(n_in, n_out, (k, k)))

    def forward(self, x):
        extra = 11
        x = nn.functional.interpolate(x, (x.shape[2] * 2, x.shape[3] * 2))
        x = nn.functional.pad(x, (extra, extra, extra, extra))
        for i in range(1, 9):
            x = nn.functional.leaky_relu(getattr(self, f"conv{i}")(x), 0.1)
        return x
