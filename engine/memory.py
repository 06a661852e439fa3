"""Peak memory of a txt2img request, known before it runs: a model of the activations by architecture (the
UNet and VAE configs), size, batch, backend and attention kind, and the budget check built on it.

What dominates, measured on CPU (benchmarks/memory.py, BENCHMARKS.md "Memory per request size"):

* **Attention score matrices.** A self-attention layer over T = h*w latent tokens holds scores and their
  softmax, 2 x rows x heads x T^2 fp32 values, when the graph computes full attention (the ONNX export before
  export.attention: MatMul -> Softmax -> MatMul; now 16 query chunks on the CPU runtimes). T grows with the 4th power of the image side: tiny-sd1 (4 heads at the 64x64
  latent of a 512^2 image) measured +1.2 GiB, the demo model at 1024^2 20 GB. torch's CPU
  ``scaled_dot_product_attention`` (flash kernel) does not build them for the UNet; it does for the VAE's single
  head mid-block attention (measured). ``chunked:K`` (query chunks) divides them by K.
* **Full-resolution VAE activations**: about 5 fp32 tensors of the decoder's first-block width at the image
  size, per image in the batch (tiny-sd1: 16 channels, measured 260-400 B per pixel). Above the engine's tiling
  size (``engine.tiling.VaeTiling``, the same object the pipeline decodes with) they are those of one tile,
  plus the blended image being assembled (3 channels, and its normalised copy: 6 fp32 per pixel).

The UNet step and the VAE decode do not overlap, so the peak is the larger of the two stages, plus the model
itself (weights as the backend holds them) and the process. Margin: the test (tests/test_memory.py) runs the
real engine and requires the measured peak growth to lie within 35% (+ 96 MiB) of the estimate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import SdEngineError
from core.safetensors_header import read_safetensors_header
from engine.models.checkpoints import bundled_config, detect_arch, detect_folder_arch
from engine.models.convert import METADATA_KEY
from engine.models.family import FAMILIES, VAE_SCALE_FACTOR, Arch, Kind
from engine.tiling import VaeTiling
from export.attention import DEFAULT_CHUNKS, attention_kind

FP32 = 4
# scores + softmax alive at once in a full-attention graph
FULL_ATTENTION_ARRAYS = 2.0
# full-resolution fp32 tensors of the VAE decoder's first-block width alive at once (measured, see above)
VAE_FULL_RES_TENSORS = 5.0
# the tiled decode's output being assembled: sum, weights, normalised copy (fp32 values per pixel and image)
TILED_OUTPUT_VALUES = 7.0
# UNet conv activations: fp32 tensors of a level's width alive at once (OpenVINO's CPU plugin plans more:
# measured 1.25-1.35x the default at 2048^2 on tiny-sd1 and the demo model, BENCHMARKS.md)
UNET_TENSORS = 8.0
UNET_TENSORS_BY_BACKEND = {"openvino": 10.0}
# runtimes that keep a stage's activation buffers for the next call (OpenVINO's infer requests, ONNX Runtime's
# arena): the UNet's are still held while the VAE decodes, so the stages add up; torch frees them between stages
RETAINS_ACTIVATIONS = frozenset({"openvino", "onnxruntime"})
# what a backend holds per byte of weights in the checkpoint file (ORT keeps initializers and its own copies;
# sdengine ORT SD1.5 peaked at 9.2 GB for a 4.3 GB fp32 model, GPU.md), and the process without a model
WEIGHT_FACTOR = {"onnxruntime": 2.0, "torch": 1.1, "tensorrt": 1.2}
PROCESS_BYTES = 450 * 2**20
# OpenVINO's plugin and compiled models: the process after a 64x64 warm-up measured 630-650 MiB (tiny-sd1, demo)
PROCESS_BYTES_BY_BACKEND = {"openvino": 640 * 2**20}
# attention kind of each backend's graph today: (UNet self-attention, VAE mid-block attention)
# (the ONNX export computes attention in export.attention.DEFAULT_CHUNKS query slices for the CPU runtimes)
_CHUNKED = attention_kind(DEFAULT_CHUNKS)
# (OpenVINO gets full attention, which its CPU plugin fuses into a blocked kernel: no score matrices, measured)
BACKEND_ATTENTION = {"onnxruntime": (_CHUNKED, _CHUNKED), "openvino": ("flash", "flash"),
                     "torch": ("flash", "full"), "tensorrt": ("flash", "flash")}
DEFAULT_BUDGET_FRACTION = 0.5
PLAN_SIZES = tuple(range(64, 2049, 64))


def _attention_factor(kind: str) -> float:
    """Score arrays per (row, head, T^2) for an attention kind: "full", "flash" (none), "chunked:K"."""
    if kind == "full":
        return FULL_ATTENTION_ARRAYS
    if kind == "flash":
        return 0.0
    if kind.startswith("chunked:"):
        return FULL_ATTENTION_ARRAYS / max(int(kind.split(":", 1)[1]), 1)
    raise ValueError(f"unknown attention kind {kind!r} (full, flash, chunked:K)")


def _as_tuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclass(frozen=True)
class Architecture:
    """What the memory model reads from a model's diffusers configs."""

    unet_channels: tuple[int, ...]  # per level
    unet_heads: tuple[int, ...]  # per level
    unet_attention: tuple[bool, ...]  # per level: has transformer blocks
    vae_channels: tuple[int, ...]
    vae_attention: bool = True
    weights_bytes: int = 0
    text_layers: int | None = None  # fewest hidden layers of the text encoders (the largest clip_skip)
    family: str | None = None  # engine.models.family.Arch value, when detected from the weights

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: the family's (the SD VAEs' 8 when the family is unknown)."""
        return FAMILIES[Arch(self.family)].vae_scale_factor if self.family else VAE_SCALE_FACTOR

    @classmethod
    def from_configs(cls, unet: Mapping[str, Any], vae: Mapping[str, Any], weights_bytes: int = 0,
                     text: tuple[Mapping[str, Any], ...] = ()) -> "Architecture":
        channels = tuple(int(c) for c in unet["block_out_channels"])
        n = len(channels)
        # diffusers: num_attention_heads, else the legacy attention_head_dim (which SD1/SD2/SDXL configs use
        # as the head count)
        heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
        heads = tuple(int(h) for h in _as_tuple(heads, n))
        kinds = tuple(unet.get("down_block_types") or ())
        attention = tuple("Attn" in str(k) for k in kinds) or (True,) * n
        layers = [int(t["num_hidden_layers"]) for t in text if t and t.get("num_hidden_layers")]
        return cls(channels, heads, attention, tuple(int(c) for c in vae["block_out_channels"]),
                   bool(vae.get("mid_block_add_attention", True)), int(weights_bytes), min(layers) if layers else None)


@dataclass(frozen=True)
class Estimate:
    """Bytes: ``total`` = ``base`` (process + weights) + ``activations`` + ``held``.

    ``unet``/``vae``/``upscale``: the largest activations of each kind of stage; ``activations`` (``peak``):
    their sum on a runtime that keeps a stage's buffers for its next call (OpenVINO, ONNX Runtime), else the
    largest (torch frees them; the stages never run at once); ``held``: what stays alive across them (ControlNet control images, the batch's finished images,
    the images of earlier iterations when they are not streamed, the webui answer's base64 copies)."""

    total: int
    base: int
    unet: int
    vae: int
    upscale: int = 0
    held: int = 0
    peak: int | None = None  # the stages at the peak: their sum on runtimes that keep buffers, else the largest

    @property
    def activations(self) -> int:
        return max(self.unet, self.vae, self.upscale) if self.peak is None else self.peak


def _unet_pass(arch: Architecture, width: int, height: int, rows: int, kind: str,
               tensors: float = UNET_TENSORS, ip_tokens: int = 0) -> int:
    """A sampling step's activations: per level, the conv tensors and (with attention) the score arrays: the
    self-attention's (T x T) and, with IP-Adapter units, their image-prompt attention's (T x ``ip_tokens``: the
    largest adapter's units x tokens, one batched attention; it runs after the self-attention, so the larger
    counts; engine.ip_adapter.attention_tokens)."""
    f = arch.vae_scale_factor
    lh, lw = max(height // f, 1), max(width // f, 1)
    attention = conv = 0.0
    for level, (channels, heads, has_attention) in enumerate(zip(arch.unet_channels, arch.unet_heads,
                                                                  arch.unet_attention)):
        tokens = max(lh >> level, 1) * max(lw >> level, 1)
        conv += rows * channels * tokens * FP32 * tensors
        if has_attention:
            attention = max(attention, rows * heads * tokens * max(tokens, ip_tokens) * FP32 * _attention_factor(kind))
    return int(attention + conv)


def _vae_pass(arch: Architecture, width: int, height: int, batch_size: int, kind: str,
              tiling: VaeTiling | None) -> int:
    """A VAE decode (or encode: the mirror network, the same widths) of a batch at this image size: the
    activations of the whole image or of one tile, and the tiled output being assembled."""
    f = arch.vae_scale_factor
    tw, th = tiling.tile_shape(width, height) if tiling is not None else (width, height)
    tokens = (th // f) * (tw // f) if arch.vae_attention else 0
    vae = batch_size * (arch.vae_channels[0] * tw * th * FP32 * VAE_FULL_RES_TENSORS
                        + tokens * tokens * FP32 * _attention_factor(kind))
    if (tw, th) != (width, height):
        vae += batch_size * width * height * FP32 * TILED_OUTPUT_VALUES
    return int(vae)


def _base(arch: Architecture, backend: str) -> int:
    return PROCESS_BYTES_BY_BACKEND.get(backend, PROCESS_BYTES) + int(arch.weights_bytes * WEIGHT_FACTOR.get(backend, 2.0))


def _stages(backend: str, *stages: int) -> int:
    """The activations of a request's stages at its peak: their sum on a runtime that keeps each stage's buffers
    (:data:`RETAINS_ACTIVATIONS`), else the largest."""
    return sum(stages) if backend in RETAINS_ACTIVATIONS else max(stages)


def estimate(arch: Architecture, width: int, height: int, batch_size: int = 1, *, cfg: bool = True,
             backend: str = "onnxruntime", attention: tuple[str, str] | None = None,
             tiling: VaeTiling | None = VaeTiling(), ip_tokens: int = 0) -> Estimate:
    """Peak memory of one batch of a one-pass request (sampling, then the VAE decode). ``cfg``: the UNet runs
    conditional and unconditional rows (cfg_scale != 1). ``attention``: (UNet, VAE) attention kinds; default:
    the backend's. ``tiling``: the engine's VAE tiling (``EngineConfig.vae_tiling``; None: never tiled).
    :func:`estimate_request` adds what a whole request holds (iterations, hires fix, units, the answer)."""
    unet_kind, vae_kind = attention or BACKEND_ATTENTION.get(backend, ("full", "full"))
    rows = batch_size * (2 if cfg else 1)
    unet = _unet_pass(arch, width, height, rows, unet_kind, UNET_TENSORS_BY_BACKEND.get(backend, UNET_TENSORS),
                      ip_tokens)
    vae = _vae_pass(arch, width, height, batch_size, vae_kind, tiling)
    base = _base(arch, backend)
    return Estimate(total=base + _stages(backend, unet, vae), base=base, unet=unet, vae=vae,
                    peak=_stages(backend, unet, vae))


# ------------------------------------------------------------------------------------------- whole requests
# a finished image: H x W x 3 uint8
IMAGE_BYTES_PER_PX = 3
# the decoded batch (float32, 3 channels) while it becomes uint8 (engine.pipeline.to_uint8: one image's
# temporaries at a time)
DECODED_BYTES_PER_PX = 3 * FP32
# a ControlNet unit's control image at a pass's size: float32 RGB, its uint8 detected map and fitted input
UNIT_BYTES_PER_PX = 3 * FP32 + 2 * IMAGE_BYTES_PER_PX
# the webui route's answer per image: its base64 string in the images list, the JSON text and its UTF-8 bytes,
# each 4/3 of the PNG (api_compat.webui.routes)
ANSWER_COPIES = 3
BASE64_RATIO = 4 / 3
# ADetailer (engine.adetailer): a detector's working memory (MediaPipe's BlazeFace runs on a 128x128 or 192x192
# input; a YOLO .pt file's weights and activations are counted by its file size on top) and the masks of one tab
# (uint8, full image size, one per region: counted for this many regions)
DETECTOR_BYTES = 64 * 2**20
DETAIL_MASKS = 8

# An upscaler pass's cost, for the hires fix's image path and the extras helper's model upscalers:
# ``cost(in_width, in_height, out_width, out_height, batch_size) -> bytes`` at its peak (weights included).
UpscalerCost = Callable[[int, int, int, int, int], int]


def png_bytes(width: int, height: int) -> int:
    """The most a result PNG of this size takes (incompressible pixels: stored deflate blocks, a filter byte per
    row, the infotext chunk): what its file, and the bytes read back from it, may hold."""
    raw = height * (width * IMAGE_BYTES_PER_PX + 1)
    return raw + 5 * (raw // 16384 + 1) + 64 * 1024


def answer_bytes(width: int, height: int, images: int) -> int:
    """What the webui route's answer holds for ``images`` results of this size: their base64 copies (a synchronous
    ``/sdapi/v1/txt2img`` sends every image inline; the ``/scc`` API sends URLs and holds none)."""
    return int(images * ANSWER_COPIES * BASE64_RATIO * png_bytes(width, height))


def resize_pass(in_width: int, in_height: int, out_width: int, out_height: int, batch_size: int) -> int:
    """The hires fix's image upscalers (Lanczos, Nearest: PIL, engine.img2img.upscale_image): the uint8 batch
    in, each image resized (uint8 out), the stacked batch and its float32 copy the VAE encoder takes."""
    out = out_width * out_height
    return int(batch_size * (in_width * in_height * IMAGE_BYTES_PER_PX + out * (2 * IMAGE_BYTES_PER_PX + 2 * 3 * FP32)))


def model_upscaler_pass(scale: float, *, tile: int = 0, features: int = 64, tensors: float = 6.0,
                        model_bytes: int = 0) -> UpscalerCost:
    """The cost function of a model upscaler (ESRGAN-like, e.g. loaded by spandrel) of ``scale`` run over tiles of
    ``tile`` input pixels a side (0: the whole image at once): ``tensors`` fp32 activations of ``features``
    channels at the tile's input size and 3-channel ones at its output size, the float output being assembled
    (with its blend weights), the uint8 result and the stacked float32 batch for the VAE encoder, plus
    ``model_bytes`` (the weights as loaded). Use it as ``estimate_request(..., upscaler=model_upscaler_pass(4,
    tile=192))``; measure a model's ``tensors`` against benchmarks/memory.py before relying on the default."""

    def cost(in_width: int, in_height: int, out_width: int, out_height: int, batch_size: int) -> int:
        tw, th = (min(tile, in_width), min(tile, in_height)) if tile else (in_width, in_height)
        ow, oh = int(tw * scale), int(th * scale)
        activations = features * tw * th * FP32 * tensors + 3 * ow * oh * FP32 * 2
        assembled = (3 + 1) * out_width * out_height * FP32 if tile else 0
        return int(model_bytes + activations + assembled + resize_pass(in_width, in_height, out_width, out_height,
                                                                       batch_size))

    return cost


def estimate_request(arch: Architecture, width: int, height: int, batch_size: int = 1, *, n_iter: int = 1,
                     hires: tuple[int, int] | None = None, upscaler: UpscalerCost | None = None, units: int = 0,
                     answer: bool = False, streamed: bool = True, cfg: bool = True, hires_cfg: bool | None = None,
                     extra: int = 0, ip_tokens: int = 0,
                     backend: str = "onnxruntime", attention: tuple[str, str] | None = None,
                     tiling: VaeTiling | None = VaeTiling(), detailer: tuple[int, int] | None = None,
                     detector_bytes: int = DETECTOR_BYTES, preprocessor_bytes: int = 0) -> Estimate:
    """Peak memory of a whole request: the largest stage of one iteration (sampling; with the hires fix
    ``hires=(width, height)`` of the second pass, the upscale -- latent when ``upscaler`` is None, else the VAE
    decode at the first size, ``upscaler(...)`` and the VAE encode at the second -- and its sampling; the VAE
    decode with the batch becoming uint8) plus what is held across stages: ``units`` ControlNet units' control
    images at each pass's size, the images of earlier iterations when not ``streamed`` (the engine hands each
    iteration's images to the task writer, api_compat.tasks.run_generation, so they are not held), and with
    ``answer`` the webui answer's base64 copies of all ``batch_size * n_iter`` images (:func:`answer_bytes`), and
    ``extra`` bytes of weights loaded beside the model (IP-Adapter units: engine.ip_adapter.memory_bytes), and
    ``ip_tokens`` the image-prompt tokens their attention takes at once (engine.ip_adapter.attention_tokens).
    ``detailer=(width, height)``: ADetailer's inpaint passes at that size (the largest of the request's tabs):
    each pass is a one-image img2img (VAE encode, sampling, decode) run after the request's own passes, one after
    another, so they add one pass's peak (not one per region) while every image of the request is held, with the
    detector (``detector_bytes``) and a tab's masks.
    ``preprocessor_bytes``: the weights of the units' model-based preprocessors (kept loaded between requests:
    engine.controlnet.annotators)."""
    unet_kind, vae_kind = attention or BACKEND_ATTENTION.get(backend, ("full", "full"))
    first = estimate(arch, width, height, batch_size, cfg=cfg, backend=backend, attention=attention, tiling=tiling,
                     ip_tokens=ip_tokens)
    out_w, out_h = hires or (width, height)
    out_px = out_w * out_h
    unet, upscale = first.unet, 0
    tensors = UNET_TENSORS_BY_BACKEND.get(backend, UNET_TENSORS)
    decode = _vae_pass(arch, out_w, out_h, batch_size, vae_kind, tiling)
    decode += batch_size * out_px * (IMAGE_BYTES_PER_PX + DECODED_BYTES_PER_PX)
    held = units * UNIT_BYTES_PER_PX * width * height + preprocessor_bytes + extra
    if hires is not None:
        rows = batch_size * (2 if (cfg if hires_cfg is None else hires_cfg) else 1)
        unet = max(unet, _unet_pass(arch, out_w, out_h, rows, unet_kind, tensors, ip_tokens))
        held += units * UNIT_BYTES_PER_PX * out_px
        if upscaler is not None:
            upscale = max(_vae_pass(arch, width, height, batch_size, vae_kind, tiling)
                          + batch_size * width * height * (DECODED_BYTES_PER_PX + IMAGE_BYTES_PER_PX),
                          upscaler(width, height, out_w, out_h, batch_size),
                          _vae_pass(arch, out_w, out_h, batch_size, vae_kind, tiling)
                          + batch_size * out_px * DECODED_BYTES_PER_PX)
    detail = 0
    if detailer is not None:  # ADetailer's passes run after every image of the request is made: all held
        dw, dh = detailer
        streamed = False
        pass_vae = _vae_pass(arch, dw, dh, 1, vae_kind, tiling) + dw * dh * (IMAGE_BYTES_PER_PX + DECODED_BYTES_PER_PX)
        detail = (_stages(backend, _unet_pass(arch, dw, dh, 2 if cfg else 1, unet_kind, tensors, ip_tokens), pass_vae)
                  + detector_bytes + DETAIL_MASKS * out_px + 2 * out_px * IMAGE_BYTES_PER_PX)
        held += out_px * batch_size * IMAGE_BYTES_PER_PX  # the last iteration's images, while they are detailed
    if not streamed:
        held += (n_iter - 1) * batch_size * out_px * IMAGE_BYTES_PER_PX
    if answer:
        held += answer_bytes(out_w, out_h, batch_size * n_iter)
    peak = max(_stages(backend, unet, max(decode, upscale)), detail)
    return Estimate(total=first.base + peak + held, base=first.base, unet=unet, vae=decode, upscale=upscale,
                    held=held, peak=peak)


def machine_memory() -> int:
    """Bytes of memory this process may use: MemTotal, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget() -> int:
    """A fraction of the machine's memory (other processes, the OS and the page cache need the rest)."""
    return int(machine_memory() * DEFAULT_BUDGET_FRACTION)


def largest_fitting(arch: Architecture, width: int, height: int, batch_size: int, budget: int, **kwargs
                    ) -> tuple[int, int] | None:
    """The largest (width, height) of the request's aspect ratio (multiples of 64) whose estimate fits, or None."""
    best = None
    for side in PLAN_SIZES:
        scale = side / max(width, height)
        w = max(64, int(width * scale) // 64 * 64)
        h = max(64, int(height * scale) // 64 * 64)
        if estimate_request(arch, w, h, batch_size, **kwargs).total <= budget:
            best = (w, h)
        else:
            break
    return best


def largest_batch(arch: Architecture, width: int, height: int, budget: int, limit: int = 64, **kwargs) -> int:
    """The largest batch_size that fits at this size (0: not even one image)."""
    n = 0
    while n < limit and estimate_request(arch, width, height, n + 1, **kwargs).total <= budget:
        n += 1
    return n


_ARCH_CACHE: dict[tuple, tuple[Architecture, int] | None] = {}


def _is_checkpoint(arch: Arch | None) -> bool:
    return arch is not None and arch.kind is Kind.CHECKPOINT


def _family(arch: Arch | None):
    """The family table's entry of a checkpoint architecture; SD1's (512, factor 8) when unknown."""
    return FAMILIES[arch if _is_checkpoint(arch) else Arch.SD1]


def architecture_of(path: str | os.PathLike) -> tuple[Architecture, int] | None:
    """(Architecture, native size) of a checkpoint file or diffusers folder, from its configs (the file's
    ``sdengine.configs`` metadata, the folder's config.json files, else the bundled config of the detected
    family); only headers are read. None when unknown (a pickle, an unrecognised layout)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _ARCH_CACHE:
        return _ARCH_CACHE[key]
    result = None
    try:
        if path.is_dir():
            unet = json.loads((path / "unet" / "config.json").read_text())
            vae = json.loads((path / "vae" / "config.json").read_text())
            size = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
            arch = detect_folder_arch(path)
            native = int(unet.get("sample_size", 64)) * _family(arch).vae_scale_factor
            if _is_checkpoint(arch) and native < 64:
                native = FAMILIES[arch].native_size
            text = tuple(json.loads((path / sub / "config.json").read_text())
                         for sub in ("text_encoder", "text_encoder_2") if (path / sub / "config.json").is_file())
            result = (replace(Architecture.from_configs(unet, vae, size, text), family=getattr(arch, "value", None)),
                      native)
        elif path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)
            raw = header.metadata.get(METADATA_KEY)
            arch = detect_arch(header.shapes)
            if raw:
                configs = json.loads(raw)
                native = int(configs.get("native_size") or _family(arch).native_size)
            elif _is_checkpoint(arch):
                native = FAMILIES[arch].native_size
                configs = bundled_config(FAMILIES[arch].bundled)
            else:
                configs = None
            if configs and "unet" in configs and "vae" in configs:
                text = tuple(configs[k] for k in ("text_encoder", "text_encoder_2") if isinstance(configs.get(k), dict))
                result = (replace(Architecture.from_configs(configs["unet"], configs["vae"], stat.st_size, text),
                                  family=getattr(arch, "value", None)), native)
    except (OSError, ValueError, KeyError, TypeError, SdEngineError):  # unreadable: the engine reports it
        result = None
    _ARCH_CACHE[key] = result
    return result
