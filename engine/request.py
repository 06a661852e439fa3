"""The engine's own request and result types.

``api_compat`` translates the sd_txt2img JSON payload into a :class:`GenerationRequest` (validated at that
boundary); the pipeline consumes it and returns a :class:`GenerationResult`. Both are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit, already validated. ``image`` is an RGB uint8 array (H, W, 3), or an
    ``engine.controlnet.images.EncodedImage`` (the compressed file, decoded when the unit runs)."""

    model: str
    image: Any = field(repr=False, compare=False)
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    resize_mode: str = "Crop and Resize"  # "Just Resize" | "Crop and Resize" | "Resize and Fill"
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    control_mode: str = "Balanced"  # | "My prompt is more important" | "ControlNet is more important"
    pixel_perfect: bool = False
    save_detected_map: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """A txt2img request in engine terms (webui semantics for every field).

    ``model`` None means the engine's default model. ``width``/``height`` None mean the model's native
    size. ``eta`` None means the sampler's default. ``seed`` -1 draws a random seed.
    """

    model: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    vae: str = "Automatic"
    clip_skip: int = 1
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    eta_noise_seed_delta: int = 0
    controlnet_units: tuple[ControlNetUnit, ...] = ()
    disable_extra_networks: bool = False  # webui: <lora:...> tags are removed from the prompt but not applied


@dataclass
class GenerationResult:
    """Images (RGB uint8, H x W x 3), one webui infotext per image, and the info dict of the API spec."""

    images: list[np.ndarray]
    infotexts: list[str]
    info: dict[str, Any]
    seeds: list[int]
    subseeds: list[int]
    timings: dict[str, float]
    detected_maps: list[np.ndarray] = field(default_factory=list)
