"""ADetailer (the Bing-su/adetailer extension, v25.3.0) over :meth:`engine.pipeline.Engine.generate`: after a
txt2img or img2img request, each image goes through the enabled tabs one after another; a tab detects regions
(engine.adetailer.detectors), makes one mask per region (engine.adetailer.masks) and repaints each with an
inpainting img2img pass of the engine's own inpaint path (engine.img2img: mask blur, "Only masked" crop at
``ad_inpaint_only_masked_padding``, overlay), each pass on the previous one's image, as the extension's
``postprocess_image``.

The inpaint pass takes the request's settings where a tab does not give its own (``ad_use_steps``, ...): the
image's seed + the region's index, the request's width x height (the first pass's, as the extension's ``p.width``)
or ``ad_inpaint_width`` x ``ad_inpaint_height``, "original" fill, resize mode 0, one image. The image's infotext
gets the extension's "ADetailer ..." fields (its ``extra_params`` rules) and "ADetailer version"; a tab that found
nothing leaves the image as it was and writes ``ADetailer note: nothing detected`` (this engine's field).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from core.errors import Cancelled
from engine.adetailer import masks as mask_rules
from engine.adetailer.detectors import Detectors  # noqa: F401 (engine.adetailer.Detectors)
from engine.controlnet.images import as_array
from engine.infotext import quote
from engine.progress import Progress, as_callback
from engine.request import FaceRestoration, GenerationRequest, InitImage
from engine.rules import USE_SAME_SAMPLER, USE_SAME_SCHEDULER

log = logging.getLogger(__name__)

VERSION = "25.3.0"  # the extension version whose API and infotext this follows ("ADetailer version")
SAME_CHECKPOINT, SAME_VAE = ("None", "Use same checkpoint"), ("None", "Use same VAE")
SKIP_IMG2IMG = {"steps": 1, "sampler_name": "Euler", "width": 128, "height": 128}  # the extension's set_skip_img2img


@dataclass(frozen=True)
class ADetailerTab:
    """One tab's settings, the extension's ``ADetailerArgs`` (same names, same defaults)."""

    ad_model: str = "None"
    ad_model_classes: str = ""
    ad_tab_enable: bool = True
    ad_prompt: str = ""
    ad_negative_prompt: str = ""
    ad_confidence: float = 0.3
    ad_mask_filter_method: str = "Area"
    ad_mask_k: int = 0
    ad_mask_min_ratio: float = 0.0
    ad_mask_max_ratio: float = 1.0
    ad_dilate_erode: int = 4
    ad_x_offset: int = 0
    ad_y_offset: int = 0
    ad_mask_merge_invert: str = "None"
    ad_mask_blur: int = 4
    ad_denoising_strength: float = 0.4
    ad_inpaint_only_masked: bool = True
    ad_inpaint_only_masked_padding: int = 32
    ad_use_inpaint_width_height: bool = False
    ad_inpaint_width: int = 512
    ad_inpaint_height: int = 512
    ad_use_steps: bool = False
    ad_steps: int = 28
    ad_use_cfg_scale: bool = False
    ad_cfg_scale: float = 7.0
    ad_use_checkpoint: bool = False
    ad_checkpoint: str | None = None
    ad_use_vae: bool = False
    ad_vae: str | None = None
    ad_use_sampler: bool = False
    ad_sampler: str = "DPM++ 2M Karras"
    ad_scheduler: str = USE_SAME_SCHEDULER
    ad_use_noise_multiplier: bool = False
    ad_noise_multiplier: float = 1.0
    ad_use_clip_skip: bool = False
    ad_clip_skip: int = 1
    ad_restore_face: bool = False
    ad_controlnet_model: str = "None"
    ad_controlnet_module: str = "None"
    ad_controlnet_weight: float = 1.0
    ad_controlnet_guidance_start: float = 0.0
    ad_controlnet_guidance_end: float = 1.0

    def need_skip(self) -> bool:
        return self.ad_model == "None" or self.ad_tab_enable is False

    def infotext(self, n: int) -> dict[str, Any]:
        """The extension's ``extra_params(suffix(n))``: every field by its infotext name, less those its rules
        pop (unused toggles and their values, defaults that say nothing)."""
        if self.need_skip():
            return {}
        p = {name: getattr(self, attr) for attr, name in INFOTEXT_NAMES}

        def pop(key: str, keys: tuple[str, ...] | None = None, cond: Any = None) -> None:
            if key not in p:
                return
            hit = (not bool(p[key])) if cond is None else p[key] == cond
            if hit:
                for k in keys or (key,):
                    p.pop(k, None)

        pop("ADetailer model classes")
        pop("ADetailer prompt")
        pop("ADetailer negative prompt")
        p.pop("ADetailer tab enable", None)
        pop("ADetailer mask only top k", ("ADetailer mask only top k", "ADetailer method to decide top k masks"), 0)
        pop("ADetailer mask min ratio", cond=0.0)
        pop("ADetailer mask max ratio", cond=1.0)
        pop("ADetailer x offset", cond=0)
        pop("ADetailer y offset", cond=0)
        pop("ADetailer mask merge invert", cond="None")
        pop("ADetailer inpaint only masked", ("ADetailer inpaint padding",))
        for toggle, values in (("use inpaint width height", ("inpaint width", "inpaint height")),
                               ("use separate steps", ("steps",)), ("use separate CFG scale", ("CFG scale",)),
                               ("use separate checkpoint", ("checkpoint",)), ("use separate VAE", ("VAE",)),
                               ("use separate sampler", ("sampler", "scheduler")),
                               ("use separate noise multiplier", ("noise multiplier",)),
                               ("use separate CLIP skip", ("CLIP skip",))):
            pop(f"ADetailer {toggle}", (f"ADetailer {toggle}", *(f"ADetailer {v}" for v in values)))
        pop("ADetailer scheduler", cond=USE_SAME_SCHEDULER)
        pop("ADetailer restore face")
        cn = ("ADetailer ControlNet model", "ADetailer ControlNet module", "ADetailer ControlNet weight",
              "ADetailer ControlNet guidance start", "ADetailer ControlNet guidance end")
        pop(cn[0], cn, "None")
        pop(cn[1], cond="None")
        pop(cn[2], cond=1.0)
        pop(cn[3], cond=0.0)
        pop(cn[4], cond=1.0)
        return {k + suffix(n): v for k, v in p.items()}


INFOTEXT_NAMES: tuple[tuple[str, str], ...] = (
    ("ad_model", "ADetailer model"), ("ad_model_classes", "ADetailer model classes"),
    ("ad_tab_enable", "ADetailer tab enable"), ("ad_prompt", "ADetailer prompt"),
    ("ad_negative_prompt", "ADetailer negative prompt"), ("ad_confidence", "ADetailer confidence"),
    ("ad_mask_filter_method", "ADetailer method to decide top k masks"), ("ad_mask_k", "ADetailer mask only top k"),
    ("ad_mask_min_ratio", "ADetailer mask min ratio"), ("ad_mask_max_ratio", "ADetailer mask max ratio"),
    ("ad_x_offset", "ADetailer x offset"), ("ad_y_offset", "ADetailer y offset"),
    ("ad_dilate_erode", "ADetailer dilate erode"), ("ad_mask_merge_invert", "ADetailer mask merge invert"),
    ("ad_mask_blur", "ADetailer mask blur"), ("ad_denoising_strength", "ADetailer denoising strength"),
    ("ad_inpaint_only_masked", "ADetailer inpaint only masked"),
    ("ad_inpaint_only_masked_padding", "ADetailer inpaint padding"),
    ("ad_use_inpaint_width_height", "ADetailer use inpaint width height"),
    ("ad_inpaint_width", "ADetailer inpaint width"), ("ad_inpaint_height", "ADetailer inpaint height"),
    ("ad_use_steps", "ADetailer use separate steps"), ("ad_steps", "ADetailer steps"),
    ("ad_use_cfg_scale", "ADetailer use separate CFG scale"), ("ad_cfg_scale", "ADetailer CFG scale"),
    ("ad_use_checkpoint", "ADetailer use separate checkpoint"), ("ad_checkpoint", "ADetailer checkpoint"),
    ("ad_use_vae", "ADetailer use separate VAE"), ("ad_vae", "ADetailer VAE"),
    ("ad_use_sampler", "ADetailer use separate sampler"), ("ad_sampler", "ADetailer sampler"),
    ("ad_scheduler", "ADetailer scheduler"),
    ("ad_use_noise_multiplier", "ADetailer use separate noise multiplier"),
    ("ad_noise_multiplier", "ADetailer noise multiplier"),
    ("ad_use_clip_skip", "ADetailer use separate CLIP skip"), ("ad_clip_skip", "ADetailer CLIP skip"),
    ("ad_restore_face", "ADetailer restore face"), ("ad_controlnet_model", "ADetailer ControlNet model"),
    ("ad_controlnet_module", "ADetailer ControlNet module"), ("ad_controlnet_weight", "ADetailer ControlNet weight"),
    ("ad_controlnet_guidance_start", "ADetailer ControlNet guidance start"),
    ("ad_controlnet_guidance_end", "ADetailer ControlNet guidance end"),
)
TAB_FIELDS = tuple(f.name for f in fields(ADetailerTab))
assert set(TAB_FIELDS) == {a for a, _ in INFOTEXT_NAMES}


def ordinal(n: int) -> str:
    return str(n) + ("th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def suffix(n: int, sep: str = " ") -> str:
    """The extension's infotext suffix of tab ``n`` (0-based): "" for the first, " 2nd", " 3rd", ..."""
    return "" if n == 0 else sep + ordinal(n + 1)


@dataclass(frozen=True)
class ADetailer:
    """``alwayson_scripts.ADetailer``: the enabled tabs (tabs that ``need_skip`` are kept for the infotext's
    numbering) and ``skip_img2img`` (img2img: the img2img pass is reduced to the extension's 1 step at 128x128 and
    the tabs run on the init image)."""

    tabs: tuple[ADetailerTab, ...]
    skip_img2img: bool = False

    def infotext(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for n, tab in enumerate(self.tabs):
            params.update(tab.infotext(n))
        params["ADetailer version"] = VERSION
        return params

    @property
    def active(self) -> list[tuple[int, ADetailerTab]]:
        return [(n, t) for n, t in enumerate(self.tabs) if not t.need_skip()]


def split_prompt(ad_prompt: str, default: str) -> list[str]:
    """The extension's ``_get_prompt``: ``[SEP]`` separates the prompts of the regions (the last one serves the
    rest); an empty part is the request's prompt, ``[PROMPT]`` is replaced by it."""
    parts = re.split(r"\s*\[SEP\]\s*", ad_prompt)
    return [default if not p else p.replace("[PROMPT]", default) for p in parts]


def _user_mask(init: InitImage, width: int, height: int) -> np.ndarray:
    """The extension's ``get_image_mask``: the request's mask (inverted with inpainting_mask_invert), binary (the
    webui's create_binary_mask: the alpha channel of an RGBA mask, else L > 128), at the generation size."""
    from PIL import Image

    from engine.img2img import resize_image

    mask = as_array(init.mask)
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = mask[..., 3]
    elif mask.ndim == 3:
        mask = np.asarray(Image.fromarray(mask[..., :3]).convert("L"))
    binary = np.where(mask > 128, 255, 0).astype(np.uint8)
    if init.inpainting_mask_invert:
        binary = 255 - binary
    return np.asarray(resize_image(init.resize_mode, Image.fromarray(binary), width, height).convert("L"))


class _Relay:
    """Progress of the whole request: the base generation's events as they are, then each inpaint pass's as phase
    ``detailing`` (``done/total``: the pass's own steps; ``step/steps``: the request's, grown by each pass's
    steps once it starts, as the extension adds its passes to the webui's job count)."""

    def __init__(self, progress):
        self.callback = as_callback(progress)
        self.step = self.steps = 0
        self.done = 0  # steps of the base request and of the finished passes
        self.current = 0  # steps of the pass running
        self.detail = ""

    def base(self, event: Progress) -> None:
        self.step, self.steps = event.step, event.steps
        if self.callback is not None:
            self.callback(event)

    def start(self, detail: str) -> None:
        self.done, self.current = max(self.done, self.steps), 0
        self.announce(detail)

    def inner(self, event: Progress) -> None:
        self.current = event.steps
        self.step, self.steps = self.done + min(event.step, event.steps), self.done + event.steps
        if self.callback is not None:
            self.callback(Progress("detailing", event.step, event.steps, self.step, self.steps, None,
                                   f"{self.detail}: {event.phase}"))

    def finish(self) -> None:
        self.done += self.current
        self.step = self.steps = self.done

    def announce(self, detail: str) -> None:
        self.detail = detail
        if self.callback is not None:
            self.callback(Progress("detailing", 0, 0, self.step, self.steps, None, detail))


def inpaint_size(req: GenerationRequest, tab: ADetailerTab, base_size: tuple[int, int]) -> tuple[int, int]:
    """The extension's ``get_width_height``: ``ad_inpaint_width`` x ``ad_inpaint_height`` with
    ``ad_use_inpaint_width_height``, else the request's width x height (``base_size`` when it gave none)."""
    if tab.ad_use_inpaint_width_height:
        return tab.ad_inpaint_width, tab.ad_inpaint_height
    return req.width or base_size[0], req.height or base_size[1]


def inpaint_request(req: GenerationRequest, tab: ADetailerTab, image: np.ndarray, mask: np.ndarray, *,
                    prompt: str, negative_prompt: str, seed: int, subseed: int,
                    size: tuple[int, int]) -> GenerationRequest:
    """The extension's ``get_i2i_p`` + ``fix_p2`` for one region: an inpainting img2img request of one image."""
    init = req.init
    sampler, scheduler = req.sampler_name, req.scheduler
    if tab.ad_use_sampler:
        sampler = req.sampler_name if tab.ad_sampler == USE_SAME_SAMPLER else tab.ad_sampler
        scheduler = req.scheduler if tab.ad_scheduler == USE_SAME_SCHEDULER else tab.ad_scheduler
    face = None
    if tab.ad_restore_face:
        face = req.face_restoration or FaceRestoration()
    return replace(
        req, prompt=prompt, negative_prompt=negative_prompt, seed=seed, subseed=subseed, batch_size=1, n_iter=1,
        steps=tab.ad_steps if tab.ad_use_steps else req.steps,
        cfg_scale=tab.ad_cfg_scale if tab.ad_use_cfg_scale else req.cfg_scale,
        sampler_name=sampler, scheduler=scheduler, width=size[0], height=size[1],
        clip_skip=tab.ad_clip_skip if tab.ad_use_clip_skip else req.clip_skip,
        controlnet_units=(), hires=None, sd_upscale=None, adetailer=None, face_restoration=face,
        init=InitImage(
            image=image, denoising_strength=tab.ad_denoising_strength, resize_mode=0, mask=mask,
            mask_blur_x=tab.ad_mask_blur, mask_blur_y=tab.ad_mask_blur, inpainting_fill=1,
            inpaint_full_res=tab.ad_inpaint_only_masked,
            inpaint_full_res_padding=tab.ad_inpaint_only_masked_padding, inpainting_mask_invert=False,
            initial_noise_multiplier=(tab.ad_noise_multiplier if tab.ad_use_noise_multiplier else
                                      init.initial_noise_multiplier if init is not None else 1.0),
            fix_steps=init.fix_steps if init is not None else False,
            upscaler=init.upscaler if init is not None else "None"))


def regions(detectors: Detectors, tab: ADetailerTab, image: np.ndarray, req: GenerationRequest,
            size: tuple[int, int], field_name: str = "adetailer.tabs[0].ad_model") -> tuple[list[np.ndarray], int]:
    """The masks a tab repaints on ``image`` (the extension's predict + ``pred_preprocessing``), and how many
    regions the detector found before the filters."""
    pred = detectors.predict(tab.ad_model, image, tab.ad_confidence, tab.ad_model_classes, field_name)
    found = len(pred.bboxes)
    if not found:
        return [], 0
    h, w = image.shape[:2]
    pred = mask_rules.filter_by_ratio(pred, tab.ad_mask_min_ratio, tab.ad_mask_max_ratio, (w, h))
    pred = mask_rules.filter_k(pred, tab.ad_mask_k, tab.ad_mask_filter_method)
    out = mask_rules.preprocess(pred.masks, tab.ad_dilate_erode, tab.ad_x_offset, tab.ad_y_offset,
                                tab.ad_mask_merge_invert)
    init = req.init
    if init is not None and init.mask is not None and not init.inpaint_full_res:
        out = mask_rules.intersecting(_user_mask(init, *size), out)
    return out, found


def _append(infotext: str, params: dict[str, Any]) -> str:
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{infotext}, {line}" if infotext else line


def run(engine, req: GenerationRequest, detectors: Detectors, *, progress=None,
        cancel: threading.Event | None = None, on_images=None, preview=None):
    """``req`` with ``adetailer`` set, over ``engine.generate``: the request itself, then every image through the
    tabs; returns the GenerationResult (``images`` empty when handed to ``on_images``, as the engine does)."""
    ad: ADetailer = req.adetailer
    relay = _Relay(progress)
    base_req = replace(req, adetailer=None)
    skip = ad.skip_img2img and req.init is not None
    if skip:
        base_req = replace(base_req, **SKIP_IMG2IMG)
    kw = {"preview": preview} if preview is not None else {}
    result = engine.generate(base_req, progress=relay.base, cancel=cancel, **kw)
    images = list(result.images)
    if skip:
        init_image = as_array(req.init.image)[..., :3]
        images = [init_image.copy() for _ in images]
    base_size = (int(result.info.get("width") or images[0].shape[1]),
                 int(result.info.get("height") or images[0].shape[0]))
    if skip:
        base_size = (init_image.shape[1], init_image.shape[0])
    common = ad.infotext()
    infotexts, warnings = [], list(result.info.get("warnings") or [])
    timings = dict(result.timings)
    total = len(images)
    for i in range(total):
        image = images[i]
        notes: dict[str, Any] = {}
        for n, tab in ad.active:
            _check(cancel)
            name = f"ADetailer {ordinal(n + 1)} tab ({tab.ad_model})"
            relay.announce(f"{name}: detecting on image {i + 1} of {total}")
            size = inpaint_size(req, tab, base_size)
            found_masks, found = regions(detectors, tab, image, req, size, f"adetailer.tabs[{n}].ad_model")
            if not found_masks:
                why = "nothing detected" if not found else "no region left after the mask filters"
                notes["ADetailer note" + suffix(n)] = why
                warnings.append(f"image {i + 1}: {name}: {why}; the image is unchanged")
                log.info("image %d: %s: %s", i + 1, name, why)
                continue
            prompts = split_prompt(tab.ad_prompt, req.prompt)
            negatives = split_prompt(tab.ad_negative_prompt, req.negative_prompt)
            seed, subseed = result.seeds[i], result.subseeds[i]
            for j, mask in enumerate(found_masks):
                prompt = prompts[min(j, len(prompts) - 1)]
                if re.match(r"^\s*\[SKIP\]\s*$", prompt):
                    continue
                _check(cancel)
                inner = inpaint_request(req, tab, image, mask, prompt=prompt,
                                        negative_prompt=negatives[min(j, len(negatives) - 1)],
                                        seed=seed + j, subseed=subseed + j, size=size)
                relay.start(f"{name}: image {i + 1} of {total}, region {j + 1} of {len(found_masks)}")
                out = engine.generate(inner, progress=relay.inner, cancel=cancel)
                relay.finish()
                for key, value in out.timings.items():
                    timings[f"adetailer_{key}"] = timings.get(f"adetailer_{key}", 0.0) + value
                image = out.images[0]
        images[i] = image
        infotexts.append(_append(result.infotexts[i], {**common, **notes}))
    info = dict(result.info)
    info["infotexts"] = infotexts
    info["warnings"] = warnings
    if on_images is not None:
        on_images(0, images, infotexts)
        images = []
    return type(result)(images=images, infotexts=infotexts, info=info, seeds=result.seeds,
                        subseeds=result.subseeds, timings=timings, detected_maps=result.detected_maps)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation cancelled")
