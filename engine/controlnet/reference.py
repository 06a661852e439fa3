"""sd-webui-controlnet's ``reference_only``: attention injection from a reference image, no ControlNet model.

What the extension does (scripts/hook.py: the AttentionInjection parts of ``UnetHook.forward`` and
``hacked_basic_transformer_inner_forward``), and what is implemented here:

* The unit's image (its detected map: the image itself, fitted to the pass's size with the unit's resize mode) is
  VAE-encoded once per pass; the latent is repeated over the rows the UNet runs.
* At every model evaluation where the unit is active (its guidance window, as ControlNet units), before the UNet
  runs: ``ref_xt = sqrt(a_t) * latent + sqrt(1 - a_t) * noise`` (q_sample at ``t = round(timestep)``, fresh noise
  per evaluation and row), and the UNet runs once on ``ref_xt`` with the same timesteps and text context in
  "write" mode: every self-attention layer (``attn1`` of a transformer block) whose ``attn_weight`` is below the
  unit's weight stores its input hidden states (``norm1(x)``) in its bank, with the unit's style fidelity.
* ``attn_weight``: the transformer blocks sorted by channels, widest first (a stable sort of the UNet's order:
  down blocks, middle block, up blocks), block i of N has ``i / N``: weight 1 writes every layer, 0.5 the wider
  (deeper) half, 0 none.
* The main UNet pass then "reads": a layer with a bank attends to ``cat([own, *bank], tokens)`` (``out_ref``);
  with ``style`` the mean of its banked fidelities, the rows of negative prompts get ``style * plain +
  (1 - style) * out_ref`` (``plain``: ordinary self-attention; only when style > 1e-5) and the other rows
  ``out_ref``. Several reference units each run a write pass; their banks concatenate.
* Style fidelity = ``clamp(threshold_a, 0, 1)`` (default 0.5); SDXL: cubed; "ControlNet is more important": 1;
  "My prompt is more important" (soft injection) or the hires fix's pass: 0.

Not implemented: ``reference_adain`` / ``reference_adain+attn`` (the group-norm statistics hooks): refused at
submit by the preprocessor registry, naming the module. The noise of ``q_sample`` is the engine's own seeded draw
(the extension uses torch's global generator), so images are reproducible for a seed but not the webui's pixels.

The hooks need attention processors on the UNet's modules: a backend that can install them has
``self_attention_layers()`` and ``attention_processors(mapping)`` (the torch backend); the pipeline serves
reference units on a torch runtime when its own backend runs exported graphs (docs/DECISIONS.md).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from engine.arrays import as_like, to_host
from engine.controlnet.units import ControlMode, PreparedUnit, active

log = logging.getLogger(__name__)

Array = Any
STYLE_EPS = 1e-5  # below it the negative rows get no plain self-attention (the extension's threshold)


def supports_reference(backend: Any) -> bool:
    """Whether ``backend`` can install attention processors (the torch backend)."""
    return hasattr(backend, "attention_processors") and hasattr(backend, "self_attention_layers")


def style_fidelity(unit: PreparedUnit, *, sdxl: bool = False, hires: bool = False) -> float:
    """The extension's style fidelity of a reference unit (see the module docstring)."""
    value = 0.5 if unit.threshold_a is None else float(unit.threshold_a)
    value = max(0.0, min(1.0, value))
    if sdxl:
        value = value ** 3.0
    if unit.control_mode is ControlMode.CONTROL:
        return 1.0
    if unit.control_mode.soft_injection or hires:
        return 0.0
    return value


def attention_weights(channels: Sequence[int]) -> list[float]:
    """``attn_weight`` of each layer (given in UNet order by its channel count): i / N in the order of a stable
    sort by channels, widest first."""
    order = sorted(range(len(channels)), key=lambda k: -channels[k])
    weights = [0.0] * len(channels)
    for i, k in enumerate(order):
        weights[k] = float(i) / float(len(channels))
    return weights


@dataclass
class _State:
    """What the processors of one UNet share during one model evaluation."""

    mode: str = "off"  # "write" | "read" | "off"
    weight: float = 0.0  # the writing unit's weight
    fidelity: float = 0.0  # the writing unit's style fidelity
    uncond_rows: list[int] = field(default_factory=list)


class ReferenceProcessor:
    """A diffusers attention processor for one self-attention (attn1) layer: writes its input to its bank, or
    reads the bank (see the module docstring); otherwise the layer's own processor runs."""

    def __init__(self, state: _State, attn_weight: float, inner: Any, plain: Any):
        self.state = state
        self.attn_weight = attn_weight
        self.inner = inner  # the layer's processor (fused, SDPA, ...)
        self.plain = plain  # diffusers AttnProcessor2_0: unfused projections, any key/value length
        self.bank: list[Array] = []
        self.fidelities: list[float] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        state = self.state
        if state.mode == "write" and state.weight > self.attn_weight:
            self.bank.append(hidden_states.detach().clone())
            self.fidelities.append(state.fidelity)
        if state.mode == "read" and self.bank:
            import torch

            style = sum(self.fidelities) / float(len(self.fidelities))
            context = torch.cat([hidden_states] + [b.to(hidden_states.dtype) for b in self.bank], dim=1)
            out_ref = self.plain(attn, hidden_states, context, attention_mask)
            out = out_ref
            if state.uncond_rows and style > STYLE_EPS:
                rows = torch.as_tensor(state.uncond_rows, device=hidden_states.device)
                out_c = out_ref.clone()
                out_c[rows] = self.plain(attn, hidden_states[rows], None, attention_mask)
                out = style * out_c + (1.0 - style) * out_ref
            self.clear()
            return out
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def clear(self) -> None:
        self.bank = []
        self.fidelities = []


class ReferenceInjection:
    """The reference units of one sampling pass over a backend that can hook attention.

    ``encode(pixels (1, 3, H, W) in [0, 1]) -> latent (1, C, h, w)`` is the backend's VAE encoder (as img2img);
    ``alphas_cumprod`` the model's noise schedule (T entries); ``seed`` seeds the q_sample noise.
    :meth:`inject` wraps one model evaluation.
    """

    def __init__(self, backend: Any, units: Sequence[PreparedUnit], steps: int, alphas_cumprod: np.ndarray,
                 encode: Callable[[np.ndarray], Array], *, seed: int, sdxl: bool = False, hires: bool = False):
        self.backend = backend
        self.units = [u for u in units if u.reference]
        self.steps = steps
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.encode = encode
        self.sdxl = sdxl
        self.hires = hires
        self.rng = np.random.default_rng(seed)
        self._latents: dict[int, np.ndarray] = {}
        self._layers: list | None = None

    def latent(self, k: int) -> np.ndarray:
        """The VAE latent of reference unit ``k`` (1, C, h, w), encoded once."""
        if k not in self._latents:
            self._latents[k] = to_host(self.encode(self.units[k].image)).astype(np.float32)
        return self._latents[k]

    def noised(self, k: int, timesteps: np.ndarray, rows: int) -> np.ndarray:
        """q_sample of unit ``k``'s latent at ``round(timesteps)`` (one per row), fresh noise per row."""
        latent = self.latent(k)
        t = np.clip(np.round(np.asarray(timesteps, dtype=np.float64)).astype(np.int64), 0,
                    len(self.alphas_cumprod) - 1)
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noise = self.rng.standard_normal((rows,) + latent.shape[1:])
        return (np.sqrt(a) * latent + np.sqrt(1.0 - a) * noise).astype(np.float32)

    def _processors(self, state: _State) -> dict:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if self._layers is None:
            self._layers = list(self.backend.self_attention_layers())
        weights = attention_weights([channels for _, channels in self._layers])
        plain = AttnProcessor2_0()
        return {attn: ReferenceProcessor(state, w, attn.processor, plain)
                for (attn, _), w in zip(self._layers, weights)}

    @contextlib.contextmanager
    def inject(self, run: Callable[[str, Mapping[str, Array]], Mapping[str, Array]], feeds: Mapping[str, Array],
               step: int, cond_mask: np.ndarray | None) -> Iterator[None]:
        """Around one model evaluation (``feeds``: the plain ``unet`` feeds; ``cond_mask`` 1 for rows of positive
        prompts): the write pass of every active reference unit, then the main pass reads (inside the block)."""
        todo = [k for k, u in enumerate(self.units) if u.weight > 0 and active(u, step, self.steps)]
        if not todo:
            yield
            return
        rows = int(feeds["sample"].shape[0])
        uncond = [] if cond_mask is None else [int(i) for i in np.flatnonzero(np.asarray(cond_mask) < 0.5)]
        state = _State(uncond_rows=uncond)
        timesteps = to_host(feeds["timestep"]).reshape(-1)
        with self.backend.attention_processors(self._processors(state)):
            for k in todo:
                unit = self.units[k]
                state.mode, state.weight = "write", float(unit.weight)
                state.fidelity = style_fidelity(unit, sdxl=self.sdxl, hires=self.hires)
                ref = as_like(self.noised(k, timesteps, rows), feeds["sample"])
                run("unet", {**feeds, "sample": ref})
            state.mode = "read"
            yield
