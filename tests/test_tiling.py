"""Tiled VAE decode (engine.tiling, issue 12): the blend is exact for a pointwise decoder on any size (numpy and
torch arrays), and the real engine's tiled decode of a tiny model matches its untiled decode with no seam."""

from __future__ import annotations

import numpy as np
import pytest

from engine.tiling import LATENT_SCALE, VaeTiling, decode, decode_tiled, tile_starts


def _pointwise(component, feeds):
    """A decoder whose pixels depend only on their own latent pixel: tiling must not change it at all."""
    assert component == "vae_decoder"
    x = feeds["latent"]
    x = x.numpy() if hasattr(x, "numpy") else x
    assert x.flags["C_CONTIGUOUS"]
    rgb = np.tanh(x[:, :3] * 0.7 + x[:, 3:4])
    return {"image": rgb.repeat(LATENT_SCALE, axis=2).repeat(LATENT_SCALE, axis=3)}


@pytest.mark.parametrize("h,w,tile,overlap", [(24, 40, 16, 6), (113, 70, 64, 16), (9, 30, 8, 3), (8, 8, 16, 4)])
def test_blend_is_exact_for_a_pointwise_decoder(h, w, tile, overlap):
    """Every pixel's blend weights sum to 1, also where three tiles meet (113 = 3 tiles of 64 at stride 24.5)."""
    latent = np.random.default_rng(0).standard_normal((2, 4, h, w)).astype(np.float32)
    starts = tile_starts(h, min(tile, h), overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, h) == h
    assert all(a + min(tile, h) - b >= overlap for a, b in zip(starts, starts[1:]))
    np.testing.assert_allclose(decode_tiled(_pointwise, latent, tile, overlap), _pointwise("vae_decoder", {
        "latent": latent})["image"], atol=1e-6)


def test_blend_on_torch_tensors():
    torch = pytest.importorskip("torch")
    latent = torch.randn(1, 4, 30, 20, generator=torch.Generator().manual_seed(0))
    out = decode(_pointwise, latent, VaeTiling(tile=12, overlap=4, above_px=64))
    np.testing.assert_allclose(out, _pointwise("vae_decoder", {"latent": latent.numpy()})["image"], atol=1e-6)


def test_when_to_tile():
    t = VaeTiling()  # 64-latent tiles (512 px) above 768^2
    assert not t.applies(768, 768) and t.applies(1024, 1024) and t.applies(2048, 512)
    assert not t.applies(4096, 64)  # fewer pixels than 768^2
    assert t.tile_shape(1024, 1024) == (512, 512) and t.tile_shape(512, 512) == (512, 512)
    assert not VaeTiling(tile=0).applies(4096, 4096)
    with pytest.raises(ValueError):
        VaeTiling(tile=16, overlap=10)


def _generate(store, cache, backend, tiling):
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    engine = Engine(models_dir=store, cache_dir=cache, backend=backend, vae_tiling=tiling)
    result = engine.generate(GenerationRequest(model="tiny-sd1", steps=2, width=256, height=192, seed=3))
    return result.images[0].astype(np.float32) / 255


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_tiled_decode_matches_untiled_without_seams(tiny_store, tmp_path_factory, backend):
    """Reference: the same engine's untiled decode. tiny-sd1's VAE at 256x192 (a 32x24 latent) in 16-latent tiles
    overlapping by 6 (3x2 tiles): its decoder sees the whole latent through GroupNorm statistics and the
    mid-block attention, so tiles differ from the whole a little: measured mean 0.006, max 0.047 (of 1).
    Tolerance: mean <= 0.015, max <= 0.1. Seams: along every tile edge the pixel jump across the edge differs
    from the untiled image's jump by <= 0.05 (measured <= 0.024; a hard seam would show the 0.1-0.2 contrast
    of the image), and the pixels on the edge differ from the untiled ones by <= 0.07."""
    cache = tmp_path_factory.getbasetemp() / "api-engine-cache"
    cache.mkdir(exist_ok=True)
    tiling = VaeTiling(tile=16, overlap=6, above_px=128)
    plain = _generate(tiny_store, cache, backend, VaeTiling(tile=0))
    tiled = _generate(tiny_store, cache, backend, tiling)
    assert plain.std() > 0.05  # an image with structure, not a flat field
    diff = np.abs(plain - tiled)
    assert diff.mean() <= 0.015 and diff.max() <= 0.1, (diff.mean(), diff.max())
    for axis, n in ((0, 192 // LATENT_SCALE), (1, 256 // LATENT_SCALE)):
        starts = tile_starts(n, tiling.tile, tiling.overlap)
        assert len(starts) > 1
        edges = sorted({s * LATENT_SCALE for s in starts[1:]} | {(s + tiling.tile) * LATENT_SCALE for s in starts[:-1]})
        jump_tiled = np.abs(np.diff(tiled, axis=axis))
        jump_plain = np.abs(np.diff(plain, axis=axis))
        for edge in edges:
            seam = np.abs(jump_tiled.take(edge - 1, axis=axis) - jump_plain.take(edge - 1, axis=axis)).max()
            assert seam <= 0.05, (axis, edge, seam)
            assert max(diff.take(edge - 1, axis=axis).max(), diff.take(edge, axis=axis).max()) <= 0.07


def _pool_encoder(component, feeds):
    """An encoder whose latent pixel depends only on its own 8x8 image block: tiling must not change it."""
    assert component == "vae_encoder"
    x = feeds["image"]
    b, c, H, W = x.shape
    pooled = x.reshape(b, c, H // LATENT_SCALE, LATENT_SCALE, W // LATENT_SCALE, LATENT_SCALE).mean(axis=(3, 5))
    return {"latent": np.concatenate([pooled, pooled[:, :1] * pooled[:, 2:3]], axis=1)}


@pytest.mark.parametrize("h,w,tile,overlap", [(24, 40, 16, 6), (113, 9, 64, 16)])
def test_tiled_encode_is_exact_for_a_blockwise_encoder(h, w, tile, overlap):
    from engine.tiling import encode

    image = np.random.default_rng(1).random((2, 3, h * LATENT_SCALE, w * LATENT_SCALE)).astype(np.float32)
    tiling = VaeTiling(tile=tile, overlap=overlap, above_px=8)
    assert tiling.applies(w * LATENT_SCALE, h * LATENT_SCALE)
    np.testing.assert_allclose(encode(_pool_encoder, image, tiling), _pool_encoder("vae_encoder", {
        "image": image})["latent"], atol=1e-6)


def test_tiled_encode_of_the_tiny_vae(tiny_store, tmp_path_factory):
    """Reference: the untiled encode on the same backend (ONNX Runtime). tiny-sd1's random encoder (GroupNorm
    statistics and mid-block attention over its input) at 256x192 in 24-latent tiles overlapping by 8:
    measured mean 0.0052, max 0.061 against latents of std 0.051. Tolerance: mean <= 0.2 x std, max <= 2 x std."""
    from engine.pipeline import Engine
    from engine.tiling import encode

    cache = tmp_path_factory.getbasetemp() / "api-engine-cache"
    cache.mkdir(exist_ok=True)
    run = Engine(models_dir=tiny_store, cache_dir=cache, backend="onnxruntime").runtime("tiny-sd1").backend.run
    yy, xx = np.mgrid[0:192, 0:256] / 64.0
    image = np.stack([0.5 + 0.4 * np.sin(xx * 1.3 + yy), 0.5 + 0.4 * np.cos(yy * 1.7),
                      ((xx - 2) ** 2 + (yy - 1.5) ** 2 < 1) * 0.8 + 0.1])[None].astype(np.float32)
    whole = encode(run, image, None)
    tiled = encode(run, image, VaeTiling(tile=24, overlap=8, above_px=128))
    diff = np.abs(whole - tiled)
    assert whole.shape == tiled.shape == (1, 4, 24, 32)
    assert diff.mean() <= 0.2 * whole.std() and diff.max() <= 2 * whole.std(), (diff.mean(), diff.max(), whole.std())
