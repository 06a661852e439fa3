"""The model side of sampling: model sigmas, sigma <-> timestep, eps/v scalings and classifier-free guidance.

A :class:`Denoiser` is the ``denoise(x, sigma) -> x0`` callable every sampler takes (k-diffusion's
``CompVisDenoiser`` / ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser`` wrapped in the webui's
``CFGDenoiser``). It works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from engine.conditioning import StepConditioning
from core.errors import InvalidRequest
from engine.arrays import as_like, floats, is_numpy, stack, take_rows
from engine.schedule import PREDICTION_TYPES, ModelSchedule

Array = Any
ModelFn = Callable[[Array, Array, StepConditioning, int], Array]



@dataclass(frozen=True)
class _Rows:
    image: tuple[int, ...]  # image index of every conditioning row the model runs
    cond: StepConditioning


class Denoiser:
    """``denoise(x, sigma) -> x0`` with classifier-free guidance over a :class:`StepConditioning`, in one model call.

    ``model(x_in, t_in, cond, step)`` returns the raw UNet output (eps or v) for the M conditioning rows of
    ``cond`` (x_in (M,4,h,w) already scaled by c_in, t_in (M,) float32 timesteps). ``conditioning(step)`` gives
    the StepConditioning of sampling step ``step``, which is derived from sigma against ``sigmas`` (the largest
    i with sigmas[i] >= sigma), so second-order samplers' intermediate evaluations belong to their step.

    ``s_min_uncond`` > 0 (the webui's "NGMS", negative guidance minimum sigma): a call whose first sigma is below
    it skips the negative rows and combines at CFG scale 1, on odd-numbered calls only (the webui's ``self.step``
    counts denoiser calls from 0 per pass) unless ``s_min_uncond_all``. ``skipped`` counts the calls it skipped.
    """

    def __init__(self, model: ModelFn, schedule: ModelSchedule, prediction_type: str, cfg_scale: float,
                 conditioning: Callable[[int], StepConditioning], sigmas: Sequence[float] | Array,
                 s_min_uncond: float = 0.0, s_min_uncond_all: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise InvalidRequest("prediction_type", f"unknown prediction type {prediction_type!r}",
                                 ", ".join(PREDICTION_TYPES))
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.cfg_scale = float(cfg_scale)
        self.conditioning = conditioning
        self.sigmas = floats(sigmas)
        self.last = None  # (x0 rows, their conditioning, the CFG result, negative rows run) of the last call
        self.s_min_uncond = float(s_min_uncond)
        self.s_min_uncond_all = bool(s_min_uncond_all)
        self.calls = 0  # the webui CFGDenoiser's self.step: denoiser calls of this pass
        self.skipped = 0  # calls that skipped the negative rows (NGMS)

    def step_of(self, sigma: float) -> int:
        """Largest i with sigmas[i] >= sigma (relative tolerance 1e-5), clamped to [0, len(sigmas) - 2]."""
        i = 0
        for j, s in enumerate(self.sigmas[:-1]):
            if s >= sigma * (1 - 1e-5):
                i = j
        return i

    def skip_uncond(self, sigma: float) -> bool:
        """webui CFGDenoiser: ``(step % 2 or s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond``
        (only where the negative rows run at all: cfg_scale > 1)."""
        return (self.cfg_scale > 1 and self.s_min_uncond > 0 and sigma < self.s_min_uncond
                and bool(self.calls % 2 or self.s_min_uncond_all))

    def rows(self, cond: StepConditioning, negatives: bool = True) -> _Rows:
        """The (conditioning row, image) pairs to run: every positive AND-part of every image, then (only when
        cfg_scale > 1 and ``negatives``) every image's negative. When that is not simply rows 0..k-1 (a negative row shared by
        several images, say), the conditioning arrays are gathered so that each run row has its own x."""
        pairs = [(row, b) for b, parts in enumerate(cond.positive) for row, _ in parts]
        negatives = negatives and self.cfg_scale > 1
        if negatives:
            pairs += [(row, b) for b, row in enumerate(cond.negative)]
        order = [row for row, _ in pairs]
        image = tuple(b for _, b in pairs)
        arrays = {name: getattr(cond, name) for name in ("context", "pooled", "time_ids")
                  if getattr(cond, name) is not None}
        if order == list(range(len(cond.context))):
            return _Rows(image, cond)
        if order == list(range(len(order))):  # the first k rows (cfg <= 1: the positives)
            taken = {name: value[: len(order)] for name, value in arrays.items()}
        else:
            taken = {name: value[order] for name, value in arrays.items()}
        position = iter(range(len(pairs)))
        positive = tuple(tuple((next(position), w) for _, w in parts) for parts in cond.positive)
        negative = tuple(next(position) for _ in cond.negative) if negatives else ()
        return _Rows(image, replace(cond, positive=positive, negative=negative, **taken))

    def __call__(self, x: Array, sigma: Any) -> Array:
        batch = int(x.shape[0])
        sigmas_b = floats(sigma) if len(getattr(sigma, "shape", ())) > 0 else [float(sigma)]
        if len(sigmas_b) != batch:
            sigmas_b = sigmas_b[:1] * batch
        step = self.step_of(max(sigmas_b))
        skip = self.skip_uncond(sigmas_b[0])
        self.calls += 1
        self.skipped += skip
        rows = self.rows(self.conditioning(step), negatives=not skip)
        idx = list(rows.image)
        s_rows = [sigmas_b[b] for b in idx]
        t_rows = self.schedule.sigma_to_t(np.asarray(s_rows, dtype=np.float64))
        x_rows = take_rows(x, idx)
        c_in = self._col([1 / math.sqrt(s * s + 1) for s in s_rows], x)
        raw = self.model(x_rows * c_in, as_like(t_rows, x, dtype=_f32(x)), rows.cond, step)
        if self.prediction_type == "epsilon" or self.schedule.lcm_skip:
            x0 = x_rows + raw * self._col([-s for s in s_rows], x)
        else:  # v: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1)
            x0 = raw * self._col([-s / math.sqrt(s * s + 1) for s in s_rows], x) + \
                x_rows * self._col([1 / (s * s + 1) for s in s_rows], x)
        if self.schedule.lcm_skip:  # LCM boundary condition on the timestep * 10 (webui get_scaled_out)
            ts = [float(v) * 10 for v in np.atleast_1d(t_rows)]
            x0 = x0 * self._col([v / math.sqrt(v * v + 0.25) for v in ts], x) + \
                x_rows * self._col([0.25 / (v * v + 0.25) for v in ts], x)
        out = self.combine(x0, rows.cond, skip)
        self.last = (x0, rows.cond, out, self.cfg_scale > 1 and not skip)  # live previews (engine.preview.select): references, no copy
        return out

    def combine(self, x0: Array, cond: StepConditioning, skipped: bool = False) -> Array:
        """webui CFGDenoiser.combine_denoised: uncond + sum w * cfg * (x0[row] - uncond), per image. ``skipped``
        (NGMS): the image's first positive row stands in for the uncond and the scale is 1, as the webui does."""
        out = []
        for b, parts in enumerate(cond.positive):
            if skipped:
                uncond = x0[parts[0][0]]
                acc = uncond
                for row, w in parts:
                    acc = acc + (x0[row] - uncond) * w
                out.append(acc)
                continue
            if self.cfg_scale <= 1:
                total = sum(w for _, w in parts) or 1.0
                acc = None
                for row, w in parts:
                    term = x0[row] * (w / total)
                    acc = term if acc is None else acc + term
                out.append(acc)
                continue
            uncond = x0[cond.negative[b]]
            acc = uncond
            for row, w in parts:
                acc = acc + (x0[row] - uncond) * (w * self.cfg_scale)
            out.append(acc)
        return stack(out)

    @staticmethod
    def _col(values: list[float], like: Array) -> Any:
        """Per-row scalars as a (M,1,1,1) array, or a float when all are equal."""
        if all(v == values[0] for v in values):
            return values[0]
        return as_like(np.asarray(values, dtype=np.float64).reshape(-1, 1, 1, 1), like)


def _f32(x: Array) -> Any:
    if is_numpy(x):
        return np.float32
    import torch

    return torch.float32


class LatentBlend:
    """Inpainting with a normal checkpoint (webui CFGDenoiser with ``mask_before_denoising`` off): after every
    denoiser call the kept region of the prediction is replaced by the init latent,
    ``denoised = init * mask + nmask * denoised`` (``nmask`` 1 where the image is repainted, ``mask = 1 - nmask``);
    :meth:`final` applies the same blend to the sampler's result, as the webui's ``sample`` does."""

    def __init__(self, denoise: Callable[[Array, Any], Array], init: Array, nmask: Array):
        self.denoise = denoise
        self.init = init
        self.nmask = nmask
        self.mask = 1.0 - nmask

    def __call__(self, x: Array, sigma: Any) -> Array:
        return self.init * self.mask + self.nmask * self.denoise(x, sigma)

    def final(self, x: Array) -> Array:
        return x * self.nmask + self.init * self.mask
