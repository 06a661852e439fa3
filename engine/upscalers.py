"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ... through spandrel) beside the PIL ones, as the webui
(v1.9) finds, names and runs them.

* **Where**: the webui's folders under the models directory (:data:`FOLDERS`). Files are named by their stem,
  except the webui's fixed names of the Real-ESRGAN and DAT releases (``RealESRGAN_x4plus.pth`` is
  "R-ESRGAN 4x+", ``DAT_x4.pth`` "DAT x4"), which are listed when their file is present (nothing is downloaded).
* **How**: webui ``Upscaler.upscale``: up to three passes of the model while the image is smaller than the target
  (rounded down to a multiple of 8), then one Lanczos resize to it; each pass is tiled (the webui's
  ``ESRGAN_tile`` / ``ESRGAN_tile_overlap`` options, in input pixels; 0: whole image) with the tiles' overlaps
  blended by linear ramps (the webui averages them flat; ramps leave no visible seam). Tiles keep the peak memory
  of a pass to one tile's activations plus the output image (:func:`estimate_bytes`).
* Loaded models are kept per (file, mtime, device), at most :data:`CACHE_SIZE`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import Cancelled, InvalidRequest, ModelError
from engine.spandrel_loader import load_model

log = logging.getLogger(__name__)

PIL_UPSCALERS = ("None", "Lanczos", "Nearest")
# webui folder -> the model_name the webui lists for its upscaler class (None: the file's stem)
FOLDERS = {"ESRGAN": "ESRGAN_4x", "RealESRGAN": None, "SwinIR": "SwinIR 4x", "HAT": None, "DAT": None}
EXTENSIONS = (".pth", ".pt", ".safetensors")
# the webui's fixed names of known releases: folder -> {file stem: (name, scale)}
KNOWN = {
    "RealESRGAN": {"RealESRGAN_x4plus": ("R-ESRGAN 4x+", 4), "RealESRGAN_x4plus_anime_6B": ("R-ESRGAN 4x+ Anime6B", 4),
                   "RealESRGAN_x2plus": ("R-ESRGAN 2x+", 2), "realesr-general-x4v3": ("R-ESRGAN General 4xV3", 4),
                   "realesr-general-wdn-x4v3": ("R-ESRGAN General WDN 4xV3", 4),
                   "realesr-animevideov3": ("R-ESRGAN AnimeVideo", 4)},
    "DAT": {"DAT_x2": ("DAT x2", 2), "DAT_x3": ("DAT x3", 3), "DAT_x4": ("DAT x4", 4)},
}
DEFAULT_TILE, DEFAULT_OVERLAP = 192, 8  # webui ESRGAN_tile, ESRGAN_tile_overlap
CACHE_SIZE = 2
_SCALE_IN_NAME = re.compile(r"(?:^|[^0-9a-z])(?:x([1-8])|([1-8])x)(?:[^0-9a-z]|$)", re.I)


@dataclass(frozen=True)
class UpscalerFile:
    """A model upscaler found on disk: the webui's name, its file, folder, the scale it is listed with."""

    name: str
    path: Path
    folder: str
    scale: int

    @property
    def model_name(self) -> str:
        return FOLDERS.get(self.folder) or self.path.stem


def _listed_scale(stem: str) -> int:
    match = _SCALE_IN_NAME.search(stem)
    return int(match.group(1) or match.group(2)) if match else 4


def find_upscalers(models_dir: str | Path) -> list[UpscalerFile]:
    """The model upscalers under ``models_dir`` (a directory listing; nothing is read), in the webui's order:
    folder by folder, files by name; a name already taken is skipped (the first wins)."""
    out: list[UpscalerFile] = []
    taken = {n.lower() for n in PIL_UPSCALERS}
    for folder in FOLDERS:
        base = Path(models_dir) / folder
        try:
            files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        except OSError:
            continue
        for path in files:
            name, scale = KNOWN.get(folder, {}).get(path.stem, (path.stem, _listed_scale(path.stem)))
            if name.lower() in taken:
                continue
            taken.add(name.lower())
            out.append(UpscalerFile(name, path, folder, scale))
    return out


def upscaler_names(models_dir: str | Path | None) -> tuple[str, ...]:
    """Every image upscaler's name: the PIL ones, then the model files'."""
    models = find_upscalers(models_dir) if models_dir is not None else []
    return (*PIL_UPSCALERS, *(u.name for u in models))


def resolve(name: str, models_dir: str | Path | None, field: str) -> str:
    """The upscaler ``name`` means (matched in any case), as it is named; InvalidRequest naming ``field`` with
    the names there are, and for a webui release name that is not installed, the file and folder it needs."""
    if name in PIL_UPSCALERS:
        return name
    names = upscaler_names(models_dir)
    wanted = str(name).strip().lower() if isinstance(name, str) else None
    for known in names:
        if known.lower() == wanted:
            return known
    hint = ""
    for folder, releases in KNOWN.items():
        for stem, (release, _) in releases.items():
            if release.lower() == wanted:
                hint = f" (put {stem}.pth in the models folder {folder}/)"
    if not hint and models_dir is not None:
        hint = f" (model upscalers are read from the models folders {', '.join(f + '/' for f in FOLDERS)})"
    raise InvalidRequest(field, f"the upscaler {str(name)[:100]!r} is not available in this engine{hint}",
                         ", ".join(names))


def find(name: str, models_dir: str | Path | None) -> UpscalerFile | None:
    """The model file of upscaler ``name`` (its exact name), None for the PIL ones."""
    if name in PIL_UPSCALERS or models_dir is None:
        return None
    return next((u for u in find_upscalers(models_dir) if u.name == name), None)


# ------------------------------------------------------------------------------------------------- running
class ModelUpscaler:
    """A loaded model upscaler (a spandrel image model) on a device."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = Path(path)
        self.device = device
        self.model = load_model(self.path, device)
        self.scale = int(self.model.scale)
        self.architecture = str(self.model.architecture.name)
        if self.model.input_channels != 3 or self.model.output_channels != 3:
            raise ModelError(str(path), f"is a {self.model.input_channels}->{self.model.output_channels} channel "
                             "model; an upscaler takes and gives RGB")

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.model.parameters())

    def __call__(self, image: np.ndarray, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 cancel: threading.Event | None = None, progress: Callable[[int, int], None] | None = None
                 ) -> np.ndarray:
        """One pass of the model over an RGB uint8 (H, W, 3) image: (H*s, W*s, 3) uint8, tiled."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)
        with torch.inference_mode():
            out = tiled(lambda t: self.model(t.to(self.device)).float().cpu(), x, self.scale, tile, overlap,
                        cancel=cancel, progress=progress)
            return out[0].clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: every ``tile - overlap`` pixels, the last one flush with the end."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, start: int, end: int, total: int, overlap: int):
    """Blend weights of one tile along one side, in output pixels: a ramp over the overlap on sides that meet
    another tile, flat 1 elsewhere (never 0, so every pixel has weight)."""
    import torch

    w = torch.ones(length)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, dtype=torch.float32) + 1.0) / (overlap + 1.0)
    n = min(overlap, length)
    if start > 0:
        w[:n] = torch.minimum(w[:n], ramp[:n])
    if end < total:
        w[length - n:] = torch.minimum(w[length - n:], ramp[:n].flip(0))
    return w


def tiled(run: Callable, x, scale: int, tile: int, overlap: int, *, cancel: threading.Event | None = None,
          progress: Callable[[int, int], None] | None = None):
    """``run`` over a (1, C, H, W) tensor in ``tile``-sized tiles overlapping by ``overlap`` input pixels,
    blended with linear ramps across each overlap; the whole tensor at once when ``tile`` is 0 or covers it."""
    import torch

    _, c, h, w = x.shape
    if tile <= 0 or (tile >= h and tile >= w):
        if progress:
            progress(0, 1)
        out = run(x)
        if progress:
            progress(1, 1)
        return out
    overlap = max(0, min(overlap, tile // 2))
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _starts(h, th, overlap), _starts(w, tw, overlap)
    result = torch.zeros((1, c, h * scale, w * scale))
    weight = torch.zeros((1, 1, h * scale, w * scale))
    total, done = len(ys) * len(xs), 0
    for y in ys:
        for x0 in xs:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after {done} of {total} upscaler tiles")
            out = run(x[..., y:y + th, x0:x0 + tw])
            oy, ox, oh, ow = y * scale, x0 * scale, th * scale, tw * scale
            wy = _ramp(oh, oy, oy + oh, h * scale, overlap * scale)
            wx = _ramp(ow, ox, ox + ow, w * scale, overlap * scale)
            mask = (wy[:, None] * wx[None, :])[None, None]
            result[..., oy:oy + oh, ox:ox + ow] += out[..., :oh, :ow] * mask
            weight[..., oy:oy + oh, ox:ox + ow] += mask
            done += 1
            if progress:
                progress(done, total)
    return result / weight


_cache: OrderedDict[tuple, ModelUpscaler] = OrderedDict()
_cache_lock = threading.Lock()


def load(path: Path, device: str = "cpu") -> ModelUpscaler:
    """The loaded upscaler of ``path`` on ``device`` (kept while the file is unchanged; at most CACHE_SIZE)."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, device)
    with _cache_lock:
        model = _cache.get(key)
        if model is not None:
            _cache.move_to_end(key)
            return model
    model = ModelUpscaler(path, device)
    with _cache_lock:
        _cache[key] = model
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    log.info("upscaler %s loaded: %s x%d on %s", Path(path).name, model.architecture, model.scale, device)
    return model


@dataclass(frozen=True)
class Upscaling:
    """How a model upscaler runs: the models folder, device and tiling (the webui's ESRGAN_tile options)."""

    models_dir: Path | None = None
    device: str = "cpu"
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP


def upscale(image: np.ndarray, scale: float, name: str, how: Upscaling, *, cancel: threading.Event | None = None,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """webui ``Upscaler.upscale``: an RGB uint8 image enlarged by ``scale`` through upscaler ``name`` (PIL or
    model): passes while smaller than the target (rounded down to a multiple of 8, at most 3), then Lanczos to it."""
    from PIL import Image

    dest_w, dest_h = int((image.shape[1] * scale) // 8 * 8), int((image.shape[0] * scale) // 8 * 8)
    entry = find(name, how.models_dir)
    if entry is None and name not in PIL_UPSCALERS:
        raise InvalidRequest("upscaler", f"the upscaler {name!r} is not available in this engine",
                             ", ".join(upscaler_names(how.models_dir)))
    model = load(entry.path, how.device) if entry is not None else None
    im = image
    for i in range(3):
        if im.shape[1] >= dest_w and im.shape[0] >= dest_h and (i > 0 or scale != 1):
            break
        shape = im.shape
        if model is not None:
            im = model(im, tile=how.tile, overlap=how.overlap, cancel=cancel, progress=progress)
        elif name == "None":
            break
        else:
            resample = Image.Resampling.LANCZOS if name == "Lanczos" else Image.Resampling.NEAREST
            im = np.asarray(Image.fromarray(im).resize((int(im.shape[1] * scale), int(im.shape[0] * scale)),
                                                       resample=resample))
        if shape == im.shape:
            break
    if (im.shape[1], im.shape[0]) != (dest_w, dest_h):
        im = np.asarray(Image.fromarray(im).resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS))
    return np.ascontiguousarray(im, dtype=np.uint8)


def estimate_bytes(width: int, height: int, scale: int = 4, tile: int = DEFAULT_TILE, features: int = 64,
                   parameters: int = 70 * 2**20) -> int:
    """Peak bytes of one model pass on a (width, height) image: the input and the blended output with its
    weight (fp32), one tile's activations (about 12 fp32 feature maps of ``features`` channels at the tile size,
    and 3 at the output tile size: an RRDB's dense block and its upsampler), and the weights."""
    t_w, t_h = (min(tile, width), min(tile, height)) if tile > 0 else (width, height)
    image = 4 * (3 * width * height + 4 * width * height * scale * scale)
    tile_bytes = 4 * features * t_w * t_h * (12 + 3 * scale * scale)
    return image + tile_bytes + parameters
