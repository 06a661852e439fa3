"""Seeded noise like the webui's CPU RNG (modules/rng.py ImageRNG): references are plain torch calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import InvalidRequest
from engine.noise import MAX_SEED, ImageRNG, make_noise_sampler, resolve_seed, slerp

SHAPE = (4, 8, 12)


def webui_randn(seed, shape=SHAPE):
    torch.manual_seed(seed)
    return torch.randn(shape)


def test_first_is_manual_seed_randn_per_image():
    rng = ImageRNG(SHAPE, [123, 124, 7])
    x = rng.first()
    assert x.shape == (3, *SHAPE) and x.dtype == torch.float32
    for i, seed in enumerate([123, 124, 7]):
        assert torch.equal(x[i], webui_randn(seed))


def test_next_continues_each_generator():
    rng = ImageRNG(SHAPE, [5, 6])
    first = rng.next()  # the first next() is first(), as in the webui
    second, third = rng.next(), rng.next()
    for i, seed in enumerate([5, 6]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(first[i], torch.randn(SHAPE, generator=g))
        assert torch.equal(second[i], torch.randn(SHAPE, generator=g))
        assert torch.equal(third[i], torch.randn(SHAPE, generator=g))


def test_eta_noise_seed_delta_reseeds_after_first():
    rng = ImageRNG(SHAPE, [5, 6], eta_noise_seed_delta=31337)
    assert torch.equal(rng.first()[0], webui_randn(5))
    step = rng.next()
    assert torch.equal(step[1], webui_randn(6 + 31337))


def reference_slerp(val, low, high):
    """webui rng.slerp in float64 numpy: norms over dim 1 (of (4, h, w)), linear fallback low*val + high*(1-val)."""
    low, high = low.double().numpy(), high.double().numpy()
    ln = low / np.linalg.norm(low, axis=1, keepdims=True)
    hn = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (ln * hn).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = np.arccos(dot)
    so = np.sin(omega)
    return (np.sin((1.0 - val) * omega) / so)[:, None] * low + (np.sin(val * omega) / so)[:, None] * high


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.8, 1.0])
def test_subseed_slerp(strength):
    rng = ImageRNG(SHAPE, [10, 11], subseeds=[99, 100], subseed_strength=strength)
    x = rng.first()
    for i, (seed, sub) in enumerate([(10, 99), (11, 100)]):
        if strength == 0:
            expected = webui_randn(seed).double().numpy()
        else:
            expected = reference_slerp(strength, webui_randn(seed), webui_randn(sub))
        assert np.abs(x[i].double().numpy() - expected).max() <= 1e-5
    if strength == 1.0:
        assert torch.allclose(x[0], webui_randn(99), atol=1e-5)


def test_slerp_parallel_fallback_keeps_webui_order():
    a = torch.ones(4, 3, 3)
    assert torch.allclose(slerp(0.3, a, a * 2), a * 0.3 + a * 2 * 0.7)


def test_seed_resize_places_old_size_noise_in_the_centre():
    """webui "resize seed from": noise of the old size (randn(seed) at 4 x 32/8 x 48/8) in the centre."""
    rng = ImageRNG(SHAPE, [42], seed_resize_from_h=32, seed_resize_from_w=48)
    x = rng.first()[0]
    small = webui_randn(42, (4, 4, 6))
    assert torch.equal(x[:, 2:6, 3:9], small)


def test_resolve_seed():
    assert resolve_seed(1234) == 1234
    drawn = {resolve_seed(-1) for _ in range(20)}
    assert all(0 <= s < MAX_SEED for s in drawn) and len(drawn) > 1
    with pytest.raises(InvalidRequest) as e:
        resolve_seed("7")
    assert e.value.field == "seed"


def test_noise_sampler_returns_arrays_like_x():
    rng = ImageRNG(SHAPE, [3])
    x0 = rng.first()
    x = x0.numpy() * 14.6
    noise = make_noise_sampler(x, rng)
    n = noise(14.6, 10.0)
    assert isinstance(n, np.ndarray) and n.dtype == np.float32 and n.shape == x.shape
    g = torch.Generator().manual_seed(3)
    torch.randn(SHAPE, generator=g)
    assert np.array_equal(n[0], torch.randn(SHAPE, generator=g).numpy())
    t = make_noise_sampler(torch.zeros(1, *SHAPE, dtype=torch.float64), ImageRNG(SHAPE, [3]))(1.0, 0.5)
    assert t.dtype == torch.float64


def test_brownian_noise_sampler_is_deterministic_per_seed():
    x = torch.zeros(2, *SHAPE)
    sig = np.array([10.0, 3.0, 1.0, 0.1, 0.0], np.float32)
    a = make_noise_sampler(x, brownian=True, seeds=[1, 2], sigmas=sig)(10.0, 3.0)
    b = make_noise_sampler(x[:1], brownian=True, seeds=[1], sigmas=sig)(10.0, 3.0)
    assert torch.equal(a[0], b[0])  # an image's noise does not depend on the rest of the batch
    assert not torch.equal(a[0], a[1])
    assert 0.8 < a.std().item() < 1.2
