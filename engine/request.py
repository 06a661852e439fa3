"""The engine's own request and result types.

``api_compat`` translates the sd_txt2img JSON payload into a :class:`GenerationRequest` (validated at that
boundary); the pipeline consumes it and returns a :class:`GenerationResult`. Both are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.upscalers import DEFAULT_OVERLAP, DEFAULT_TILE


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit, already validated. ``image`` is an RGB uint8 array (H, W, 3), or an
    ``engine.controlnet.images.EncodedImage`` (the compressed file, decoded when the unit runs).

    ``model`` "None": a module that needs no ControlNet model (sd-webui-controlnet's ``reference_*``).
    ``hr_option`` (with the hires fix): the passes the unit acts in, "Both", "Low res only" or "High res only"
    (its detected maps are made for both passes either way, as the extension does)."""

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
    hr_option: str = "Both"
    # per-residual control weights (down residuals in UNet order, then the middle block): they replace the scales
    # of ``weight`` and the control mode, as sd-webui-controlnet's ``advanced_weighting`` (None: not used)
    advanced_weighting: tuple[float, ...] | None = None


@dataclass(frozen=True)
class InitImage:
    """img2img: the init image (RGB uint8 (H, W, 3), or an engine.controlnet.images.EncodedImage kept compressed
    while queued) and how it is used, webui semantics for every field.

    ``resize_mode``: 0 "Just resize", 1 "Crop and resize", 2 "Resize and fill", 3 "Just resize (latent upscale)".
    ``mask`` (uint8 (H, W) or (H, W, 3), or an EncodedImage; white = repaint) turns on inpainting; ``inpainting_fill``: 0 fill, 1 original,
    2 latent noise, 3 latent nothing. ``fix_steps`` is the webui's img2img_fix_steps setting.
    """

    image: Any = field(repr=False, compare=False)
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: Any = field(default=None, repr=False, compare=False)
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: bool = False
    initial_noise_multiplier: float = 1.0
    fix_steps: bool = False
    upscaler: str = "None"  # the webui's upscaler_for_img2img (image resizes that enlarge)


@dataclass(frozen=True)
class FaceRestoration:
    """webui ``restore_faces``: every image's faces restored after decoding (engine.faces). ``model`` is the
    webui's face_restoration_model ("CodeFormer", "GFPGAN"; None: the first installed); ``codeformer_weight`` its
    code_former_weight (0: strongest, 1: weakest; CodeFormer only)."""

    model: str | None = None
    codeformer_weight: float = 0.5


# the webui's show_progress_type, live_preview_content and sd_vae_encode_method / sd_vae_decode_method values
PREVIEW_METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")
PREVIEW_CONTENTS = ("Prompt", "Negative prompt", "Combined")
VAE_METHODS = ("Full", "TAESD")


@dataclass(frozen=True)
class LivePreview:
    """Live previews (the webui's live_previews_enable, show_progress_type, show_progress_every_n_steps,
    live_preview_content): every ``every_n_steps`` sampling steps the current x0 prediction of ``content`` is
    decoded with ``method`` off the sampling thread (engine.preview) and handed to the caller's preview sink.
    They never change the images."""

    method: str = "Approx NN"
    every_n_steps: int = 10
    content: str = "Prompt"


DEFAULT_HIRES_UPSCALER = "Latent"  # the webui's latent_upscale_default_mode


@dataclass(frozen=True)
class Hires:
    """txt2img hires fix (webui ``enable_hr``): the second pass, webui semantics for every field.

    ``resize_x``/``resize_y`` 0 mean "use ``scale``"; ``steps`` 0 means the first pass's steps; ``sampler_name``
    None means the first pass's sampler; ``scheduler`` None means "Automatic" (the webui's hires pass rule);
    ``prompt``/``negative_prompt`` None mean the first pass's; ``cfg_scale`` None means the first pass's;
    ``upscaler`` None means "Latent" (the webui's default latent upscale mode), and the infotext then leaves
    "Hires upscaler" out, as the webui does when ``hr_upscaler`` is not given.
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str | None = None
    steps: int = 0
    denoising_strength: float = 0.75
    sampler_name: str | None = None
    scheduler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = None
    checkpoint: str | None = None  # webui hr_checkpoint_name: the second pass's checkpoint (None: the same)

    @property
    def upscaler_name(self) -> str:
        """The upscaler the second pass uses."""
        return self.upscaler or DEFAULT_HIRES_UPSCALER


@dataclass(frozen=True)
class Refiner:
    """webui ``refiner_checkpoint`` / ``refiner_switch_at``: the checkpoint that takes over the sampling run at the
    switch point (engine.refiner: the webui's rule on the model's sigmas; ``switch_at`` None: from the first step,
    as the webui does when the field is left out)."""

    checkpoint: str
    switch_at: float | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A txt2img or img2img request in engine terms (webui semantics for every field).

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
    # the webui's speed levers, opt-in (docs/DECISIONS.md): NGMS skips the negative rows below this sigma (every
    # other denoiser call, or every call with s_min_uncond_all); ToMe merges this share of the self-attention
    # tokens (torch backend), token_merging_ratio_hr in the hires pass (already resolved: hr, else the first's)
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    token_merging_ratio: float = 0.0
    token_merging_ratio_hr: float = 0.0
    controlnet_units: tuple[ControlNetUnit, ...] = ()
    init: InitImage | None = None  # img2img (and inpainting with a mask)
    hires: Hires | None = None  # txt2img's second pass
    disable_extra_networks: bool = False  # webui: <lora:...> tags are removed from the prompt but not applied
    sd_upscale: Any = None  # img2img: the "SD upscale" script (engine.sd_upscale.SdUpscale)
    tiling: bool = False  # webui seamless tiling: circular padding in the UNet and VAE convolutions
    face_restoration: FaceRestoration | None = None  # webui restore_faces (None: off)
    # webui sd_vae_encode_method / sd_vae_decode_method: "Full" (the model's VAE) or "TAESD" (engine.preview)
    vae_encode_method: str = "Full"
    vae_decode_method: str = "Full"
    live_preview: LivePreview | None = None  # None: no previews
    refiner: Refiner | None = None  # the SDXL refiner (None: off)
    adetailer: Any = None  # the ADetailer extension's tabs after the generation (engine.adetailer.ADetailer)
    # the webui's ESRGAN_tile / ESRGAN_tile_overlap options: the tiles a model upscaler of the hires fix or the SD
    # upscale script runs over, in input pixels (0: the whole image at once), as the extras run them
    upscaler_tile: int = DEFAULT_TILE
    upscaler_tile_overlap: int = DEFAULT_OVERLAP


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
