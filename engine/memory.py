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
from collections.abc import Mapping
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
# UNet conv activations: fp32 tensors of a level's width alive at once
UNET_TENSORS = 8.0
# what a backend holds per byte of weights in the checkpoint file (ORT keeps initializers and its own copies;
# sdengine ORT SD1.5 peaked at 9.2 GB for a 4.3 GB fp32 model, GPU.md), and the process without a model
WEIGHT_FACTOR = {"onnxruntime": 2.0, "torch": 1.1, "tensorrt": 1.2}
PROCESS_BYTES = 450 * 2**20
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
    """Bytes: ``total`` = ``base`` (process + weights) + max(``unet``, ``vae``)."""

    total: int
    base: int
    unet: int
    vae: int

    @property
    def activations(self) -> int:
        return max(self.unet, self.vae)


def estimate(arch: Architecture, width: int, height: int, batch_size: int = 1, *, cfg: bool = True,
             backend: str = "onnxruntime", attention: tuple[str, str] | None = None,
             tiling: VaeTiling | None = VaeTiling()) -> Estimate:
    """Peak memory of one batch of a request. ``cfg``: the UNet runs conditional and unconditional rows
    (cfg_scale != 1). ``attention``: (UNet, VAE) attention kinds; default: the backend's. ``tiling``: the
    engine's VAE tiling (``EngineConfig.vae_tiling``; None: never tiled)."""
    unet_kind, vae_kind = attention or BACKEND_ATTENTION.get(backend, ("full", "full"))
    rows = batch_size * (2 if cfg else 1)
    f = arch.vae_scale_factor
    lh, lw = max(height // f, 1), max(width // f, 1)
    unet = 0.0
    conv = 0.0
    for level, (channels, heads, has_attention) in enumerate(zip(arch.unet_channels, arch.unet_heads,
                                                                  arch.unet_attention)):
        tokens = max(lh >> level, 1) * max(lw >> level, 1)
        conv += rows * channels * tokens * FP32 * UNET_TENSORS
        if has_attention:
            unet = max(unet, rows * heads * tokens * tokens * FP32 * _attention_factor(unet_kind))
    tw, th = tiling.tile_shape(width, height) if tiling is not None else (width, height)
    vae_tokens = (th // f) * (tw // f) if arch.vae_attention else 0
    vae = batch_size * (arch.vae_channels[0] * tw * th * FP32 * VAE_FULL_RES_TENSORS
                        + vae_tokens * vae_tokens * FP32 * _attention_factor(vae_kind))
    if (tw, th) != (width, height):
        vae += batch_size * width * height * FP32 * TILED_OUTPUT_VALUES
    base = PROCESS_BYTES + int(arch.weights_bytes * WEIGHT_FACTOR.get(backend, 2.0))
    unet_total = int(unet + conv)
    return Estimate(total=base + max(unet_total, int(vae)), base=base, unet=unet_total, vae=int(vae))


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
        if estimate(arch, w, h, batch_size, **kwargs).total <= budget:
            best = (w, h)
        else:
            break
    return best


def largest_batch(arch: Architecture, width: int, height: int, budget: int, limit: int = 64, **kwargs) -> int:
    """The largest batch_size that fits at this size (0: not even one image)."""
    n = 0
    while n < limit and estimate(arch, width, height, n + 1, **kwargs).total <= budget:
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
