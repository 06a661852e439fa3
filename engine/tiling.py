"""Tiled VAE decode (and encode): a large latent decoded as overlapping latent tiles through ``run("vae_decoder", ...)``, the
tiles blended with linear ramps over their overlaps (the diffusers / webui approach: ``AutoencoderKL.tiled_decode``
blends the same way), so that no full-resolution activation of the whole image (nor the mid-block attention over
all latent tokens) is ever alive. Works on every backend: it only slices the latent and runs the component.

Tiles are ``tile`` latent pixels square (the last ones shifted in so that every tile is whole), neighbours
overlapping by at least ``overlap`` latent pixels; in an overlap the two tiles' images are mixed with weights
that ramp linearly from one to the other, so the tiles' own borders (zero padding, their own GroupNorm
statistics) get weight near 0 and no seam is left (tests/test_tiling.py: tiled vs untiled on a tiny model).
The knowledge of *when* to tile lives in :class:`VaeTiling`; engine.memory uses the same object to estimate.

Seamless tiling (the webui's ``tiling``): an untiled decode/encode runs the component's circular-padding variant
(``export.descriptors.SEAMLESS``). A tiled one cannot (each tile would wrap onto itself): the input is padded by
wrapping around (``overlap`` latent pixels each side), decoded in tiles by the plain component and cropped back,
so every border of the result is computed from the content across the opposite border, as in the untiled case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from engine.arrays import contiguous, to_host
from engine.models.family import VAE_SCALE_FACTOR
from export.descriptors import SEAMLESS

LATENT_SCALE = VAE_SCALE_FACTOR  # image pixels per latent pixel (every supported family's VAE)
# called before each tile; raises (core.errors.Cancelled) to stop a tiled pass
Check = Callable[[], None]


@dataclass(frozen=True)
class VaeTiling:
    """``tile``/``overlap`` in latent pixels; decode is tiled when the image has more than ``above_px`` squared
    pixels (``tile`` 0: never)."""

    tile: int = 64
    overlap: int = 16
    above_px: int = 768

    def __post_init__(self):
        if self.tile and not 0 <= self.overlap < self.tile // 2 + 1:
            raise ValueError(f"overlap {self.overlap} must be below half the tile ({self.tile})")

    def applies(self, width: int, height: int) -> bool:
        return bool(self.tile) and width * height > self.above_px**2 and (
            height // LATENT_SCALE > self.tile or width // LATENT_SCALE > self.tile)

    def tile_shape(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) in image pixels of the largest tile decoded for an image of this size."""
        if not self.applies(width, height):
            return width, height
        return (min(width, self.tile * LATENT_SCALE), min(height, self.tile * LATENT_SCALE))


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``0..n``, evenly spaced, neighbours overlapping by at
    least ``overlap`` (one tile when ``n <= tile``)."""
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramps(starts: list[int], size: int, scale: int) -> list[np.ndarray]:
    """1-d blend weights (image pixels) of each tile along one axis: 1 inside, a linear ramp over each overlap
    with a neighbour (the two ramps of an overlap sum to 1)."""
    out = []
    for i, s in enumerate(starts):
        w = np.ones(size * scale, dtype=np.float32)
        if i > 0:
            ov = (starts[i - 1] + size - s) * scale
            w[:ov] = (np.arange(ov, dtype=np.float32) + 0.5) / ov
        if i + 1 < len(starts):
            ov = (s + size - starts[i + 1]) * scale
            w[size * scale - ov:] = np.minimum(w[size * scale - ov:], (ov - 0.5 - np.arange(ov, dtype=np.float32)) / ov)
        out.append(w)
    return out


def _tiled(run, component: str, feed: str, output: str, x, tile: int, overlap: int, down: int, up: int,
           check: Check | None = None):
    """``run(component, {feed: tile})[output]`` over overlapping tiles of ``x`` (B, C, H, W), blended. Tiles are
    placed in units of ``down`` input pixels (= ``up`` output pixels): latent pixels for both directions.
    ``check()`` runs before each tile (it raises to stop: a cancelled request stops within one tile)."""
    b, _, H, W = x.shape
    h, w = H // down, W // down
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy, wx = _ramps(ys, th, up), _ramps(xs, tw, up)
    out = total = None
    for y0, ry in zip(ys, wy):
        for x0, rx in zip(xs, wx):
            if check is not None:
                check()
            part = contiguous(x[:, :, y0 * down:(y0 + th) * down, x0 * down:(x0 + tw) * down])
            result = to_host(run(component, {feed: part})[output]).astype(np.float32, copy=False)
            if out is None:
                out = np.zeros((b, result.shape[1], h * up, w * up), dtype=np.float32)
                total = np.zeros((h * up, w * up), dtype=np.float32)  # 1 unless 3 tiles meet
            weight = ry[:, None] * rx[None, :]
            Y, X = y0 * up, x0 * up
            out[:, :, Y:Y + th * up, X:X + tw * up] += result * weight
            total[Y:Y + th * up, X:X + tw * up] += weight
    return out / total


def decode_tiled(run: Callable[[str, Mapping], dict], latent, tile: int, overlap: int,
                 check: Check | None = None) -> np.ndarray:
    """``run("vae_decoder", {"latent": tile})`` over overlapping tiles of ``latent`` (B, 4, h, w) -> the image
    (B, 3, 8h, 8w) float32 on the host, tiles blended linearly over their overlaps."""
    return _tiled(run, "vae_decoder", "latent", "image", latent, tile, overlap, 1, LATENT_SCALE, check)


def encode_tiled(run: Callable[[str, Mapping], dict], image, tile: int, overlap: int,
                 check: Check | None = None) -> np.ndarray:
    """``run("vae_encoder", {"image": tile})`` over overlapping tiles of ``image`` (B, 3, H, W) (tile and overlap
    in latent pixels) -> the latent (B, 4, H/8, W/8) float32 on the host, blended over the overlaps."""
    return _tiled(run, "vae_encoder", "image", "latent", image, tile, overlap, LATENT_SCALE, 1, check)


def _wrap_pad(x, pad: int):
    """``x`` (B, C, H, W) padded by ``pad`` on each side of both spatial axes with its own opposite border."""
    return np.pad(to_host(x), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="wrap")


def decode(run: Callable[[str, Mapping], dict], latent, tiling: VaeTiling | None,
           check: Check | None = None, seamless: bool = False) -> np.ndarray:
    """The VAE decode stage: tiled when ``tiling`` applies to the image size (``check()`` before each tile),
    else one call; ``seamless``: the image wraps around (see the module docstring)."""
    h, w = int(latent.shape[-2]), int(latent.shape[-1])
    if tiling is not None and tiling.applies(w * LATENT_SCALE, h * LATENT_SCALE):
        if seamless:
            pad, crop = tiling.overlap, tiling.overlap * LATENT_SCALE
            image = decode_tiled(run, _wrap_pad(latent, pad), tiling.tile, tiling.overlap, check)
            return np.ascontiguousarray(image[:, :, crop:crop + h * LATENT_SCALE, crop:crop + w * LATENT_SCALE])
        return decode_tiled(run, latent, tiling.tile, tiling.overlap, check)
    component = SEAMLESS["vae_decoder"] if seamless else "vae_decoder"
    return to_host(run(component, {"latent": latent})["image"])


def encode(run: Callable[[str, Mapping], dict], image, tiling: VaeTiling | None,
           check: Check | None = None, seamless: bool = False) -> np.ndarray:
    """The VAE encode (img2img, hires): tiled when ``tiling`` applies to the image size (``check()`` before each
    tile), else one call; ``seamless``: padding wraps around (see the module docstring)."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if tiling is not None and tiling.applies(w, h):
        if seamless:
            pad = tiling.overlap
            latent = encode_tiled(run, _wrap_pad(image, pad * LATENT_SCALE), tiling.tile, tiling.overlap, check)
            return np.ascontiguousarray(latent[:, :, pad:pad + h // LATENT_SCALE, pad:pad + w // LATENT_SCALE])
        return encode_tiled(run, image, tiling.tile, tiling.overlap, check)
    component = SEAMLESS["vae_encoder"] if seamless else "vae_encoder"
    return to_host(run(component, {"image": image})["latent"])
