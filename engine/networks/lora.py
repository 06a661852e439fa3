"""LoRA files -> per-parameter weight deltas over one model's diffusers modules.

A :class:`LoraSet` is what a prompt asks for: LoRA files with their text-encoder and UNet multipliers. It is
mapped once onto the model's modules (:func:`map_lora`: every layer of a file must land on a module of
the right shape, else the file is refused as made for another architecture) and gives, per source module
(``unet``, ``text_encoder``, ``text_encoder_2``), ``delta W`` of each touched parameter
(:meth:`WeightPatch.deltas`): ``sum over (file, layer) of multiplier * alpha/rank * up @ down``, in float32.

Backends apply a :class:`WeightPatch` without re-exporting anything (see engine/backends): the torch backend
adds the deltas to its weights in place and restores the originals exactly; the onnxruntime backend feeds
the patched tensors as initializer overrides of the exported graph; openvino swaps them into the constants of
the IR it compiles; TensorRT refits its engines.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from core.errors import BackendUnavailable, ModelError
from engine.models.convert import unet_key_to_ldm
from engine.networks.files import LoraFile, LoraLayer, guess_lora_arch

log = logging.getLogger(__name__)

TEXT_SOURCES = ("text_encoder", "text_encoder_2")
SOURCES = ("unet", *TEXT_SOURCES)


def _norm(name: str) -> str:
    key = name.replace(".", "_")
    return key[len("text_model_"):] if key.startswith("text_model_") else key


def module_table(source: str, module) -> dict[str, str]:
    """Normalised LoRA module key -> parameter name of the module's weight (``down_blocks.0....to_q.weight``).

    Every weight-bearing Linear/Conv2d is listed under its diffusers name; a UNet also under its original
    (LDM) name, which SDXL kohya files use (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
    """
    import torch

    table: dict[str, str] = {}
    config = dict(getattr(module, "config", {}) or {}) if source == "unet" else None
    for name, sub in module.named_modules():
        if not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) or not name:
            continue
        param = f"{name}.weight"
        table.setdefault(_norm(name), param)
        if config is not None:
            try:
                ldm = unet_key_to_ldm(param, config)
            except (ModelError, KeyError, TypeError):
                continue
            table.setdefault(_norm(ldm[: -len(".weight")]), param)
    return table


@dataclass(frozen=True)
class MappedLora:
    """One LoRA file mapped onto a model: ``targets[source][param] = layer``."""

    name: str
    sha256: str
    targets: dict[str, dict[str, LoraLayer]]


def map_lora(lora: LoraFile, name: str, sha256: str, modules: Mapping[str, Any], model_arch,
             tables: dict[str, dict[str, str]]) -> MappedLora:
    """Map every layer of ``lora`` onto ``modules`` (the model's diffusers components).

    ``tables`` caches :func:`module_table` per source. Raises ModelError naming the file when a layer names
    a module the model lacks or the shapes differ (a LoRA for another architecture).
    """
    targets: dict[str, dict[str, LoraLayer]] = {}
    problems = []
    for (source, key), layer in lora.layers.items():
        if source not in modules:
            problems.append(f"{source} (the model has no such text encoder)")
            continue
        if source not in tables:
            tables[source] = module_table(source, modules[source])
        param = tables[source].get(_norm(key))
        if param is None:
            problems.append(f"{source} module {key!r} does not exist in this model")
            continue
        weight = modules[source].get_parameter(param)
        out, inp = int(layer.up.shape[0]), int(layer.down.reshape(layer.down.shape[0], -1).shape[1])
        if weight.shape[0] != out or weight[0].numel() != inp:
            problems.append(f"{source} module {key!r}: LoRA gives {out}x{inp}, the weight is {tuple(weight.shape)}")
            continue
        targets.setdefault(source, {})[param] = layer
    if problems:
        shapes = {f"{'lora_te2_' if s == 'text_encoder_2' else 'lora_unet_' if s == 'unet' else 'lora_te_'}{k}"
                  f".lora_down.weight": tuple(layer.down.shape) for (s, k), layer in lora.layers.items()}
        made_for = guess_lora_arch(shapes)
        arch = getattr(model_arch, "value", model_arch)
        hint = f"it looks made for {made_for.value}, the checkpoint is {arch}" if made_for else \
            f"it does not fit the checkpoint ({arch})"
        raise ModelError(lora.path, f"LoRA {name!r} is refused: {hint}; {len(problems)} of {len(lora.layers)} "
                                    f"layers do not fit, e.g. {problems[0]}")
    return MappedLora(name, sha256, targets)


@dataclass(frozen=True)
class LoraUse:
    """One activated LoRA: the mapped file with its multipliers."""

    lora: MappedLora
    te: float
    unet: float

    def multiplier(self, source: str) -> float:
        return self.unet if source == "unet" else self.te


@dataclass(frozen=True)
class WeightPatch:
    """The weight changes of a set of activated LoRAs, per source module.

    ``key(source)`` identifies the patch of one source (empty string: unpatched); equal keys give
    bit-identical weights. :meth:`deltas` yields ``(param, delta float32)`` one parameter at a time, in a
    fixed order (so the sum is computed the same way every time).
    """

    uses: tuple[LoraUse, ...] = ()
    _keys: dict = field(default_factory=dict, compare=False, repr=False)

    def active(self, source: str) -> tuple[LoraUse, ...]:
        return tuple(u for u in self.uses if source in u.lora.targets and u.multiplier(source) != 0.0)

    def key(self, source: str) -> str:
        if source not in self._keys:
            uses = self.active(source)
            text = "|".join(f"{u.lora.sha256}:{u.multiplier(source)!r}" for u in uses)
            self._keys[source] = hashlib.sha256(text.encode()).hexdigest()[:16] if uses else ""
        return self._keys[source]

    def params(self, source: str) -> list[str]:
        """The parameters of ``source`` this patch changes (sorted)."""
        return sorted({p for u in self.active(source) for p in u.lora.targets[source]})

    def deltas(self, source: str) -> Iterator[tuple[str, Any]]:
        uses = self.active(source)
        for param in self.params(source):
            total = None
            for u in uses:
                layer = u.lora.targets[source].get(param)
                if layer is None:
                    continue
                d = layer.delta() * (u.multiplier(source) * layer.scale)
                total = d if total is None else total + d
            yield param, total

    @property
    def text_key(self) -> str:
        """The patch of the text encoders (part of the prompt cache key): empty when they are unpatched."""
        return "+".join(k for k in (self.key(s) for s in TEXT_SOURCES) if k)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for s in SOURCES if self.key(s))


EMPTY = WeightPatch()


def patched_tensors(patch: WeightPatch, source: str, base, where: str):
    """``[(graph tensor name, numpy array)]``: the patched weights of ``source`` as an exported graph holds them.

    ``base`` is the graph's :class:`export.onnx.SourceWeights` (parameter -> ``[name, transposed, dtype]`` and
    the fp32 values the export was made from, read from the artefact: the torch weights may be released); the
    patched value is ``apply_delta`` over that weight, transposed and cast as the graph has it (fp16 in an fp16
    stage). Raises BackendUnavailable naming ``where`` when a touched weight is not a plain tensor of the graph.
    """
    import numpy as np
    import torch

    out = []
    for param, delta in patch.deltas(source):
        if param not in (base.graph_mapping or {}) or param not in base:
            raise BackendUnavailable(f"{where}: the weight {param} cannot be replaced in the exported graph (fused "
                                     "or folded by an optimizer); LoRA needs the unfused export (gpu_optimize=False)")
        name, transposed, dtype = base.graph_mapping[param]
        with torch.no_grad():
            weight = apply_delta(torch.from_numpy(base(param)), delta)
        value = weight.t() if transposed else weight
        out.append((name, np.ascontiguousarray(value.numpy().astype(dtype))))
    return out


def apply_delta(weight, delta):
    """``weight + delta`` computed in float32, returned in the weight's dtype and shape (the one formula every
    backend uses, so equal patches give equal bits)."""
    import torch

    return (weight.to(torch.float32) + delta.reshape(weight.shape)).to(weight.dtype)

