"""sd-webui-controlnet's ``tile_colorfix`` and ``tile_colorfix+sharp``: a colour fix of every model output.

The modules' map is the image itself (the extension's ``identity``), fitted to the pass's size as any detected map,
and the unit's ControlNet (a tile model) runs on it as usual. What sets them apart is a post-processing of the UNet's
output at every model evaluation (scripts/hook.py, "Post-processing for color fix"), written here as the extension
writes it:

* The unit's map is VAE-encoded once per pass (``x0_origin``, the scaled latent; the extension's
  ``used_hint_cond_latent``).
* ``k = int(Variation)`` (threshold_a, 3..32, default 8), doubled in the hires fix's second pass.
* From the output ``eps`` and the UNet's input ``xt`` at ``t = round(timestep)``: ``x0_prd = sqrt(1 / a_t) * xt -
  sqrt(1 / a_t - 1) * eps`` (ldm's predict_start_from_noise), then ``x0 = x0_prd - blur(x0_prd, k) +
  blur(x0_origin, k)``: the prediction's low frequencies replaced by the image's. ``blur`` is the extension's: edge
  replicated by ``k``, mean over ``(2k + 1)^2``.
* ``+sharp``: with ``d = Sharpness * 0.01`` (threshold_b, 0..2, default 1), the rows of negative prompts take ``d *
  blur(x0, k) + (1 - d) * x0``; the positive rows keep ``x0``.
* ``eps' = (sqrt(1 / a_t) * xt - x0) / sqrt(1 / a_t - 1)`` (predict_noise_from_start), and the output becomes
  ``w * eps' + (1 - w) * eps`` with ``w`` the unit's weight clamped to [0, 1].

As in the extension the fix applies at every evaluation of the pass (it does not look at the guidance window), and
its formula reads the output as eps whatever the model predicts (a v-prediction model gets the same arithmetic).
Units run in order, each on the previous one's result. Only the passes a unit acts in (its ``hr_option``) have the
fix: the extension also colour-fixes a pass that its ``hr_option`` turns the ControlNet off for (docs/DECISIONS.md).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from engine.arrays import as_like, to_host

Array = Any
COLORFIX_MODULES = ("tile_colorfix", "tile_colorfix+sharp")


def blur(x, k: int):
    """The extension's ``blur``: replicate-pad by ``k``, average over (2k+1) x (2k+1), stride 1 (torch tensors)."""
    import torch.nn.functional as F

    y = F.pad(x, (k, k, k, k), mode="replicate")
    return F.avg_pool2d(y, (k * 2 + 1, k * 2 + 1), stride=(1, 1))


def colorfix(xt, eps, t, latent, alphas_cumprod, k: int, weight: float, sharpness: float | None = None,
             cond_mask=None):
    """One unit's fix of the output ``eps`` (M, C, h, w) for the input ``xt`` at float timesteps ``t`` (M,);
    ``latent`` (1, C, h, w) the unit's encoded image; ``sharpness``: threshold_b of ``+sharp`` (None: plain);
    ``cond_mask`` (M,) 1 for rows of positive prompts. float64 torch tensors in, the same out."""
    import torch

    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=xt.device)
    steps = torch.round(t.double()).long().clamp(0, len(alphas) - 1).to(xt.device)
    a = alphas[steps].reshape(-1, 1, 1, 1)
    recip, recipm1 = torch.sqrt(1.0 / a), torch.sqrt(1.0 / a - 1.0)
    x0_prd = recip * xt - recipm1 * eps
    x0 = x0_prd - blur(x0_prd, k) + blur(latent.expand_as(x0_prd), k)
    if sharpness is not None:
        detail = float(sharpness) * 0.01
        neg = detail * blur(x0, k) + (1 - detail) * x0
        mark = torch.as_tensor(np.asarray(cond_mask, dtype=np.float64), device=xt.device).reshape(-1, 1, 1, 1)
        x0 = mark * x0 + (1 - mark) * neg
    eps_prd = (recip * xt - x0) / recipm1
    w = max(0.0, min(1.0, float(weight)))
    return eps_prd * w + eps * (1 - w)


class ColorFix:
    """The colour-fix units of one sampling pass: :meth:`apply` post-processes each model evaluation's output.
    ``encode(pixels (1, 3, H, W) in [0, 1]) -> latent (1, C, h, w)`` is the backend's VAE encoder (scaled, as
    img2img); ``alphas_cumprod`` the model's schedule; ``hires``: the hires fix's second pass (k doubled)."""

    def __init__(self, units: Sequence, alphas_cumprod: np.ndarray, encode: Callable[[np.ndarray], Array], *,
                 hires: bool = False):
        self.units = [u for u in units if u.module in COLORFIX_MODULES]
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.encode = encode
        self.hires = hires
        self._latents: dict = {}  # (unit, device) -> its encoded image, float64, made once per pass
        self._alphas: dict = {}  # device -> the schedule as a float64 tensor

    def latent(self, i: int, device=None):
        """Unit ``i``'s encoded image (1, C, h, w) as a float64 tensor on ``device``, encoded once."""
        import torch

        key = (i, str(device))
        if key not in self._latents:
            host = to_host(self.encode(self.units[i].image)).astype(np.float64)
            self._latents[key] = torch.as_tensor(host, device=device)
        return self._latents[key]

    def apply(self, xt: Array, t: Array, out: Array, cond_mask: np.ndarray) -> Array:
        """The output ``out`` of the UNet on ``xt`` at timesteps ``t`` after every unit's fix, in ``out``'s kind
        (numpy or torch), dtype and device; a torch output is fixed on its own device (no host round trip)."""
        import torch

        device = None if isinstance(out, np.ndarray) else out.device
        x = torch.as_tensor(xt, device=device).double()
        eps = torch.as_tensor(out, device=device).double()
        steps = torch.as_tensor(t, device=device).double().reshape(-1)
        if str(device) not in self._alphas:
            self._alphas[str(device)] = torch.as_tensor(self.alphas_cumprod, device=device)
        for i, unit in enumerate(self.units):
            k = int(unit.threshold_a if unit.threshold_a is not None else 8)
            if self.hires:
                k *= 2
            sharp = unit.threshold_b if unit.module == "tile_colorfix+sharp" else None
            if unit.module == "tile_colorfix+sharp" and sharp is None:
                sharp = 1.0
            eps = colorfix(x, eps, steps, self.latent(i, device), self._alphas[str(device)], k, unit.weight, sharp,
                           cond_mask)
        return as_like(eps, out)
