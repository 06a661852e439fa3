"""Checkpoint formats, architecture detection and loading, offline.

Formats: webui single files (``.safetensors``; pickles ``.ckpt/.pt/.pth/.bin`` only with ``allow_pickle``)
and diffusers folders (``model_index.json`` for pipelines, ``config.json`` for a ControlNet or VAE).

Single files are converted with diffusers' ldm -> diffusers functions
(``diffusers.loaders.single_file_utils``) into modules built from a config that is never fetched: the
diffusers configs stored in the file's metadata (key ``sdengine.configs``, written by
:func:`engine.models.convert.save_single_file`) or else the bundled config of the detected family
(``engine/models/configs/*.json``).

Prediction type: metadata, else a ``<name>.yaml`` beside the file containing ``parameterization: "v"``
(webui convention), else epsilon for SD1/SDXL; for SD2 the webui's heuristic (one UNet pass on a constant
input at t=999: v models give ``mean(out - x) < -1``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.errors import ModelError
from core.deferred import deferred_components, real_module
from core.lazy import load, load_all
from core.safetensors_header import read_safetensors_header
from engine.models.convert import METADATA_KEY, SD2_OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_REFINER_OPENCLIP_PREFIX
from engine.models.family import FAMILIES, Arch, Kind, ModelFamily, model_family, tokenizers  # noqa: F401 (Arch, Kind re-exported)
from engine.models.hashing import short_hash
from engine.schedule import alphas_cumprod as scheduler_alphas_cumprod
from engine.schedule import scheduler_config as default_scheduler_config
from export.onnx import mark_loaded

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# how an operator opts in to pickle loading (EngineConfig.allow_pickle), as the refusals say it
PICKLE_OPT_IN = ('convert it to .safetensors, or opt in to pickle loading: sdengine serve --allow-pickle, or '
                 '"allow_pickle": true in the server\'s configuration (--configs FILE, e.g. {"default": '
                 '{"allow_pickle": true}})')


def pickle_refusal(path: str | os.PathLike, allow_pickle: bool) -> str | None:
    """Why the model file ``path`` is refused before anything reads it: a pickle (``.ckpt``, ``.pt`` ...) without
    the opt-in, as :func:`load_pickle` would refuse it when the task runs; None otherwise."""
    suffix = Path(path).suffix.lower()
    if allow_pickle or suffix not in PICKLE_SUFFIXES:
        return None
    return f"a pickle ({suffix}) can run code when loaded and is refused without the pickle opt-in; {PICKLE_OPT_IN}"


def bundled_config(name: str) -> dict:
    """A bundled config file (``engine/models/configs/{name}``) as a dict."""
    return json.loads(resources.files("engine.models").joinpath("configs", name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- reading


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class NeedsWeights(Exception):
    """A load without weights (``meta=True``) is not possible for this file: load it with its weights."""


def load_pickle(path, allow_pickle: bool, what: str = "checkpoint"):
    """The object of a pickle ``what`` (a checkpoint, a LoRA or embedding file, ...), read with
    ``weights_only=True``; ModelError without the opt-in (pickles can run code) or when torch cannot read it. The
    one pickle gate of the engine (engine.networks.files, engine.ip_adapter call it)."""
    import torch

    if not allow_pickle:
        raise ModelError(path, f"pickle {what}s can run code when loaded and are refused; convert it to "
                               ".safetensors or opt in with allow_pickle (EngineConfig.allow_pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
        raise ModelError(path, f"cannot load pickle {what} (weights_only=True): {exc}") from exc


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False,
                    meta: bool = False) -> tuple[dict, dict[str, str]]:
    """``(state_dict, metadata)`` of a single file. Pickles are refused unless ``allow_pickle``.

    ``meta=True``: tensors on the meta device with the header's shapes and dtypes, no tensor data read (a
    safetensors header only); raises :class:`NeedsWeights` for a pickle (its layout is only known by
    unpickling)."""
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if meta:
        if suffix not in SAFETENSORS_SUFFIXES:
            raise NeedsWeights(f"{path.name}: only a safetensors header can be read without its tensors")
        header = read_safetensors_header(path)
        if any(header.dtypes.get(k) not in _TORCH_DTYPES for k in header.shapes):
            raise NeedsWeights(f"{path.name}: a tensor dtype without a torch equivalent")
        return ({k: torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES[header.dtypes[k]]), device="meta")
                 for k, shape in header.shapes.items()}, header.metadata)
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle(path, allow_pickle)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelError(path, f"pickle checkpoint holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    if suffix not in SAFETENSORS_SUFFIXES:
        raise ModelError(path, f"unknown checkpoint format {suffix!r} (allowed: {', '.join(WEIGHT_SUFFIXES)})")
    header = read_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path)), header.metadata
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise ModelError(path, f"cannot read safetensors file: {exc}") from exc


# ---------------------------------------------------------------------------------------------- detection


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_arch(shapes: Mapping[str, tuple[int, ...]]) -> Arch | None:
    """Architecture from state-dict keys (and shapes); ``None`` when no supported layout is found."""
    keys = shapes.keys()
    if _has_prefix(keys, "control_model.") or _has_prefix(keys, "input_hint_block.") or _has_prefix(keys, "zero_convs."):
        prefix = "control_model." if _has_prefix(keys, "control_model.") else ""
        return Arch.CONTROLNET_SDXL if f"{prefix}label_emb.0.0.weight" in shapes else Arch.CONTROLNET_SD1
    if "controlnet_cond_embedding.conv_in.weight" in shapes:  # a diffusers-keyed ControlNet single file
        return Arch.CONTROLNET_SDXL if "add_embedding.linear_1.weight" in shapes else Arch.CONTROLNET_SD1
    if _has_prefix(keys, "model.diffusion_model."):
        if _has_prefix(keys, "conditioner.embedders.1.model.") and _has_prefix(keys, "conditioner.embedders.0.transformer."):
            return Arch.SDXL
        if _has_prefix(keys, SDXL_REFINER_OPENCLIP_PREFIX):  # the refiner: OpenCLIP-G is its only embedder
            return Arch.SDXL_REFINER
        if _has_prefix(keys, "cond_stage_model.model."):
            return Arch.SD2
        if _has_prefix(keys, "cond_stage_model.transformer."):
            return Arch.SD1
        return None
    vae_prefix = "first_stage_model." if _has_prefix(keys, "first_stage_model.") else ""
    if f"{vae_prefix}decoder.conv_in.weight" in shapes and f"{vae_prefix}post_quant_conv.weight" in shapes:
        return Arch.VAE
    return None


def detect_folder_arch(folder: str | os.PathLike) -> Arch | None:
    """Architecture of a diffusers folder from its configs."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        unet = _read_json(folder / "unet" / "config.json")
        if unet.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir():
            # the refiner's pipeline has no first text encoder (diffusers: text_encoder null)
            return Arch.SDXL if (folder / "text_encoder").is_dir() else Arch.SDXL_REFINER
        te = _read_json(folder / "text_encoder" / "config.json")
        return Arch.SD2 if te.get("hidden_act") == "gelu" else Arch.SD1
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        cfg = _read_json(cfg_file)
        if cfg.get("_class_name") == "ControlNetModel":
            return Arch.CONTROLNET_SDXL if cfg.get("addition_embed_type") == "text_time" else Arch.CONTROLNET_SD1
        if cfg.get("_class_name") == "AutoencoderKL":
            return Arch.VAE
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"cannot read JSON config: {exc}") from exc
    return data if isinstance(data, dict) else {}


def detect_path_arch(path: str | os.PathLike) -> Arch | None:
    """Architecture of a file (safetensors header only) or diffusers folder; ``None`` for unknown or pickle."""
    path = Path(path)
    if path.is_dir():
        return detect_folder_arch(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return detect_arch(read_safetensors_header(path).shapes)
    return None


# where each text encoder of a single-file checkpoint keeps its token-embedding table (width = hidden size)
_TEXT_PREFIXES = {
    Arch.SD1: {"text_encoder": "cond_stage_model.transformer."},
    Arch.SD2: {"text_encoder": "cond_stage_model.model."},
    Arch.SDXL: {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
    Arch.SDXL_REFINER: {"text_encoder_2": SDXL_REFINER_OPENCLIP_PREFIX},
}


def text_encoder_widths(path: str | os.PathLike) -> tuple[Arch, dict[str, int]] | None:
    """``(arch, {text-encoder component: hidden size})`` of a checkpoint without loading it: a single file from
    its safetensors header (the token-embedding tables), a diffusers folder from its configs. ``None`` for
    pickles, unknown layouts and non-checkpoints."""
    path = Path(path)
    if path.is_dir():
        arch = detect_folder_arch(path)
        if arch not in _TEXT_PREFIXES:
            return None
        widths = {c: _read_json(path / c / "config.json").get("hidden_size") for c in FAMILIES[arch].text_encoders}
    elif path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        arch = detect_arch(header.shapes)
        if arch not in _TEXT_PREFIXES:
            return None
        widths = {}
        for component, prefix in _TEXT_PREFIXES[arch].items():
            tables = [s for k, s in header.shapes.items()
                      if k.startswith(prefix) and k.endswith("token_embedding.weight") and len(s) == 2]
            widths[component] = tables[0][1] if tables else None
        if None in widths.values():  # no table in the file: the configs it would be built from
            configs = metadata_configs(header.metadata, path) or _family_configs(arch)
            widths = {c: w or (configs.get(c) or {}).get("hidden_size") for c, w in widths.items()}
    else:
        return None
    if any(not isinstance(w, int) for w in widths.values()):
        return None
    return arch, widths


def metadata_configs(metadata: Mapping[str, str], path) -> dict | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ModelError(path, f"corrupt {METADATA_KEY} metadata: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(path, f"corrupt {METADATA_KEY} metadata: not a JSON object")
    return data


def yaml_parameterization(path: Path) -> str | None:
    """From ``<name>.yaml`` beside the file (webui): ``v_prediction`` when it says ``parameterization: "v"``,
    else ``epsilon`` (the LDM default); ``None`` without a yaml."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(encoding="utf-8", errors="replace")
    return "v_prediction" if re.search(r"""parameterization\s*:\s*["']?v["']?\s*$""", text, re.M) else "epsilon"


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded into diffusers / transformers modules (eval mode) plus what the engine needs."""

    name: str
    path: Path
    arch: Arch
    prediction_type: str
    short_hash: str
    sha256: str
    native_size: int
    components: dict[str, Any] = field(repr=False)
    alphas_cumprod: np.ndarray = field(repr=False)
    scheduler_config: dict = field(repr=False)
    vae_path: Path | None = None
    # True: the modules were built without their weights (meta device, see load_checkpoint(meta=True)); a
    # backend that finds every artefact in its cache runs them, else the engine loads the weights in
    meta: bool = False
    family: ModelFamily = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # built once per loaded model (and again by dataclasses.replace, e.g. when an external VAE is set)
        object.__setattr__(self, "family", model_family(
            self.arch, unet_config=self.components["unet"].config, native_size=self.native_size,
            prediction_type=self.prediction_type, alphas_cumprod=self.alphas_cumprod, sha256=self.sha256,
            short_hash=self.short_hash, vae_path=self.vae_path))


@dataclass(frozen=True)
class LoadedControlNet:
    name: str
    path: Path
    arch: Arch
    short_hash: str
    sha256: str
    module: Any = field(repr=False)


# ---------------------------------------------------------------------------------------------- building


def _build(factory, state_dict: Mapping, path, what: str, dtype):
    """Instantiate a module on the meta device and assign ``state_dict`` (no random init); strict keys."""
    import torch

    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    with torch.device("meta"):
        module = factory()
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise ModelError(path, f"{what} weights do not match its config: {len(lines)} shape mismatches, e.g. "
                               f"{'; '.join(lines[:2]) or exc}") from None
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(path, f"{what} weights do not match its config: missing {sorted(missing)[:5]} "
                               f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})")
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (CLIP position_ids)
            if not name.endswith("position_ids"):
                raise ModelError(path, f"{what}: cannot materialise buffer {name}")
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buf.shape[-1]).expand(buf.shape),
                                  persistent=False)
    return module.eval().requires_grad_(False)


def _text_config(config: Mapping):
    CLIPTextConfig = load("transformers", "CLIPTextConfig")

    return CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("model_type",)})


def _strip_text_model(module, sd: Mapping) -> dict:
    if hasattr(module, "text_model"):
        return dict(sd)
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _meta_clip(config: Mapping, projection: bool):
    """A transformers CLIP text model on the meta device (no memory, no init)."""
    import torch
    CLIPTextModel, CLIPTextModelWithProjection = load_all("transformers", "CLIPTextModel",
                                                          "CLIPTextModelWithProjection")

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        return cls(_text_config(config))


def _build_clip(config: Mapping, converted: Mapping, path, what: str, dtype, projection: bool):
    """Assign converted weights (``text_model.``-prefixed or flat) to a CLIP text model of ``config``.

    transformers 5's CLIPTextModel is flat (``embeddings...``); CLIPTextModelWithProjection keeps
    ``text_model.``; diffusers' converters emit ``text_model.`` keys, so the prefix is dropped when flat.
    """
    module = _meta_clip(config, projection)
    return _build(lambda: module, _strip_text_model(module, converted), path, what, dtype)


def _sd2_openclip_subset(state_dict: Mapping, prefix: str) -> dict:
    """OpenCLIP keys minus the last residual block and text_projection (diffusers' SD2 text encoder)."""
    layers = {int(m[1]) for k in state_dict if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    last = f"{prefix}transformer.resblocks.{max(layers)}." if layers else None
    return {k: v for k, v in state_dict.items()
            if k.startswith(prefix) and not (last and k.startswith(last)) and k != prefix + "text_projection"}


def build_text_encoders(arch: Arch, state_dict: Mapping, configs: Mapping, path, dtype, only=None) -> dict:
    """Text encoders + tokenizers of a single-file checkpoint (diffusers' clip conversion functions); ``only``:
    the text encoders to build (default: all)."""
    convert_ldm_clip_checkpoint, convert_open_clip_checkpoint = load_all(
        "diffusers.loaders.single_file_utils", "convert_ldm_clip_checkpoint", "convert_open_clip_checkpoint")

    def wanted(key: str) -> bool:
        return only is None or key in only

    out: dict[str, Any] = {}
    if arch in (Arch.SD1, Arch.SDXL) and wanted("text_encoder"):
        conv = convert_ldm_clip_checkpoint(state_dict)
        if not any(k.startswith("text_model.") for k in conv):  # very old transformers layout
            conv = {f"text_model.{k}": v for k, v in conv.items()}
        out["text_encoder"] = _build_clip(configs["text_encoder"], conv, path, "text_encoder", dtype, False)
    if arch is Arch.SD2 and wanted("text_encoder"):
        sub = _sd2_openclip_subset(state_dict, SD2_OPENCLIP_PREFIX)
        probe = _meta_clip(configs["text_encoder"], False)
        conv = convert_open_clip_checkpoint(probe, sub, prefix=SD2_OPENCLIP_PREFIX)
        out["text_encoder"] = _build_clip(configs["text_encoder"], conv, path, "text_encoder", dtype, False)
    if arch in (Arch.SDXL, Arch.SDXL_REFINER) and wanted("text_encoder_2"):
        prefix = SDXL_OPENCLIP_PREFIX if arch is Arch.SDXL else SDXL_REFINER_OPENCLIP_PREFIX
        sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        probe = _meta_clip(configs["text_encoder_2"], True)
        conv = convert_open_clip_checkpoint(probe, sub, prefix=prefix)
        out["text_encoder_2"] = _build_clip(configs["text_encoder_2"], conv, path, "text_encoder_2", dtype, True)
    out.update(tokenizers(arch))
    return out


def _unet_class():
    UNet2DConditionModel = load("diffusers", "UNet2DConditionModel")

    return UNet2DConditionModel


def _vae_from_state_dict(state_dict: Mapping, config: Mapping, path, dtype):
    AutoencoderKL = load("diffusers", "AutoencoderKL")
    convert_ldm_vae_checkpoint = load("diffusers.loaders.single_file_utils", "convert_ldm_vae_checkpoint")

    conv = convert_ldm_vae_checkpoint(state_dict, config)
    return _build(lambda: AutoencoderKL(**config), conv, path, "vae", dtype)


def _sd2_is_v(unet) -> bool:
    """The webui's SD2 v-parameterization test: one UNet pass at t=999 on constant inputs (sd_models_config)."""
    import torch

    dim = unet.config.cross_attention_dim
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=unet.dtype)
        cond = torch.full((1, 2, dim), 0.5, dtype=unet.dtype)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample
        return (out - x).mean().item() < -1


def _family_configs(arch: Arch) -> dict:
    fam = FAMILIES[arch]
    if fam.bundled is None:
        raise ModelError(arch.value, "no bundled config")
    return bundled_config(fam.bundled)


def build_components(arch: Arch, state_dict: Mapping, configs: Mapping, path, dtype=None, only=None) -> dict:
    """UNet, VAE, text encoders and tokenizers of an SD1/SD2/SDXL LDM state dict, built from ``configs``;
    ``only``: the modules to build (default: all, with the tokenizers), the others' tensors untouched.

    Works on any device's tensors (the tests feed meta tensors of the real families' sizes).
    """
    import torch
    convert_ldm_unet_checkpoint = load("diffusers.loaders.single_file_utils", "convert_ldm_unet_checkpoint")

    dtype = dtype or torch.float32
    for needed in ("unet", "vae") + FAMILIES[arch].text_encoders:
        if needed not in configs:
            raise ModelError(path, f"configs lack {needed!r}")
    out: dict[str, Any] = {}
    if only is None or "unet" in only:
        unet_cfg = configs["unet"]
        out["unet"] = _build(lambda: _unet_class()(**unet_cfg), convert_ldm_unet_checkpoint(state_dict, unet_cfg),
                             path, "unet", dtype)
    if only is None or "vae" in only:
        out["vae"] = _vae_from_state_dict(state_dict, configs["vae"], path, dtype)
    if only is None:
        return {**out, **build_text_encoders(arch, state_dict, configs, path, dtype)}
    if any(k in only for k in FAMILIES[arch].text_encoders):
        out.update({k: v for k, v in build_text_encoders(arch, state_dict, configs, path, dtype, only).items()
                    if k in only})
    return out


def build_controlnet(arch: Arch, state_dict: Mapping, config: Mapping, path, dtype=None):
    """A diffusers ControlNetModel from a ControlNet state dict (``control_model.``, bare ldm or diffusers keys)."""
    import torch
    ControlNetModel = load("diffusers", "ControlNetModel")
    convert_controlnet_checkpoint = load("diffusers.loaders.single_file_utils", "convert_controlnet_checkpoint")

    dtype = dtype or torch.float32
    conv = convert_controlnet_checkpoint(state_dict, config)
    if config.get("addition_embed_type") == "text_time" and "add_embedding.linear_1.weight" not in conv:
        # diffusers' converter skips SDXL's add embedding (label_emb) for ControlNets
        prefix = "control_model." if any(k.startswith("control_model.") for k in state_dict) else ""
        for new, old in (("linear_1", "0.0"), ("linear_2", "0.2")):
            for p in ("weight", "bias"):
                if f"{prefix}label_emb.{old}.{p}" in state_dict:
                    conv[f"add_embedding.{new}.{p}"] = state_dict[f"{prefix}label_emb.{old}.{p}"]
    return _build(lambda: ControlNetModel(**config), conv, path, "controlnet", dtype)


def load_single_file(path: str | os.PathLike, *, name: str | None = None, sha256: str = "",
                     allow_pickle: bool = False, dtype=None, meta: bool = False,
                     card: Mapping | None = None) -> LoadedModel:
    """Load a webui single-file SD1/SD2/SDXL checkpoint into diffusers modules (``meta``, ``card``: see
    :func:`load_checkpoint`)."""
    import torch

    dtype = dtype or torch.float32
    path = Path(path)
    state_dict, metadata = read_state_dict(path, allow_pickle, meta=meta)
    arch = detect_arch({k: tuple(v.shape) for k, v in state_dict.items()})
    if arch is None or arch.kind is not Kind.CHECKPOINT:
        what = "unknown architecture" if arch is None else f"a {arch.kind.value} file, not a checkpoint"
        raise ModelError(path, f"{what}: expected SD1.x/SD2.x/SDXL keys (model.diffusion_model. with "
                               f"cond_stage_model.transformer. / cond_stage_model.model. / conditioner.embedders.); "
                               f"first keys: {sorted(state_dict)[:3]}")
    in_ch = state_dict["model.diffusion_model.input_blocks.0.0.weight"].shape[1] \
        if "model.diffusion_model.input_blocks.0.0.weight" in state_dict else 4
    if in_ch != 4:
        raise ModelError(path, f"UNet with {in_ch} input channels (inpainting / instruct models) is not supported")
    stated = metadata_configs(metadata, path)
    configs = stated or _family_configs(arch)
    components = None
    if card is None or not meta:
        components = build_components(arch, state_dict, configs, path, dtype)

    prediction = (stated or {}).get("prediction_type") or yaml_parameterization(path)
    fam = FAMILIES[arch]
    native = (stated or {}).get("native_size")
    if prediction is None:
        if arch is Arch.SD2:
            if meta:
                raise NeedsWeights(f"{path.name}: the SD2 prediction type is found by running the UNet")
            prediction = "v_prediction" if _sd2_is_v(components["unet"]) else "epsilon"
            log.info("%s: SD2 prediction type by the webui heuristic: %s", path.name, prediction)
        else:
            prediction = fam.prediction_type
    sample_size = None
    if native is None:
        native = fam.native_size
        if arch is Arch.SD2 and prediction == "epsilon":  # SD2 base: 512 px (the bundled config is 768-v)
            native = 512
            sample_size = native // 8

    def finish(built: dict) -> dict:
        if sample_size is not None:
            built["unet"].register_to_config(sample_size=sample_size)
        return built

    if components is None:  # the card's deferred modules; the first use builds them as above
        components = {**deferred_components(card, lambda: finish(build_components(arch, state_dict, configs, path,
                                                                                      dtype)), path.stem),
                      **tokenizers(arch)}
    else:
        del state_dict
        finish(components)
    sched = dict(configs.get("scheduler") or default_scheduler_config(prediction), prediction_type=prediction)
    return _result(name or path.stem, path, arch, prediction, sha256, int(native), components, sched, meta)


def _result(name, path, arch, prediction, sha256, native, components, sched, meta=False) -> LoadedModel:
    return LoadedModel(name=name, path=Path(path), arch=arch, prediction_type=prediction,
                       short_hash=short_hash(sha256) if sha256 else "", sha256=sha256, native_size=native,
                       components=components, alphas_cumprod=scheduler_alphas_cumprod(sched), scheduler_config=sched,
                       meta=meta)


# weight file names of a diffusers / transformers component folder, safetensors first
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _folder_state_dict(sub: Path, names: tuple[str, ...], allow_pickle: bool, meta: bool = False) -> dict:
    """The weights of one component folder: a single file or a sharded ``*.index.json`` (pickles per policy)."""
    for name in names:
        index = sub / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            if any(Path(s).name != s for s in shards):
                raise ModelError(index, "shard names must be plain file names")
            out: dict = {}
            for shard in shards:
                out.update(read_state_dict(sub / shard, allow_pickle, meta)[0])
            return out
        if (sub / name).is_file():
            return read_state_dict(sub / name, allow_pickle, meta)[0]
    raise ModelError(sub, f"no weights found (looked for {', '.join(names)} and sharded indexes)")


def _diffusers_module(sub: Path, cls, allow_pickle: bool, dtype, what: str, meta: bool = False):
    """A diffusers model from ``sub/config.json`` + its weights, built on the meta device (no random init)."""
    cfg_file = sub / "config.json"
    if not cfg_file.is_file():
        raise ModelError(sub, f"{what}: config.json is missing")
    config = _read_json(cfg_file)
    sd = _folder_state_dict(sub, _DIFFUSERS_WEIGHTS, allow_pickle, meta)
    return _build(lambda: cls.from_config(config), sd, sub, what, dtype)


def _transformers_clip(sub: Path, projection: bool, allow_pickle: bool, dtype, what: str, meta: bool = False):
    config = _read_json(sub / "config.json")
    if not config:
        raise ModelError(sub, f"{what}: config.json is missing")
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "dtype",
                                                             "torch_dtype", "_name_or_path")}
    sd = _folder_state_dict(sub, _TRANSFORMERS_WEIGHTS, allow_pickle, meta)
    return _build_clip(config, sd, sub, what, dtype, projection)


def load_diffusers_folder(folder: str | os.PathLike, *, name: str | None = None, sha256: str = "",
                          allow_pickle: bool = False, dtype=None, meta: bool = False,
                          card: Mapping | None = None) -> LoadedModel:
    """Load a diffusers pipeline folder (``model_index.json``): configs and weights from the folder only.

    Modules are built on the meta device and the weights assigned (as for single files), so nothing is
    fetched and ``.bin`` (pickle) weights follow the same ``allow_pickle`` policy as single files.
    """
    import torch

    dtype = dtype or torch.float32
    folder = Path(folder)
    arch = detect_folder_arch(folder)
    if arch is None or arch.kind is not Kind.CHECKPOINT:
        raise ModelError(folder, "unknown architecture: not a SD1.x/SD2.x/SDXL diffusers pipeline folder")

    def build() -> dict[str, Any]:
        return _folder_modules(folder, arch, None, allow_pickle, dtype, meta)

    # the card's deferred modules (built by the first use) or the modules now
    components = deferred_components(card, build, folder.name) if card is not None and meta else build()
    components.update(tokenizers(arch))
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    prediction = sched.get("prediction_type") or FAMILIES[arch].prediction_type
    sched = dict(sched or default_scheduler_config(prediction), prediction_type=prediction)
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    native = int(components["unet"].config.sample_size) * 8
    return _result(name or folder.name, folder, arch, prediction, sha256, native, components, sched, meta)


def _folder_modules(folder: Path, arch: Arch, only, allow_pickle: bool, dtype, meta: bool = False) -> dict:
    """The modules of a diffusers pipeline folder (``only``: those named; default: all), each from its own
    subfolder's files."""
    AutoencoderKL = load("diffusers", "AutoencoderKL")

    makers = {
        "unet": lambda: _diffusers_module(folder / "unet", _unet_class(), allow_pickle, dtype, "unet", meta),
        "vae": lambda: _diffusers_module(folder / "vae", AutoencoderKL, allow_pickle, dtype, "vae", meta),
    }
    if arch is not Arch.SDXL_REFINER:
        makers["text_encoder"] = lambda: _transformers_clip(folder / "text_encoder", False, allow_pickle, dtype,
                                                            "text_encoder", meta)
    if arch in (Arch.SDXL, Arch.SDXL_REFINER):
        makers["text_encoder_2"] = lambda: _transformers_clip(folder / "text_encoder_2", True, allow_pickle, dtype,
                                                              "text_encoder_2", meta)
    return {key: make() for key, make in makers.items() if only is None or key in only}


def load_modules(path: str | os.PathLike, only, *, allow_pickle: bool = False, dtype=None) -> dict[str, Any]:
    """The modules ``only`` (e.g. ``("unet",)``) of a checkpoint file or diffusers folder, with their weights:
    what one export needs (:func:`load_weights_into` moves them into the model's modules). The tensors of the
    other modules are never read: a safetensors file is memory-mapped (``safetensors.torch.load_file``), a
    folder's other subfolders are not opened."""
    import torch

    dtype = dtype or torch.float32
    path = Path(path)
    only = tuple(only)
    if path.is_dir():
        arch = detect_folder_arch(path)
        if arch is None or arch.kind is not Kind.CHECKPOINT:
            raise ModelError(path, "unknown architecture: not a SD1.x/SD2.x/SDXL diffusers pipeline folder")
        return _folder_modules(path, arch, only, allow_pickle, dtype)
    state_dict, metadata = read_state_dict(path, allow_pickle)
    arch = detect_arch({k: tuple(v.shape) for k, v in state_dict.items()})
    if arch is None or arch.kind is not Kind.CHECKPOINT:
        raise ModelError(path, "unknown architecture: expected SD1.x/SD2.x/SDXL checkpoint keys")
    configs = metadata_configs(metadata, path) or _family_configs(arch)
    return build_components(arch, state_dict, configs, path, dtype, only)


def load_checkpoint(path: str | os.PathLike, **kwargs) -> LoadedModel:
    """A checkpoint file or diffusers folder (see :func:`load_single_file`, :func:`load_diffusers_folder`).

    ``meta=True``: the same modules, configs and checks, built from the safetensors headers only (parameters on
    the meta device, no tensor read, about a second for SDXL): what a backend that runs cached exported graphs
    needs. Raises :class:`NeedsWeights` where the weights are needed to load at all (pickles, an SD2 file
    without a stated prediction type); :func:`load_weights_into` puts the weights in later. ``card`` (with
    ``meta``): the file's module card (core.deferred): the modules are deferred, built by their first
    use other than their configs."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, **kwargs)
    return load_single_file(path, **kwargs)


def load_weights_into(skeleton: Mapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """Move the weights of the ``loaded`` modules into the same-named ``skeleton`` modules (built with
    ``meta=True`` or released after export) in place: the objects the backends hold get their weights back."""
    for key, module in skeleton.items():
        full = loaded.get(key)
        if not hasattr(module, "load_state_dict") or full is None or full is module:
            continue
        module = real_module(module)
        module.load_state_dict(full.state_dict(), strict=True, assign=True)
        for name, buf in full.named_buffers():  # non-persistent buffers (CLIP position_ids) are not in the state dict
            owner, leaf = (module.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) if "." in name \
                else (module, name)
            owner._buffers[leaf] = buf
        module.eval().requires_grad_(False)
        mark_loaded(module)


def load_vae(path: str | os.PathLike, *, config: Mapping | None = None, allow_pickle: bool = False, dtype=None,
             meta: bool = False):
    """An external VAE (single file with ``first_stage_model.`` or bare ldm keys, or a diffusers folder)."""
    import torch
    AutoencoderKL = load("diffusers", "AutoencoderKL")

    dtype = dtype or torch.float32
    path = Path(path)
    if path.is_dir():
        return _diffusers_module(path, AutoencoderKL, allow_pickle, dtype, "vae", meta)
    state_dict, metadata = read_state_dict(path, allow_pickle, meta)
    arch = detect_arch({k: tuple(v.shape) for k, v in state_dict.items()})
    if arch not in (Arch.VAE, Arch.SD1, Arch.SD2, Arch.SDXL, Arch.SDXL_REFINER):
        raise ModelError(path, "unknown architecture: no VAE keys (encoder./decoder./first_stage_model.)")
    stated = metadata_configs(metadata, path) or {}
    cfg = dict(stated.get("vae") or config or bundled_config("sd15.json")["vae"])
    return _vae_from_state_dict(state_dict, cfg, path, dtype)


def load_controlnet(path: str | os.PathLike, *, name: str | None = None, sha256: str = "",
                    allow_pickle: bool = False, dtype=None) -> LoadedControlNet:
    """A ControlNet single file (``control_model.``, bare ldm or diffusers keys) or diffusers folder."""
    import torch
    ControlNetModel = load("diffusers", "ControlNetModel")

    dtype = dtype or torch.float32
    path = Path(path)
    if path.is_dir():
        arch = detect_folder_arch(path)
        if arch is None or not arch.is_controlnet:
            raise ModelError(path, "unknown architecture: not a diffusers ControlNet folder")
        module = _diffusers_module(path, ControlNetModel, allow_pickle, dtype, "controlnet")
    else:
        state_dict, metadata = read_state_dict(path, allow_pickle)
        arch = detect_arch({k: tuple(v.shape) for k, v in state_dict.items()})
        if arch is None or not arch.is_controlnet:
            raise ModelError(path, "unknown architecture: no ControlNet keys (control_model., input_hint_block, "
                                   "zero_convs, controlnet_cond_embedding)")
        meta = metadata_configs(metadata, path)
        module = build_controlnet(arch, state_dict, (meta or _family_configs(arch))["controlnet"], path, dtype)
    return LoadedControlNet(name=name or path.stem, path=path, arch=arch,
                            short_hash=short_hash(sha256) if sha256 else "", sha256=sha256, module=module)
