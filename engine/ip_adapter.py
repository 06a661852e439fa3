"""IP-Adapter through ControlNet units, as sd-webui-controlnet takes it: an image as the prompt.

A unit whose ``module`` is one of :data:`MODULES` and whose ``model`` is an IP-Adapter file (the h94 layouts:
``image_proj`` / ``ip_adapter`` keys; safetensors with ``image_proj.`` / ``ip_adapter.`` prefixes, or a ``.bin``
pickle holding the two dicts, read only with the pickle opt-in) in ``models/ControlNet`` (or ``models/ipadapter``):

* **Image encoder.** Each reference image is encoded by the CLIP vision model the module names: ViT-H
  (``ip-adapter_clip_sd15``, ``ip-adapter_clip_h``, ``ip-adapter_clip_sdxl_plus_vith``) or ViT-bigG
  (``ip-adapter_clip_sdxl``, ``ip-adapter_clip_g``); ``ip-adapter-auto`` takes the installed encoder whose size fits
  the adapter. The files are looked up where the extension and Forge keep them (:data:`ENCODER_FILES`): a
  transformers ``CLIPVisionModelWithProjection`` state dict, its config read from the shapes. The image is resized
  (bicubic, short side to the encoder's size), centre-cropped and normalised as ``CLIPImageProcessor`` does.
* **Image prompt tokens.** Plain adapters project the image embedding (``image_embeds``), the unconditional rows
  get the projection of a zero embedding; "plus" adapters (a Resampler: ``latents`` in ``image_proj``) and
  full-face adapters (``ip-adapter-full-face_sd15``: ``proj.0`` Linear, GELU, ``proj.2`` Linear, ``proj.3``
  LayerNorm, diffusers' ``IPAdapterFullImageProjection``) project the penultimate hidden states -- a full-face
  adapter every one of them, so its token count is the encoder's (257 for ViT-H at 224 px; part of its variant's
  key, :meth:`IPAdapters.with_tokens`). Their unconditional rows: the projection of the extension's stored ViT-H
  hidden states (:data:`UNCOND_FILE`) where sd-webui-controlnet is installed beside the models folder and pickles
  are allowed (the extension's rule for SD1/SD2 adapters), else of the hidden states of an all-zero image
  (diffusers' ``prepare_ip_adapter_image_embeds``). The projection is diffusers' own module, built by its
  converter. Several images in one unit (the extension's multi-input form: ``image`` as a list) average their
  tokens, the extension's ``ImageEmbed.average_of``.
* **Sampling.** At each model evaluation every unit in its guidance window (the ControlNet rule, ``start <=
  step/steps <= end``) adds ``weight * attention(q, tokens)`` in every cross-attention layer; the UNet runs as the
  export variant of :mod:`export.ip_adapter` (tokens and weights are inputs; nothing is rebuilt per image). When no
  unit is active (or every active weight is 0) the plain UNet runs: weight 0 is exactly no adapter.

Not implemented (refused naming the field): the FaceID / InstantID / PuLID adapters and their modules; the
extension's stored unconditional tokens of the SDXL plus adapters (``clip_vision_vith_uc``: 16 tokens 2048 wide,
used as they are) are replaced by diffusers' zero-image rule.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from core.errors import InvalidRequest, ModelError
from export.ip_adapter import adapter_module, module_key, variant_name

log = logging.getLogger(__name__)

# module -> the CLIP vision encoder it runs ("h": ViT-H, "g": ViT-bigG, None: chosen by the adapter's size)
MODULES: dict[str, str | None] = {
    "ip-adapter_clip_sd15": "h",
    "ip-adapter_clip_h": "h",
    "ip-adapter_clip_sdxl_plus_vith": "h",
    "ip-adapter_clip_sdxl": "g",
    "ip-adapter_clip_g": "g",
    "ip-adapter-auto": None,
}
ENCODER_NAMES = {"h": "CLIP ViT-H", "g": "CLIP ViT-bigG"}
# where the encoders are kept, relative to the model store's root (the webui's models/ folder): Forge's
# models/clip_vision first, then sd-webui-controlnet's download folder beside models/
ENCODER_FILES: dict[str, tuple[str, ...]] = {
    "h": ("clip_vision/CLIP-ViT-H-14.safetensors", "clip_vision/clip_h.safetensors", "clip_vision/clip_h.pth",
          "../extensions/sd-webui-controlnet/annotator/downloads/clip_vision/clip_h.pth"),
    "g": ("clip_vision/CLIP-ViT-bigG.safetensors", "clip_vision/clip_g.safetensors", "clip_vision/clip_g.pth",
          "../extensions/sd-webui-controlnet/annotator/downloads/clip_vision/clip_g.pth"),
}
# sd-webui-controlnet's stored unconditional ViT-H penultimate hidden states (a torch pickle, {"uc": (1, 257, 1280)
# float16}), the negative image prompt of its SD1/SD2 plus and full-face adapters, where the extension is installed
UNCOND_FILE = "../extensions/sd-webui-controlnet/annotator/clipvision/clip_vision_h_uc.data"
# attention heads of the OpenCLIP vision towers by width (ViT-L/H/bigG all have 16); other widths: width / 64
_HEADS = {1024: 16, 1280: 16, 1664: 16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def is_ip_module(module: str | None) -> bool:
    return module in MODULES


# ------------------------------------------------------------------------------------------------- files
def _nested(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in out and rest:
            out[head][rest] = value
    return out


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, dict[str, Any]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` of an h94 IP-Adapter file; ModelError when it is not one or
    is a pickle without the opt-in."""
    from engine.models.checkpoints import load_pickle, read_state_dict

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        obj = load_pickle(path, allow_pickle)
        if isinstance(obj, dict) and isinstance(obj.get("image_proj"), dict):
            state = {"image_proj": dict(obj["image_proj"]), "ip_adapter": dict(obj.get("ip_adapter") or {})}
        else:
            state = _nested(obj if isinstance(obj, dict) else {})
    else:
        flat, _ = read_state_dict(path, allow_pickle)
        state = _nested(flat)
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ModelError(path, "not an IP-Adapter file (no image_proj and ip_adapter weights)")
    return state


def is_adapter_file(path: str | os.PathLike) -> bool:
    """Whether a ControlNet-folder file is an IP-Adapter (a safetensors header, or a pickle's name, is read)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from core.safetensors_header import read_safetensors_header

        try:
            keys = read_safetensors_header(path).shapes
        except Exception:  # noqa: BLE001 - an unreadable file is not an adapter
            return False
        return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)
    return "ip-adapter" in path.name.lower() or "ip_adapter" in path.name.lower()


@dataclass(frozen=True)
class AdapterShape:
    """What an adapter's variant depends on: image tokens, cross-attention width, the CLIP input it projects
    (``clip_dim``: the projected embedding's width, or the hidden width for a plus or full-face adapter, which
    project the penultimate hidden states). A full-face adapter's token count is its encoder's (every hidden
    state is a token: 257 for ViT-H at 224 px), 0 until the encoder is known (:func:`encoder_tokens`)."""

    tokens: int
    cross_dim: int
    clip_dim: int
    plus: bool
    full: bool = False


def adapter_shape(state: Mapping[str, Mapping[str, Any]], field_name: str = "model") -> AdapterShape:
    proj, ip = state["image_proj"], state["ip_adapter"]
    k = ip.get("1.to_k_ip.weight")
    if k is None:
        raise InvalidRequest(field_name, "the IP-Adapter file has no 1.to_k_ip.weight", "an h94 IP-Adapter file")
    cross = int(k.shape[1])
    if "latents" in proj and "proj_in.weight" in proj:
        return AdapterShape(int(proj["latents"].shape[1]), cross, int(proj["proj_in.weight"].shape[1]), True)
    if "proj.weight" in proj and "norm.weight" in proj:
        return AdapterShape(int(proj["proj.weight"].shape[0]) // cross, cross, int(proj["proj.weight"].shape[1]),
                            False)
    faceid = "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj
    if not faceid and all(f"proj.{i}.weight" in proj for i in (0, 2, 3)):  # full-face: Linear, GELU, Linear, LN
        return AdapterShape(0, cross, int(proj["proj.0.weight"].shape[1]), True, full=True)
    kind = "FaceID" if faceid else "unknown"
    raise InvalidRequest(field_name, f"{kind} IP-Adapters are not supported",
                         "ip-adapter_sd15, ip-adapter-plus_sd15, ip-adapter-plus-face_sd15, "
                         "ip-adapter-full-face_sd15, ip-adapter_sdxl, ip-adapter_sdxl_vit-h (and their plus variants)")


def encoder_tokens(image_size: int, patch_size: int) -> int:
    """The hidden states' token count of a CLIP vision encoder: one per patch, plus the class token."""
    return (int(image_size) // int(patch_size)) ** 2 + 1


def image_projection(image_proj: Mapping[str, Any]):
    """diffusers' image projection module (ImageProjection / IPAdapterPlusImageProjection /
    IPAdapterFullImageProjection) of an adapter's ``image_proj`` weights, by diffusers' own converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    module = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, dict(image_proj), low_cpu_mem_usage=False)
    return module.float().eval()


# ------------------------------------------------------------------------------------------------- encoders
def encoder_paths(root: str | os.PathLike, role: str) -> list[Path]:
    root = Path(root)
    return [root / rel for rel in ENCODER_FILES[role]]


def find_encoder(root: str | os.PathLike, role: str) -> Path | None:
    for path in encoder_paths(root, role):
        if path.is_file():
            return path
    return None


def encoder_config(shapes: Mapping[str, tuple]):
    """A transformers CLIPVisionConfig from a CLIPVisionModelWithProjection state dict's shapes."""
    from transformers import CLIPVisionConfig

    patch = shapes["vision_model.embeddings.patch_embedding.weight"]
    hidden, patch_size = int(patch[0]), int(patch[2])
    positions = int(shapes["vision_model.embeddings.position_embedding.weight"][0])
    side = int(round(math.sqrt(positions - 1)))
    layers = len({k.split(".")[3] for k in shapes if k.startswith("vision_model.encoder.layers.")})
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=int(shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]),
        projection_dim=int(shapes["visual_projection.weight"][0]), num_hidden_layers=layers,
        num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)), image_size=side * patch_size,
        patch_size=patch_size, hidden_act="gelu", layer_norm_eps=1e-5)


def load_encoder(path: str | os.PathLike, allow_pickle: bool = False):
    """A CLIPVisionModelWithProjection from a state-dict file (safetensors, or a pickle with the opt-in)."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from engine.models.checkpoints import read_state_dict

    path = Path(path)
    state, _ = read_state_dict(path, allow_pickle)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if "visual_projection.weight" not in state or "vision_model.embeddings.patch_embedding.weight" not in state:
        raise ModelError(path, "not a CLIP vision model with projection (no vision_model./visual_projection keys)")
    model = CLIPVisionModelWithProjection(encoder_config({k: tuple(v.shape) for k, v in state.items()}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(path, f"CLIP vision weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(torch.float32).eval()


def clip_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, size, size) float32 as CLIPImageProcessor: bicubic resize of the short side to
    ``size``, centre crop, scale to [0, 1], normalise with the CLIP mean and std."""
    from PIL import Image

    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    img = Image.fromarray(np.ascontiguousarray(image[..., :3])).resize((new_w, new_h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top:top + size, left:left + size] / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


# ------------------------------------------------------------------------------------------------- units
@dataclass
class LoadedAdapter:
    key: str  # short hash: the variant's name part
    name: str
    path: Path
    shape: AdapterShape
    projection: Any
    ip_adapter: dict = field(repr=False)


@dataclass(frozen=True)
class IPUnit:
    """A prepared IP-Adapter unit: its image-prompt tokens for conditional and unconditional rows (1, N, D)."""

    model: str
    adapter: str  # LoadedAdapter.key
    cond: np.ndarray = field(repr=False, compare=False)
    uncond: np.ndarray = field(repr=False, compare=False)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    module: str = "ip-adapter-auto"
    label: str = ""  # the infotext's model: "name [hash]"
    detected_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    used: dict = field(default_factory=dict, compare=False)
    reference = False  # not a reference_only unit
    ip = True


def unit_images(unit) -> list[np.ndarray]:
    """The unit's reference images as RGB uint8 arrays (one, or the multi-input list)."""
    from engine.controlnet.images import as_array, hwc3

    images = unit.image if isinstance(unit.image, (list, tuple)) else [unit.image]
    return [hwc3(as_array(img)) for img in images]


class IPAdapters:
    """The IP-Adapter files and CLIP vision encoders of an engine, loaded on first use (the last request's kept)."""

    def __init__(self, store, allow_pickle: bool = False):
        self.store = store
        self.allow_pickle = allow_pickle
        self.adapters: dict[tuple, LoadedAdapter] = {}
        self.encoders: dict[str, Any] = {}
        self._uncond: dict[str, Any] = {}  # UNCOND_FILE's path -> its float32 tensor (None: not usable)
        self._prepared: dict[int, tuple] = {}  # id(request unit) -> (unit, result): the hires pass reuses the first's

    def adapter(self, name: str, field_name: str) -> LoadedAdapter:
        from engine.models.family import Kind

        entry = self.store.resolve(name, Kind.CONTROLNET, field=field_name)
        sha = self.store.hashes.sha256(entry.path)
        cache_key = (str(entry.path), sha)
        if cache_key not in self.adapters:
            try:
                state = read_adapter(entry.path, self.allow_pickle)
            except ModelError as exc:
                raise InvalidRequest(field_name, str(exc), "an IP-Adapter model (image_proj / ip_adapter weights)") \
                    from None
            shape = adapter_shape(state, field_name)
            self.adapters = {k: v for k, v in self.adapters.items() if k[0] != str(entry.path)}
            self.adapters[cache_key] = LoadedAdapter(sha[:10], entry.name, entry.path, shape,
                                                     image_projection(state["image_proj"]), state["ip_adapter"])
        return self.adapters[cache_key]

    def stored_uncond(self, adapter: LoadedAdapter, shape) -> Any:
        """The extension's stored unconditional hidden states (:data:`UNCOND_FILE`, its ``{"uc": (1, 257, 1280)}``
        of CLIP ViT-H) when the extension is installed beside the models folder, the engine allows pickles (it is
        one), the adapter is an SD1/SD2 plus or full-face one (the extension's rule: its SDXL plus adapters take
        another, unprojected) and the tensor has the encoder's hidden-state ``shape``; else None (the zero image)."""
        import torch

        from engine.models.checkpoints import load_pickle

        if adapter.shape.cross_dim == 2048:
            return None
        path = Path(self.store.root) / UNCOND_FILE
        if not path.is_file():
            return None
        key = str(path)
        if key not in self._uncond:
            try:
                obj = load_pickle(path, self.allow_pickle, "unconditional hidden states file")
                self._uncond[key] = obj["uc"].to(torch.float32) if isinstance(obj, dict) else None
            except (ModelError, KeyError, AttributeError) as exc:
                log.info("%s: not used (%s); the negative image prompt is the zero image's", path, exc)
                self._uncond[key] = None
        uc = self._uncond[key]
        return uc if uc is not None and tuple(uc.shape) == tuple(shape) else None

    def with_tokens(self, adapter: LoadedAdapter, tokens: int) -> LoadedAdapter:
        """A full-face adapter as it runs with an encoder of ``tokens`` hidden states: the token count is part of
        its UNet variant (the ``ip_tokens`` input's shape), so it is part of its key (``{sha}-{tokens}``)."""
        cache_key = (str(adapter.path), adapter.key, tokens)
        if cache_key not in self.adapters:
            self.adapters[cache_key] = replace(adapter, key=f"{adapter.key}-{tokens}",
                                               shape=replace(adapter.shape, tokens=tokens))
        return self.adapters[cache_key]

    def encoder_for(self, module: str, adapter: LoadedAdapter, field_name: str):
        """The CLIP vision encoder of ``module`` for ``adapter`` (refused naming ``field_name`` when none is
        installed or its size does not fit the adapter)."""
        role = MODULES[module]
        roles = [role] if role is not None else ["h", "g"]
        tried = []
        for r in roles:
            path = find_encoder(self.store.root, r)
            if path is None:
                tried.append(r)
                continue
            key = str(path)
            if key not in self.encoders:
                self.encoders[key] = load_encoder(path, self.allow_pickle)
            enc = self.encoders[key]
            want = enc.config.hidden_size if adapter.shape.plus else enc.config.projection_dim
            if want == adapter.shape.clip_dim:
                return enc
            if role is not None:
                raise InvalidRequest(f"{field_name}.module", f"{module!r} runs the {ENCODER_NAMES[r]} encoder "
                                     f"({want} wide), the adapter {adapter.name!r} takes {adapter.shape.clip_dim}",
                                     "the module of the adapter's encoder, or ip-adapter-auto")
        places = ", ".join(f"models/{rel}" for r in roles for rel in ENCODER_FILES[r])
        raise InvalidRequest(f"{field_name}.module", f"no CLIP vision encoder installed for {module!r} that fits "
                             f"the adapter {adapter.name!r}", f"a CLIP vision model in one of: {places}")

    def prepare(self, unit, field_name: str, check: Callable[[], None] | None = None) -> tuple[IPUnit, LoadedAdapter]:
        """A request unit -> its :class:`IPUnit` (the reference images encoded and projected; once per request
        unit: the hires fix's pass reuses the first pass's)."""
        import torch

        hit = self._prepared.get(id(unit))
        if hit is not None and hit[0] is unit:
            return hit[1]

        adapter = self.adapter(unit.model, f"{field_name}.model")
        encoder = self.encoder_for(unit.module, adapter, field_name)
        if adapter.shape.full:
            adapter = self.with_tokens(adapter, encoder_tokens(encoder.config.image_size, encoder.config.patch_size))
        size = int(encoder.config.image_size)
        images = unit_images(unit)
        conds, unconds = [], []
        with torch.inference_mode():
            for img in images:
                if check is not None:
                    check()
                pixels = torch.from_numpy(clip_pixels(img, size))
                if adapter.shape.plus:
                    out = encoder(pixels, output_hidden_states=True)
                    cond = adapter.projection(out.hidden_states[-2])
                    stored = self.stored_uncond(adapter, out.hidden_states[-2].shape)
                    if stored is None:  # diffusers' rule: the hidden states of an all-zero image
                        stored = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
                    uncond = adapter.projection(stored)
                else:
                    embeds = encoder(pixels).image_embeds
                    cond = adapter.projection(embeds)
                    uncond = adapter.projection(torch.zeros_like(embeds))
                conds.append(cond.float().numpy())
                unconds.append(uncond.float().numpy())
        cond = np.mean(np.stack(conds), axis=0).astype(np.float32)
        uncond = np.mean(np.stack(unconds), axis=0).astype(np.float32)
        prepared = IPUnit(unit.model, adapter.key, cond, uncond, float(unit.weight), float(unit.guidance_start),
                          float(unit.guidance_end), unit.module, f"{adapter.path.stem} [{adapter.key[:8]}]",
                          detected_map=images[0],
                          used={"processor_res": unit.processor_res, "threshold_a": unit.threshold_a,
                                "threshold_b": unit.threshold_b})
        if len(self._prepared) >= 16:
            self._prepared.clear()
        self._prepared[id(unit)] = (unit, (prepared, adapter))
        return prepared, adapter

    def attach(self, backend, adapter: LoadedAdapter, unet, model_name: str = "", field_name: str = "model") -> None:
        """Adds the adapter's ``to_k_ip`` / ``to_v_ip`` module to the backend's modules (once); an adapter that
        does not fit the UNet is refused naming ``field_name``."""
        modules = backend._components  # the backend's module dict (ComponentsMixin)
        key = module_key(adapter.key)
        if key not in modules:
            try:
                modules[key] = adapter_module(adapter.ip_adapter, unet, adapter.shape.tokens)
            except ValueError as exc:
                raise InvalidRequest(field_name, f"the IP-Adapter {adapter.name!r} does not fit the model "
                                     f"{model_name!r}: {exc}", "an IP-Adapter made for this model's family") from None


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


def _header_shapes(path: Path) -> dict[str, tuple] | None:
    """A safetensors file's tensor shapes (None for a pickle: known only by unpickling it)."""
    if path.suffix.lower() != ".safetensors":
        return None
    from core.safetensors_header import read_safetensors_header

    return read_safetensors_header(path).shapes


def check_units(store, request, allow_pickle: bool) -> None:
    """The submit-time checks of a request's IP-Adapter units, from file headers alone (engine.admission): a
    pickle adapter without the opt-in, a file that is not an IP-Adapter or an unsupported kind, no installed encoder
    for the module, an encoder whose width does not fit the adapter -- each an InvalidRequest naming the field.
    Whether the adapter fits the checkpoint is checked when the unit runs (the UNet's layers tell)."""
    from engine.models.family import Kind

    for k, unit in enumerate(request.controlnet_units):
        field_name = f"controlnet_units[{k}]"
        if not is_ip_module(unit.module):
            if unit.model not in (None, "None") and _names_adapter(store, unit.model):
                raise InvalidRequest(f"{field_name}.module", f"{unit.model!r} is an IP-Adapter model, which runs "
                                     f"with an IP-Adapter module, not {unit.module!r}", ", ".join(MODULES))
            continue
        try:
            entry = store.resolve(unit.model, Kind.CONTROLNET, field=f"{field_name}.model")
        except Exception:  # noqa: BLE001 - the model check names it
            continue
        shapes = _header_shapes(entry.path)
        if shapes is None:
            if not allow_pickle:
                raise InvalidRequest(f"{field_name}.model", f"{entry.name!r} is a pickle, which can run code when "
                                     "loaded and is refused", "a .safetensors IP-Adapter, or a server started with "
                                     "allow_pickle")
            continue
        state = _nested({key: _Shape(s) for key, s in shapes.items()})
        if not state["image_proj"] or not state["ip_adapter"]:
            raise InvalidRequest(f"{field_name}.model", f"{entry.name!r} is not an IP-Adapter file (no image_proj "
                                 "and ip_adapter weights)", "an IP-Adapter model with an ip-adapter module")
        shape = adapter_shape(state, f"{field_name}.model")
        role = MODULES[unit.module]
        roles = [role] if role is not None else ["h", "g"]
        found = [(r, p) for r in roles for p in [find_encoder(store.root, r)] if p is not None]
        if not found:
            places = ", ".join(f"models/{rel}" for r in roles for rel in ENCODER_FILES[r])
            raise InvalidRequest(f"{field_name}.module", f"no CLIP vision encoder installed for {unit.module!r}",
                                 f"a CLIP vision model in one of: {places}")
        widths = []
        for r, path in found:
            enc = _header_shapes(path)
            if enc is None:
                return  # a pickle encoder: its width is checked when it is loaded
            width = (enc["vision_model.embeddings.patch_embedding.weight"][0] if shape.plus
                     else enc["visual_projection.weight"][0])
            if width == shape.clip_dim:
                break
            widths.append((r, width))
        else:
            r, width = widths[0]
            raise InvalidRequest(f"{field_name}.module", f"{unit.module!r} runs the {ENCODER_NAMES[r]} encoder "
                                 f"({width} wide), the adapter {entry.name!r} takes {shape.clip_dim}",
                                 "the module of the adapter's encoder, or ip-adapter-auto")


def _names_adapter(store, name: str) -> bool:
    """Whether the ControlNet-folder model ``name`` is an IP-Adapter safetensors file (its header's keys)."""
    from engine.models.family import Kind

    try:
        path = store.resolve(name, Kind.CONTROLNET).path
    except Exception:  # noqa: BLE001 - the model check names it
        return False
    return path.suffix.lower() == ".safetensors" and is_adapter_file(path)


def _fp32_bytes(path: Path) -> int:
    """What a weights file holds once loaded as float32 modules (a safetensors header's element count; a pickle:
    its size, read as float32)."""
    if path.suffix.lower() == ".safetensors":
        from core.safetensors_header import read_safetensors_header

        shapes = read_safetensors_header(path).shapes
        return 4 * sum(math.prod(s) for s in shapes.values())
    return path.stat().st_size


def memory_bytes(store, request) -> int:
    """What a request's IP-Adapter units hold while it runs (engine.memory): each distinct adapter file and CLIP
    vision encoder as float32 torch weights (the encoder's activations for one 224x224 image are small beside
    them). Units the store cannot resolve count nothing (the submit's model check names them)."""
    from engine.models.family import Kind

    files: set[Path] = set()
    for unit in request.controlnet_units:
        if not is_ip_module(unit.module):
            continue
        try:
            files.add(store.resolve(unit.model, Kind.CONTROLNET).path)
        except Exception:  # noqa: BLE001 - named by the model check
            continue
        roles = [MODULES[unit.module]] if MODULES[unit.module] else ["h", "g"]
        found = [p for p in (find_encoder(store.root, r) for r in roles) if p is not None]
        if found:
            files.add(max(found, key=lambda p: p.stat().st_size))
    return sum(_fp32_bytes(p) for p in files)


VIT_H_TOKENS = 257  # the hidden states of CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token


def attention_tokens(store, request) -> int:
    """The image-prompt tokens the UNet's IP-Adapter attention takes at once (engine.memory: its score arrays are
    rows x heads x latent pixels x this): the largest over the request's adapters of units x tokens (plain: the
    projection's, plus: the Resampler's queries, full-face: the encoder's hidden states, from its header; 257 for
    a pickled ViT-H encoder). From headers; what the store cannot resolve or read counts nothing."""
    from engine.models.family import Kind

    counts: dict[Path, list] = {}
    for unit in request.controlnet_units:
        if not is_ip_module(unit.module):
            continue
        try:
            path = store.resolve(unit.model, Kind.CONTROLNET).path
            shapes = _header_shapes(path)
            shape = None if shapes is None else adapter_shape(_nested({k: _Shape(s) for k, s in shapes.items()}))
        except Exception:  # noqa: BLE001 - the submit checks name it
            continue
        tokens = VIT_H_TOKENS if shape is None else shape.tokens  # a pickle: the most an h94 adapter takes
        if shape is not None and shape.full:
            roles = [MODULES[unit.module]] if MODULES[unit.module] else ["h", "g"]
            found = [p for p in (find_encoder(store.root, r) for r in roles) if p is not None]
            enc = _header_shapes(found[0]) if found else None
            tokens = (int(enc["vision_model.embeddings.position_embedding.weight"][0]) if enc is not None
                      else VIT_H_TOKENS)
        entry = counts.setdefault(path, [0, tokens])
        entry[0] += 1
    return max((units * tokens for units, tokens in counts.values()), default=0)


class IPInjection:
    """The IP-Adapter units of one sampling pass: per model evaluation, the variant's name suffix and feeds."""

    def __init__(self, units: Sequence[IPUnit], steps: int):
        self.units = list(units)
        self.steps = steps
        order: list[str] = []
        for u in self.units:
            if u.adapter not in order:
                order.append(u.adapter)
        self.order = order

    def feeds(self, base: str, step: int, cond_mask: np.ndarray | None, n_rows: int, like) -> tuple[str, dict] | None:
        """``(component, extra feeds)`` of the variant for this evaluation, or None when no unit acts (the plain
        component runs)."""
        from engine.arrays import as_like
        from engine.controlnet.units import active

        if not any(u.weight != 0 and active(u, step, self.steps) for u in self.units):
            return None
        mask = np.ones(n_rows, dtype=np.float32) if cond_mask is None else np.asarray(cond_mask, np.float32)
        extra, parts = {}, []
        for i, key in enumerate(self.order):
            units = [u for u in self.units if u.adapter == key]
            tokens = np.stack([np.where(mask[:, None, None] > 0.5, u.cond[0][None], u.uncond[0][None])
                               for u in units], axis=1).astype(np.float32)
            scale = np.asarray([[u.weight if active(u, step, self.steps) else 0.0 for u in units]] * n_rows,
                               dtype=np.float32)
            extra[f"ip_tokens_{i}"] = as_like(tokens, like)
            extra[f"ip_scale_{i}"] = as_like(scale, like)
            parts.append((key, len(units)))
        return variant_name(base, parts), extra

