"""The SDXL refiner as the webui runs it (``refiner_checkpoint``, ``refiner_switch_at``), and the checks of a second
checkpoint in a request (the refiner, the hires fix's ``hr_checkpoint_name``).

The webui (modules/sd_samplers_common.apply_refiner, called by the CFG denoiser before each model call) switches
to the refiner checkpoint inside the same sampling run: the sampler, its noise and its sigmas go on, only the
model (and the conditioning, encoded by the refiner's own text encoder) changes. The switch rule, on the model's
discrete sigmas (the default; ``refiner_switch_by_sample_steps`` is not served)::

    t = argmin |model_sigmas - max(sigma)|        # the discrete timestep nearest the call's sigma
    completed_ratio = (999 - t) / 1000
    switch when refiner_switch_at is None or completed_ratio >= refiner_switch_at   (once; then the refiner stays)

so ``refiner_switch_at`` 1.0 never switches (the ratio is at most 0.999): the same pixels as no refiner, and no
"Refiner" fields in the infotext (the webui writes them when the switch happens). With the hires fix the refiner
acts in the second pass only (the webui's default ``hires_fix_refiner_pass`` "second pass").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from core.errors import InvalidRequest
from engine.models.family import FAMILIES, Kind

log = logging.getLogger(__name__)


def completed_ratio(model_sigmas, sigma) -> float:
    """The webui's completed ratio at a model call of noise level ``sigma`` (a number or an array of the batch's):
    ``(999 - t) / 1000`` with ``t`` the index of the model's discrete sigma nearest ``max(sigma)``."""
    table = np.asarray(model_sigmas, dtype=np.float32)
    s = np.float32(np.max(np.asarray(_host(sigma), dtype=np.float32)))
    t = int(np.argmin(np.abs(table - s)))
    return (999 - t) / 1000


def switches(model_sigmas, sigma, switch_at: float | None) -> bool:
    """Whether the refiner takes over at this call (the webui's rule; ``switch_at`` None: at once)."""
    return switch_at is None or completed_ratio(model_sigmas, sigma) >= switch_at


def _host(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return value


class RefinerSwitch:
    """``denoise(x, sigma) -> x0``: the base model's denoiser until :func:`switches` holds at a call's sigma, then
    the refiner's (made by ``make_refiner()`` at that moment: its conditioning is encoded then, as the webui's
    setup_conds) for the rest of the run. ``on_switch()`` runs once, before the refiner's first call."""

    def __init__(self, base: Callable, make_refiner: Callable[[], Callable], model_sigmas, switch_at: float | None,
                 on_switch: Callable[[], None] | None = None):
        self.active = base
        self.make_refiner = make_refiner
        self.model_sigmas = np.asarray(model_sigmas, dtype=np.float32)
        self.switch_at = switch_at
        self.on_switch = on_switch
        self.switched = False
        self.calls = 0  # model calls so far; the switch's index is kept in ``switch_call``
        self.switch_call: int | None = None

    def __call__(self, x, sigma):
        if not self.switched and switches(self.model_sigmas, sigma, self.switch_at):
            self.switched, self.switch_call = True, self.calls
            if self.on_switch is not None:
                self.on_switch()
            self.active = self.make_refiner()
        self.calls += 1
        return self.active(x, sigma)

    @property
    def last(self):
        """The active denoiser's last call (live previews, engine.preview)."""
        return getattr(self.active, "last", None)


def check_second_checkpoint(base_arch, other_arch, base_name: str, other_name: str, field: str,
                            controlnet_units: int = 0) -> None:
    """InvalidRequest naming ``field`` unless the checkpoint ``other_name`` (the refiner, the hires checkpoint) can
    take over ``base_name``'s latents: a checkpoint family of the same latent space (engine.models.family); a
    hires checkpoint with ``controlnet_units`` is refused (the units' models are loaded for the request's
    checkpoint). Called at submit (engine.admission) and again when the engine loads the checkpoints."""
    if field == "hires.checkpoint" and controlnet_units:
        raise InvalidRequest(field, "a hires checkpoint with ControlNet units is not supported (the units' models "
                             "are loaded for the request's checkpoint)",
                             "empty (the same checkpoint) with controlnet units")
    if other_arch is None or other_arch.kind is not Kind.CHECKPOINT:
        raise InvalidRequest(field, f"{other_name} is not a checkpoint this engine can load",
                             "a checkpoint of the models' Stable-diffusion folder")
    if base_arch is None:
        return
    base_space = FAMILIES[base_arch].latent_space
    if FAMILIES[other_arch].latent_space != base_space:
        fits = ", ".join(a.value for a, d in FAMILIES.items() if d.text is not None and d.latent_space == base_space)
        raise InvalidRequest(field, f"{other_name} ({other_arch.value}) cannot continue the latents of "
                             f"{base_name} ({base_arch.value}): another latent space",
                             f"a checkpoint of the same latent space ({fits})")
