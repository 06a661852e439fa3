"""Init images, inpainting masks and upscalers, as the webui (v1.10) prepares them for img2img and the hires fix.

The webui rules live here, once (modules/images.py ``resize_image``, modules/masking.py, processing.py
``StableDiffusionProcessingImg2Img.init`` and ``apply_overlay``, the latent and simple upscalers):

* resize modes: 0 "Just resize" (stretch), 1 "Crop and resize" (cover, centre crop), 2 "Resize and fill"
  (fit, the borders stretched from the image's edges), 3 "Just resize (latent upscale)" (the image is encoded at
  its own size and the latent resized bilinearly; its mask goes through mode 2's branch, as in the webui);
* an enlarging image resize goes through the img2img upscaler ("None": one Lanczos resize; "Lanczos",
  "Nearest": the webui's upscaler classes, then Lanczos to the exact size);
* masks: inverted, Gaussian-blurred (separably in x and y, kernel ``2 * int(2.5 * blur + 0.5) + 1``, reflected
  borders), doubled for the overlay, resized to the latent and rounded; "fill" blurs the unmasked colours into
  the hole before encoding, "latent noise" / "latent nothing" replace the masked latent;
* "Only masked" (inpaint_full_res): the mask's bounding box plus padding, grown to the generation's aspect
  ratio, is generated at full size and pasted back;
* the result: the original's unmasked pixels composited over the generated image (the blurred mask as alpha).

The pipeline (engine.pipeline) calls :func:`prepare_init`, encodes :attr:`InitPlan.pixels`, asks
:meth:`InitPlan.latent_mask` for the per-step blend, and :meth:`InitPlan.finish` for each decoded image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from core.errors import InvalidRequest
from engine.controlnet.images import as_array
from engine.models.family import VAE_SCALE_FACTOR
from engine import upscalers
from engine.rules import MIN_SIZE

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")
# webui shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS: Mapping[str, tuple[str, bool]] = MappingProxyType({
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
})
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")


def check_image_upscaler(name: str, field_name: str, *, latent: bool, models_dir=None) -> str:
    """The upscaler of that name this engine has, as it names it (the name matched in any case); with
    ``models_dir``, the model upscalers of its folders too (engine.upscalers)."""
    names = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS) if latent else IMAGE_UPSCALERS
    if name in names:
        return name
    found = [n for n in names if isinstance(name, str) and n.lower() == name.strip().lower()]  # any case
    if found:
        return found[0]
    if models_dir is not None:
        try:
            return upscalers.resolve(name, models_dir, field_name)
        except InvalidRequest as exc:
            raise InvalidRequest(field_name, exc.message, ", ".join(
                (*(LATENT_UPSCALERS if latent else ()), *upscalers.upscaler_names(models_dir)))) from None
    raise InvalidRequest(field_name, f"the upscaler {str(name)[:100]!r} is not available in this engine",
                         ", ".join(names))


# ------------------------------------------------------------------------------------------------ resizing
def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image))


def _upscaler_resize(im, w: int, h: int, upscaler: str, how: upscalers.Upscaling | None = None):
    """webui images.resize_image's inner ``resize``: a plain Lanczos resize, unless the upscaler enlarges."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if upscaler in (None, "None") or im.mode == "L":
        return im.resize((w, h), resample=lanczos)
    scale = max(w / im.width, h / im.height)
    if scale > 1.0 and upscaler not in IMAGE_UPSCALERS:  # a model upscaler (engine.upscalers)
        out = upscalers.upscale(np.asarray(im.convert("RGB")), scale, upscaler, how or upscalers.Upscaling())
        im = Image.fromarray(out)
    elif scale > 1.0:  # webui Upscaler.upscale with UpscalerLanczos / UpscalerNearest
        resample = lanczos if upscaler == "Lanczos" else Image.Resampling.NEAREST
        dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
        for _ in range(3):
            if im.width >= dest_w and im.height >= dest_h and scale != 1:
                break
            shape = im.size
            im = im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
            if shape == im.size:
                break
        if im.size != (dest_w, dest_h):
            im = im.resize((int(dest_w), int(dest_h)), resample=lanczos)
    if im.size != (w, h):
        im = im.resize((w, h), resample=lanczos)
    return im


def resize_image(mode: int, im, width: int, height: int, upscaler: str = "None"):
    """webui images.resize_image on a PIL image (modes 1/2 return RGB, as the webui's canvas)."""
    from PIL import Image

    if mode == 0:
        return _upscaler_resize(im, width, height, upscaler)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _upscaler_resize(im, src_w, src_h, upscaler)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode != 1:
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                          box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill_width + src_w, 0))
    return res


def upscale_image(image: np.ndarray, width: int, height: int, upscaler: str,
                  how: upscalers.Upscaling | None = None) -> np.ndarray:
    """An RGB uint8 image resized to (width, height) through an image upscaler (the hires fix's image path;
    ``how``: where model upscalers are and how they run)."""
    return np.asarray(_upscaler_resize(_pil(image), width, height, upscaler, how).convert("RGB"), dtype=np.uint8)


def upscale_latent(latents: Any, height: int, width: int, upscaler: str) -> Any:
    """(B, 4, h, w) latents -> (B, 4, height, width) with the webui's latent upscale mode ``upscaler``."""
    import torch

    mode, antialias = LATENT_UPSCALERS[upscaler]
    t = torch.from_numpy(np.ascontiguousarray(latents)) if isinstance(latents, np.ndarray) else latents
    out = torch.nn.functional.interpolate(t.float(), size=(height, width), mode=mode, antialias=antialias)
    return out.numpy() if isinstance(latents, np.ndarray) else out.to(latents.dtype)


# ------------------------------------------------------------------------------------------------ masks
def _gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def blur_mask(mask: np.ndarray, blur_x: int, blur_y: int) -> np.ndarray:
    """The webui's mask blur: cv2.GaussianBlur along x then y with its kernel sizes and reflected borders
    (BORDER_REFLECT_101), in float and rounded to uint8 (cv2's fixed point can differ by 1 level)."""
    out = mask.astype(np.float64)
    for axis, blur in ((1, blur_x), (0, blur_y)):
        if blur > 0:
            size = 2 * int(2.5 * blur + 0.5) + 1
            kernel = _gaussian_kernel(blur, size)
            pad = size // 2
            widths = [(0, 0), (0, 0)]
            widths[axis] = (pad, pad)
            padded = np.pad(out, widths, mode="reflect")
            out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """webui masking.get_crop_region_v2: the bounding box of the mask's non-zero pixels plus ``padding``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if padding:
        return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)
    return x1, y1, x2, y2


def expand_crop_region(region, processing_width: int, processing_height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """webui masking.expand_crop_region: grow the region to the generation's aspect ratio, inside the image."""
    x1, y1, x2, y2 = region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """One axis of expand_crop_region: ``[lo, hi)`` grown by ``diff`` around its centre, shifted back inside
    ``[0, limit)`` and clipped to it."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def fill(image, mask):
    """webui masking.fill: the masked region filled with the unmasked colours, blurred in from its edges."""
    from PIL import Image, ImageFilter, ImageOps

    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class InitPlan:
    """An init image made ready for one generation size.

    ``pixels``: (1, 3, H', W') float32 in [0, 1] for the VAE encoder (H' x W' is the generation size, or the
    image's own size for the latent-upscale mode). ``latent_size`` is the (h, w) the encoded latent must have.
    """

    pixels: np.ndarray = field(repr=False)
    latent_size: tuple[int, int]
    resize_latent: bool
    inpainting_fill: int | None  # None: no mask
    mask_image: Any = field(default=None, repr=False)  # PIL image the latent mask is made from
    overlay: Any = field(default=None, repr=False)  # RGBA: the original's unmasked pixels
    paste_to: tuple[int, int, int, int] | None = None
    infotext: Mapping[str, Any] = field(default_factory=dict)
    mask_round: bool = True

    def latent_mask(self) -> np.ndarray | None:
        """(h, w) float32 of the webui's ``nmask``: 1 where the latent is repainted, 0 where it is kept
        (rounded to 0/1 unless mask_round is off)."""
        if self.mask_image is None:
            return None
        h, w = self.latent_size
        latmask = np.asarray(self.mask_image.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
        return (np.around(latmask) if self.mask_round else latmask).astype(np.float32)

    def finish(self, image: np.ndarray) -> np.ndarray:
        """webui apply_overlay: a decoded RGB uint8 image with the original's unmasked pixels pasted over."""
        if self.overlay is None:
            return image
        from PIL import Image

        im = _pil(image)
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            base = Image.new("RGBA", (self.overlay.width, self.overlay.height))
            base.paste(resize_image(1, im, w, h), (x, y))
            im = base
        im = im.convert("RGBA")
        im.alpha_composite(self.overlay)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def prepare_init(init: Any, width: int, height: int, multiple: int | None = None,
                 scale: int = VAE_SCALE_FACTOR) -> InitPlan:
    """The webui's img2img init (processing.StableDiffusionProcessingImg2Img.init) for one init image:
    ``init`` is an engine.request.InitImage, (width, height) the generation size, ``scale`` the family's VAE
    factor (image pixels per latent pixel; ``multiple``: the latent-upscale mode's size multiple, default it)."""
    multiple = multiple or scale
    from PIL import Image, ImageOps

    image = _pil(as_array(init.image)).convert("RGB")
    infotext: dict[str, Any] = {}
    crop = None
    mask_image = overlay_mask = None
    if init.mask is not None:
        mask = _pil(as_array(init.mask)).convert("L")
        if init.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
            infotext["Mask mode"] = "Inpaint not masked"
        if init.mask_blur_x > 0 or init.mask_blur_y > 0:
            mask = _pil(blur_mask(np.asarray(mask), init.mask_blur_x, init.mask_blur_y))
            infotext["Mask blur"] = init.mask_blur_x if init.mask_blur_x == init.mask_blur_y else None
        if init.inpaint_full_res:
            if mask.size != image.size:
                raise InvalidRequest("init.mask", f"is {mask.width}x{mask.height}, the init image "
                                     f"{image.width}x{image.height}", "a mask of the init image's size for "
                                     "inpaint_full_res")
            region = crop_region(np.asarray(mask), init.inpaint_full_res_padding)
            if region is not None:
                overlay_mask = mask
                crop = expand_crop_region(region, width, height, mask.width, mask.height)
                mask_image = resize_image(2, mask.crop(crop), width, height)
                infotext["Inpaint area"] = "Only masked"
                infotext["Masked area padding"] = init.inpaint_full_res_padding
            # a blank mask: plain img2img, as the webui
        else:
            mask_image = resize_image(init.resize_mode, mask, width, height)
            doubled = np.clip(np.asarray(mask_image).astype(np.float32) * 2, 0, 255).astype(np.uint8)
            overlay_mask = _pil(doubled)

    if crop is None and init.resize_mode != 3:
        image = resize_image(init.resize_mode, image, width, height, init.upscaler)
    overlay = None
    if mask_image is not None:
        if overlay_mask.size != image.size:
            overlay_mask = resize_image(init.resize_mode, overlay_mask, image.width, image.height)
        masked = Image.new("RGBa", (image.width, image.height))
        masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
        overlay = masked.convert("RGBA")
    if crop is not None:
        image = resize_image(2, image.crop(crop), width, height)
    if mask_image is not None:
        if init.inpainting_fill != 1:
            image = fill(image, mask_image)
        infotext["Masked content"] = INPAINTING_FILLS[init.inpainting_fill] if init.inpainting_fill != 1 else None
    if init.resize_mode == 3 and crop is None:  # encoded at its own size: a multiple of the UNet's downscale
        image = image.resize((max(image.width // multiple, 1) * multiple, max(image.height // multiple, 1) * multiple),
                             resample=Image.Resampling.LANCZOS) if image.width % multiple or \
            image.height % multiple else image
    pixels = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
    if init.initial_noise_multiplier != 1.0:
        infotext["Noise multiplier"] = init.initial_noise_multiplier
    return InitPlan(np.ascontiguousarray(pixels), (height // scale, width // scale), init.resize_mode == 3 and crop is None,
                    init.inpainting_fill if mask_image is not None else None, mask_image, overlay,
                    None if crop is None else (crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1]),
                    MappingProxyType({k: v for k, v in infotext.items() if v is not None}), init.mask_round)


# ------------------------------------------------------------------------------------------------ hires fix
@dataclass(frozen=True)
class HiresSize:
    """The hires fix's sizes (webui StableDiffusionProcessingTxt2Img.calculate_target_resolution): the first
    pass is upscaled to ``upscale_width x upscale_height`` and its latent cut (centred) to ``width x height``."""

    width: int
    height: int
    upscale_width: int
    upscale_height: int
    field: str  # the request field the size comes from (hires.scale, hires.resize_x, hires.resize_y)
    first_width: int
    first_height: int
    scale: int = VAE_SCALE_FACTOR  # image pixels per latent pixel (the family's VAE factor)

    @property
    def upscale_latent(self) -> tuple[int, int]:
        """(height, width) of the first pass's latent upscaled (before the cut)."""
        return self.upscale_height // self.scale, self.upscale_width // self.scale

    def truncate(self, latents: Any) -> Any:
        f = self.scale
        ty = self.upscale_height // f - self.height // f
        tx = self.upscale_width // f - self.width // f
        if not tx and not ty:
            return latents
        h, w = latents.shape[2], latents.shape[3]
        return latents[:, :, ty // 2:h - (ty + 1) // 2, tx // 2:w - (tx + 1) // 2]

    def allowed(self, multiple: int, max_size: int) -> str:
        if self.field == "hires.scale":
            top = max_size / max(self.first_width, self.first_height)
            return (f"a scale giving a second pass of multiples of {multiple} from {MIN_SIZE} to {max_size} pixels "
                    f"a side (at most {top:g} for {self.first_width}x{self.first_height})")
        return f"sizes giving a second pass of multiples of {multiple} from {MIN_SIZE} to {max_size} pixels a side"


def hires_size(width: int, height: int, hires: Any, scale: int = VAE_SCALE_FACTOR) -> HiresSize:
    """The webui's hires target for a first pass of ``width x height`` (``hires``: engine.request.Hires); the
    second pass runs at the latent size the webui gets: ``upscale // scale`` latent pixels (``scale``: the
    family's VAE factor, 8), less the cut."""
    rx, ry = int(hires.resize_x or 0), int(hires.resize_y or 0)
    target = None
    if rx == 0 and ry == 0:
        uw, uh, name = int(width * hires.scale), int(height * hires.scale), "hires.scale"
    elif ry == 0:
        uw, uh, name = rx, rx * height // width, "hires.resize_x"
    elif rx == 0:
        uw, uh, name = ry * width // height, ry, "hires.resize_y"
    else:
        name, target = "hires.resize_x", (rx, ry)
        if width / height < rx / ry:
            uw, uh = rx, rx * height // width
        else:
            uw, uh = ry * width // height, ry
    f = scale
    tx, ty = ((uw - target[0]) // f, (uh - target[1]) // f) if target else (0, 0)
    return HiresSize(f * (uw // f - tx), f * (uh // f - ty), uw, uh, name, width, height, f)
