"""ControlNet unit scheduling and control modes, as sd-webui-controlnet v1.1.4xx does them.

Pure functions over numpy arrays and torch tensors; the denoiser's model closure calls
:func:`controlnet_residuals` once per model evaluation and runs ``unet_control`` with the result, or the
plain ``unet`` when it returns None.

What the extension does (scripts/hook.py, scripts/controlnet.py), and what is implemented here:

* **Guidance window.** ``guidance_schedule_handler`` sets ``current_sampling_percent = sampling_step /
  total_sampling_steps`` and stops the unit when ``pct < guidance_start or pct > guidance_end``: a unit
  runs when ``start <= step / steps <= end``. :func:`active` takes the 0-based index of the sampling step
  (API.md: "the unit runs at step i (of n) when start <= i/n <= end"); every model evaluation of a
  2nd-order sampler within step i uses the same i. (The webui's ``state.sampling_step`` is updated by the
  sampler callback *after* a step, so inside step i >= 1 it still reads i - 1; pass ``step - 1`` clamped at 0
  to reproduce that lag exactly -- see :func:`webui_sampling_step`.)
* **Control modes.** ``soft_injection = mode != Balanced``, ``cfg_injection = mode == "ControlNet is more
  important"``. Scales per residual (down residuals 0..n-2 in UNet order, then the middle block):
  Balanced: ``weight`` for every residual; soft injection: ``weight * 0.825 ** (12 - i)`` for i = 0..12
  (SD1.x/2.x: 12 down residuals get 0.825^12 .. 0.825^1, the middle block 1.0). For other residual counts
  the extension truncates that 13-long list (SDXL: ``control_scales[:10]``, so SDXL's 9 down residuals get
  0.825^12 .. 0.825^4 and its middle block 0.825^3, not 1.0); :func:`residual_scales` does the same for any
  n <= 13. cfg_injection multiplies every residual by the cond mark: rows of the negative prompt get no
  control at all ("same scales, conditional half only").
* **Advanced weighting** (the unit's ``advanced_weighting``, hook.py: ``control_scales =
  param.advanced_weighting``): one scale per residual (down residuals in UNet order, then the middle block) that
  *replaces* the scales above -- neither ``weight`` nor the soft-injection scales apply to it (the extension logs
  "Advanced weighting overwrites soft_injection effect"); cfg_injection's cond mark still does.
* **Several units** add their scaled residuals (in unit order) before the UNet adds the sum.
* **Model-free units** (``reference_only``: :mod:`engine.controlnet.reference`) run no ControlNet and add no
  residual; :func:`controlnet_residuals` skips them.
* A unit whose scales are all 0 contributes exactly zero; it is skipped instead of run (same result, one
  ControlNet pass less). A cond-only unit runs its ControlNet on the cond rows only (ControlNet rows are
  independent), the other rows of its residuals are zero -- the same numbers as running all rows and masking.

Backend component names: the ControlNet of a unit is the component :func:`controlnet_component` names,
``"controlnet:<model name>"`` (one exported ControlNet per model file, several per request possible).
The pipeline may pass ``component_for`` to map a model name to its own key (e.g. ``lambda m: "controlnet"``
when a backend holds a single ControlNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from core.errors import InvalidRequest
from engine.rules import parse_choice

Array = Any  # numpy.ndarray or torch.Tensor

SOFT_INJECTION_BASE = 0.825
# The extension's residual layout: 12 down-block residuals + 1 middle block (SD1.x / SD2.x ControlNets).
SOFT_INJECTION_COUNT = 13
CONTROLNET_COMPONENT_PREFIX = "controlnet:"
# model-free modules that inject attention instead of residuals (engine.controlnet.reference implements them)
REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
MID_RESIDUAL = "mid_residual"


def parse_mode(cls: type[Enum], value: Any, field_name: str, what: str, aliases: dict[str, str] | None = None,
               ints: dict[int, Enum] | None = None):
    """A webui/extension enum member from its name, an alias, or the extension's legacy int (member order,
    plus ``ints`` extras), by the one choice parser (engine.rules.parse_choice); anything else is an
    InvalidRequest naming ``field_name`` and the allowed names."""
    if isinstance(value, cls):
        return value
    members = list(cls)
    index = parse_choice(value, [m.value for m in members], field_name, what=what, aliases=aliases,
                         ints={k: members.index(v) for k, v in (ints or {}).items()})
    return members[index]


class ControlMode(str, Enum):
    """The extension's control modes (external_code.ControlMode), by their API names."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"

    @classmethod
    def parse(cls, value: Any, field_name: str = "control_mode") -> "ControlMode":
        """A mode from its name, or from the extension's legacy int (0, 1, 2 in this order)."""
        return parse_mode(cls, value, field_name, "control mode")

    @property
    def soft_injection(self) -> bool:
        return self is not ControlMode.BALANCED

    @property
    def cond_only(self) -> bool:
        """The extension's cfg_injection: residuals go to the conditional rows only."""
        return self is ControlMode.CONTROL


def extension_residuals(sdxl: bool) -> int:
    """The extension's residual count of a family's ControlNets (its ``control_scales`` and the length its
    ``advanced_weighting`` expects): 13 for SD1.x/SD2.x (12 down + middle), 10 for SDXL (9 + middle)."""
    return 10 if sdxl else SOFT_INJECTION_COUNT


def residual_count(controlnet: Any) -> int:
    """Residuals of a diffusers ControlNetModel (its down-block zero convs + the middle block)."""
    return len(controlnet.controlnet_down_blocks) + 1


def controlnet_component(model: str) -> str:
    """Backend component key of the ControlNet ``model``: ``"controlnet:<model>"``."""
    return CONTROLNET_COMPONENT_PREFIX + model


@dataclass(frozen=True)
class PreparedUnit:
    """A ControlNet unit ready for sampling.

    ``image`` is the control image tensor (1, 3, H, W) float32 in [0, 1] at the generation size (see
    :func:`engine.controlnet.images.prepare_control_image`); ``detected_map`` the same picture as RGB uint8
    (H, W, 3), kept for ``save_detected_map``.
    """

    model: str
    image: np.ndarray = field(repr=False, compare=False)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    module: str = "none"
    detected_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    # per-residual scales replacing weight and the control mode's (see the module docstring); None: not used
    advanced_weighting: tuple[float, ...] | None = None
    # the preprocessor's slider values as used (threshold_a of reference_only: the style fidelity; of tile_colorfix:
    # its Variation, threshold_b of tile_colorfix+sharp its Sharpness)
    threshold_a: float | None = None
    threshold_b: float | None = None
    # the preprocessor values actually used (defaults applied, pixel perfect resolved), for the infotext
    used: dict = field(default_factory=dict, compare=False)
    # control image repeated to n rows, per (n, array kind/device/dtype): built once per request, not per step
    _rows_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "control_mode", ControlMode.parse(self.control_mode))
        if np.ndim(self.image) != 4 or np.shape(self.image)[:2] != (1, 3):
            raise ValueError(f"PreparedUnit.image must be (1, 3, H, W), got {np.shape(self.image)}")

    @property
    def component(self) -> str:
        return controlnet_component(self.model)

    @property
    def reference(self) -> bool:
        """A model-free reference unit (attention injection, no ControlNet): :mod:`engine.controlnet.reference`."""
        return self.module in REFERENCE_MODULES

    @property
    def contributes(self) -> bool:
        """Whether the unit's residuals can be non-zero (a zero weight, or all-zero advanced weights, cannot)."""
        if self.advanced_weighting is not None:
            return any(w != 0 for w in self.advanced_weighting)
        return self.weight != 0


def sampling_percent(step: int, steps: int) -> float:
    """The extension's ``current_sampling_percent``: ``step / steps``."""
    return step / steps


def webui_sampling_step(step: int) -> int:
    """The value of the webui's ``state.sampling_step`` while the sampler evaluates 0-based step ``step``.

    The k-diffusion callback sets it to i after step i finished, and it starts at 0, so step 0 and step 1
    both read 0. ``active(unit, webui_sampling_step(i), n)`` reproduces the webui's window to the step.
    """
    return max(0, step - 1)


def active(unit: PreparedUnit, step: int, steps: int) -> bool:
    """Whether ``unit`` runs at 0-based sampling step ``step`` of ``steps``: start <= step/steps <= end."""
    pct = sampling_percent(step, steps)
    return not (pct < unit.guidance_start or pct > unit.guidance_end)


def active_units(units: Sequence[PreparedUnit], step: int, steps: int) -> list[PreparedUnit]:
    """The ControlNet units (not the model-free reference ones) that run at this step and can change the result
    (:attr:`PreparedUnit.contributes`), in unit order."""
    return [u for u in units if not u.reference and u.contributes and active(u, step, steps)]


def residual_scales(unit: PreparedUnit, n_residuals: int) -> list[float]:
    """Scale of each of ``n_residuals`` residuals (down residuals in UNet order, then the middle block).

    Balanced: ``weight``. "My prompt is more important" / "ControlNet is more important":
    ``weight * 0.825 ** (12 - i)``, the extension's 13 soft-injection scales truncated to ``n_residuals``.
    ``advanced_weighting`` (checked against the ControlNet by engine.rules.check_layer_weights) replaces both.
    """
    if n_residuals < 1:
        raise ValueError(f"n_residuals must be >= 1, got {n_residuals}")
    if unit.advanced_weighting is not None:
        if len(unit.advanced_weighting) != n_residuals:
            raise ValueError(f"advanced_weighting has {len(unit.advanced_weighting)} weights, the ControlNet "
                             f"{n_residuals} residuals")
        return [float(w) for w in unit.advanced_weighting]
    w = float(unit.weight)
    if not unit.control_mode.soft_injection:
        return [w] * n_residuals
    if n_residuals > SOFT_INJECTION_COUNT:
        raise ValueError(
            f"soft injection defines {SOFT_INJECTION_COUNT} scales; this ControlNet has {n_residuals} residuals"
        )
    return [w * (SOFT_INJECTION_BASE ** float(12 - i)) for i in range(SOFT_INJECTION_COUNT)][:n_residuals]


def cond_rows_mask(positive: Sequence[Sequence[tuple[int, float]]], n_rows: int) -> np.ndarray:
    """(n_rows,) float32 mask: 1 for rows that hold a positive prompt part, 0 for negative-prompt rows.

    ``positive`` is :attr:`engine.conditioning.StepConditioning.positive`; ``n_rows`` the rows of the
    batch the UNet runs (its ``context`` rows).
    """
    mask = np.zeros(n_rows, dtype=np.float32)
    for parts in positive:
        for row, _weight in parts:
            mask[row] = 1.0
    return mask


def _is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def _like(values: np.ndarray, ref: Array) -> Array:
    """``values`` as an array of ref's kind (numpy, or a torch tensor on ref's device and dtype)."""
    if _is_numpy(ref):
        return np.asarray(values, dtype=ref.dtype)
    import torch

    return torch.as_tensor(np.asarray(values), dtype=ref.dtype, device=ref.device)


def _row_mask(mask: np.ndarray, ref: Array) -> Array:
    return _like(np.asarray(mask, dtype=np.float32).reshape((-1,) + (1,) * (ref.ndim - 1)), ref)


def combine_residuals(
    per_unit_residuals: Sequence[Sequence[Array]],
    scales: Sequence[Sequence[float]],
    row_masks: Sequence[np.ndarray | None] | None = None,
) -> list[Array]:
    """Sum over units of ``residual * scale`` (times the unit's row mask, if it has one).

    ``per_unit_residuals[k]`` are unit k's residuals (down..., mid), ``scales[k]`` its scales
    (:func:`residual_scales`), ``row_masks[k]`` None (all rows) or a (B,) 0/1 array (1 = conditional row)
    for a "ControlNet is more important" unit. Works on numpy arrays and torch tensors alike.
    """
    if not per_unit_residuals:
        raise ValueError("combine_residuals needs at least one unit")
    if row_masks is None:
        row_masks = [None] * len(per_unit_residuals)
    if not (len(per_unit_residuals) == len(scales) == len(row_masks)):
        raise ValueError("per_unit_residuals, scales and row_masks must have one entry per unit")
    n = len(per_unit_residuals[0])
    total: list[Array] = []
    for k, (residuals, unit_scales, mask) in enumerate(zip(per_unit_residuals, scales, row_masks)):
        if len(residuals) != n or len(unit_scales) != n:
            raise ValueError(f"unit {k}: {len(residuals)} residuals and {len(unit_scales)} scales, expected {n}")
        for i, (r, s) in enumerate(zip(residuals, unit_scales)):
            term = r * s
            if mask is not None:
                term = term * _row_mask(mask, r)
            if k == 0:
                total.append(term)
            else:
                total[i] = total[i] + term
    return total


def residual_names(n_residuals: int) -> list[str]:
    """Feed names of ``unet_control``'s residual inputs: down_residual_0..n-2, mid_residual."""
    return [f"down_residual_{i}" for i in range(n_residuals - 1)] + [MID_RESIDUAL]


def _ordered_outputs(outputs: Mapping[str, Array]) -> list[Array]:
    downs = sorted((k for k in outputs if k.startswith("down_residual_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if MID_RESIDUAL not in outputs or [int(k.rsplit("_", 1)[1]) for k in downs] != list(range(len(downs))):
        raise ValueError(f"controlnet outputs must be down_residual_0..n-1 and mid_residual, got {sorted(outputs)}")
    return [outputs[k] for k in downs] + [outputs[MID_RESIDUAL]]


def _take_rows(x: Array, rows: np.ndarray) -> Array:
    if _is_numpy(x):
        return x[rows]
    import torch

    return x.index_select(0, torch.as_tensor(rows, device=x.device))


def _scatter_rows(part: Array, rows: np.ndarray, n_rows: int) -> Array:
    if _is_numpy(part):
        full = np.zeros((n_rows,) + part.shape[1:], dtype=part.dtype)
        full[rows] = part
        return full
    import torch

    full = part.new_zeros((n_rows,) + tuple(part.shape[1:]))
    full[torch.as_tensor(rows, device=part.device)] = part
    return full


def _control_rows(unit: PreparedUnit, n_rows: int, ref: Array) -> Array:
    """``unit.image`` repeated to ``n_rows`` rows as ref's kind, cached on the unit (on a GPU backend this
    is one host->device copy per request and row count, not one per model evaluation)."""
    key = (n_rows, type(ref).__name__, str(getattr(ref, "device", "cpu")), str(ref.dtype))
    cached = unit._rows_cache.get(key)
    if cached is None:
        cached = unit._rows_cache[key] = _repeat_rows(unit.image, n_rows, ref)
    return cached


def _repeat_rows(image: np.ndarray, n_rows: int, ref: Array) -> Array:
    img = _like(image, ref)
    if _is_numpy(img):
        return np.ascontiguousarray(np.broadcast_to(img, (n_rows,) + img.shape[1:]))
    return img.expand(n_rows, *img.shape[1:]).contiguous()


def controlnet_residuals(
    run: Callable[[str, Mapping[str, Array]], Mapping[str, Array]],
    units: Sequence[PreparedUnit],
    step: int,
    steps: int,
    feeds: Mapping[str, Array],
    cond_mask: np.ndarray | None = None,
    component_for: Callable[[str], str] = controlnet_component,
) -> dict[str, Array] | None:
    """The residual feeds of ``unet_control`` for one model evaluation, or None when no unit is active.

    ``run`` is ``backend.run``; ``feeds`` the plain ``unet`` feeds of this evaluation (``sample``,
    ``timestep``, ``encoder_hidden_states``, SDXL ``text_embeds``/``time_ids``; B rows); ``cond_mask`` (B,)
    marks the rows of positive prompts (:func:`cond_rows_mask`; None = every row is conditional, as when
    cfg_scale <= 1 skips the negative pass). Each active unit runs ``component_for(unit.model)`` with
    ``feeds`` + ``controlnet_cond`` (its control image repeated to B rows). Returns
    ``{"down_residual_0": ..., ..., "mid_residual": ...}``: the scaled, masked sum over the units.
    """
    todo = active_units(units, step, steps)
    if not todo:
        return None
    n_rows = int(feeds["sample"].shape[0])
    mask = None if cond_mask is None else np.asarray(cond_mask, dtype=np.float32).reshape(-1)
    if mask is not None and mask.shape[0] != n_rows:
        raise ValueError(f"cond_mask has {mask.shape[0]} rows, the batch {n_rows}")
    per_unit, scales, masks = [], [], []
    for unit in todo:
        unit_mask = mask if unit.control_mode.cond_only and mask is not None and not mask.all() else None
        rows = None if unit_mask is None else np.flatnonzero(unit_mask > 0.5)
        if rows is not None and rows.size == 0:
            continue  # cond-only unit, no conditional row in this batch: contributes nothing
        unit_feeds = dict(feeds) if rows is None else {k: _take_rows(v, rows) for k, v in feeds.items()}
        n_run = n_rows if rows is None else int(rows.size)
        unit_feeds["controlnet_cond"] = _control_rows(unit, n_run, feeds["sample"])
        outputs = _ordered_outputs(run(component_for(unit.model), unit_feeds))
        if rows is not None:
            outputs = [_scatter_rows(o, rows, n_rows) for o in outputs]
        per_unit.append(outputs)
        scales.append(residual_scales(unit, len(outputs)))
        masks.append(None)  # rows outside the mask are already zero
    if not per_unit:
        return None
    total = combine_residuals(per_unit, scales, masks)
    return dict(zip(residual_names(len(total)), total))


class HiresOption(str, Enum):
    """The extension's ``hr_option`` (enums.HiResFixOption): the passes of a hires-fix request a unit acts in.
    Its detected maps are made for both passes whatever the option (the extension preprocesses for both)."""

    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"

    @classmethod
    def parse(cls, value: Any, field_name: str = "hr_option") -> "HiresOption":
        """An option from its name (any case), or its index in this order."""
        return parse_mode(cls, value, field_name, "hires option")

    def acts_in(self, hires_pass: bool) -> bool:
        """Whether the unit acts in the first pass (``hires_pass`` False) or in the hires fix's pass (True)."""
        if self is HiresOption.LOW_RES_ONLY:
            return not hires_pass
        if self is HiresOption.HIGH_RES_ONLY:
            return hires_pass
        return True
