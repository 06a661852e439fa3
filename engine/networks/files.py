"""LoRA and embedding files: formats, architecture detection and the webui's hashes.

LoRA formats read here (each key names one module of the UNet or a text encoder):

- kohya / webui: ``lora_unet_<module>``, ``lora_te_<module>`` (SD1/SD2), ``lora_te1_`` / ``lora_te2_`` (SDXL),
  each with ``.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha``; conv layers (LoCon) carry
  4-d factors. ``<module>`` is the diffusers or the original (LDM) module name with dots as underscores.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``), the older ``.lora.down.weight`` / ``.lora.up.weight`` and attention-processor
  names (``attn1.processor.to_q_lora.down.weight``), with optional ``.alpha``.

LyCORIS LoHa / LoKr / IA3 / DoRA / full-difference files and Tucker-decomposed conv factors (``lora_mid``)
are refused with a :class:`ModelError` naming the file and its kind, and so are files in a format neither the
webui nor sdengine reads (:func:`foreign_format`: cloneofsimo ``lora_diffusion``'s ``unet:N:up``, a
textual-inversion embedding or a checkpoint put among the LoRAs). :func:`lora_problem` says it from the
safetensors header alone, and a pickle refused without the opt-in (the listings, ``models info`` and the
submit-time check use it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.errors import ModelError
from core.safetensors_header import data_sha256, read_safetensors_header
from engine.models.checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, pickle_refusal
from engine.models.checkpoints import load_pickle as _pickle_gate
from engine.models.family import Arch, Kind

# component prefixes of the kohya format
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# suffix -> factor role
_FACTORS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha",
}
# LyCORIS / other kinds: suffix marker -> what the file is
_REFUSED = {
    "hada_w1_a": "LoHa (LyCORIS Hadamard product)", "hada_w2_a": "LoHa (LyCORIS Hadamard product)",
    "lokr_w1": "LoKr (LyCORIS Kronecker product)", "lokr_w2": "LoKr (LyCORIS Kronecker product)",
    "lokr_w1_a": "LoKr (LyCORIS Kronecker product)", "lokr_w2_a": "LoKr (LyCORIS Kronecker product)",
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)", "dora_scale": "DoRA (weight-decomposed LoRA)",
    "on_input": "IA3", "diff": "full weight difference (LyCORIS 'full')", "diff_b": "full weight difference",
}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# cloneofsimo lora_diffusion (the "LoRA for diffusers" of early 2023): "<component>:<index>:up|down", the
# layers numbered in module order, with no module names (nothing says where a factor goes without the
# library's own injection order); the webui's Lora extension does not read it either
_LORA_DIFFUSION = re.compile(r"^(unet|text_encoder(_2)?):\d+:(up|down)$")
SUPPORTED_FORMATS = ("LoRA and LoCon in the kohya/webui (lora_unet_/lora_te_ with lora_down/lora_up/alpha) or "
                     "diffusers/PEFT (unet./text_encoder. with lora_A/lora_B) format")


@dataclass
class LoraLayer:
    """The factors of one module: ``delta W = scale * up @ down`` (reshaped to W), ``scale = alpha / rank``."""

    down: Any = None  # torch tensor (r, in) or (r, in, kh, kw)
    up: Any = None  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha / self.rank) if self.alpha is not None else 1.0

    def delta(self):
        """``up @ down`` in float32, shaped (out, in[, kh, kw])."""
        import torch

        up, down = self.up.to(torch.float32), self.down.to(torch.float32)
        flat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if down.dim() == 4:
            return flat.reshape(up.shape[0], *down.shape[1:])
        return flat


@dataclass
class LoraFile:
    """A parsed LoRA file: ``layers[(component, module key)]``. Module keys are the file's own names with
    dots as underscores (``down_blocks_0_attentions_0_proj_in``); :mod:`engine.networks.lora` maps them."""

    path: Path
    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)
    format: str = "kohya"

    @property
    def components(self) -> set[str]:
        return {c for c, _ in self.layers}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(component, module key, role)`` of a tensor name, or None when no LoRA format matches it."""
    for suffix, role in _FACTORS.items():
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return component, stem[len(prefix):], role
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            if m := _PROCESSOR.search(stem):  # attn1.processor.to_q_lora -> attn1.to_q
                target = m[1] if m[1] != "to_out" else "to_out.0"
                stem = stem[: m.start()] + "." + target
            return component, stem.replace(".", "_"), role
    return None


def refused_kind(keys) -> str | None:
    """What a non-LoRA network file is (LoHa, LoKr, ...), from its tensor names; None for plain LoRA."""
    for key in keys:
        last = key.rsplit(".", 2)
        for part in last[-2:]:
            if part in _REFUSED:
                return _REFUSED[part]
    return None


def foreign_format(keys) -> str | None:
    """The format of a file in the LoRA folders that is no LoRA sdengine reads, from its tensor names (None:
    not one of these)."""
    keys = list(keys)
    if any(_LORA_DIFFUSION.match(k) for k in keys):
        return ("a LoRA in the cloneofsimo lora_diffusion format (tensor names 'unet:N:up' / 'text_encoder:N:down': "
                "layers by number, not by module name)")
    if any(k.startswith("string_to_param") for k in keys) or keys == ["emb_params"] or {"clip_l", "clip_g"} <= set(keys):
        return "a textual-inversion embedding (it belongs in embeddings/)"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a full checkpoint (it belongs in Stable-diffusion/)"
    return None


def refusal(keys) -> str | None:
    """Why a LoRA-folder file with these tensor names is refused (its kind or foreign format), or None."""
    if kind := refused_kind(keys):
        return f"this is a {kind} network, which sdengine does not apply (supported: {SUPPORTED_FORMATS})"
    if fmt := foreign_format(keys):
        return f"not a LoRA sdengine (or the webui) can load: {fmt} (supported: {SUPPORTED_FORMATS})"
    return None


def lora_problem(path: str | os.PathLike, allow_pickle: bool = False) -> str | None:
    """:func:`refusal` of a LoRA file from its safetensors header alone, or a pickle without ``allow_pickle``
    (engine.models.checkpoints.pickle_refusal); None for a usable file, a pickle with the opt-in -- its tensor
    names need a load -- or an unreadable header: loading it gives that error."""
    path = Path(path)
    if why := pickle_refusal(path, allow_pickle):
        return why
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    try:
        keys = read_safetensors_header(path).shapes
    except ModelError:
        return None
    return refusal(keys)


def load_pickle(path: Path, allow_pickle: bool) -> Any:
    """The object of a pickle LoRA or embedding file: engine.models.checkpoints.load_pickle (the one gate)."""
    return _pickle_gate(path, allow_pickle, what="file")


def read_tensors(path: Path, allow_pickle: bool) -> dict:
    """Every tensor of a LoRA or embedding file (nested dicts of pickles flattened with dots)."""
    import torch

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle(path, allow_pickle)
        out: dict = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, torch.Tensor):
                out[prefix] = value
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)

        walk("", obj)
        return out
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelError(path, f"unknown file format {suffix!r} (allowed: .safetensors, or pickles with allow_pickle)")
    read_safetensors_header(path)  # validates (truncation, corrupt header) with a clear error
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(path, f"cannot read safetensors file: {exc}") from exc


def read_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Parse a LoRA file. Raises ModelError naming the file for LyCORIS kinds, other formats, broken factors."""
    path = Path(path)
    tensors = read_tensors(path, allow_pickle)
    if why := refusal(tensors):
        raise ModelError(path, why)
    lora = LoraFile(path, format="kohya" if any(k.startswith("lora_") for k in tensors) else "diffusers")
    unknown = []
    for key, value in tensors.items():
        parts = _split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        component, module, role = parts
        layer = lora.layers.setdefault((component, module), LoraLayer())
        if role == "alpha":
            layer.alpha = float(value.reshape(-1)[0])
        else:
            setattr(layer, role, value)
    if unknown:
        raise ModelError(path, f"not a LoRA file in a supported format: {len(unknown)} tensor names are not LoRA "
                               f"factors, e.g. {unknown[0]!r} (supported: {SUPPORTED_FORMATS})")
    if not lora.layers:
        raise ModelError(path, "no LoRA layers in this file")
    for (component, module), layer in lora.layers.items():
        if layer.up is None or layer.down is None:
            raise ModelError(path, f"{component} {module}: has only one of the two LoRA factors (up/down)")
        if layer.up.shape[1] != layer.down.shape[0]:
            raise ModelError(path, f"{component} {module}: factor ranks differ (up {tuple(layer.up.shape)}, "
                                   f"down {tuple(layer.down.shape)})")
    return lora


# --------------------------------------------------------------------------------------------- detection

def guess_lora_arch(keys_shapes: Mapping[str, tuple]) -> Arch | None:
    """The checkpoint family a LoRA was trained for, from its tensor names and shapes (None: unknown)."""
    comps = set()
    context = None
    for key, shape in keys_shapes.items():
        parts = _split_key(key)
        if parts is None:
            continue
        comps.add(parts[0])
        if parts[2] == "down" and parts[1].endswith(("attn2_to_k", "attn2_to_v")) and len(shape) >= 2:
            context = int(shape[1])
    if "text_encoder_2" in comps or context == 2048:
        return Arch.SDXL
    if context == 1024:
        return Arch.SD2
    if context == 768:
        return Arch.SD1
    return None


def guess_embedding_arch(keys_shapes: Mapping[str, tuple]) -> Arch | None:
    if any(k.startswith("clip_g") for k in keys_shapes):
        return Arch.SDXL
    dims = {int(s[-1]) for s in keys_shapes.values() if s}
    return Arch.SD1 if dims == {768} else Arch.SD2 if dims == {1024} else None


def detect_network_arch(path: str | os.PathLike, kind: Kind) -> Arch | None:
    """The family a LoRA / embedding file is for, from the safetensors header (None for pickles, unknown)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    shapes = read_safetensors_header(path).shapes
    return guess_lora_arch(shapes) if kind is Kind.LORA else guess_embedding_arch(shapes)


# ------------------------------------------------------------------------------------------------ hashes

def addnet_hash(path: str | os.PathLike) -> str:
    """The webui's LoRA hash of a safetensors file ("addnet" hash): sha256 of the bytes after the header."""
    return data_sha256(path)
