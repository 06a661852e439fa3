"""Seeded noise exactly like the webui's "CPU" RNG source (modules/rng.py, sd_samplers_common.py).

Image i of a request has its own torch CPU generator seeded with its seed: the initial latent noise is
``torch.randn((4, H/8, W/8), generator=...)`` (with the variation subseed slerped in), and every later draw a
sampler asks for (ancestral noise, churn, restarts) is the next ``randn`` of the same generators, reseeded with
``seed + eta_noise_seed_delta`` after the first draw when ENSD is set. SDE samplers get a Brownian-tree noise
sampler seeded with the batch's seeds (k-diffusion's BrownianTreeNoiseSampler, via torchsde). Noise is always
made on the CPU in float32, so the same seed gives the same image on every machine and backend.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from core.errors import InvalidRequest
from engine.arrays import to_like
from engine.rules import MAX_SEED

Array = Any
NoiseFn = Callable[[float, float], Array]


def resolve_seed(seed: int | None) -> int:
    """webui get_fixed_seed: -1 (or None) draws a random seed in [0, 4294967294); others pass through."""
    if seed is None or seed == -1:
        return int(random.randrange(MAX_SEED))
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise InvalidRequest("seed", f"must be an integer, got {seed!r}", "-1 or an integer")
    return int(seed)


def randn(seed: int, shape: Sequence[int], generator: Any = None) -> Any:
    """webui rng.randn: ``torch.manual_seed(seed); torch.randn(shape)`` on the CPU (own generator, no global)."""
    import torch

    if generator is None:
        generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, device="cpu")


def slerp(val: float, low: Any, high: Any) -> Any:
    """webui rng.slerp, kept exactly (norms over dim 1 and the swapped linear fallback included)."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    """Per-image generators of a batch (webui modules/rng.ImageRNG, "CPU" source).

    ``shape`` is one image's latent shape (4, H/8, W/8). :meth:`first` returns the (B, 4, h, w) initial noise
    (with subseed variation and seed-resize), :meth:`next` the next draw of every image's generator.
    Arrays come back as float32 CPU torch tensors; :func:`to_like` converts them.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 eta_noise_seed_delta: int = 0):
        import torch

        self.shape = tuple(int(v) for v in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.is_first = True

    def first(self) -> Any:
        import torch

        resized = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        noise_shape = (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8) if resized \
            else self.shape
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = randn(subseed, noise_shape)
            if noise_shape != self.shape:
                noise = randn(seed, noise_shape)
            else:
                noise = randn(seed, self.shape, generator=generator)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                x = randn(seed, self.shape, generator=generator)
                dx = (self.shape[2] - noise_shape[2]) // 2
                dy = (self.shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty = max(dx, 0), max(dy, 0)
                dx, dy = max(-dx, 0), max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [torch.Generator("cpu").manual_seed(s + self.eta_noise_seed_delta) for s in self.seeds]
        self.is_first = False
        return torch.stack(xs)

    def next(self) -> Any:
        import torch

        if self.is_first:
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g, device="cpu") for g in self.generators])


class BrownianNoise:
    """k-diffusion BrownianTreeNoiseSampler with one torchsde.BrownianTree per seed (CPU, float32).

    ``noise(sigma, sigma_next)`` = W(sigma_next) - W(sigma) / sqrt(|sigma_next - sigma|), per image.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], sigma_min: float, sigma_max: float):
        import torch
        import torchsde

        self._torch = torch
        t0 = torch.as_tensor(sigma_min, dtype=torch.float32)
        t1 = torch.as_tensor(sigma_max, dtype=torch.float32)
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros(tuple(shape), dtype=torch.float32)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: Any, sigma_next: Any) -> Any:
        torch = self._torch
        t0 = torch.as_tensor(sigma, dtype=torch.float32)
        t1 = torch.as_tensor(sigma_next, dtype=torch.float32)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # torchsde warns when sigma_max itself is asked for (float rounding)
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def make_noise_sampler(like: Array, rng: ImageRNG | None = None, *, brownian: bool = False,
                       seeds: Sequence[int] | None = None, sigmas: Any = None) -> NoiseFn:
    """``noise(sigma, sigma_next) -> array like ``like```` for a sampler.

    Brownian (webui: DPM++ SDE, 2M SDE, 3M SDE): a Brownian tree per seed over [min positive sigma, max sigma];
    otherwise the next draw of ``rng`` (webui's patched ``torch.randn_like``).
    """
    if brownian:
        if seeds is None or sigmas is None:
            raise ValueError("a Brownian noise sampler needs the batch's seeds and the sampling sigmas")
        s = np.asarray([float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)],
                       dtype=np.float32)
        tree = BrownianNoise(tuple(like.shape[1:]), seeds, float(s[s > 0].min()), float(s.max()))
        return lambda sigma, sigma_next: to_like(tree(sigma, sigma_next), like)
    if rng is None:
        raise ValueError("a noise sampler needs the batch's ImageRNG")
    return lambda sigma, sigma_next: to_like(rng.next(), like)
